"""VERIFY speed: the current design vs the one it replaced, same model, prompts and process.

Both measure the model before an edit the way a run does (greedy answers to the held-out harmful
and harmless prompts, the KL reference of the harmless answers' first tokens, perplexity) and then
as an edited model would be measured (answers again, KL to that reference, perplexity):

* **previous**: harmful and harmless prompts generated separately in batches of 32, every
  prompt run in full, the KL reference computed by a second, teacher-forced pass over prompt +
  answer;
* **current** (evaluate.evaluate_model with the default settings): both sets in the same batches
  of 128, the template's shared prefix run once per batch (shared_prefix.py), the reference's
  log-probs kept while the original generates (generate.LogprobRecorder), the KL pass sharing
  the prefix too.

It prints each part's time, the totals and the ratio, how many answers differ (a different batch
composition changes float rounding), both refusal rates, the largest gap between the recorded and
the teacher-forced reference log-probs, and each design's KL of the unedited model to its reference.

    python benchmarks/verify_speed.py            # demo model, 64 + 64 test prompts, 64 tokens
    python benchmarks/verify_speed.py --perplexity   # perplexity too (unchanged code, same in both)
    python benchmarks/verify_speed.py --write-results   # also replace RESULTS.md's "verify-speed" section
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

import results_md
from obliteratus.settings import resolve_settings
from obliteratus.data.prompts import heldout_text
from obliteratus.evaluate import evaluate_model, is_refusal, kl_to_reference, perplexity, reference
from obliteratus.evaluate.generate import generate
from obliteratus.models.load import summon
from obliteratus.pipeline import prepare_prompts
from obliteratus.presets import load_preset

SECTION = "verify-speed"  # of benchmarks/RESULTS.md


def timed(times: dict, name: str, fn):
    start = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - start
    print(f"  {name:<34} {times[name]:7.1f} s", flush=True)
    return out


def previous(model, tokenizer, prompts, ev) -> tuple[dict, list, list, dict]:
    """The replaced VERIFY, before and after (the same unedited model both times)."""
    times: dict[str, float] = {}
    _, harmful = prompts.part("harmful", "test")
    _, harmless = prompts.part("harmless", "test")
    bs = 32
    for when in ("before", "after"):
        h = timed(times, f"{when}: generate harmful (32/batch)",
                  lambda: generate(model, tokenizer, harmful, ev.max_new_tokens, bs))
        s = timed(times, f"{when}: generate harmless (32/batch)",
                  lambda: generate(model, tokenizer, harmless, ev.max_new_tokens, bs))
        if when == "before":
            ref = timed(times, "before: KL reference (teacher-forced)",
                        lambda: reference(model, harmless, s, ev.kl_tokens, bs))
        else:
            kl = timed(times, "after: KL", lambda: kl_to_reference(model, ref, bs))
        if ev.perplexity:
            timed(times, f"{when}: perplexity", lambda: perplexity(model, tokenizer, heldout_text(), ev.ppl_window))
    return times, h, s, {"kl_mean": kl["kl_mean"], "reference": ref}


def current(model, tokenizer, prompts, ev) -> tuple[dict, object, object]:
    times: dict[str, float] = {}
    harmful, harmless = prompts.part("harmful", "test"), prompts.part("harmless", "test")
    before = timed(times, "before: evaluate_model", lambda: evaluate_model(model, tokenizer, harmful, harmless, ev,
                                                                          make_reference=True))
    after = timed(times, "after: evaluate_model (with KL)",
                  lambda: evaluate_model(model, tokenizer, harmful, harmless, ev, before.reference))
    return times, before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--perplexity", action="store_true",
                        help="also time perplexity (the same code in both designs, about 50 s each on the demo model)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"also replace the {SECTION!r} section of benchmarks/RESULTS.md (the demo model only)")
    args = parser.parse_args()
    if args.write_results:
        results_md.check_write(SECTION, [] if args.model == "demo" else
                               [f"--model {args.model}: the section is the demo model's"])
    settings = resolve_settings(load_preset("basic"), {"data": {"n_test": args.n_test},
                                                      "evaluate": {"max_new_tokens": args.tokens,
                                                                   "perplexity": args.perplexity}})
    ev = settings.evaluate
    loaded = summon(args.model, settings.model)
    prompts = prepare_prompts(loaded.tokenizer, settings)
    print(f"{platform.node()} · {platform.processor() or platform.machine()} · {torch.get_num_threads()} threads · "
          f"torch {torch.__version__} · {args.model} · {args.n_test} + {args.n_test} prompts · {args.tokens} tokens",
          flush=True)
    print("previous design", flush=True)
    old_times, old_h, old_s, old = previous(loaded.model, loaded.tokenizer, prompts, ev)
    print("current design", flush=True)
    new_times, before, after = current(loaded.model, loaded.tokenizer, prompts, ev)
    old_total, new_total = sum(old_times.values()), sum(new_times.values())
    gap = max(float((a - b).abs().max()) for a, b in zip(before.reference.logprobs, old["reference"].logprobs))
    old_text = loaded.tokenizer.batch_decode(old_h + old_s, skip_special_tokens=True)
    differ = sum(a != b for a, b in zip(old_text, before.harmful_responses + before.harmless_responses))
    print(f"\nprevious: {old_total:.1f} s   current: {new_total:.1f} s   ratio {old_total / new_total:.2f}x")
    notes = [f"answers that differ (batch composition changes float rounding): {differ} of {len(old_text)}; "
             f"refusal before: previous {sum(map(is_refusal, old_text[:len(old_h)])) / len(old_h):.3f}, "
             f"current {before.metrics['refusal']:.3f}",
             f"recorded vs teacher-forced reference, max |log-prob gap| {gap:.2e}; "
             f"KL 16 of the unedited model: previous {old['kl_mean']:.2e}, current {after.metrics['kl_mean']:.2e}",
             f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"]
    for line in notes:
        print(line)
    if args.write_results:
        table = ["| design | part | time |", "|---|---|---|"]
        for design, times, total in (("previous", old_times, old_total), ("current", new_times, new_total)):
            table += [f"| {design} | {part} | {seconds:.1f} s |" for part, seconds in times.items()]
            table.append(f"| {design} | **total** | **{total:.1f} s** |")
        table.append(f"| **ratio** | | **{old_total / new_total:.2f}×** |")
        what = (f"One process, the {args.model} model, the {args.n_test} + {args.n_test} held-out test prompts, "
                f"{args.tokens} greedy tokens, VERIFY as a run does it before and after an edit (the same unedited "
                "model both times, so the \"after\" KL is ~0); perplexity "
                + ("included." if args.perplexity else "left out (the same code in both designs)."))
        results_md.write_section(SECTION, results_md.section_text(
            what, "\n".join(table), "; ".join(notes) + ".", device=str(loaded.device),
            dtype=str(next(loaded.model.parameters()).dtype)))


if __name__ == "__main__":
    main()
