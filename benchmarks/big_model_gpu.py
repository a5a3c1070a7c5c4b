"""Bigger than the machine, measured on one GPU (issue 27): a random-weight Llama-3-8B-shaped model
(no download) through PROBE, VERIFY's generation and one optimizer trial, loaded three ways:

* ``bf16``: the whole model on the GPU;
* ``nf4``: ``model.quantization = "nf4"`` (bitsandbytes; needs its wheel on the machine);
* ``split``: bf16 with ``model.max_memory`` forcing about half of the layers onto the CPU
  (accelerate's device map; those layers stream to the GPU at each forward).

    PYTHONPATH=src python benchmarks/big_model_gpu.py --dir /tmp/big       # one GPU, < 8 minutes
    python benchmarks/big_model_gpu.py --dir /tmp/big --scale 0.03 --device cpu --loads bf16,split  # a smoke run

Each load runs in its own process (peak GPU memory its own). Every time is printed next to the
matmul floor: the forward's FLOPs (2 x the parameters of the decoder's matrices x the tokens) at the
bf16 GEMM rate this GPU reaches (measured here on an 8192^3 product); for generation also the
bandwidth floor (the weights' bytes read once per generated token at the measured copy rate).
The checkpoint is written once to --dir (about 16 GB at scale 1) and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def shape(scale: float, layers: int | None) -> dict:
    """The Llama-3-8B shape with its widths times `scale` (kept multiples of 128: nf4's blocks, heads)."""
    width = lambda n: max(128, int(n * scale) // 128 * 128)  # noqa: E731
    out = dict(SHAPE, hidden_size=width(SHAPE["hidden_size"]), intermediate_size=width(SHAPE["intermediate_size"]))
    heads = max(2, out["hidden_size"] // 128)
    out.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=128)
    if layers:
        out["num_hidden_layers"] = layers
    return out


def tokenizer():
    """A byte-level tokenizer (259 ids) with a chat template: the prompts need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   padding_side="left")
    fast.chat_template = TEMPLATE
    return fast


def build(path: Path, config: dict, device: str) -> int:
    """A random bf16 checkpoint of `config` at `path`; returns the decoder matrices' parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    cfg = LlamaConfig(**config, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="4GB")
    tok.save_pretrained(path)
    matrices = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    del model
    return matrices


def floors(device: str) -> dict:
    """The bf16 GEMM rate (FLOP/s) and the copy bandwidth (bytes/s) this device reaches."""
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    x = torch.empty(256 << 20 if dev.type == "cuda" else 32 << 20, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)

    def best(fn, reps=5):
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    best(lambda: a @ b, 2)
    flops = 2 * n ** 3 / best(lambda: a @ b)
    bandwidth = 2 * x.numel() / best(lambda: y.copy_(x))  # read + write
    return {"flops": flops, "bandwidth": bandwidth}


def one(load: str, path: Path, device: str, out: Path, n: int, tokens: int) -> None:
    """PROBE, VERIFY's generation and one trial of `load`, in this process; the timings to `out`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from optimizer_cost import fixed_params, ours

    from obliteratus.batching import max_positions
    from obliteratus.evaluate.generate import generate
    from obliteratus.models.load import summon
    from obliteratus.optimize.trial import Scorer, scaled_plan
    from obliteratus.pipeline import FixedEdit, prepare_prompts, probe
    from obliteratus.presets import load_preset
    from obliteratus.run import Reporter
    from obliteratus.settings import resolve_settings

    config = json.loads((path / "config.json").read_text())
    model = {"dtype": "bfloat16", "device": device, "cpu_pack": "off"}
    if load == "nf4":
        model["quantization"] = "nf4"
    if load == "split":  # about half the layers' bytes on the device, the rest on the CPU
        layer_bytes = 2 * (4 * config["hidden_size"] ** 2 + 3 * config["hidden_size"] * config["intermediate_size"])
        head = 2 * 2 * config["vocab_size"] * config["hidden_size"]
        budget = head + layer_bytes * config["num_hidden_layers"] // 2
        key = "0" if device.startswith("cuda") else "cpu"
        model["max_memory"] = {key: f"{budget // 2**20}MiB", **({"cpu": "200GiB"} if key == "0" else {})}
        model["offload_dir"] = str(path.parent / "offload")
    settings = resolve_settings(load_preset("basic"), {
        "model": model, "data": {"n_train": n, "n_val": n, "n_test": n},
        "evaluate": {"max_new_tokens": tokens}, "layers": {"method": "fixed", "layer": config["num_hidden_layers"] // 2}})
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    loaded = summon(str(path), settings.model)
    times = {"load": time.perf_counter() - t0}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model))
    sync()
    t0 = time.perf_counter()
    cache = probe(loaded, prompts, settings, Reporter())
    sync()
    times["probe"] = time.perf_counter() - t0
    probe_tokens = sum(len(ids) for c in ("harmful", "harmless") for ids in prompts.part(c, "train")[1].ids)
    choice = FixedEdit(settings)
    choice.distill(loaded, cache, prompts, Reporter())
    harmful = prompts.part("harmful", "test")[1]
    sync()
    t0 = time.perf_counter()
    answers = generate(loaded.model, loaded.tokenizer, harmful, tokens, batch_size=n)
    sync()
    times["generate"] = time.perf_counter() - t0
    steps = max(len(a) for a in answers)
    opts = settings.optimize.study
    scorer = Scorer.build(loaded.model, loaded.tokenizer, prompts.part("harmful", "val")[1],
                          prompts.part("harmless", "val")[1], opts, n)
    params = fixed_params(loaded.adapter.n_layers, "global")
    q, plan = scaled_plan(params, choice.directions.mean_diffs, loaded.adapter.n_layers, 1.0)
    sync()
    t0 = time.perf_counter()
    trial = ours(loaded, scorer, q, plan, settings.excise)
    sync()
    times["trial"] = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    out.write_text(json.dumps({"times": times, "probe_tokens": probe_tokens, "gen_steps": steps, "gen_rows": len(answers),
                               "trial_tokens": trial["tokens_generated"], "peak": peak,
                               "device_map": sorted(set(map(str, (getattr(loaded.model, "hf_device_map", None) or {}).values())))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="work directory (must not exist)")
    parser.add_argument("--scale", type=float, default=1.0, help="width factor (1 = Llama-3-8B)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--loads", default="bf16,nf4,split")
    parser.add_argument("--n", type=int, default=32, help="prompts per class and split")
    parser.add_argument("--tokens", type=int, default=64, help="tokens VERIFY generates")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.dir / "model", args.device, args.out, args.n, args.tokens)
        return
    if args.dir.exists():
        raise SystemExit(f"error: {args.dir} exists; give a new work directory")
    config = shape(args.scale, args.layers)
    try:
        t0 = time.perf_counter()
        matrices = build(args.dir / "model", config, args.device)
        print(f"checkpoint: {matrices / 1e9:.2f} B decoder-matrix parameters, written in {time.perf_counter() - t0:.0f} s")
        fl = floors(args.device)
        print(f"device: {fl['flops'] / 1e12:.1f} TFLOP/s bf16 GEMM, {fl['bandwidth'] / 1e9:.0f} GB/s copy")
        rows = ["| load | where | PROBE | floor | VERIFY generation | floors (FLOPs / bytes) | one trial | peak GPU memory |",
                "|---|---|---|---|---|---|---|---|"]
        for load in args.loads.split(","):
            out = args.dir / f"{load}.json"
            env_cmd = [sys.executable, __file__, "--dir", str(args.dir), "--device", args.device, "--one", load,
                       "--out", str(out), "--n", str(args.n), "--tokens", str(args.tokens)]
            done = subprocess.run(env_cmd)
            if done.returncode != 0:
                rows.append(f"| {load} | failed (exit {done.returncode}) | | | | | | |")
                continue
            r = json.loads(out.read_text())
            t = r["times"]
            probe_floor = 2 * matrices * r["probe_tokens"] / fl["flops"]
            gen_flops = 2 * matrices * r["gen_rows"] * r["gen_steps"] / fl["flops"]
            weight_bytes = matrices * (0.5 if load == "nf4" else 2)
            gen_bytes = weight_bytes * r["gen_steps"] / fl["bandwidth"]
            rows.append(f"| {load} | {', '.join(r['device_map']) or args.device} | {t['probe']:.2f} s | "
                        f"{t['probe'] / probe_floor:.1f}x | {t['generate']:.2f} s ({r['gen_rows']} x {r['gen_steps']} tokens) | "
                        f"{t['generate'] / gen_flops:.0f}x / {t['generate'] / gen_bytes:.1f}x | {t['trial']:.2f} s | "
                        f"{r['peak'] / 2**30:.1f} GiB |")
        print("\n".join(rows))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
