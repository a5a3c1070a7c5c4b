"""obliteratus: find, study and remove refusal directions in transformer language models.

Stages: SUMMON (``models``) -> PROBE (``probe``) -> DISTILL (``directions``) -> EXCISE (``excise``)
-> VERIFY (``evaluate``) -> REBIRTH (``save``). ``obliterate`` runs them all, for every preset, and
returns a ``Run`` (``run.metrics``, ``run.save(dir)``); ``RunRecord`` is ``obliteratus.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import obliterate
    from .record import RunRecord
    from .run import Run

__version__ = "0.1.0"

__all__ = ["Run", "RunRecord", "obliterate", "__version__"]


def __getattr__(name: str):
    """``obliterate``, ``Run`` and ``RunRecord``, loaded on first use (PEP 562), so that importing one
    stage (``obliteratus.models.load``, ``obliteratus.errors``) does not load the whole pipeline.
    The one import inside a function outside the optional extras (tests/test_imports.py)."""
    if name == "obliterate":
        from .pipeline import obliterate

        return obliterate
    if name == "Run":
        from .run import Run

        return Run
    if name == "RunRecord":
        from .record import RunRecord

        return RunRecord
    raise AttributeError(f"module 'obliteratus' has no attribute {name!r}")
