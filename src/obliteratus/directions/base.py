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


def orthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """Rows of `basis` [k, d] -> orthonormal rows spanning the same space, each keeping its sign."""
    q, r = torch.linalg.qr(basis.T.to(torch.float64))  # q: [d, k]
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.to(basis.dtype)


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
    harmless_mean: torch.Tensor | None = None  # [d] at (layer, position): Householder's harmless target
    layer_weights: dict[int, float] | None = None  # per-layer strengths (spectral / informed), layer -> w
    mean_diffs: torch.Tensor | None = None  # [L+1, d] mean differences of every layer at `position` (report)
    fit: dict = field(default_factory=dict)  # what an iterative method reports about its fit (RDO: steps, losses)

    def __post_init__(self):
        gram = self.basis.double() @ self.basis.double().T
        assert torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-4), "basis not orthonormal"

    @property
    def k(self) -> int:
        return self.basis.shape[0]
