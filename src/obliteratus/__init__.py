"""obliteratus: find, study and remove refusal directions in transformer language models.

Stages: SUMMON (``models``) -> PROBE (``probe``) -> DISTILL (``directions``) -> EXCISE (``excise``)
-> VERIFY (``evaluate``) -> REBIRTH (``save``). ``obliterate`` runs them all.
"""

__version__ = "0.1.0"


def obliterate(*args, **kwargs):
    """See :func:`obliteratus.pipeline.obliterate` (imported lazily to keep ``import obliteratus`` light)."""
    from .pipeline import obliterate as run

    return run(*args, **kwargs)


__all__ = ["obliterate", "__version__"]
