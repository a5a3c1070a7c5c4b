"""EXCISE: weight edits that remove (λ = 1) or reflect (λ = 2) directions from the residual stream."""

from .apply import EditReport, excise
from .hooks import ablated
from .projection import norm_preserving_project, project_out, project_vector, residual_norms

__all__ = ["EditReport", "ablated", "excise", "norm_preserving_project", "project_out", "project_vector",
           "residual_norms"]
