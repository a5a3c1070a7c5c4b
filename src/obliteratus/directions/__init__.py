"""DISTILL: direction methods (one file each, registered by name) and layer selection."""

from . import diff_means, svd  # noqa: F401  (registration)
from .base import Directions, DirectionMethod, direction_methods, get_direction_method, orthonormalize, register_direction_method

__all__ = ["DirectionMethod", "Directions", "direction_methods", "get_direction_method", "orthonormalize",
           "register_direction_method"]
