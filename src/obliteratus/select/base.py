"""Layer selection interface: a layer selector chooses DISTILL's source layer (and token position).

Each selector is one module that registers itself once with :func:`register_layer_selector` under
the name ``layers.method`` takes; the DISTILL driver calls ``selector.select(SelectContext)`` for
every selector alike and never names one. ``directions.index`` (a fractional layer, Heretic's
direction_index) replaces the selector; its interpolation is in select/interpolate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from ..settings import Settings
    from .layers import LayerSelection

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


@dataclass(frozen=True)
class SelectContext:
    """What a selector may use: the model, the contrast of the train activations, their per-layer
    mean differences and the validation prompts."""

    model: Any
    adapter: Any  # ArchitectureAdapter
    tokenizer: Any
    contrast: Any  # directions.contrast.Contrast: positive [n, positions, L+1, d], negative [m, ...]
    mean_diffs: torch.Tensor  # [positions, L+1, d]
    val: dict  # {"harmful": Encoded, "harmless": Encoded}: the validation prompts
    settings: Settings
    task: Progress
    orthogonal_to: torch.Tensor | None  # [positions, L+1, d] harmless means to project candidates against, or None
    share_prefix: Callable[[], bool]  # whether the validation prompts may share their template prefix (checked lazily)


@dataclass(frozen=True)
class LayerSelector:
    name: str
    description: str
    select: Callable[[SelectContext], LayerSelection]


LAYER_SELECTORS: Registry[LayerSelector] = Registry("layer selector")


def register_layer_selector(name: str, description: str, select: Callable[[SelectContext], LayerSelection]) -> LayerSelector:
    return LAYER_SELECTORS.register(name, LayerSelector(name, description, select))


def layer_selectors() -> dict[str, LayerSelector]:
    return LAYER_SELECTORS.as_dict()


def get_layer_selector(name: str) -> LayerSelector:
    return LAYER_SELECTORS.get(name)
