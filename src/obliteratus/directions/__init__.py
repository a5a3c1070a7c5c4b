"""DISTILL: direction methods (one file each, registered by name) and the driver; layer selection is in select/."""

from . import (cone, cot_aware, diff_means, jailbreak, leace, rdo, sae, svd, wasserstein,  # noqa: F401  (registration)
               whitened_svd)
from .base import (Basis, DirectionMethod, Directions, FitContext, direction_methods, get_direction_method, orthonormalize,
                   register_direction_method)

__all__ = ["Basis", "DirectionMethod", "Directions", "FitContext", "direction_methods", "get_direction_method",
           "orthonormalize", "register_direction_method"]
