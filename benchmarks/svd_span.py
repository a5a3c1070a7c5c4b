"""Does removing more paired-SVD directions remove more refusals? The foundation issue's `advanced` recipe on a real model.

    python benchmarks/svd_span.py                         # demo model, basic's default splits, layer 17
    python benchmarks/svd_span.py --model /tmp/tiny-qwen --n-train 8 --n-val 4 --n-test 2 --layer 1 \
        --tokens 4 --k 2                                  # smoke test

One process: SUMMON, PROBE the train prompts, judge them for basic's filtered contrast (refused
harmful vs answered harmless train prompts, from the model's own greedy answers), then at the source
layer (--layer; 17 is what `basic` chooses at the default sizes):

1. the difference of means u and the top-k right singular vectors v_1..v_k of the paired differences
   (directions/svd.py, the `svd` method), and how much of u lies in the span of the top j of them
   (‖P_j u‖², j = 1, 2, 4, k);
2. for each edit below, the weights are edited in place as `basic` edits them (every layer's attention
   and MLP writers, their biases and the embeddings, λ = 1), the validation harmful prompts are judged
   (marker judge on up to --tokens greedy tokens, each answer stopped once decided), and the original
   weights are put back:
   unedited; u; v_1; the top-k span (plain and norm-preserving: the issue's recipe); u with each v_i
   (orthonormalised); u with v_1..v_{k-1}.

With --sweep, step 2 is instead: unedited; u at --layer; and the issue's recipe (the top-k span of
the paired differences at that layer, norm-preserving) with its SVD taken at every candidate layer
of Arditi's selection (the last 20% pruned), so that no choice of source layer is left untried.
With --window, every edit touches only the embeddings and the writers of layers 0 … source (the
source window of the shipped `advanced`, excise/window.py) instead of every layer.

Every edited row also reports the first-token KL on the validation harmless prompts (the quantity
Arditi's selection filters on). Prints one line per measurement; --json writes them all.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from obliteratus.settings import resolve_settings
from obliteratus.directions import orthonormalize
from obliteratus.directions.base import shares_prefix
from obliteratus.directions.driver import contrast_groups
from obliteratus.select.layers import candidate_layers, window_plan
from obliteratus.directions.svd import paired_svd
from obliteratus.evaluate.early import judge
from obliteratus.shared_prefix import last_logits
from obliteratus.evaluate.kl import kl_rows
from obliteratus.excise import excise
from obliteratus.models.load import summon
from obliteratus.pipeline import Reporter, prepare_prompts, probe
from obliteratus.presets import load_preset


def span_fraction(u: torch.Tensor, basis: torch.Tensor) -> float:
    """‖P u‖² for unit u [d] and orthonormal rows basis [j, d]."""
    return float((basis.double() @ u.double()).norm() ** 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--n-train", type=int, default=None, help="default: basic's (128)")
    p.add_argument("--n-val", type=int, default=None, help="default: basic's (32)")
    p.add_argument("--n-test", type=int, default=None,
                   help="default: basic's (64); unused here, but the train and validation parts start after it")
    p.add_argument("--layer", type=int, default=17, help="source layer (resid_pre index)")
    p.add_argument("--k", type=int, default=4, help="paired-SVD directions (the issue's recipe: 4)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per validation prompt for the refusal count")
    p.add_argument("--sweep", action="store_true",
                   help="the issue's recipe with its SVD at every candidate layer (u only at --layer)")
    p.add_argument("--window", action="store_true",
                   help="edit only the embeddings and layers 0 .. source (advanced's source window)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.k < 2:
        p.error("--k must be at least 2")

    data = {key: v for key, v in (("n_train", args.n_train), ("n_val", args.n_val), ("n_test", args.n_test))
            if v is not None}
    settings = resolve_settings(load_preset("basic"), {"data": data} if data else None)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(" · ".join(f"{k} {v}" for k, v in row.items()), flush=True)

    start = time.perf_counter()
    loaded = summon(args.model, settings.model)
    prompts = prepare_prompts(loaded.tokenizer, settings)
    cache = probe(loaded, prompts, settings, Reporter())
    train = {c: prompts.encoded[f"{c}.train"] for c in ("harmful", "harmless")}
    contrast = contrast_groups(loaded.adapter, loaded.tokenizer, cache, settings, train)
    del cache
    if not 0 <= args.layer <= loaded.adapter.n_layers:
        p.error(f"--layer must be in 0..{loaded.adapter.n_layers}")

    def groups(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The refused-harmful and answered-harmless rows [n, d], [m, d] at `layer`, last position."""
        return contrast.positive[:, -1, layer].double(), contrast.negative[:, -1, layer].double()

    positive, negative = groups(args.layer)
    emit({"setup_s": round(time.perf_counter() - start, 1), "refused_harmful": len(positive),
          "answered_harmless": len(negative), "layer": args.layer})

    diff = positive.mean(0) - negative.mean(0)
    u = diff / diff.norm()  # [d]
    v = paired_svd(positive, negative, args.k).double()  # [k, d], orthonormal
    emit({"mean_diff_norm": round(float(diff.norm()), 3),
          "cos_u_v": [round(float(abs(row @ u)), 3) for row in v],
          "span_fraction_u": {j: round(span_fraction(u, v[:j]), 3) for j in sorted({1, 2, 4, args.k}) if j <= args.k}})

    model, val, harmless = loaded.model, prompts.encoded["harmful.val"], prompts.encoded["harmless.val"]
    original = {name: t.detach().clone() for name, t in model.state_dict().items()}
    batch, share = settings.evaluate.batch_size, shares_prefix(model, harmless, settings)

    def log_probs() -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(last_logits(model, harmless, batch, share).double(), -1)

    base = log_probs()

    def refusals(label: str, q: torch.Tensor | None, norm_preserve: bool = False, layer: int | None = None,
                 **extra) -> None:
        t0 = time.perf_counter()
        row = {"edit": label, **({} if layer is None else {"layer": layer}), **extra}
        if q is not None:
            ex = settings.excise.model_copy(update={"norm_preserve": norm_preserve} | (
                {"layer_weights": "through_source"} if args.window else {}))
            plan = window_plan(loaded.adapter.n_layers, args.layer if layer is None else layer, ex)
            excise(loaded.adapter, q.float(), ex, plan)
            row["kl_first"] = round(float(kl_rows(base, log_probs()).mean()), 3)
        verdicts = judge(model, loaded.tokenizer, val, args.tokens, batch)
        if q is not None:
            model.load_state_dict(original)
        emit(row | {"val_refusals": f"{verdicts.count}/{len(val.ids)}", "s": round(time.perf_counter() - t0, 1)})

    refusals("unedited", None)
    if args.sweep:
        refusals(f"u (basic) at layer {args.layer}", u[None])
        for layer in candidate_layers(loaded.adapter.n_layers, settings.layers):
            pos, neg = groups(layer)
            if not float((pos.mean(0) - neg.mean(0)).norm()) > 1e-6:
                emit({"edit": f"top-{args.k} span at layer {layer}", "skipped": "no difference (a fixed token)"})
                continue
            refusals(f"top-{args.k} span, norm-preserving, at layer {layer}",
                     paired_svd(pos, neg, args.k).double(), norm_preserve=True, layer=layer)
    else:
        refusals("u (basic)", u[None])
        refusals("v_1", v[:1])
        refusals(f"top-{args.k} span", v)
        refusals(f"top-{args.k} span, norm-preserving (the issue's advanced)", v, norm_preserve=True)
        for i in range(args.k):
            refusals(f"u + v_{i + 1}", orthonormalize(torch.stack([u, v[i]])))
        refusals(f"u + v_1..v_{args.k - 1}", orthonormalize(torch.cat([u[None], v[:args.k - 1]])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
