"""RDO's three loss terms on a real model: which one drives the direction, and where it goes.

    python benchmarks/rdo_terms.py                                     # demo model, the rdo preset's settings
    python benchmarks/rdo_terms.py --retain-weight 0.0333 --init diff_means --layer 18
    python benchmarks/rdo_terms.py --model /tmp/tiny-qwen --n-train 8 --n-val 4 --steps 2 --pairs 4 \
        --target-tokens 4 --layer 1                                    # smoke test

One process: SUMMON, PROBE the train prompts, choose the source layer as the `rdo` preset does
(Arditi's selection with its relaxed filters) unless --layer fixes it, build the paper's targets
(directions/rdo.py: rdo_targets), then

1. each term of the objective (ablation CE, addition CE, retain KL) at the difference of means, on
   the first --pairs train pairs, one term at a time (rdo_loss with the other weights 0);
2. fit_rdo with the preset's options (or --init / --retain-weight / --steps), printing every step's
   loss and |cos| with the difference of means;
3. each term again at the fitted direction;
4. refusals among the validation harmful prompts (marker judge on up to --tokens greedy tokens,
   each answer stopped once decided: evaluate/early.py's judge) with the
   difference of means and with the fitted direction ablated by hooks (every layer's input and
   attention/MLP outputs, as the paper evaluates), and unedited.

No weight is written. Prints one line per measurement; --json writes them all.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from obliteratus.settings import resolve_settings
from obliteratus.directions import rdo as R
from obliteratus.directions.driver import distill
from obliteratus.evaluate.early import judge
from obliteratus.evaluate.judges.markers import is_refusal
from obliteratus.hook_points import hooked
from obliteratus.models.load import summon
from obliteratus.pipeline import Reporter, prepare_prompts, probe
from obliteratus.presets import load_preset

TERMS = {"ablation": (1.0, 0.0, 0.0), "addition": (0.0, 1.0, 0.0), "retain": (0.0, 0.0, 1.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=2,
                   help="test prompts per class: unused here, but the validation and train parts start after them")
    p.add_argument("--layer", type=int, default=None, help="source layer (default: the rdo preset's Arditi selection)")
    p.add_argument("--init", choices=["random", "diff_means"], default=None, help="default: the preset's (random)")
    p.add_argument("--retain-weight", type=float, default=None, help="default: the preset's (1, the paper's)")
    p.add_argument("--steps", type=int, default=None, help="cap on optimiser steps (default: one epoch)")
    p.add_argument("--pairs", type=int, default=32, help="train pairs the loss terms are measured on")
    p.add_argument("--target-tokens", type=int, default=None, help="default: the preset's (30, the paper's)")
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens per validation prompt for the refusal count")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    rdo = {k: v for k, v in {"init": args.init, "retain_weight": args.retain_weight, "max_steps": args.steps,
                             "target_tokens": args.target_tokens}.items() if v is not None}
    overrides = {"data": {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test},
                 "directions": {"method": "diff_means", "rdo": rdo}}
    if args.layer is not None:
        overrides["layers"] = {"method": "fixed", "layer": args.layer}
    settings = resolve_settings(load_preset("rdo"), overrides)
    options = settings.directions.options_for("rdo")
    out: dict = {"options": options.model_dump()}
    t0 = time.perf_counter()

    def say(key: str, value) -> None:
        out[key] = value
        print(f"{key}: {value}  [{time.perf_counter() - t0:.0f} s]", flush=True)

    loaded = summon(args.model, settings.model)
    prompts = prepare_prompts(loaded.tokenizer, settings)
    cache = probe(loaded, prompts, settings, Reporter())
    dirs, selection = distill(loaded, cache, prompts, settings, Reporter())  # the difference of means and the layer
    del cache
    model, adapter, tok = loaded.model, loaded.adapter, loaded.tokenizer
    layer, dim = selection.layer, dirs.basis
    say("layer", layer)
    train = {c: prompts.encoded[f"{c}.train"] for c in ("harmful", "harmless")}
    targets = R.rdo_targets(model, adapter, tok, train["harmful"], train["harmless"], layer, dirs.mean_diff,
                            options.target_tokens, settings.evaluate.batch_size)
    say("alpha", round(targets.alpha, 4))
    say("addition targets that refuse", f"{sum(is_refusal(tok.decode(t)) for t in targets.addition)}"
                                        f"/{len(targets.addition)}")

    n = min(args.pairs, len(targets.ablation), len(targets.addition))
    sub = R.RdoTargets(targets.ablation[:n], targets.addition[:n], targets.retain[:n], targets.alpha)
    h, hl = train["harmful"].subset(list(range(n))), train["harmless"].subset(list(range(n)))

    def terms(basis: torch.Tensor) -> dict[str, float]:
        result = {}
        for name, (a, b, c) in TERMS.items():
            o = options.model_copy(update={"ablation_weight": a, "addition_weight": b, "retain_weight": c})
            result[name] = round(R.rdo_loss(model, adapter, h, hl, sub, layer, basis, o), 4)
        return result

    w = f"{options.ablation_weight:g} / {options.addition_weight:g} / {options.retain_weight:g}"
    say(f"terms at the difference of means ({n} pairs; unweighted, the objective weighs them {w})", terms(dim))
    original = R._Problem.step_loss

    def logged(problem, basis, idx, gen, backward):
        value = original(problem, basis, idx, gen, backward)
        cos = abs(float(R._unit(basis.detach()[0].double().cpu()) @ dim[0].double()))
        print(f"  step loss {value:.4f}  |cos| to the difference of means {cos:.3f}", flush=True)
        return value

    R._Problem.step_loss = logged
    try:
        result = R.fit_rdo(model, adapter, train["harmful"], train["harmless"], targets, layer,
                           R.initial_basis(options, dirs.mean_diff), options)
    finally:
        R._Problem.step_loss = original
    say("fit", R.fit_info(result, dirs.mean_diff))
    say(f"terms at the fitted direction ({n} pairs)", terms(result.basis))

    val = prompts.encoded["harmful.val"]

    def refusals(r: torch.Tensor | None) -> str:
        hooks = [] if r is None else R.ablation_hooks(adapter.n_layers, r)
        with hooked(adapter, hooks):
            refused = judge(model, tok, val, args.tokens, settings.evaluate.batch_size).refused
        return f"{sum(refused)}/{len(refused)}"

    say("val refusals, unedited", refusals(None))
    say("val refusals, difference of means ablated", refusals(dim[0]))
    say("val refusals, fitted direction ablated", refusals(result.basis[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
