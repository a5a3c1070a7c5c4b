"""DISTILL: direction methods (one file each, registered by name) and layer selection."""

from . import (cone, cot_aware, diff_means, jailbreak, leace, rdo, sae, svd, wasserstein,  # noqa: F401  (registration)
               whitened_svd)
from .base import Directions, DirectionMethod, direction_methods, get_direction_method, orthonormalize, register_direction_method

__all__ = ["DirectionMethod", "Directions", "direction_methods", "get_direction_method", "orthonormalize",
           "register_direction_method"]
