"""Every preset on the demo model with the same splits, in one process: SUMMON, PROBE, layer
selection and VERIFY-before run once (the presets share their layer settings, which is checked),
then each preset's directions are fitted, excised, verified, and the weights restored.

    python benchmarks/presets_table.py [--presets basic advanced] [--n-train 64 --n-val 12 --n-test 40 --tokens 40]

Prints a markdown table (refusal on held-out harmful prompts, over-refusal on held-out harmless
prompts, KL first token / mean over 16 tokens, perplexity, time of the preset-specific stages)."""

from __future__ import annotations

import argparse
import time

import torch

from obliteratus.config import resolve_settings
from obliteratus.evaluate import evaluate_model, reference
from obliteratus.excise import excise
from obliteratus.models import summon
from obliteratus.pipeline import Reporter, distill, prepare_prompts, probe
from obliteratus.presets import load_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--presets", nargs="+", default=["basic", "advanced"])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=12)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    cli = {"data": {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test},
           "evaluate": {"max_new_tokens": args.tokens, "batch_size": args.n_test}}
    settings = {name: resolve_settings(load_preset(name), cli) for name in args.presets}
    first = settings[args.presets[0]]
    def shared(s):  # everything layer selection depends on
        e = s.excise
        return (s.layers, s.probe, s.data, s.directions.project_harmless, e.lam, e.attention, e.mlp, e.embeddings,
                e.biases)

    for name, s in settings.items():
        if shared(s) != shared(first):
            raise SystemExit(f"{name} does not share layer/probe/data settings with {args.presets[0]}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = summon(args.model, first.model)
    prompts = prepare_prompts(loaded.tokenizer, first)
    cache = probe(loaded, prompts, first, Reporter())
    t_probe = time.perf_counter() - t0
    _, selection = distill(loaded, cache, prompts, first, Reporter())
    t_select = time.perf_counter() - t0 - t_probe
    ev = first.evaluate
    harmful, harmless = prompts.part("harmful", "test"), prompts.part("harmless", "test")
    before = evaluate_model(loaded.model, loaded.tokenizer, harmful, harmless, ev)
    ref = reference(loaded.model, prompts.encoded["harmless.test"], before.harmless_continuations, ev.kl_tokens,
                    ev.batch_size)
    writers = loaded.adapter.writers()
    saved = [(p, p.detach().clone()) for w in writers for p in (w.module.weight, w.bias) if p is not None]
    rows = [("unedited", before.metrics, None, "")]
    for name, s in settings.items():
        start = time.perf_counter()
        directions, _ = distill(loaded, cache, prompts, s, Reporter(), selection)
        excise(loaded.adapter, directions.basis, s.excise)
        after = evaluate_model(loaded.model, loaded.tokenizer, harmful, harmless, ev, ref)
        rows.append((name, after.metrics, time.perf_counter() - start, f"k={directions.k}"))
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)
    print(f"model {args.model}; splits train/val/test = {args.n_train}/{args.n_val}/{args.n_test} per class; "
          f"{args.tokens} new tokens; layer {selection.layer} (position {selection.position}) chosen by "
          f"{selection.method}; probe {t_probe:.0f}s, layer selection {t_select:.0f}s")
    print("| preset | refusal (harmful test) | over-refusal (harmless test) | KL first | KL 16 | perplexity | "
          "fit+excise+verify (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, m, secs, note in rows:
        kl1, kl16 = m.get("kl_first"), m.get("kl_mean")
        print(f"| {name} {note} | {m['refusal']:.3f} | {m['over_refusal']:.3f} | "
              f"{'—' if kl1 is None else f'{kl1:.3f}'} | {'—' if kl16 is None else f'{kl16:.3f}'} | "
              f"{m['perplexity']:.2f} | {'—' if secs is None else f'{secs:.0f}'} |")


if __name__ == "__main__":
    main()
