"""PROBE speed: batched (length-sorted, left-padded, decoder body only, hooks keep the last
position) vs the audited design (one prompt per forward pass through the full model with
output_hidden_states, every position of every layer materialised, then sliced). Same prompts,
same process, both timed here; prints times, tokens/s, achieved GFLOP/s against this machine's
measured matmul rate, and the ratio.

    python benchmarks/probe_speed.py                       # demo model, 128 + 128 built-in prompts
    python benchmarks/probe_speed.py --synthetic llama3-8b --device cuda --dtype bfloat16

--synthetic builds random weights of a named shape (no download), with random token ids whose
lengths follow the demo prompts' chat-formatted lengths.
"""

from __future__ import annotations

import argparse
import platform
import random
import resource
import time

import torch

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
    from obliteratus.settings import ModelSettings
    from obliteratus.data import format_prompts, load_prompts
    from obliteratus.batching import encode_prompts
    from obliteratus.models import summon

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
    args = parser.parse_args()
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
    print(f"model: {args.synthetic or args.model}  non-embedding params={params / 1e6:.1f}M  "
          f"prompts={sum(len(e.ids) for e in sets)}  tokens={n_tokens}")
    print(f"measured matmul rate: {peak:.1f} GFLOP/s; FLOP floor at that rate: {flops / peak / 1e9:.2f} s")
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


if __name__ == "__main__":
    main()
