"""DISTILL interface: a direction method maps activations at one layer to an orthonormal basis.

A method is a pure function ``fit(harmful [n, d], harmless [m, d], k, config) -> [k, d]`` registered
once under its name with :func:`register_direction_method`, together with the pydantic model of its
own options (the preset's ``[directions.<name>]`` table, validated with ``extra="forbid"``); the
pipeline looks methods up by name. Methods that need the model itself (RDO, SAE, jailbreak
contrast) are driven by the pipeline and register with ``needs_model=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import BaseModel

from ..errors import ConfigError
from ..options import NoOptions, parse_options

FitFn = Callable[[torch.Tensor, torch.Tensor, int, Any], torch.Tensor]


@dataclass(frozen=True)
class DirectionMethod:
    name: str
    description: str
    fit: FitFn
    max_directions: int | None  # None = any k
    options: type[BaseModel] = NoOptions
    needs_model: bool = False
    reports_fit: bool = False  # fit(..., info=dict) fills in what the fit did, for the run's metadata

    def parse_options(self, table: dict | None) -> BaseModel:
        return parse_options(self.options, table, f"[directions.{self.name}]")


_REGISTRY: dict[str, DirectionMethod] = {}


def register_direction_method(name: str, description: str, fit: FitFn, max_directions: int | None = None, *,
                              options: type[BaseModel] = NoOptions, needs_model: bool = False,
                              reports_fit: bool = False) -> None:
    if not name.isidentifier():
        raise ValueError(f"direction method name {name!r} must be an identifier")
    if name in _REGISTRY:
        raise ValueError(f"direction method {name!r} is already registered")
    if options.model_config.get("extra") != "forbid":
        raise ValueError(f"options model of {name!r} must set extra='forbid'")
    _REGISTRY[name] = DirectionMethod(name, description, fit, max_directions, options, needs_model, reports_fit)


def direction_methods() -> dict[str, DirectionMethod]:
    return dict(_REGISTRY)


def get_direction_method(name: str) -> DirectionMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown direction method {name!r}; valid: {', '.join(sorted(_REGISTRY))}") from None


RANK_RTOL = torch.finfo(torch.float32).eps ** 0.5  # ≈ 3.5e-4: below this a float32 row is rounding noise


def orthonormalize(basis: torch.Tensor, rtol: float = RANK_RTOL, min_rows: int = 1) -> torch.Tensor:
    """Rows of `basis` [k, d] -> [m, d] (m ≤ k) orthonormal rows spanning the same space, each keeping
    its sign (row i has a positive component along input row i). Rank-checked Gram–Schmidt, twice
    ("twice is enough": orthogonal to rounding), in float64:

        v_i = b_i − Σ_{j<i} (b_i·q_j) q_j,   q_i = v_i / ‖v_i‖   kept only if ‖v_i‖ > rtol·‖b_i‖

    A row that (nearly) lies in the span of the rows before it is dropped: normalising its residual
    would blow rounding noise up to a unit vector, an unrelated direction. Raises ActivationError
    when fewer than `min_rows` rows are left (min_rows = k: every row must be independent)."""
    from ..errors import ActivationError

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
    read: torch.Tensor | None = None  # LEACE: oblique read rows [k, d] with read·basisᵀ = I
    harmless_mean: torch.Tensor | None = None  # [d] harmless mean at (layer, position)
    layer_weights: dict[int, float] | None = None  # per-layer strengths (spectral / informed), layer -> w
    mean_diffs: torch.Tensor | None = None  # [L+1, d] mean differences of every layer at `position` (report)
    fit: dict = field(default_factory=dict)  # what an iterative method reports about its fit (RDO: steps, losses)

    def __post_init__(self):
        gram = self.basis.double() @ self.basis.double().T
        assert torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-4), "basis not orthonormal"

    @property
    def k(self) -> int:
        return self.basis.shape[0]
