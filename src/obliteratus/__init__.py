"""obliteratus: find, study and remove refusal directions in transformer language models.

Stages: SUMMON (``models``) -> PROBE (``probe``) -> DISTILL (``directions``) -> EXCISE (``excise``)
-> VERIFY (``evaluate``) -> REBIRTH (``save``). ``obliterate`` runs them all, for every preset, and
returns a ``Run`` (``run.metrics``, ``run.save(dir)``); ``RunRecord`` is ``obliteratus.json``.
"""

__version__ = "0.1.0"


def obliterate(*args, **kwargs):
    """See :func:`obliteratus.pipeline.obliterate` (imported lazily to keep ``import obliteratus`` light)."""
    from .pipeline import obliterate as run

    return run(*args, **kwargs)


def __getattr__(name: str):
    """``Run`` (what obliterate returns) and ``RunRecord`` (``obliteratus.json``), imported lazily."""
    if name == "Run":
        from .run import Run

        return Run
    if name == "RunRecord":
        from .record import RunRecord

        return RunRecord
    raise AttributeError(f"module 'obliteratus' has no attribute {name!r}")


__all__ = ["Run", "RunRecord", "obliterate", "__version__"]
