"""Layer selection (part of DISTILL): one module per selector, registered by name (``layers.method``)."""

from ..registry import import_technique_modules
from .base import LayerSelector, SelectContext, get_layer_selector, layer_selectors, register_layer_selector
from .layers import LayerSelection

import_technique_modules(__name__, __path__)  # every selector module registers itself on import

__all__ = ["LayerSelection", "LayerSelector", "SelectContext", "get_layer_selector", "layer_selectors",
           "register_layer_selector"]
