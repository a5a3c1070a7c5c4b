"""DISTILL interface: a direction method maps activations at one layer to an orthonormal basis.

A method is a pure function ``fit(harmful [n, d], harmless [m, d], k) -> [k, d]`` registered once
under its name with :func:`register_direction_method`; the pipeline looks methods up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ConfigError

FitFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class DirectionMethod:
    name: str
    description: str
    fit: FitFn
    max_directions: int | None  # None = any k


_REGISTRY: dict[str, DirectionMethod] = {}


def register_direction_method(name: str, description: str, fit: FitFn, max_directions: int | None = None) -> None:
    if not name.isidentifier():
        raise ValueError(f"direction method name {name!r} must be an identifier")
    if name in _REGISTRY:
        raise ValueError(f"direction method {name!r} is already registered")
    _REGISTRY[name] = DirectionMethod(name, description, fit, max_directions)


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


@dataclass(frozen=True)
class Directions:
    """The result of DISTILL: what gets excised, and where it came from."""

    basis: torch.Tensor  # [k, d] orthonormal rows, float32
    method: str
    layer: int  # index into the activation cache's layer axis (resid_pre of that layer)
    position: int  # negative offset of the token position, -1 = last
    mean_diff: torch.Tensor  # [d] unnormalised harmful - harmless mean at (layer, position)
    layer_norms: list[float] = field(default_factory=list)  # ||mean diff|| per layer (report)

    def __post_init__(self):
        gram = self.basis.double() @ self.basis.double().T
        assert torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-4), "basis not orthonormal"

    @property
    def k(self) -> int:
        return self.basis.shape[0]
