"""The streaming bake's memory and time on a checkpoint the size of Llama-3-8B (issue 27).

    python benchmarks/bake_stream.py --dir /work/bake-bench            # about 16 GB on disk, twice
    python benchmarks/bake_stream.py --dir /tmp/b --scale 0.25         # a quarter of the layers' width
    python benchmarks/bake_stream.py --dir /work/bake-bench --write-results

Builds a synthetic Llama-3-8B-shaped checkpoint in DIR/src (random bfloat16: d = 4096, 32 layers,
MLP 14336, 8 KV heads, vocabulary 128256, untied lm_head; about 16 GB in shards of at most 4.6 GB),
then times, each in its own process (its peak RSS read from that process):

* the I/O floor: a plain copy of the same files, read and written in 64 MiB pieces (run before and
  after the bake, the faster one counted: the second read may come from the page cache);
* the bake (``export.bake.bake``) of a plan that projects one direction out of every o_proj,
  down_proj and the token embeddings (5.8 GB of the 16 edited, 10 GB copied);
* a process that only imports the bake and reads the plan: the fixed overhead.

Prints peak RSS next to the largest shard and the largest edited tensor, and the bake's time against
the copy's. Goals (the issue's): peak RSS <= largest shard + 10 % + the fixed overhead; time <= 1.5x
the copy. It then checks one edited tensor against ``edit_tensor`` on the source and one untouched
tensor byte for byte, and removes what it wrote (``--keep`` keeps it).
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
from safetensors.torch import save_file

import results_md

SECTION = "bake-stream"
SHARD = int(4.6e9)  # bytes per shard at most (Meta's own Llama-3-8B shards are 5.0, 5.0, 4.9 and 1.2 GB)


def shapes(scale: float) -> dict[str, tuple[int, ...]]:
    d, inter, layers, vocab, kv = int(4096 * scale), int(14336 * scale), 32, 128256, int(1024 * scale)
    out = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                    p + "mlp.down_proj.weight": (d, inter), p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,)})
    out.update({"model.norm.weight": (d,), "lm_head.weight": (vocab, d)})
    return out


def build(src: Path, scale: float) -> list[int]:
    """The checkpoint: shards, index, config. Returns the shard sizes in bytes."""
    src.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, sizes = {}, {}, 0, []

    def flush():
        nonlocal shard, size
        name = f"model-{len(sizes) + 1:05d}.safetensors"
        save_file(shard, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        sizes.append((src / name).stat().st_size)
        shard, size = {}, 0

    for name, shape in shapes(scale).items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD and shard:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    n = len(sizes)
    weight_map = {k: v.replace(".safetensors", f"-of-{n:05d}.safetensors") for k, v in weight_map.items()}
    for i in range(1, n + 1):
        (src / f"model-{i:05d}.safetensors").rename(src / f"model-{i:05d}-of-{n:05d}.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
    d = int(4096 * scale)
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d, "num_hidden_layers": 32,
        "intermediate_size": int(14336 * scale), "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "torch_dtype": "bfloat16", "tie_word_embeddings": False}))
    return sizes


def write_plan(path: Path, scale: float) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from obliteratus.export.plan import EditPlanFile, PlannedOp

    d = int(4096 * scale)
    q = torch.nn.functional.normalize(torch.randn(1, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    ops = [PlannedOp(("model.embed_tokens.weight",), (128256, d), "basis.0", None, 1.0, "in_out")]
    for name, shape in shapes(scale).items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            ops.append(PlannedOp((name,), shape, "basis.0", None, 1.0, "out_in"))
    EditPlanFile(ops, {"basis.0": q}, {"model_type": "llama", "source": "synthetic"}).save(path)
    return [op.names[0] for op in ops]


CHILD = r"""
import json, sys, time
from pathlib import Path
job, plan, src, out = sys.argv[1:5]
t0 = time.perf_counter()
if job == "copy":
    Path(out).mkdir()
    for f in sorted(Path(src).iterdir()):
        with open(f, "rb") as a, open(Path(out) / f.name, "wb") as b:
            while piece := a.read(64 << 20):
                b.write(piece)
else:
    from obliteratus.export.bake import bake
    from obliteratus.export.plan import load_plan
    loaded = load_plan(plan)
    if job == "bake":  # (timed from here: the imports are the overhead job's)
        t0 = time.perf_counter()
        bake(loaded, src, out)
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, kept across exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "rss": hwm * 1024}))
"""


def child(job: str, plan: Path, src: Path, out: Path) -> dict:
    env_path = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run([sys.executable, "-c", CHILD, job, str(plan), str(src), str(out)], check=True,
                          capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="work directory (must not exist); needs 2x the size")
    parser.add_argument("--scale", type=float, default=1.0, help="width factor of the layers (1 = Llama-3-8B)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--write-results", action="store_true", help="replace the bake-stream section of RESULTS.md")
    args = parser.parse_args()
    if args.write_results:
        results_md.check_write(SECTION, [] if args.scale == 1.0 else [f"--scale {args.scale}: the section is 8B"])
    if args.dir.exists():
        raise SystemExit(f"error: {args.dir} exists; give a new work directory")
    src, out, copy = args.dir / "src", args.dir / "baked", args.dir / "copy"
    try:
        t0 = time.perf_counter()
        sizes = build(src, args.scale)
        edited = write_plan(args.dir / "plan.safetensors", args.scale)
        total = sum(sizes)
        print(f"checkpoint: {total / 1e9:.2f} GB in {len(sizes)} shards (largest {max(sizes) / 1e9:.2f} GB), "
              f"built in {time.perf_counter() - t0:.0f} s; plan: {len(edited)} tensors")
        plan = args.dir / "plan.safetensors"
        base = child("overhead", plan, src, out)
        first = child("copy", plan, src, copy)
        shutil.rmtree(copy)
        baked = child("bake", plan, src, out)
        second = child("copy", plan, src, copy)
        shutil.rmtree(copy)
        floor = min(first["seconds"], second["seconds"])
        largest_edit = 128256 * int(4096 * args.scale) * 2
        bound = max(sizes) * 1.1 + base["rss"]
        print(f"copy (read + write, 64 MiB pieces): {first['seconds']:.1f} s and {second['seconds']:.1f} s "
              f"({total / floor / 1e9:.2f} GB/s at best); peak RSS {first['rss'] / 2**30:.2f} GiB")
        print(f"bake: {baked['seconds']:.1f} s = {baked['seconds'] / floor:.2f}x the copy (goal <= 1.5x); "
              f"peak RSS {baked['rss'] / 2**30:.2f} GiB")
        print(f"fixed overhead (imports + plan): {base['rss'] / 2**30:.2f} GiB, {base['seconds']:.1f} s; largest shard {max(sizes) / 2**30:.2f} "
              f"GiB; largest edited tensor {largest_edit / 2**30:.2f} GiB; bound largest shard + 10 % + overhead "
              f"= {bound / 2**30:.2f} GiB: {'met' if baked['rss'] <= bound else 'NOT met'}")
        check(src, out)
        if args.write_results:
            table = "\n".join([
                "| | time | peak RSS |", "|---|---|---|",
                f"| plain copy (read + write, 64 MiB pieces), best of 2 | {floor:.1f} s | {first['rss'] / 2**30:.2f} GiB |",
                f"| `obliteratus bake` | {baked['seconds']:.1f} s (**{baked['seconds'] / floor:.2f}×** the copy) | "
                f"**{baked['rss'] / 2**30:.2f} GiB** |",
                f"| imports + plan only (the fixed overhead) | | {base['rss'] / 2**30:.2f} GiB |"])
            what = (f"A synthetic Llama-3-8B-shaped checkpoint (random bfloat16, {total / 1e9:.2f} GB in {len(sizes)} "
                    f"shards, largest {max(sizes) / 2**30:.2f} GiB); the plan projects one direction out of every "
                    f"o_proj, down_proj and the embeddings ({len(edited)} tensors). Each job in its own process.")
            results_md.write_section(SECTION, results_md.section_text(
                what, table, f"Bound: largest shard + 10 % + overhead = {bound / 2**30:.2f} GiB "
                f"({'met' if baked['rss'] <= bound else 'not met'}); largest edited tensor "
                f"{largest_edit / 2**30:.2f} GiB; one edited tensor equals edit_tensor on the source, one untouched "
                "tensor is byte-identical."))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


def check(src: Path, out: Path) -> None:
    from safetensors import safe_open

    from obliteratus.excise.projection import edit_tensor

    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    d = None
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        with safe_open(str(src / index[name]), "pt") as a, safe_open(str(out / index[name]), "pt") as b:
            before, after = a.get_tensor(name), b.get_tensor(name)
        if name.endswith("o_proj.weight"):
            d = before.shape[0]
            q = torch.nn.functional.normalize(torch.randn(1, d, generator=torch.Generator().manual_seed(1)), dim=-1)
            assert torch.equal(after, edit_tensor(before, q, None, 1.0, "out_in")), "the bake differs from edit_tensor"
        else:
            assert torch.equal(after.view(torch.int16), before.view(torch.int16)), "an untouched tensor changed"
    print("checked: an edited tensor equals edit_tensor on the source; an untouched one is byte-identical")


if __name__ == "__main__":
    main()
