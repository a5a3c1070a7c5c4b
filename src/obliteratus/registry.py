"""One registry for every stage's techniques: direction methods, excise variants, layer selectors, judges.

Each technique module registers itself once, on import, under an identifier name; a lookup by an
unknown name raises ConfigError listing the valid names; a bad or duplicate name is a ValueError at
import time (peft's ``register_peft_method``). Options models must forbid extra keys, so a typo in a
preset's table is an error, not a silently ignored key.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (`what`: "direction method", "excise variant", ...), in registration order."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, options: type[BaseModel] | None = None) -> T:
        if not name.isidentifier():
            raise ValueError(f"{self.what} name {name!r} must be an identifier")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        if options is not None and options.model_config.get("extra") != "forbid":
            raise ValueError(f"options model of {self.what} {name!r} must set extra='forbid'")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove `name` (tests that register a toy technique clean up with this)."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r}; valid: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def as_dict(self) -> dict[str, T]:
        return dict(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class NoOptions(BaseModel):
    """Options model of an entry that has none (a given table is still checked for typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_options(model: type[BaseModel], table: dict | None, where: str) -> BaseModel:
    """`table` validated by `model`; every problem in one ConfigError prefixed by `where`."""
    try:
        return model.model_validate(table or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{where}: {problems}") from None


def import_technique_modules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every module of the technique package `package` (its ``__path__``), in name order, except
    those in `skip`: a technique registers itself when its module is imported, so adding one is one
    new file that nothing else has to list."""
    skip = set(skip)
    for info in sorted(pkgutil.iter_modules(path), key=lambda info: info.name):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
