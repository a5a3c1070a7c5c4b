"""The capability check (evaluate/capability.py): each question run once with its KV cache serving its
choices, against one left-padded row per (question, choice), on the same items of the demo model.

    python benchmarks/capability_speed.py                  # about 2 minutes on the 2-core box
    python benchmarks/capability_speed.py --write-results

Prints the seconds of each path on the first --n items (both give the same log-probs; the largest
difference is printed), the ratio, and the seconds of the cached path on the default item set, which
is what VERIFY adds before and after every run.
"""

from __future__ import annotations

import argparse
import time

import torch

import results_md
from obliteratus.evaluate.capability import CapabilitySet, capability, choice_logprobs
from obliteratus.models.load import summon
from obliteratus.pipeline import capability_set
from obliteratus.settings import resolve_settings
from obliteratus.shared_prefix import can_share_prefix

SECTION = "capability-speed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n", type=int, default=40, help="items both paths score")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if args.write_results:
        results_md.check_write(SECTION, [] if args.model == "demo" else ["the section is the demo model's"])
    settings = resolve_settings(None, {})
    loaded = summon(args.model, settings.model)
    full = capability_set(loaded.tokenizer, settings)
    if not can_share_prefix(loaded.model, full.prompts):
        raise SystemExit("error: this model cannot go on from a padded cache: only the one-row-per-choice path runs")
    few = CapabilitySet(full.items[:args.n], type(full.prompts).from_ids(full.prompts.ids[:args.n], full.prompts.pad_id),
                        full.choices[:args.n])
    times, scores = {}, {}
    for name, share in (("cached", True), ("one row per choice", False)):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        scores[name] = choice_logprobs(loaded.model, few, settings.evaluate.batch_size, share)
        times[name] = time.perf_counter() - t0
    diff = max(abs(a - b) for sa, sb in zip(*scores.values()) for a, b in zip(sa, sb))
    t0 = time.perf_counter()
    result = capability(loaded.model, full, settings.evaluate.batch_size, True)
    t_full = time.perf_counter() - t0
    ratio = times["one row per choice"] / times["cached"]
    table = "\n".join([
        "| path | items | seconds |", "|---|---|---|",
        f"| one row per (question, choice) | {args.n} | {times['one row per choice']:.1f} |",
        f"| each question once, its KV cache serving its choices | {args.n} | {times['cached']:.1f} |",
        f"| **ratio** | | **{ratio:.1f}×** |",
        f"| cached, the default set (VERIFY's check, once per model) | {len(full.items)} | {t_full:.1f} |"])
    lines = [f"largest |Δ log-prob| between the paths: {diff:.1e}",
             f"accuracy on the default set: {result['capability']:.3f} (chance {result['capability_chance']:.3f})"]
    print(table)
    print("\n".join(lines))
    if args.write_results:
        results_md.write_section(SECTION, results_md.section_text(
            "One process, float32, the same items for both paths, batch size 128.", table,
            "\n".join(f"- {line}" for line in lines)))


if __name__ == "__main__":
    main()
