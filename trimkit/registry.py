"""Named registries of adapters and method parts, filled by plugins through hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that no plugin registered. The message lists what is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    source: str  # plugin name that registered it (and its distribution, when known)


class Registry(Generic[T]):
    """A name -> object table for one kind of item (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Entry[T]] = {}
        self._current_source = "<direct>"

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items and not replace:
            prev = self._items[name]
            raise ValueError(
                f"{self.kind} {name!r} is already registered by {prev.source}; "
                f"pass replace=True to override it (attempted by {self._current_source})"
            )
        self._items[name] = Entry(name, obj, self._current_source)
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name].obj
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered: {sorted(self._items) or 'none'}"
            ) from None

    def source(self, name: str) -> str:
        self.get(name)
        return self._items[name].source

    def names(self) -> list[str]:
        return sorted(self._items)

    def entries(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._items.values(), key=lambda e: e.name))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class TrimkitRegistry:
    """All registries, handed to the ``trimkit_register_*`` hooks."""

    adapters: Registry[Any] = field(default_factory=lambda: Registry("adapter"))
    token_policies: Registry[Any] = field(default_factory=lambda: Registry("token policy"))
    head_policies: Registry[Any] = field(default_factory=lambda: Registry("head policy"))
    samplers: Registry[Any] = field(default_factory=lambda: Registry("sampler"))
    objectives: Registry[Any] = field(default_factory=lambda: Registry("objective"))
    schedulers: Registry[Any] = field(default_factory=lambda: Registry("scheduler"))

    def all(self) -> dict[str, Registry[Any]]:
        return {
            "adapters": self.adapters,
            "token_policies": self.token_policies,
            "head_policies": self.head_policies,
            "samplers": self.samplers,
            "objectives": self.objectives,
            "schedulers": self.schedulers,
        }

    def _set_source(self, source: str) -> None:
        for reg in self.all().values():
            reg._current_source = source
