"""Refusal judges, one per module, selected by name (``--judge``): ``markers``, ``prefix``,
``embedding`` (sentence-transformers, optional) and ``llm`` (a local chat model). The optional
dependencies are imported only when a judge is built."""

from ...registry import import_technique_modules
from .base import Judge, JudgeSpec, Verdicts, binary_metrics, get_judge, judges, make_judge, register_judge

import_technique_modules(__name__, __path__)  # every judge module registers itself on import

__all__ = ["Judge", "JudgeSpec", "Verdicts", "binary_metrics", "get_judge", "judges", "make_judge", "register_judge"]
