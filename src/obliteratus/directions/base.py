"""DISTILL interface: a direction method maps the contrast at the source layer to an orthonormal basis.

Every method is one module that registers itself once with :func:`register_direction_method`: its
name, the pydantic model of its own options (the preset's ``[directions.<name>]`` table, validated
with ``extra="forbid"``) and its fit. The driver calls ``method.fit_context(FitContext) -> Basis``
for every method alike and never names one:

* a closed-form method gives the pure tensor function ``fit(harmful [n, d], harmless [m, d], k,
  options) -> [k, d]`` and gets the default :meth:`DirectionMethod.fit_context` around it;
* a method that needs more (the model, the prompts, the whole cache: RDO, jailbreak contrast, cone)
  also gives ``pipeline_fit(FitContext) -> Basis`` in its own file and registers ``needs_model=True``.

What a fit reports about itself (RDO's steps and losses, the SAE's epochs) is :attr:`Basis.fit`;
it lands in ``obliteratus.json`` under ``directions.fit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from pydantic import BaseModel

from ..errors import ActivationError
from ..registry import NoOptions, parse_options
from ..registry import Registry
from ..shared_prefix import can_share_prefix

if TYPE_CHECKING:
    from ..batching import Encoded
    from ..settings import Settings

FitFn = Callable[..., torch.Tensor]  # (harmful [n, d], harmless [m, d], k, options, ...) -> [k, d]


@dataclass(frozen=True)
class Basis:
    """What a direction method returns to the driver: the rows and what the fit reports about itself."""

    rows: torch.Tensor  # [k, d] orthonormal, float32
    fit: dict = field(default_factory=dict)  # e.g. {"rdo": {...}}: lands in Directions.fit


@dataclass(frozen=True)
class FitContext:
    """Everything a direction method may use at the chosen source (layer, position). Closed-form
    methods read only the first fields; `loaded` … `task` are there for the methods that need the
    model or the prompts (None when a caller fits from activations alone)."""

    positive: torch.Tensor  # [n, d] the contrast's first group (harmful / refused) at (layer, position)
    negative: torch.Tensor  # [m, d] its second group
    k: int  # directions asked for, already capped at the method's max_directions
    options: BaseModel  # the method's validated [directions.<name>] table
    layer: int  # index into the activation cache's layer axis (resid_pre of that layer)
    position: int  # negative offset of the token position
    mean_diff: torch.Tensor  # [d] the contrast's difference of means at (layer, position)
    device: torch.device | str = "cpu"  # where the model lives (a method that trains, e.g. the SAE, trains there)
    loaded: Any = None  # the Loaded model (model, adapter, tokenizer)
    settings: Any = None  # the run's Settings
    train: dict | None = None  # encoded train prompts: {"harmful": Encoded, "harmless": Encoded}
    encode: Callable[[list[str]], Any] | None = None  # prompts -> Encoded, as the train prompts were encoded
    harmful_texts: list[str] | None = None  # the harmful train prompts' text
    cache: Any = None  # the whole ActivationCache of the train prompts
    task: Callable[[str, int], Callable[[int], None]] | None = None  # progress: (label, total) -> advance(n)


@dataclass(frozen=True)
class DirectionMethod:
    name: str
    description: str
    fit: FitFn  # the pure tensor function (the math; tests call it directly)
    max_directions: int | None  # None = any k
    options: type[BaseModel] = NoOptions
    needs_model: bool = False
    reports_fit: bool = False  # fit(..., info=dict) fills in what the fit did, for the run's metadata
    pipeline_fit: Callable[[FitContext], Basis] | None = None  # set by methods that need more than two groups
    fractional_index: bool = False  # directions.index may replace the fit by an interpolated difference of means
    mean_difference: bool = False  # the basis is the difference of means (an excise variant that refits it may take it)

    def parse_options(self, table: dict | None) -> BaseModel:
        return parse_options(self.options, table, f"[directions.{self.name}]")

    def fit_context(self, ctx: FitContext) -> Basis:
        """The method's basis in the pipeline: its own `pipeline_fit`, or `fit` on the two groups
        moved to the model's device (returned on the CPU)."""
        if self.pipeline_fit is not None:
            return self.pipeline_fit(ctx)
        info: dict = {}  # e.g. the SAE's epochs and held-out losses, when the method reports its fit
        report = {"info": info} if self.reports_fit else {}
        basis = self.fit(ctx.positive.to(ctx.device), ctx.negative.to(ctx.device), ctx.k, ctx.options, **report)
        return Basis(basis.float().cpu(), {self.name: info} if self.reports_fit else {})


DIRECTION_METHODS: Registry[DirectionMethod] = Registry("direction method")


def register_direction_method(name: str, description: str, fit: FitFn, max_directions: int | None = None, *,
                              options: type[BaseModel] = NoOptions, needs_model: bool = False,
                              reports_fit: bool = False, pipeline_fit: Callable[[FitContext], Basis] | None = None,
                              fractional_index: bool = False, mean_difference: bool = False) -> DirectionMethod:
    if needs_model and pipeline_fit is None:
        raise ValueError(f"direction method {name!r} needs the model: register it with pipeline_fit=, the "
                         "function that fits it from a FitContext")
    method = DirectionMethod(name, description, fit, max_directions, options, needs_model, reports_fit, pipeline_fit,
                             fractional_index, mean_difference)
    return DIRECTION_METHODS.register(name, method, options)


def direction_methods() -> dict[str, DirectionMethod]:
    return DIRECTION_METHODS.as_dict()


def get_direction_method(name: str) -> DirectionMethod:
    return DIRECTION_METHODS.get(name)


RANK_RTOL = torch.finfo(torch.float32).eps ** 0.5  # ≈ 3.5e-4: below this a float32 row is rounding noise


def orthonormalize(basis: torch.Tensor, rtol: float = RANK_RTOL, min_rows: int = 1) -> torch.Tensor:
    """Rows of `basis` [k, d] -> [m, d] (m ≤ k) orthonormal rows spanning the same space, each keeping
    its sign (row i has a positive component along input row i). Rank-checked Gram–Schmidt, twice
    ("twice is enough": orthogonal to rounding), in float64:

        v_i = b_i − Σ_{j<i} (b_i·q_j) q_j,   q_i = v_i / ‖v_i‖   kept only if ‖v_i‖ > rtol·‖b_i‖

    A row that (nearly) lies in the span of the rows before it is dropped: normalising its residual
    would blow rounding noise up to a unit vector, an unrelated direction. Raises ActivationError
    when fewer than `min_rows` rows are left (min_rows = k: every row must be independent)."""
    b = basis.detach().to(torch.float64)  # [k, d]
    if b.ndim != 2:
        raise ActivationError(f"orthonormalize: expected [k, d] rows, got shape {tuple(basis.shape)}")
    q = b.new_zeros((0, b.shape[1]))  # [m, d]
    for row in b:
        v = row - q.T @ (q @ row)
        v = v - q.T @ (q @ v)  # second pass
        norm = v.norm()
        if torch.isfinite(norm) and norm > rtol * row.norm() and norm > 0:
            q = torch.cat([q, (v / norm)[None]])
    if len(q) < min_rows:
        raise ActivationError(f"orthonormalize: only {len(q)} of {len(b)} rows are linearly independent (a row "
                              f"keeps less than {rtol:.1e} of its norm outside the span of the others, or is zero); "
                              f"{min_rows} needed")
    return q.to(basis.dtype)


def shares_prefix(model, encoded: Encoded, settings: Settings) -> bool:
    """Whether DISTILL's generation and scoring passes over `encoded` run the prompts' common template
    prefix once per batch: ``evaluate.share_prefix`` and the model computes the same logits that way."""
    return settings.evaluate.share_prefix and can_share_prefix(model, encoded)


def point_toward(basis: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Flip each row of `basis` [k, d] so that it has a non-negative component along `delta` [d]
    (from harmless toward harmful); float32."""
    signs = torch.sign(basis.double() @ delta.double())  # [k]
    signs[signs == 0] = 1.0
    return (basis.double() * signs[:, None]).float()


@dataclass(frozen=True)
class Directions:
    """The result of DISTILL: what gets excised, and where it came from."""

    basis: torch.Tensor  # [k, d] orthonormal rows, float32
    method: str
    layer: int  # index into the activation cache's layer axis (resid_pre of that layer)
    position: int  # negative offset of the token position, -1 = last
    mean_diff: torch.Tensor  # [d] unnormalised harmful - harmless mean at (layer, position)
    layer_norms: list[float] = field(default_factory=list)  # ||mean diff|| per layer (report)
    contrast: dict = field(default_factory=dict)  # which groups were contrasted (Contrast.info())
    layer_bases: dict[int, torch.Tensor] | None = None  # per-layer scope: {layer: [k, d]} for that layer's writers
    read: torch.Tensor | None = None  # oblique read rows [k, d], read·basisᵀ = I, from an excise variant's refit (LEACE)
    harmless_mean: torch.Tensor | None = None  # [d] harmless mean at (layer, position)
    layer_weights: dict[int, float] | None = None  # per-layer strengths (spectral / informed), layer -> w
    mean_diffs: torch.Tensor | None = None  # [L+1, d] mean differences of every layer at `position` (report)
    fit: dict = field(default_factory=dict)  # Basis.fit: what a method reports about its fit (RDO: steps, losses)

    def __post_init__(self):
        gram = self.basis.double() @ self.basis.double().T
        assert torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-4), "basis not orthonormal"

    @property
    def k(self) -> int:
        return self.basis.shape[0]
