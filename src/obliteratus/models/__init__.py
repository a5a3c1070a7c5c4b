"""SUMMON: model loading, offline aliases and architecture adapters."""

from .adapters import ArchitectureAdapter, ArchSpec, Writer, spec_for, supported_families
from .aliases import ALIASES, prepare
from .load import Loaded, summon

__all__ = ["ALIASES", "ArchSpec", "ArchitectureAdapter", "Loaded", "Writer", "prepare", "spec_for", "summon",
           "supported_families"]
