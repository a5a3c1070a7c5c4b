"""The driver: one function per stage, typed results passed along.

SUMMON -> PROBE (ActivationCache) -> DISTILL -> choose the edit -> VERIFY before -> EXCISE
(EditReport) -> VERIFY after -> REBIRTH (run.Run.save, record.RunRecord).

Choosing the edit has three strategies, one per kind of preset: the fixed edit (the preset's settings
as they are), the kernel grid (``optimize.search = "grid"``) and the Optuna study (``"study"``: the
``optimized`` and ``heretic`` presets, optimize/strategy.py). Each fits what it needs in DISTILL,
chooses between DISTILL and VERIFY, excises its choice and gives the record its ``directions``,
``selection`` and ``optimize`` sections; everything else is this one driver.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch


from .analysis.pca import run_pca
from .batching import Encoded, check_lengths, max_positions
from .settings import Settings, deep_merge, resolve_settings
from .data.prompts import Split, encode_texts, load_prompts, split_prompts
from .directions import Directions, get_direction_method, orthonormalize
from .directions.driver import distill
from .select.layers import LayerSelection, refusal_token_ids
from .errors import ConfigError, PromptError
from .evaluate import Evaluation, evaluate_model
from .evaluate.capability import CapabilitySet, encode_items
from .excise import EditReport, get_excise_variant
from .excise.dispatch import apply_edit, build_plan, check_held, weights_held
from .excise.kernels import KernelOptions
from .export.bake import shards_of
from .export.lora import export_lora
from .optimize.grid import GridResult, kernels as grid_kernels, search as grid_search
from .optimize.strategy import StudyEdit
from .models.load import Loaded, summon
from .presets import load_preset
from .probe import ActivationCache, collect
from .run import Reporter, Run, timed as _timed
from .save import check_output
from .steering import SteeringEntry, SteeringSpec, ablation_points, attach_steering


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
    cap = get_direction_method(settings.directions.method).max_directions
    k = settings.directions.n_directions if cap is None else min(settings.directions.n_directions, cap)
    if d.n_train < k:  # the directions actually fitted (a one-direction method fits one whatever n_directions says)
        raise PromptError(f"n_train = {d.n_train} prompts per class is fewer than the {k} directions to fit (directions.n_directions)")
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


def probe(loaded: Loaded, prompts: PromptSets, settings: Settings, reporter: Reporter) -> ActivationCache:
    acts = {}
    for cls in ("harmful", "harmless"):
        _, enc = prompts.part(cls, "train")
        advance = reporter.task(f"probe {cls}", len(enc.ids))
        acts[cls] = collect(loaded.adapter, enc, settings.probe.positions, settings.probe.batch_size, advance,
                             settings.probe.share_prefix)
    return ActivationCache(acts["harmful"], acts["harmless"])


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
    ops = first.ops  # every pass's tensor ops, in order (None once a pass has none)
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
        ops = None if ops is None or report.ops is None else [*ops, *report.ops]
        removed = torch.cat([removed, again.basis.double()])
        total = total + again.mean_diff.double()
    if ops is None and report.ops is not None:
        report.ops_missing = first.ops_missing
    report.ops = ops
    return report, log


def capability_set(tokenizer, settings: Settings) -> CapabilitySet | None:
    """VERIFY's capability items, formatted as the run formats its prompts (None when turned off)."""
    if not settings.evaluate.capability:
        return None
    return encode_items(tokenizer, lambda texts: encode_texts(tokenizer, settings, texts), settings.evaluate.capability)


def check_before(before: Evaluation, prompts: PromptSets, settings) -> None:
    """`before` (obliterate's argument) was measured on these test prompts with these evaluate
    settings, and holds the KL reference."""
    if before.reference is None or before.settings is None:
        raise ConfigError("before= needs run.before of an earlier run (an evaluation made with make_reference=True)")
    if before.settings != settings:
        raise ConfigError("before= was measured with other evaluate settings than this run's")
    if (before.reference.encoded.ids != prompts.encoded["harmless.test"].ids
            or len(before.harmful_responses) != len(prompts.harmful.test)):
        raise ConfigError("before= was measured on other test prompts than this run's (data settings or model differ)")


def uses_study(settings: Settings) -> bool:
    """The preset's edit is chosen by the multi-objective study (optimize/strategy.py)."""
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
    ex = settings.excise
    held = weights_held(loaded.adapter)
    if held is not None:
        raise ConfigError(f"--lora takes its factors from the unedited weights, and this model's are {held}: export "
                          "it from a run on the full-precision model")
    if ex.mode == "hooks" or not get_excise_variant(ex.method).low_rank or ex.neurons is not None or ex.passes > 1 or (
            loaded.adapter.moe_layers and (ex.moe.expert_directions or ex.moe.transplant or ex.moe.stabilise_routers)):
        raise ConfigError("--lora exports one low-rank projection edit; this preset adds steps that are not low rank "
                          "(hooks mode, Householder/heads, neuron masking, several passes or MoE expert steps)")
    export_lora(loaded.model, loaded.adapter, directions.basis, ex.lam, lora, attention=ex.attention, mlp=ex.mlp,
                embeddings=ex.embeddings, biases=ex.biases, plan=build_plan(loaded.adapter, directions, ex),
                norm_preserve=ex.norm_preserve, overwrite=overwrite)


class FixedEdit:
    """Choosing the edit, two of its strategies: the fixed edit (the directions DISTILL fits, excised as
    the settings say) and, with ``optimize.enabled`` and ``search = "grid"``, the kernel grid
    (optimize/grid.py) that picks per-layer kernels for those directions on the val prompts first.
    In hook mode the edit is attached as hooks (kept in ``loaded.steering``); with `lora`, the weight
    edit is also written there as a PEFT adapter."""

    def __init__(self, settings: Settings, lora: str | None = None, overwrite: bool = False):
        self.settings, self.lora, self.overwrite = settings, lora, overwrite
        self.directions: Directions | None = None
        self.selection: LayerSelection | None = None
        self.grid: GridResult | None = None
        self.steering: SteeringSpec | None = None

    def prepare(self, splits, source: str, given: bool, locks: ExitStack) -> None:
        """Checks that need no model (none beyond the driver's)."""

    def distill(self, loaded: Loaded, cache: ActivationCache, prompts: PromptSets, reporter: Reporter) -> None:
        self.directions, self.selection = distill(loaded, cache, prompts, self.settings, reporter)

    def pca(self, cache: ActivationCache) -> dict:
        position = self.selection.position
        return run_pca(cache.harmful[:, position], cache.harmless[:, position], self.selection.layer)

    def choose(self, loaded: Loaded, prompts: PromptSets, reporter: Reporter, timings: dict[str, float]) -> None:
        if self.settings.optimize.enabled and self.settings.optimize.search == "grid":
            with _timed(timings, "optimize", reporter):
                self.settings, self.grid = optimize_kernel(loaded, prompts, self.settings, self.directions, reporter)

    def excise(self, loaded: Loaded, prompts: PromptSets, reporter: Reporter) -> EditReport:
        settings, directions = self.settings, self.directions
        if settings.excise.mode == "hooks":  # inference-time edit: hooks attached now and saved with the model
            self.steering = steering_spec(loaded, directions, settings)
            loaded.steering = attach_steering(loaded.adapter, self.steering)  # keep the handle: dropping it detaches
            return EditReport(settings.excise.lam, False, directions.k, variant="hooks",
                              details={"steering_hooks": [e.hook for e in self.steering.entries]})
        if self.lora is not None:
            export_adapter(loaded, settings, directions, self.lora, self.overwrite)
        edit = apply_edit(loaded.adapter, directions, settings.excise, harmful=prompts.encoded["harmful.train"],
                          harmless=prompts.encoded["harmless.train"], batch_size=settings.evaluate.batch_size)
        if settings.excise.passes > 1:
            edit, edit.details["passes"] = refine(loaded, prompts, settings, reporter, directions, edit)
        return edit

    def sections(self) -> dict:
        """The record's directions, selection and optimize sections."""
        d = self.directions
        return {"directions": {"method": d.method, "k": d.k, "layer": d.layer, "position": d.position,
                               "layer_norms": d.layer_norms, "contrast": d.contrast, "fit": d.fit},
                "selection": self.selection.to_dict(),
                "optimize": None if self.grid is None else self.grid.to_dict()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What directions.safetensors holds."""
        d = self.directions
        tensors = {"basis": d.basis, "mean_diff": d.mean_diff}
        if d.mean_diffs is not None:
            tensors["mean_diffs"] = d.mean_diffs  # [L+1, d]: every layer, for the report
        return tensors


def edit_model(loaded: Loaded, prompts: PromptSets, settings: Settings, directions: Directions, reporter: Reporter,
               timings: dict[str, float], lora: str | None = None, overwrite: bool = False) -> Edited:
    """The kernel grid (when enabled) and EXCISE of :class:`FixedEdit` for given directions, in place."""
    fixed = FixedEdit(settings, lora, overwrite)
    fixed.directions = directions
    fixed.choose(loaded, prompts, reporter, timings)
    with _timed(timings, "excise", reporter):
        edit = fixed.excise(loaded, prompts, reporter)
    return Edited(fixed.settings, edit, fixed.grid, fixed.steering)


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


RunResult = Run  # the name before the study ran through this driver


def check_bake(source: str, settings: Settings, bake_from: str | None, output: str | None,
               overwrite: bool = False) -> None:
    """Before any work: `bake_from` is a safetensors checkpoint directory (and there is an output to
    bake into, outside it); a quantized or offloaded run that saves has a local checkpoint to bake
    (run.Run.bake_source)."""
    if bake_from is not None:
        if output is None:
            raise ConfigError("--bake-from bakes the edit into a copy of that checkpoint at --output: give one")
        shards_of(Path(bake_from).expanduser())
        check_output(output, overwrite, source=bake_from)
        return
    m = settings.model
    if output is not None and (m.quantization != "none" or m.max_memory is not None) and \
            not Path(source).expanduser().is_dir():
        raise ConfigError(f"model.quantization / model.max_memory: the edit is baked into the full-precision "
                          f"checkpoint, and {source!r} is not a local checkpoint directory: pass --bake-from DIR "
                          "(its safetensors copy)")


def obliterate(model: str | Loaded, /, preset: str = "basic", output: str | None = None, *, overwrite: bool = False,
               reporter: Reporter | None = None, lora: str | None = None, overrides: dict | None = None,
               study: dict | None = None, run_dir: str | None = None, pick: int | None = None, worker: bool = False,
               bake_from: str | None = None, before: Evaluation | None = None, **sections: dict) -> Run:
    """Run every stage on `model`: an alias, directory, .gguf file or hub id, or a models.load.Loaded
    (used as it is, not reloaded, and edited in place), with `preset` (a name or a .toml file).

    Settings: the preset < ``OBLITERATUS_*`` environment < `overrides` (nested dict) < `sections`, e.g.
    ``obliterate(m, "basic", excise={"lam": 2}, data={"n_train": 8})``. With `output` the run is saved
    there (as ``run.save(output, overwrite)`` does later); the output, `lora` and the prompt files are
    checked before any work. With `lora`, the fixed edit is also written as a PEFT LoRA adapter there.

    The edit is chosen by the preset's strategy: the fixed edit, the kernel grid or the Optuna study
    (``optimize.enabled``, ``search = "study"``; also whenever `study` is given). The study's own
    options: `study` (``optimize.study`` fields, over the preset's), `run_dir` (where the default SQLite
    study lives; default ``<output>.study`` or ``obliteratus-runs/<study name>``), `pick` (bake this
    trial number) and `worker` (only run trials, then return: no edit).

    With `bake_from` (a full-precision safetensors checkpoint of the same model) REBIRTH bakes the edit
    plan into it instead of saving the model in memory; a run on quantized or offloaded weights
    (``model.quantization``, ``model.max_memory``) bakes the directory it loaded when it is given none.
    With `before` (``run.before`` of an earlier run of the same model on the same test prompts and
    evaluate settings, e.g. another preset's) VERIFY does not measure the unedited model again.
    Returns a :class:`run.Run`."""
    reporter = reporter or Reporter()
    settings = resolve_settings(load_preset(preset), deep_merge(overrides or {}, sections))
    given = isinstance(model, Loaded)
    source = model.source if given else model
    if study is not None or uses_study(settings):
        if lora is not None:
            raise ConfigError(f"--lora: preset {preset!r} bakes an optimizer trial; export from a fixed preset")
        choice = StudyEdit(settings, source, preset, output, study, run_dir, pick, worker)
    else:
        if worker or pick is not None or run_dir is not None:
            raise ConfigError(f"worker, pick and run_dir are options of the optimizer study; preset {preset!r} "
                              "does not run one (optimize.enabled with search = 'study')")
        choice = FixedEdit(settings, lora, overwrite)
    if not worker:
        for target, other in ((output, lora), (lora, output)):
            if target is not None:
                check_output(target, overwrite, source=source, others=(other,))  # fail before any work
    check_bake(source if not given else model.path, settings, bake_from, output, overwrite)
    splits = split_prompt_sets(settings)  # a bad prompt file fails before the model loads
    timings: dict[str, float] = {}
    with ExitStack() as locks:  # the study's SQLite lock, held until the run is saved
        choice.prepare(splits, source, given, locks)
        if given:
            loaded = model
        else:
            with _timed(timings, "summon", reporter):
                loaded = summon(model, settings.model)
        check_held(loaded.adapter, settings.excise)  # an edit quantized or offloaded weights cannot take fails now
        with _timed(timings, "probe", reporter):
            prompts = prepare_prompts(loaded.tokenizer, settings, max_positions(loaded.model), splits)
            cache = probe(loaded, prompts, settings, reporter)
        with _timed(timings, "distill", reporter):
            choice.distill(loaded, cache, prompts, reporter)
        pca = choice.pca(cache)
        del cache
        choice.choose(loaded, prompts, reporter, timings)
        run = Run(preset, choice.settings, loaded, prompts, choice, timings=timings, pca=pca, bake_from=bake_from)
        if worker:
            return run
        ev, step = settings.evaluate, reporter.task
        cap = capability_set(loaded.tokenizer, settings)
        if before is not None:
            check_before(before, prompts, ev)
            run.before = before
        else:
            with _timed(timings, "verify_before", reporter):
                run.before = evaluate_model(loaded.model, loaded.tokenizer, prompts.part("harmful", "test"),
                                            prompts.part("harmless", "test"), ev, None, step, make_reference=True,
                                            capability=cap)
        with _timed(timings, "excise", reporter):
            run.edit = choice.excise(loaded, prompts, reporter)
        with _timed(timings, "verify_after", reporter):
            run.after = evaluate_model(loaded.model, loaded.tokenizer, prompts.part("harmful", "test"),
                                       prompts.part("harmless", "test"), ev, run.before.reference, step,
                                       capability=cap)
        if output is not None:
            run.save(output, overwrite, reporter)
    return run


__all__ = ["Edited", "FixedEdit", "PromptSets", "Reporter", "Run", "RunResult", "capability_set", "edit_model",
           "obliterate", "prepare_prompts", "probe", "split_prompt_sets", "uses_study"]
