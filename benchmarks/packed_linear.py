"""CPU fast path: Linear layers on oneDNN-packed weights (models/packed.py) vs plain F.linear, and
PROBE with the template prefix shared vs full batches. Same model, prompts and process.

1. the demo model's matrix shapes at 1 … 2048 rows: GFLOP/s of F.linear and of the packed kernel;
2. the optimizer's refusal count (early-stopping generation of the 32 harmful validation prompts,
   32 tokens, one batch: the bulk of a trial), plain and packed alternately, three times each:
   median times and verdicts;
3. VERIFY of the unedited model (evaluate_model: 64 + 64 test prompts, 64 tokens, KL reference,
   no perplexity), plain then packed: times and whether every answer is the same;
4. PROBE of the 128 + 128 train prompts: full batches on plain GEMM (the previous PROBE) vs the
   shared prefix on packed weights (the current one): times and the largest activation gap.

    python benchmarks/packed_linear.py          # demo model, about 9 minutes on a 2-core CPU
    python benchmarks/packed_linear.py --write-results   # also replace RESULTS.md's "packed-linear" section
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch
from torch.nn import functional as F

import results_md
from obliteratus.settings import resolve_settings
from obliteratus.evaluate import early, evaluate_model
from obliteratus.models import packed
from obliteratus.models.load import summon
from obliteratus.pipeline import prepare_prompts
from obliteratus.presets import load_preset
from obliteratus.probe import collect

SHAPES = {"q/k/v": (896, 1152), "o_proj": (896, 896), "gate/up": (896, 4864), "down": (4864, 896),
          "lm_head": (896, 151936)}
ROWS = (1, 32, 128, 512, 2048)
SECTION = "packed-linear"  # of benchmarks/RESULTS.md


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def rate(fn, flops: float, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return flops * reps / (time.perf_counter() - start) / 1e9


def kernels() -> dict[tuple[str, int], tuple[float, float]]:
    """GFLOP/s of F.linear and of the packed kernel, printed and returned per (shape, rows)."""
    print(f"{'shape':<9} {'rows':>5} {'F.linear':>9} {'packed':>8}  GFLOP/s")
    out = {}
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k)
        pw = torch.ops.mkldnn._reorder_linear_weight(w, packed.HINT_ROWS)
        for rows in ROWS:
            x = torch.randn(rows, k)
            reps = max(2, int(3e9 / (2 * rows * k * n)))
            plain = rate(lambda: F.linear(x, w), 2 * rows * k * n, reps)
            fast = rate(lambda: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], ""), 2 * rows * k * n, reps)
            print(f"{name:<9} {rows:>5} {plain:>9.0f} {fast:>8.0f}", flush=True)
            out[name, rows] = (plain, fast)
    return out


def kernel_table(rates: dict[tuple[str, int], tuple[float, float]]) -> str:
    """The section's first table: "plain / packed" GFLOP/s, one row per row count, one column per shape."""
    head = " | ".join(f"{name} {k}→{n}" for name, (k, n) in SHAPES.items())
    lines = [f"| rows | {head} |", "|---|" + "---|" * len(SHAPES)]
    for rows in ROWS:
        lines.append(f"| {rows} | " + " | ".join(f"{rates[name, rows][0]:.0f} / {rates[name, rows][1]:.0f}"
                                                 for name in SHAPES) + " |")
    return "\n".join(lines)


def set_packed(model, on: bool) -> None:
    if on:
        packed.pack_linears(model)
    else:
        packed.unpack_linears(model)


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds:7.1f} s", flush=True)
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--skip-verify", action="store_true", help="leave out part 3 (about 4 minutes)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"also replace the {SECTION!r} section of benchmarks/RESULTS.md (the demo model, every "
                             "part)")
    args = parser.parse_args()
    if args.write_results:
        partial = [] if args.model == "demo" else [f"--model {args.model}: the section is the demo model's"]
        if args.skip_verify:
            partial.append("--skip-verify leaves out part 3 (VERIFY)")
        results_md.check_write(SECTION, partial)
    settings = resolve_settings(load_preset("basic"), {"model": {"cpu_pack": "off"},
                                                      "evaluate": {"perplexity": False}})
    loaded = summon(args.model, settings.model)
    model, tok = loaded.model, loaded.tokenizer
    prompts = prepare_prompts(tok, settings)
    a = torch.randn(2048, 2048)
    matmul = rate(lambda: a @ a, 2 * 2048**3, 5)
    print(f"{platform.node()} · {torch.get_num_threads()} threads · torch {torch.__version__} · {args.model} · "
          f"2048² matmul {matmul:.0f} GFLOP/s", flush=True)
    print("1. kernels")
    rates = kernels()

    val = prompts.encoded["harmful.val"]
    test = prompts.part("harmful", "test"), prompts.part("harmless", "test")
    train = [prompts.encoded[f"{c}.train"] for c in ("harmful", "harmless")]
    results: dict[str, dict] = {"plain": {"t_judge": []}, "packed": {"t_judge": []}}
    early.judge(model, tok, val.subset([0, 1]), 4, 2, share_prefix=True)  # warm-up
    rss = rss_gib()
    # This box's speed drifts by 10-20% within minutes: the refusal count alternates plain and
    # packed three times (medians compared), VERIFY and PROBE run once each, plain first.
    for mode in ("plain", "packed") * 3:
        set_packed(model, mode == "packed")
        r = results[mode]
        r["judge"], seconds = timed(f"2. refusal count, 32 prompts x 32 tokens, {mode}",
                                    lambda: early.judge(model, tok, val, 32, 32, share_prefix=True))
        r["t_judge"].append(seconds)
    for mode in ("plain", "packed"):
        set_packed(model, mode == "packed")
        r = results[mode]
        if not args.skip_verify:
            r["verify"], r["t_verify"] = timed(f"3. VERIFY (64 + 64 prompts, 64 tokens), {mode}",
                                               lambda: evaluate_model(model, tok, *test, settings.evaluate,
                                                                      make_reference=True))
        share = mode == "packed"
        r["probe"], r["t_probe"] = timed(f"4. PROBE 128 + 128, {'shared prefix, packed' if share else 'full, plain'}",
                                         lambda: [collect(loaded.adapter, enc, 1, 32, share_prefix=share)
                                                  for enc in train])
    p, q = results["plain"], results["packed"]
    print("\nplain vs packed (ratio = plain time / packed time)")
    pj, qj = statistics.median(p["t_judge"]), statistics.median(q["t_judge"])
    same_verdicts = p["judge"].refused == q["judge"].refused
    print(f"  refusal count  {pj:6.1f} s  {qj:6.1f} s  {pj / qj:.2f}x   (medians of 3)  "
          f"same verdicts: {same_verdicts} ({q['judge'].count} refusals)")
    parts = [("the optimizer's refusal count: 32 harmful validation prompts, 32 tokens, one batch (median of 3, "
              "alternating)", pj, qj, f"same verdicts: {same_verdicts} ({q['judge'].count} refusals)")]
    if not args.skip_verify:
        pv, qv = p["verify"], q["verify"]
        same = (pv.harmful_responses == qv.harmful_responses and pv.harmless_responses == qv.harmless_responses)
        print(f"  VERIFY         {p['t_verify']:6.1f} s  {q['t_verify']:6.1f} s  {p['t_verify'] / q['t_verify']:.2f}x   "
              f"same 128 answers: {same}; refusal {pv.metrics['refusal']:.3f} / {qv.metrics['refusal']:.3f}")
        parts.append(("VERIFY of the unedited model, 64 + 64 prompts, 64 tokens, batches of 128", p["t_verify"],
                      q["t_verify"], f"same 128 answers: {same}; refusal {pv.metrics['refusal']:.3f} / "
                                     f"{qv.metrics['refusal']:.3f}"))
    gap = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(p["probe"], q["probe"]))
    print(f"  PROBE          {p['t_probe']:6.1f} s  {q['t_probe']:6.1f} s  {p['t_probe'] / q['t_probe']:.2f}x   "
          f"largest activation gap {gap:.1e} of the largest activation")
    parts.append(("PROBE 128 + 128 train prompts: full batches on plain GEMM vs shared prefix on packed weights",
                  p["t_probe"], q["t_probe"], f"activations within {gap:.1e} of the largest"))
    memory = (f"RSS before packing {rss:.2f} GiB, after {rss_gib():.2f} GiB; peak "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(memory)
    if args.write_results:
        model_table = "\n".join(["| part | plain | packed | ratio | same result |", "|---|---|---|---|---|"]
                                + [f"| {part} | {plain:.1f} s | {fast:.1f} s | {plain / fast:.2f}× | {check} |"
                                   for part, plain, fast, check in parts])
        what = (f"One process, the {args.model} model, 2048² matmul at {matmul:.0f} GFLOP/s when it started. "
                "`F.linear` against oneDNN's packed kernel (`models/packed.py`: the weight reordered once into "
                "oneDNN's blocked layout) on the demo model's shapes, GFLOP/s (plain / packed; single runs):")
        results_md.write_section(SECTION, results_md.section_text(
            what, kernel_table(rates), "On the model:", model_table, memory + ".", device="cpu",
            dtype=str(next(model.parameters()).dtype)))


if __name__ == "__main__":
    main()
