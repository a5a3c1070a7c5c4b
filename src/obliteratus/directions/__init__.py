"""DISTILL: direction methods (one file each, registered by name) and the driver; layer selection is in select/."""

from ..registry import import_technique_modules
from .base import (Basis, DirectionMethod, Directions, FitContext, direction_methods, get_direction_method, orthonormalize,
                   register_direction_method)

# every method module registers itself on import; driver.py sits above excise and select (tests/test_imports.py)
import_technique_modules(__name__, __path__, skip=("driver",))

__all__ = ["Basis", "DirectionMethod", "Directions", "FitContext", "direction_methods", "get_direction_method",
           "orthonormalize", "register_direction_method"]
