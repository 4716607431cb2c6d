"""Name -> function registries (loss families, estimators, verifiers, task generators, algorithms).

Variants are looked up by name instead of `if name == ...` chains; an unknown name fails listing the
known ones. Registries that share a `group` (the loss families) know each other, so a name from the wrong
family fails saying which family it belongs to ("'bt' is a reward-model loss, not a preference-pair loss").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from posttrain.errors import ConfigError

T = TypeVar("T")

_GROUPS: dict[str, list[Registry]] = {}


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group
        self._entries: dict[str, T] = {}
        if group is not None:
            _GROUPS.setdefault(group, []).append(self)

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorator

    def get(self, name: str, key: str | None = None) -> T:
        """The entry `name`; a ConfigError (prefixed with the config `key` that named it) lists the known ones."""
        if name in self._entries:
            return self._entries[name]
        where = f"{key}={name!r}: " if key else ""
        known = ", ".join(self.names()) or "(none)"
        sibling = next((r for r in _GROUPS.get(self.group or "", []) if r is not self and name in r), None)
        if sibling is not None:
            plural = self.kind + ("es" if self.kind.endswith("s") else "s")
            raise ConfigError(f"{where}{name!r} is a {sibling.kind}, not a {self.kind}; the {plural} are: {known}")
        raise ConfigError(f"{where}unknown {self.kind} {name!r}; known names: {known}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
