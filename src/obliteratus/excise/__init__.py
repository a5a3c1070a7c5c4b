"""EXCISE: weight edits that remove (λ = 1) or reflect (λ = 2) directions from the residual stream."""

from ..registry import import_technique_modules
from .apply import EditReport, excise
from .base import ExciseVariant, excise_variants, get_excise_variant, register_excise_variant
from .hook_form import ablated
from .projection import norm_preserving_project, project_out, project_vector, residual_norms

import_technique_modules(__name__, __path__)  # every variant module registers itself on import

__all__ = ["EditReport", "ExciseVariant", "ablated", "excise", "excise_variants", "get_excise_variant",
           "norm_preserving_project", "project_out", "project_vector", "register_excise_variant", "residual_norms"]
