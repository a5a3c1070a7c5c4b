"""PROBE speed: batched (length-sorted, left-padded, decoder body only, hooks keep the last
position) vs the audited design (one prompt per forward pass through the full model with
output_hidden_states, every position of every layer materialised, then sliced). Same prompts,
same process, both timed here; prints times, tokens/s, achieved GFLOP/s against this machine's
measured matmul rate, and the ratio.

    python benchmarks/probe_speed.py                       # demo model, 128 + 128 built-in prompts
    python benchmarks/probe_speed.py --synthetic llama3-8b --device cuda --dtype bfloat16

--synthetic builds random weights of a named shape (no download), with random token ids whose
lengths follow the demo prompts' chat-formatted lengths.

--write-results also replaces the "probe-speed" section of benchmarks/RESULTS.md (results_md.py):
the CPU run on the demo model with both designs. Its GPU table ("probe-speed-gpu") gathers the runs
of several --synthetic shapes, which no single run covers: paste it with results_md.py.
"""

from __future__ import annotations

import argparse
import platform
import random
import resource
import time

import torch

import results_md
from obliteratus.batching import Encoded
from obliteratus.models.adapters import ArchitectureAdapter
from obliteratus.probe import collect

SHAPES = {  # name: (family config class, kwargs)
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
    "llama3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama3-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTION = "probe-speed"  # of benchmarks/RESULTS.md


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 0, reps: int = 10) -> float:
    n = n or (8192 if device.type == "cuda" else 2048)  # big enough to reach the device's peak
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def load(args):
    if args.synthetic:
        import transformers

        cls_name, kwargs = SHAPES[args.synthetic]
        config = getattr(transformers, cls_name)(**kwargs)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype])
        model.eval().requires_grad_(False)
        rng = random.Random(0)
        # chat-formatted built-in prompts are 35-75 tokens long under the demo tokenizer
        ids = [[rng.randrange(100, config.vocab_size) for _ in range(rng.randint(35, 75))] for _ in range(2 * args.n)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        return model, [Encoded(ids[: args.n], order=[i for i in order if i < args.n], pad_id=0),
                       Encoded(ids[args.n:], order=[i - args.n for i in order if i >= args.n], pad_id=0)]
    from obliteratus.models.options import ModelSettings
    from obliteratus.data import format_prompts, load_prompts
    from obliteratus.batching import encode_prompts
    from obliteratus.models.load import summon

    loaded = summon(args.model, ModelSettings(dtype=args.dtype, device=args.device))
    sets = []
    for name in ("harmful", "harmless"):
        texts = format_prompts(loaded.tokenizer, load_prompts(f"builtin:{name}")[: args.n])
        sets.append(encode_prompts(loaded.tokenizer, texts, templated=True))
    return loaded.model, sets


@torch.inference_mode()
def per_prompt_loop(model, encoded: Encoded, device) -> torch.Tensor:
    """The audited design: one prompt per forward, full model incl. lm_head, all hidden states."""
    rows = []
    for ids in encoded.ids:
        out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True)
        rows.append(torch.stack([h[0, -1] for h in out.hidden_states]).float().cpu())
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--synthetic", choices=sorted(SHAPES))
    parser.add_argument("--n", type=int, default=128, help="prompts per class")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = auto")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-loop", action="store_true", help="only time the batched PROBE")
    parser.add_argument("--write-results", action="store_true",
                        help=f"also replace the {SECTION!r} section of benchmarks/RESULTS.md (the demo model on the "
                             "CPU, both designs)")
    args = parser.parse_args()
    if args.write_results:
        results_md.check_write(SECTION, partial_run(args))
    device = torch.device(args.device)
    torch.set_grad_enabled(False)

    model, sets = load(args)
    adapter = ArchitectureAdapter(model)
    n_tokens = sum(e.n_tokens for e in sets)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    peak = matmul_gflops(device, DTYPES[args.dtype])
    flops = 2 * params * n_tokens  # forward-pass FLOP floor (matmuls of the decoder body)

    collect(adapter, sets[0], 1, args.batch_size or 0)  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    batched = [collect(adapter, e, 1, args.batch_size) for e in sets]
    sync(device)
    t_batched = time.perf_counter() - start

    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={torch.get_num_threads()} "
          f"device={device} dtype={args.dtype} torch={torch.__version__}")
    described = (f"model: {args.synthetic or args.model}  non-embedding params={params / 1e6:.1f}M  "
                 f"prompts={sum(len(e.ids) for e in sets)}  tokens={n_tokens}")
    print(described)
    floor = f"measured matmul rate: {peak:.1f} GFLOP/s; FLOP floor at that rate: {flops / peak / 1e9:.2f} s"
    print(floor)
    print(f"batched PROBE : {t_batched:8.2f} s  {n_tokens / t_batched:9.1f} tok/s  "
          f"{flops / t_batched / 1e9:8.1f} GFLOP/s ({100 * flops / t_batched / 1e9 / peak:.0f}% of matmul rate)")
    if not args.skip_loop:
        start = time.perf_counter()
        looped = [per_prompt_loop(model, e, device) for e in sets]
        sync(device)
        t_loop = time.perf_counter() - start
        # HF's last hidden state has the final norm applied; ours is the raw residual: compare 0..L-1
        err = max(float((b[:, 0, :-1] - l[:, :-1]).abs().max() / l[:, :-1].abs().max()) for b, l in zip(batched, looped))
        print(f"per-prompt loop: {t_loop:8.2f} s  {n_tokens / t_loop:9.1f} tok/s  {flops / t_loop / 1e9:8.1f} GFLOP/s")
        print(f"speed-up batched / loop: {t_loop / t_batched:.2f}x   (max relative difference of activations {err:.1e})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS: {rss:.2f} GiB" + (f"; peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                                       if device.type == "cuda" else ""))
    if args.write_results:  # check_write made sure the loop ran
        def row(design: str, seconds: float) -> str:
            return (f"| {design} | {seconds:.1f} s | {n_tokens / seconds:.0f} | {flops / seconds / 1e9:.1f} "
                    f"({100 * flops / seconds / 1e9 / peak:.0f}% of the measured {peak:.1f} GFLOP/s matmul rate) |")

        table = "\n".join([
            "| design | time | tokens/s | achieved GFLOP/s |", "|---|---|---|---|",
            row("batched PROBE (length-sorted, left-padded, decoder body only, hooks keep 1 position)", t_batched),
            row("one prompt per forward pass, full model with `lm_head`, all hidden states (the audited design)",
                t_loop),
            f"| **ratio** | **{t_loop / t_batched:.2f}×** | | |"])
        what = (f"{len(sets[0].ids)} harmful + {len(sets[1].ids)} harmless built-in prompts, chat-formatted "
                f"({n_tokens:,} tokens), last position of the embedding output and every layer kept; both designs "
                "timed in the same process on the same prompts.")
        results_md.write_section(SECTION, results_md.section_text(
            what, table, f"{described}; {floor}; max relative difference of the activations (layers 0..L-1) "
            f"{err:.1e}; peak RSS {rss:.2f} GiB.", device=str(device), dtype=args.dtype))


def partial_run(args) -> list[str]:
    """Why this run does not cover the probe-speed section (empty: it does)."""
    why = []
    if args.synthetic:
        why.append("--synthetic: the GPU runs of several shapes are the 'probe-speed-gpu' section; paste that "
                   "table with `python benchmarks/results_md.py probe-speed-gpu FILE`")
    elif args.model != "demo":
        why.append(f"--model {args.model}: the section is the demo model's")
    if args.device != "cpu":
        why.append(f"--device {args.device}: the section is the CPU run")
    if args.skip_loop:
        why.append("--skip-loop leaves out the one-prompt-per-pass design")
    return why


if __name__ == "__main__":
    main()
