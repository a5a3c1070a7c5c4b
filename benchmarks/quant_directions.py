"""Directions from a quantized load against directions from the full-precision model (issue 27): the
demo model loaded as it is (float32, the dequantized Q4_K_M GGUF), in nf4 and in int8
(``model.quantization``, bitsandbytes' CPU backend), each through PROBE and DISTILL of the ``basic``
preset on the same 64 + 64 train prompts.

    python benchmarks/quant_directions.py                  # about 15 minutes on the 2-core box
    python benchmarks/quant_directions.py --write-results

Prints, for each quantized load: the cosine of its difference-of-means direction with the full
precision one at every layer (min, median, at the layer each picks), the layer each picks, and the
time of PROBE + DISTILL; each load runs in its own process, one after the other (peak RSS too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import results_md

SECTION = "quant-directions"
KINDS = ("none", "nf4", "int8")


def one(kind: str, out: Path) -> None:
    """PROBE + DISTILL of the demo in `kind`; saves mean_diffs [L+1, d] and the chosen layer."""
    from obliteratus.models.load import summon
    from obliteratus.batching import max_positions
    from obliteratus.pipeline import FixedEdit, prepare_prompts, probe
    from obliteratus.presets import load_preset
    from obliteratus.run import Reporter
    from obliteratus.settings import resolve_settings

    settings = resolve_settings(load_preset("basic"), {"model": {"quantization": kind}})
    loaded = summon("demo", settings.model)
    t0 = time.perf_counter()
    prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model))
    cache = probe(loaded, prompts, settings, Reporter())
    choice = FixedEdit(settings)
    choice.distill(loaded, cache, prompts, Reporter())
    seconds = time.perf_counter() - t0
    d = choice.directions
    torch.save({"mean_diffs": d.mean_diffs, "layer": d.layer, "basis": d.basis, "seconds": seconds,
                "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-results", action="store_true", help="replace the quant-directions section")
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.out)
        return
    if args.write_results:
        results_md.check_write(SECTION, [])
    import tempfile

    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            out = Path(tmp) / f"{kind}.pt"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--one", kind, "--out", str(out)], check=True)
            got[kind] = torch.load(out)
            print(f"{kind}: layer {got[kind]['layer']}, PROBE + DISTILL {got[kind]['seconds']:.0f} s "
                  f"(process {time.perf_counter() - t0:.0f} s), peak RSS {got[kind]['rss'] / 2**30:.2f} GiB")
    ref = got["none"]
    rows = ["| load | layer picked | cos at the reference's layer | cos at its own layer | min cos (layers 1..L) "
            "| median cos | PROBE + DISTILL | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    per_layer = {}
    for kind in KINDS:
        g = got[kind]
        a, b = ref["mean_diffs"].double(), g["mean_diffs"].double()  # [L+1, d]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
        cos = cos[1:]  # layer 0 is the embedding output: the same for every load (embeddings are not quantized)
        per_layer[kind] = [round(float(c), 4) for c in cos]
        rows.append(f"| {'full precision (float32)' if kind == 'none' else kind} | {g['layer']} | "
                    f"{float(cos[ref['layer'] - 1]):.4f} | {float(cos[g['layer'] - 1]):.4f} | {float(cos.min()):.4f} | "
                    f"{float(cos.median()):.4f} | {g['seconds']:.0f} s | {g['rss'] / 2**30:.2f} GiB |")
    table = "\n".join(rows)
    print(table)
    print("per-layer cosines (layers 1..L):", json.dumps(per_layer))
    if args.write_results:
        results_md.write_section(SECTION, results_md.section_text(
            "The demo model (Qwen2.5-Coder-0.5B-Instruct, its safetensors cache: float32 dequantized from the "
            "Q4_K_M GGUF) loaded three ways, each through PROBE and DISTILL of `basic` (64 + 64 built-in train "
            "prompts, last position) in its own process: cosine of each layer's difference of means with the "
            "full-precision one.", table,
            "Per-layer cosines (layers 1..24): " + "; ".join(
                f"{k}: {', '.join(f'{c:.3f}' for c in v)}" for k, v in per_layer.items() if k != "none")))


if __name__ == "__main__":
    main()
