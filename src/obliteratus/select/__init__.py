"""Layer selection (part of DISTILL): one module per selector, registered by name (``layers.method``)."""

from . import cosmic, knee, layers  # noqa: F401  (registration)
from .base import LayerSelector, SelectContext, get_layer_selector, layer_selectors, register_layer_selector
from .layers import LayerSelection

__all__ = ["LayerSelection", "LayerSelector", "SelectContext", "get_layer_selector", "layer_selectors",
           "register_layer_selector"]
