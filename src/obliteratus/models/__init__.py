"""SUMMON: offline aliases and architecture adapters; the loader (``summon``, ``Loaded``) is
models/load.py, imported from there (it attaches saved steering hooks, which are built on the adapters)."""

from .adapters import ArchitectureAdapter, ArchSpec, Writer, spec_for, supported_families
from .aliases import ALIASES, prepare

__all__ = ["ALIASES", "ArchSpec", "ArchitectureAdapter", "Writer", "prepare", "spec_for", "supported_families"]
