"""The driver: one function per stage, typed results passed along.

SUMMON -> PROBE (ActivationCache) -> DISTILL (Directions + LayerSelection) -> VERIFY before
-> EXCISE (EditReport) -> VERIFY after -> REBIRTH.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


from .analysis.pca import run_pca
from .batching import Encoded, check_lengths, max_positions
from .config import Settings, resolve_settings
from .data.prompts import Split, encode_chat, load_prompts, split_prompts
from .directions import Directions, orthonormalize
from .directions.driver import distill as distill_directions
from .directions.layers import LayerSelection, refusal_token_ids
from .errors import ConfigError, PromptError
from .evaluate import Evaluation, evaluate_model
from .excise import EditReport
from .excise.dispatch import apply_edit, build_plan
from .excise.kernels import KernelOptions
from .optimize.grid import GridResult, kernels as grid_kernels, search as grid_search
from .models.load import Loaded, describe, summon
from .presets import load_preset
from .probe import ActivationCache, collect
from .save import check_output, save_run, versions
from .steering import SteeringEntry, SteeringSpec, ablation_points, attach_steering


class Reporter:
    """Progress callbacks; the CLI draws bars, the Python API stays quiet."""

    def stage(self, name: str) -> None:
        pass

    def task(self, label: str, total: int) -> Callable[[int], None]:
        return lambda n: None

    def done(self, name: str, seconds: float) -> None:
        pass


@dataclass
class PromptSets:
    """Raw splits plus the encoded (chat-formatted, tokenized) form of each part."""

    harmful: Split
    harmless: Split
    encoded: dict[str, Encoded]  # "harmful.train", "harmless.test", ...

    def part(self, cls: str, part: str) -> tuple[list[str], Encoded]:
        return getattr(getattr(self, cls), part), self.encoded[f"{cls}.{part}"]


def split_prompt_sets(settings: Settings) -> tuple[Split, Split]:
    """Read, check and split both prompt sets: (harmful, harmless). It needs no model, so every verb
    calls it before SUMMON and a bad prompt file fails before any model loads."""
    d = settings.data
    harmful = load_prompts(d.harmful, d.column)
    harmless = load_prompts(d.harmless, d.column)
    overlap = {p.casefold() for p in harmful} & {p.casefold() for p in harmless}
    if overlap:
        raise PromptError(f"{len(overlap)} prompts are in both the harmful and harmless sets, e.g. {sorted(overlap)[0]!r}")
    k = settings.directions.n_directions
    if settings.directions.method != "diff_means" and d.n_train < k:
        raise PromptError(f"n_train = {d.n_train} prompts per class is fewer than n_directions = {k}")
    return (split_prompts(harmful, d.n_train, d.n_val, d.n_test, d.seed, "harmful prompts"),
            split_prompts(harmless, d.n_train, d.n_val, d.n_test, d.seed, "harmless prompts"))


def prepare_prompts(tokenizer, settings: Settings, positions: int | None = None,
                    splits: tuple[Split, Split] | None = None) -> PromptSets:
    """Load, split (unless `splits` is :func:`split_prompt_sets`' result, read before SUMMON) and encode
    both prompt sets; a prompt longer than ``data.max_prompt_tokens``, or than the model's `positions`
    (:func:`batching.max_positions`) less the tokens VERIFY generates, is refused."""
    d = settings.data
    splits = dict(zip(("harmful", "harmless"), splits or split_prompt_sets(settings)))
    encoded = {f"{cls}.{part}": encode_texts(tokenizer, settings, getattr(split, part))
               for cls, split in splits.items() for part in ("train", "val", "test")}
    new = settings.evaluate.max_new_tokens
    limit, why = d.max_prompt_tokens, f"data.max_prompt_tokens = {d.max_prompt_tokens}"
    if positions is not None and positions - new < limit:
        limit, why = positions - new, f"the model's {positions} positions less evaluate.max_new_tokens = {new}"
    for key, enc in encoded.items():
        cls, part = key.split(".")
        check_lengths(enc, getattr(splits[cls], part), limit, why, f"{cls} prompt")
    return PromptSets(splits["harmful"], splits["harmless"], encoded)


def encode_texts(tokenizer, settings: Settings, prompts: list[str]) -> Encoded:
    """Raw prompts -> chat-formatted (when the data settings ask for it), tokenized prompts."""
    d = settings.data
    return encode_chat(tokenizer, prompts, d.chat_template, d.system_prompt)


def probe(loaded: Loaded, prompts: PromptSets, settings: Settings, reporter: Reporter) -> ActivationCache:
    acts = {}
    for cls in ("harmful", "harmless"):
        _, enc = prompts.part(cls, "train")
        advance = reporter.task(f"probe {cls}", len(enc.ids))
        acts[cls] = collect(loaded.adapter, enc, settings.probe.positions, settings.probe.batch_size, advance,
                             settings.probe.share_prefix)
    return ActivationCache(acts["harmful"], acts["harmless"])


def distill(loaded: Loaded, cache: ActivationCache, prompts: PromptSets, settings: Settings,
            reporter: Reporter, selection: LayerSelection | None = None,
            contrast=None) -> tuple[Directions, LayerSelection]:
    """Choose the source layer (unless `selection` is given, e.g. shared by runs with the same
    layer settings) and fit the direction method there (directions/driver.py); `contrast`: the
    contrast groups of `cache` when the caller has already judged them."""
    d = settings.data

    def encode(texts: list[str]) -> Encoded:
        return encode_chat(loaded.tokenizer, texts, d.chat_template, d.system_prompt)

    parts = {part: {cls: prompts.encoded[f"{cls}.{part}"] for cls in ("harmful", "harmless")} for part in ("train", "val")}
    return distill_directions(loaded, cache, settings, parts["val"], parts["train"], encode, prompts.harmful.train,
                              reporter.task, selection, contrast)


def moved_cosine(total: torch.Tensor, leftover: torch.Tensor) -> float:
    """Cosine between the refusal direction found so far (`total`, the sum of the mean differences removed
    by earlier passes) and that direction once this pass's `leftover` mean difference is added. Removing a
    direction leaves the re-probed mean difference orthogonal to it, so the new unit direction alone always
    looks new; what tells whether another pass matters is how far it turns the accumulated one."""
    total, leftover = total.double(), leftover.double()
    after = total + leftover
    return float(total @ after / (total.norm() * after.norm()).clamp_min(1e-30))


def refine(loaded: Loaded, prompts: PromptSets, settings: Settings, reporter: Reporter, directions: Directions,
           first: EditReport) -> tuple[EditReport, list[dict]]:
    """Multi-pass excision: re-probe the edited model at the source layer, fit again, and excise the new
    directions, until the refusal direction stops moving (the re-probed mean difference turns the
    accumulated one by less than `refine_cos`: it would change next to nothing) or `passes` is reached.
    Returns the last pass's report and a per-pass log."""
    ex = settings.excise
    removed = directions.basis.double()  # [k, d]: span excised so far
    total = directions.mean_diff.double()  # [d]: the refusal direction found so far, unnormalised
    log = [{"pass": 1, "k": directions.k, "mean_diff_norm": float(total.norm())}]
    report = first
    for n in range(2, ex.passes + 1):
        cache = probe(loaded, prompts, settings, reporter)
        selection = LayerSelection(directions.layer, directions.position, "refine")
        again, _ = distill(loaded, cache, prompts, settings, reporter, selection)
        q = orthonormalize(removed.float())
        within = (again.basis.double() @ q.double().T).norm(dim=-1)  # [k]: |cos| to the removed span
        cos = moved_cosine(total, again.mean_diff)
        log.append({"pass": n, "moved_cos": cos, "mean_diff_norm": float(again.mean_diff.norm()),
                    "cos_to_removed": within.tolist()})
        if cos >= ex.refine_cos:
            log[-1]["stopped"] = "the refusal direction moved by less than refine_cos: nothing left to remove"
            break
        report = apply_edit(loaded.adapter, again, ex, harmful=prompts.encoded["harmful.train"],
                            harmless=prompts.encoded["harmless.train"], batch_size=settings.evaluate.batch_size)
        removed = torch.cat([removed, again.basis.double()])
        total = total + again.mean_diff.double()
    return report, log


def uses_study(settings: Settings) -> bool:
    """The preset's edit is chosen by the multi-objective study (optimize/command.py), not by this pipeline."""
    return settings.optimize.enabled and settings.optimize.search == "study"


def optimize_kernel(loaded: Loaded, prompts: PromptSets, settings: Settings, directions: Directions,
                    reporter: Reporter) -> tuple[Settings, GridResult]:
    """Grid-search the kernel on the val prompts (hooks only) and return settings with the winner."""
    opt, ex = settings.optimize, settings.excise
    n = 1 + len(grid_kernels(loaded.adapter.n_layers, opt))
    result = grid_search(loaded.adapter, directions.basis, ex.lam, prompts.encoded["harmful.val"],
                         prompts.encoded["harmless.val"], refusal_token_ids(loaded.tokenizer), opt,
                         embeddings=ex.embeddings, biases=ex.biases, batch_size=settings.evaluate.batch_size,
                         progress=reporter.task("kernel grid", n), attention=ex.attention, mlp=ex.mlp,
                         experts=ex.experts)
    kernel = result.best.kernel
    excise = ex.model_copy(update={"kernel_attn": None if kernel is None else KernelOptions(**kernel),
                                   "kernel_mlp": None if kernel is None else KernelOptions(**kernel)})
    return settings.model_copy(update={"excise": excise}), result


@dataclass
class Edited:
    """What EXCISE did: the settings actually used (the kernel grid may change them), the report, the
    grid's trials (optimized) and the steering spec (hook mode, attached to the model)."""

    settings: Settings
    report: EditReport
    grid: GridResult | None
    steering: SteeringSpec | None

    def __iter__(self):
        return iter((self.settings, self.report, self.grid, self.steering))


def export_adapter(loaded: Loaded, settings: Settings, directions: Directions, lora: str, overwrite: bool) -> None:
    """Write the edit about to be applied as a PEFT LoRA adapter (before the weights change)."""
    from .export.lora import export_lora

    ex = settings.excise
    if ex.mode == "hooks" or ex.method not in ("project", "leace") or ex.neurons is not None or ex.passes > 1 or (
            loaded.adapter.moe_layers and (ex.moe.expert_directions or ex.moe.transplant or ex.moe.stabilise_routers)):
        raise ConfigError("--lora exports one low-rank projection edit; this preset adds steps that are not low rank "
                          "(hooks mode, Householder/heads, neuron masking, several passes or MoE expert steps)")
    export_lora(loaded.model, loaded.adapter, directions.basis, ex.lam, lora, attention=ex.attention, mlp=ex.mlp,
                embeddings=ex.embeddings, biases=ex.biases, plan=build_plan(loaded.adapter, directions, ex),
                norm_preserve=ex.norm_preserve, overwrite=overwrite)


def edit_model(loaded: Loaded, prompts: PromptSets, settings: Settings, directions: Directions, reporter: Reporter,
               timings: dict[str, float], lora: str | None = None, overwrite: bool = False) -> Edited:
    """OPTIMIZE (when enabled) and EXCISE, in place; in hook mode the hooks are attached and kept in
    ``loaded.steering``. With `lora`, the edit is also written there as a PEFT adapter."""
    grid = None
    if settings.optimize.enabled and settings.optimize.search == "grid":
        with _timed(timings, "optimize", reporter):
            settings, grid = optimize_kernel(loaded, prompts, settings, directions, reporter)
    steering = None
    with _timed(timings, "excise", reporter):
        if settings.excise.mode == "hooks":  # inference-time edit: hooks attached now and saved with the model
            steering = steering_spec(loaded, directions, settings)
            loaded.steering = attach_steering(loaded.adapter, steering)  # keep the handle: dropping it detaches
            edit = EditReport(settings.excise.lam, False, directions.k, variant="hooks",
                              details={"steering_hooks": [e.hook for e in steering.entries]})
        else:
            if lora is not None:
                export_adapter(loaded, settings, directions, lora, overwrite)
            edit = apply_edit(loaded.adapter, directions, settings.excise, harmful=prompts.encoded["harmful.train"],
                              harmless=prompts.encoded["harmless.train"], batch_size=settings.evaluate.batch_size)
            if settings.excise.passes > 1:
                edit, edit.details["passes"] = refine(loaded, prompts, settings, reporter, directions, edit)
    return Edited(settings, edit, grid, steering)


def steering_spec(loaded: Loaded, directions: Directions, settings: Settings) -> SteeringSpec:
    """Hook mode: the same projection as the weight edit, as inference-time ablation at the output of
    every edited writer (steering.ablation_points: lm_head_in for a tied head, MoE parts)."""
    ex = settings.excise
    if directions.layer_bases is not None or directions.layer_weights is not None or ex.kernel_attn or ex.kernel_mlp:
        raise ConfigError("mode = 'hooks' ablates one global basis from every writer; no per-layer scope, "
                          "layer_weights or kernels")
    names = ablation_points(loaded.adapter, attention=ex.attention, mlp=ex.mlp, experts=ex.experts,
                            embeddings=ex.embeddings, lm_head=ex.lm_head, biases=ex.biases)
    return SteeringSpec([SteeringEntry(name, "ablate", directions.basis, ex.lam) for name in names])


@dataclass
class RunResult:
    settings: Settings
    loaded: Loaded
    prompts: PromptSets
    directions: Directions
    selection: LayerSelection
    edit: EditReport
    before: Evaluation
    after: Evaluation
    timings: dict[str, float] = field(default_factory=dict)
    output: str | None = None
    search: dict | None = None  # the kernel grid's trials (optimized preset)

    def metadata(self, preset: str) -> dict:
        model = describe(self.loaded)
        model.pop("config")
        return {
            "tool": "obliteratus",
            "preset": preset,
            "settings": self.settings.model_dump(),
            "model": model,
            "directions": {"method": self.directions.method, "k": self.directions.k, "layer": self.directions.layer,
                           "position": self.directions.position, "layer_norms": self.directions.layer_norms,
                           "contrast": self.directions.contrast, "fit": self.directions.fit},
            "selection": self.selection.to_dict(),
            "edit": self.edit.to_dict(),
            "metrics_before": self.before.metrics,
            "metrics_after": self.after.metrics,
            "optimize": self.search,
            "timings_s": self.timings,
            "versions": versions(),
            "seed": self.settings.data.seed,
            "splits": {cls: {part: len(getattr(getattr(self.prompts, cls), part)) for part in ("train", "val", "test")}
                       for cls in ("harmful", "harmless")},
        }


@contextmanager
def _timed(timings: dict[str, float], name: str, reporter: Reporter) -> Iterator[None]:
    reporter.stage(name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    reporter.done(name, timings[name])


def obliterate(model: str, preset: str = "basic", output: str | None = None, overwrite: bool = False,
               overrides: dict | None = None, reporter: Reporter | None = None, lora: str | None = None) -> RunResult:
    """Run all six stages on `model` (alias, directory, .gguf file or hub id); with `lora`, also write
    the edit as a PEFT LoRA adapter to that directory."""
    reporter = reporter or Reporter()
    settings = resolve_settings(load_preset(preset), overrides)
    if uses_study(settings):
        raise ConfigError(f"preset {preset!r} searches its edit with the optimizer study: run it with "
                          "`obliteratus obliterate`/`obliteratus optimize` (optimize.command.run_optimize)")
    for target, other in ((output, lora), (lora, output)):
        if target is not None:
            check_output(target, overwrite, source=model, others=(other,))  # fail before any work
    splits = split_prompt_sets(settings)  # a bad prompt file fails before the model loads
    timings: dict[str, float] = {}
    with _timed(timings, "summon", reporter):
        loaded = summon(model, settings.model)
    with _timed(timings, "probe", reporter):
        prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model), splits)
        cache = probe(loaded, prompts, settings, reporter)
    with _timed(timings, "distill", reporter):
        directions, selection = distill(loaded, cache, prompts, settings, reporter)
    pca = None if output is None else run_pca(cache.harmful[:, selection.position], cache.harmless[:, selection.position],
                                              selection.layer)
    del cache
    ev = settings.evaluate
    with _timed(timings, "verify_before", reporter):
        step = reporter.task
        before = evaluate_model(loaded.model, loaded.tokenizer, prompts.part("harmful", "test"),
                                prompts.part("harmless", "test"), ev, None, step, make_reference=True)
        ref = before.reference
    settings, edit, grid, steering = edit_model(loaded, prompts, settings, directions, reporter, timings, lora,
                                                overwrite)
    with _timed(timings, "verify_after", reporter):
        after = evaluate_model(loaded.model, loaded.tokenizer, prompts.part("harmful", "test"),
                               prompts.part("harmless", "test"), ev, ref, step)
    result = RunResult(settings, loaded, prompts, directions, selection, edit, before, after, timings,
                       search=None if grid is None else grid.to_dict())
    if output is not None:
        with _timed(timings, "rebirth", reporter):
            start = time.perf_counter()

            def metadata() -> dict:  # called once the weights are on disk: includes their write time
                timings["rebirth"] = time.perf_counter() - start
                return result.metadata(preset)

            tensors = {"basis": directions.basis, "mean_diff": directions.mean_diff}
            if directions.mean_diffs is not None:
                tensors["mean_diffs"] = directions.mean_diffs  # [L+1, d]: every layer, for the report
            result.output = str(save_run(loaded.model, loaded.tokenizer, output, metadata, tensors, overwrite,
                                         steering=steering, pca=pca))
    return result


__all__ = ["Edited", "PromptSets", "Reporter", "RunResult", "distill", "edit_model", "obliterate",
           "prepare_prompts", "probe", "split_prompt_sets"]
