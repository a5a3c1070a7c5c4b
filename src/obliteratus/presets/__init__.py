"""Presets are TOML files that override :class:`obliteratus.settings.Settings`; nothing else."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..settings import tomllib
from ..data.prompts import read_text
from ..errors import ConfigError


def _dir() -> Path:
    return Path(str(resources.files("obliteratus.presets")))


def preset_names() -> list[str]:
    return sorted(p.stem for p in _dir().glob("*.toml"))


def load_preset(name_or_path: str) -> dict:
    """A preset by name, or any TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = _dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")

    text = read_text(path, ConfigError, "preset file")  # missing, a directory, not UTF-8, binary
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
