"""Run settings: one typed model holds every default; presets (TOML) only override it.

Precedence, written down once (see :func:`resolve_settings`):
CLI overrides > ``OBLITERATUS_*`` environment variables > preset TOML > defaults here.

Environment variables name a nested field with double underscores, e.g.
``OBLITERATUS_EXCISE__LAM=2`` or ``OBLITERATUS_DATA__N_TEST=32``; values are parsed as TOML
values when they can be (numbers, booleans) and taken as strings otherwise.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .directions import direction_methods, get_direction_method
from .errors import ConfigError
from .evaluate.judges import get_judge
from .excise.base import check_excise, check_settings
from .excise.heads import HeadOptions
from .excise.householder import HouseholderOptions
from .excise.kernels import KernelOptions
from .excise.moe import MoeOptions
from .excise.neurons import NeuronOptions
from .models.options import ModelSettings
from .optimize.options import StudyOptions
from .select import layer_selectors


class Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number (`--set excise.lam=inf`) is an error here, not after VERIFY
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSettings(Section):
    harmful: str = Field("builtin:harmful", description="builtin:NAME, a .txt/.jsonl/.csv file, or a HF dataset id.")
    harmless: str = Field("builtin:harmless", description="Same forms as `harmful`.")
    column: str = Field("prompt", description="Column holding the prompt in .jsonl/.csv files and datasets.")
    n_train: int = Field(128, ge=2, description="Prompts per class used to find directions.")
    n_val: int = Field(32, ge=1, description="Prompts per class used to choose layers (never evaluated on).")
    n_test: int = Field(64, ge=1, description="Held-out prompts per class used only by VERIFY.")
    seed: int = Field(0, description="Seed of the deterministic train/val/test split.")
    chat_template: bool = Field(True, description="Wrap prompts in the tokenizer's chat template when it has one.")
    system_prompt: str | None = Field(None, description="Optional system message for the chat template.")
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the chat template (tokenizer.apply_chat_template), "
                                          "the same for PROBE, DISTILL and VERIFY: e.g. {enable_thinking = false} "
                                          "(Qwen3, SmolLM3) or {reasoning_effort = \"low\"} (gpt-oss). A key the "
                                          "template never reads is an error (docs/thinking.md).")
    response_prefix: str = Field("", description="Text appended to every formatted prompt, after the chat "
                                                  "template's generation prompt: the model's answer starts from "
                                                  "it, e.g. \"<think>\\n\\n</think>\\n\\n\" for an empty "
                                                  "reasoning block (docs/thinking.md).")
    max_prompt_tokens: int = Field(4096, ge=1, description="Longest prompt accepted, in tokens with the chat template "
                                                           "(a longer one is an error: attention memory grows with "
                                                           "its square); the model's position limit applies too.")


class ProbeSettings(Section):
    batch_size: int = Field(0, ge=0, description="Prompts per forward pass; 0 = auto (free CUDA memory, 32 on CPU).")
    positions: int = Field(1, ge=1, description="Keep the last k (post-instruction) token positions; "
                                                 "arditi and cosmic layer selection choose among them, the other "
                                                 "layer methods use the last.")
    share_prefix: bool = Field(True, description="Run the prompts' common template prefix once per batch and share "
                                                  "its KV cache (shared_prefix.py); same activations, fewer tokens.")


class DirectionSettings(Section):
    """Besides the fields below, a table named after a direction method (``[directions.whitened_svd]``)
    holds that method's own options; it is validated by the method's options model."""

    method: str = Field("diff_means", description="Direction method (see `obliteratus presets`).")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-method option tables, keyed by method name (filled from sub-tables)."
    )

    @model_validator(mode="before")
    @classmethod
    def _collect_tables(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            tables = {k: data.pop(k) for k in list(data) if k not in cls.model_fields and isinstance(data[k], dict)}
            if tables:
                data["options"] = {**data.get("options", {}), **tables}
        return data

    @model_validator(mode="after")
    def _check_tables(self) -> "DirectionSettings":
        methods = direction_methods()
        for name, table in self.options.items():
            if name not in methods:
                raise ValueError(f"[directions.{name}]: no direction method {name!r}; valid: {', '.join(sorted(methods))}")
            methods[name].parse_options(table)
        if self.biproject and not (self.project_harmless and self.scope == "global"):
            raise ValueError("biproject projects the source direction against each layer's harmless mean: it needs "
                             "project_harmless = true and scope = 'global'")
        return self

    def options_for(self, name: str) -> BaseModel:
        return get_direction_method(name).parse_options(self.options.get(name))
    n_directions: int = Field(1, ge=1, description="Directions to extract (methods that give one ignore k > 1).")
    contrast: Literal["prompts", "behaviour", "filtered"] = Field(
        "prompts", description="prompts: harmful vs harmless train prompts; behaviour: harmful train prompts the "
                               "model refuses vs those it answers (falls back to prompts-like groups when either has "
                               "fewer than min_group prompts); filtered: refused harmful vs unrefused harmless "
                               "(Arditi et al.'s data filter)."
    )
    label: Literal["generate", "logodds"] = Field(
        "generate", description="behaviour/filtered: how a train prompt is judged refused: generate = greedy "
                                "answer of label_tokens tokens judged by the marker judge (stops early once "
                                "decided); logodds = refusal log-odds of the first answer token > refusal_threshold "
                                "(free: read from the probe's final residual; Arditi et al.'s filter score).")
    label_tokens: int = Field(24, ge=1, description="generate: tokens per train prompt at most.")
    refusal_threshold: float = Field(0.0, description="logodds: a prompt is refused when its refusal log-odds exceed this.")
    min_group: int = Field(8, ge=1, description="behaviour: fewest prompts per group before falling back.")
    scope: Literal["global", "per_layer"] = Field(
        "global", description="global: one basis from the source layer for every writer; per_layer: each layer's "
                              "writers use the difference of means at that layer's output (Heretic's per-layer scope).")
    index: float | None = Field(None, ge=0.0, description="A fractional source layer (resid_pre axis): the direction is "
                                                          "interpolated between the neighbouring layers' (Heretic's "
                                                          "direction_index); replaces layer selection.")
    index_relative: bool = Field(False, description="index is a fraction of n_layers (Heretic writes its ranges so).")
    project_harmless: bool = Field(
        False, description="Orthogonalise the directions against the harmless mean at the source layer (grimjim's "
                           "projected abliteration); layer selection scores the projected directions too."
    )
    biproject: bool = Field(
        False, description="grimjim's biprojected abliteration (needs project_harmless): each layer's writers remove "
                           "the source direction orthogonalised against that layer's own harmless mean (at its output); "
                           "the embeddings keep the source-layer projection."
    )


class LayerSettings(Section):
    method: str = Field(
        "arditi", description="How the source layer is chosen (a layer selector in select/, registered by name): "
                              "arditi: Arditi's bypass/induce/KL scores, fixed: a fixed layer or fraction, knee: the "
                              "knee of the per-layer strength curve, cosmic: COSMIC's cosine scores.")
    layer: int | None = Field(None, description="fixed: layer index (resid_pre of that layer).")
    fraction: float = Field(0.6, gt=0.0, lt=1.0,
                            description="fixed: layer = int(fraction * n_layers) if `layer` unset (Sumandora's rule).")
    kl_threshold: float | None = Field(0.1, description="arditi/cosmic: drop candidates whose ablation KL exceeds this.")
    induce_threshold: float | None = Field(0.0, description="arditi: drop candidates whose addition does not induce refusal.")
    induce_relative: bool = Field(
        False, description="arditi: measure the induce score relative to the un-steered harmless prompts' refusal "
                           "log-odds (the direction must raise refusal by induce_threshold) instead of absolutely."
    )
    prune_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="arditi/knee/cosmic: never pick from the last fraction of layers.")
    min_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="First candidate layer as a fraction of depth.")
    knee_normalize: bool = Field(True, description="knee: divide ||mean diff|| by the mean activation norm per layer.")
    cosmic_fraction: float = Field(0.1, gt=0.0, le=1.0,
                                   description="cosmic: fraction of layers (least harmful/harmless similarity) scored.")


class ExciseSettings(Section):
    method: str = Field(
        "project", description="Excise variant (excise/, registered by name): project: W' = W - lam*QQ^T W; "
                               "householder: orthogonal reflection sending d to a target; heads: project only the "
                               "top attention heads' o_proj slices; leace: LEACE's oblique projection (reads along "
                               "the whitened direction).")
    mode: Literal["weights", "hooks"] = Field(
        "weights", description="weights: edit the weights; hooks: leave them and ablate at inference time with "
                               "hooks saved next to the model (steering.json), re-attached when it is loaded.")
    lam: float = Field(1.0, gt=0.0, description="lambda: 1 removes the direction, 2 reflects it.")
    norm_preserve: bool = Field(False, description="Rescale each input column of an edited matrix to its old norm.")
    biases: bool = Field(True, description="Also project the biases of the residual writers.")
    embeddings: bool = Field(True, description="Also project the token (and position) embeddings.")
    attention: bool = Field(True, description="Edit the attention output projections.")
    mlp: bool = Field(True, description="Edit the MLP down projections (and shared experts).")
    experts: bool = Field(True, description="Edit the routed experts of MoE layers with the global direction.")
    lm_head: bool = Field(False, description="Also project the lm_head's input side (untied heads only).")
    kernel_attn: KernelOptions | None = Field(None, description="Heretic-style per-layer strength of attention writers.")
    kernel_mlp: KernelOptions | None = Field(None, description="Heretic-style per-layer strength of MLP writers.")
    layer_weights: Literal["none", "spectral", "informed", "through_source"] = Field(
        "none", description="Per-layer strengths from DISTILL's measurements: spectral (DCT-smoothed profile of the "
                            "refusal signal, excise/spectral.py), informed (agreement of each layer's direction "
                            "with the source layer's, analysis/cross_layer.py) or through_source (only the "
                            "embeddings and layers 0..source are edited, excise/window.py; Arditi and COSMIC "
                            "selection then score each candidate with the same window).")
    spectral_bands: int = Field(3, ge=1, description="spectral: frequency bands of the layer profile.")
    spectral_decay: float = Field(1.6, ge=0.0, description="spectral: band t is scaled by exp(-decay * t).")
    informed_floor: float = Field(0.5, ge=0.0, lt=1.0, description="informed: layers whose direction has a cosine "
                                                                   "below this with the source's are not edited.")
    passes: int = Field(1, ge=1, description="Re-probe and excise again up to this many times (aggressive).")
    refine_cos: float = Field(0.99, gt=0.0, le=1.0, description="Stop re-probing once a pass would turn the refusal "
                                                                "direction found so far (the sum of the removed mean "
                                                                "differences) by less than this cosine.")
    householder: HouseholderOptions = Field(default_factory=HouseholderOptions)
    heads: HeadOptions = Field(default_factory=HeadOptions)
    neurons: NeuronOptions | None = Field(None, description="Also zero the MLP neurons that write most along d "
                                                            "(scored on the original weights).")
    moe: MoeOptions = Field(default_factory=MoeOptions)

    @model_validator(mode="after")
    def _consistent(self) -> "ExciseSettings":
        check_excise(self)  # the variants' declared capabilities decide which options combine (excise/base.py)
        return self


class OptimizeSettings(Section):
    """``[optimize]``: search the edit on the validation prompts before excising: the multi-objective
    Optuna study (optimize/study.py, ``[optimize.study]``; the ``optimized`` and ``heretic`` presets)
    or the small kernel grid (optimize/grid.py)."""

    enabled: bool = Field(False, description="Search on the validation prompts before excising.")
    search: Literal["study", "grid"] = Field("study", description="study: the Optuna search over Heretic's "
                                                                  "parameters (obliteratus optimize); grid: the "
                                                                  "kernel grid below, scored by refusal log-odds.")
    max_weight: list[float] = Field([0.8, 1.0, 1.2], description="Peak strengths.")
    position: list[float] = Field([0.5, 0.65, 0.8], description="Peak layer as a fraction of the last layer index.")
    distance: list[float] = Field([0.25, 0.5], description="Half-width as a fraction of the number of layers.")
    min_ratio: list[float] = Field([0.0, 0.5], description="Strength at the half-width, as a fraction of the peak.")
    tolerance: float = Field(0.25, ge=0.0, description="Admissible: refusal log-odds within this of the plain edit's.")
    study: StudyOptions = Field(default_factory=StudyOptions, description="The multi-objective Optuna search "
                                                                          "(`obliteratus optimize`).")


class EvalSettings(Section):
    max_new_tokens: int = Field(64, ge=1, description="Greedy tokens generated per test prompt.")
    kl_tokens: int = Field(16, ge=1, description="KL is averaged over this many teacher-forced tokens.")
    batch_size: int = Field(128, ge=1, description="Prompts per batch (generation, KL, the DISTILL passes that "
                                                   "score prompts); decoding costs less per prompt in bigger batches "
                                                   "(timings: docs/journal/option-measurements.md).")
    share_prefix: bool = Field(True, description="Run the prompts' common template prefix once per batch "
                                                 "(shared_prefix.py), where the model computes the same "
                                                 "logits that way (checked once per model).")
    judge: str = Field("markers", description="Refusal judge (evaluate/judges/): markers, prefix, strict, embedding, llm.")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="Options of the judge (its own model "
                                                                            "validates them), e.g. a model path.")
    perplexity: bool = Field(True, description="Measure perplexity on the built-in held-out text.")
    ppl_window: int = Field(256, ge=16, description="Tokens per perplexity window.")
    capability: int = Field(24, ge=0, description="Items per kind of the built-in multiple-choice capability check "
                                                  "(arithmetic, order, facts; evaluate/capability.py; 231 items at 24), "
                                                  "scored by log-prob before and after; 0 = off.")

    @model_validator(mode="after")
    def _known_judge(self) -> "EvalSettings":
        get_judge(self.judge)
        return self


class Settings(Section):
    description: str = ""
    kind: Literal["preset", "baseline"] = Field("preset", description="baseline: reproduces a published method.")
    source: str = Field("", description="Where a baseline's defaults come from (repository, file).")
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    probe: ProbeSettings = ProbeSettings()
    directions: DirectionSettings = DirectionSettings()
    layers: LayerSettings = LayerSettings()
    excise: ExciseSettings = ExciseSettings()
    optimize: OptimizeSettings = OptimizeSettings()
    evaluate: EvalSettings = EvalSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        if self.directions.method not in direction_methods():
            raise ValueError(
                f"unknown directions.method {self.directions.method!r}; valid: {', '.join(sorted(direction_methods()))}"
            )
        if self.optimize.enabled and self.optimize.search == "study" and self.excise.embeddings:
            raise ValueError("the optimizer's trials (optimize.search = 'study') edit the writers of layers 0..L-1 "
                             "through Heretic's kernels and never the embeddings: set excise.embeddings = false "
                             "(true would be silently ignored)")
        if self.layers.method not in layer_selectors():
            raise ValueError(f"unknown layers.method {self.layers.method!r}; valid: {', '.join(sorted(layer_selectors()))}")
        if self.layers.min_fraction >= 1.0 - self.layers.prune_fraction:
            raise ValueError("layers.min_fraction must be below 1 - layers.prune_fraction")
        check_settings(self)  # excise vs the other sections, from the variants' declarations (excise/base.py)
        return self


ENV_PREFIX = "OBLITERATUS_"


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_value(text: str) -> Any:
    """A TOML value when it parses as one (numbers, booleans, quoted strings), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def nest(dotted: dict[str, Any], sep: str = ".") -> dict:
    out: dict = {}
    for key, value in dotted.items():
        parts = [p for p in key.split(sep) if p]
        if not parts:
            raise ConfigError(f"setting {key!r}=...: no setting name (write section.field=value, e.g. excise.lam=2)")
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"setting {key!r}: {sep.join(parts[:i + 1])!r} is given a value and sub-settings")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"setting {key!r}: {sep.join(parts)!r} is given a value and sub-settings")
        node[parts[-1]] = value
    return out


def env_overrides(environ: dict[str, str] | None = None) -> dict:
    environ = os.environ if environ is None else environ
    flat = {
        key[len(ENV_PREFIX):].lower(): parse_value(value)
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and "__" in key
    }
    return nest(flat, sep="__")


def resolve_settings(preset: dict | None = None, cli: dict | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults < preset < environment < CLI. Every field error is reported at once."""
    merged = deep_merge(deep_merge(preset or {}, env_overrides(environ)), cli or {})
    bad = non_finite(merged)  # the technique tables' own models may accept NaN; no setting means it
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as err:
        raise ConfigError("invalid settings:\n" + field_errors(err, bad)) from None
    if bad:
        raise ConfigError("invalid settings:\n" + "\n".join(f"  {key}: Input should be a finite number" for key in bad))
    return settings


def field_errors(err: ValidationError, extra: list[str] = ()) -> str:
    """One indented ``  field.path: message`` line per error; the `extra` fields (NaN or infinite
    values, :func:`non_finite`) say so rather than whichever bound NaN happened to fail."""
    errors = {".".join(str(p) for p in e["loc"]) or "<root>": e["msg"] for e in err.errors()}
    errors.update({key: "Input should be a finite number" for key in extra})
    return "\n".join(f"  {key}: {msg}" for key, msg in errors.items())


def validated(model: type[BaseModel], data: dict, what: str):
    """`model` validated from `data`, or a ConfigError listing every field error (``what``: its name)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {what}:\n" + field_errors(err)) from None


def non_finite(data: Any, path: str = "") -> list[str]:
    """Dotted paths of the NaN or infinite floats in nested dicts and lists."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [path or "<root>"]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(data, (list, tuple)):
        return [p for i, v in enumerate(data) for p in non_finite(v, f"{path}.{i}")]
    return []
