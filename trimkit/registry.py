"""Named registries of adapters, method parts and tasks, filled by plugins through hooks.

Each registry of a :class:`TrimkitRegistry` checks what is registered against its protocol
(:mod:`trimkit.protocols`) and refuses a misfit with a :class:`RegistrationError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, TypeVar

from .protocols import validator_for

if TYPE_CHECKING:
    from .protocols import (Adapter, HeadPolicyFactory, ObjectiveFactory, Sampler, SchedulerFactory, Task,
                            TokenPolicyFactory)

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that no plugin registered. The message lists what is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RegistrationError(TypeError):
    """An object that does not satisfy its registry's protocol (see :mod:`trimkit.protocols`)."""


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    source: str  # plugin name that registered it (and its distribution, when known)


class Registry(Generic[T]):
    """A name -> object table for one kind of item (``kind`` is used in error messages).

    ``validator(obj)`` returns ``None`` for an acceptable object, else what is wrong with it
    (:data:`trimkit.protocols.Validator`); :meth:`register` then raises :class:`RegistrationError`.
    """

    def __init__(self, kind: str, validator: Callable[[Any], str | None] | None = None) -> None:
        self.kind = kind
        self.validator = validator
        self._items: dict[str, Entry[T]] = {}
        self._current_source = "<direct>"

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Add ``obj`` under ``name`` (``replace=True`` to override an existing entry); returns ``obj``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items and not replace:
            prev = self._items[name]
            raise ValueError(
                f"{self.kind} {name!r} is already registered by {prev.source}; "
                f"pass replace=True to override it (attempted by {self._current_source})"
            )
        problem = self.validator(obj) if self.validator is not None else None
        if problem is not None:
            raise RegistrationError(f"{self.kind} {name!r} registered by {self._current_source} is refused: {problem}")
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


def _checked(field_name: str, kind: str) -> Any:
    """A dataclass field holding a :class:`Registry` checked by the protocol of ``field_name``."""
    return field(default_factory=lambda: Registry(kind, validator_for(field_name)))


@dataclass
class TrimkitRegistry:
    """All registries, handed to the ``trimkit_register_*`` hooks (protocols: :mod:`trimkit.protocols`)."""

    adapters: Registry[Adapter] = _checked("adapters", "adapter")
    token_policies: Registry[TokenPolicyFactory] = _checked("token_policies", "token policy")
    head_policies: Registry[HeadPolicyFactory] = _checked("head_policies", "head policy")
    samplers: Registry[Sampler] = _checked("samplers", "sampler")
    objectives: Registry[ObjectiveFactory] = _checked("objectives", "objective")
    schedulers: Registry[SchedulerFactory] = _checked("schedulers", "scheduler")
    tasks: Registry[Task] = _checked("tasks", "task")

    def all(self) -> dict[str, Registry[Any]]:
        return {
            "adapters": self.adapters,
            "token_policies": self.token_policies,
            "head_policies": self.head_policies,
            "samplers": self.samplers,
            "objectives": self.objectives,
            "schedulers": self.schedulers,
            "tasks": self.tasks,
        }

    def _set_source(self, source: str) -> None:
        for reg in self.all().values():
            reg._current_source = source

    def _snapshot(self) -> dict[str, dict[str, Entry[Any]]]:
        """The current entries of every registry (for :meth:`_restore`)."""
        return {name: dict(reg._items) for name, reg in self.all().items()}

    def _restore(self, snapshot: dict[str, dict[str, Entry[Any]]]) -> None:
        """Undo every registration (and replacement) made since ``snapshot`` was taken."""
        for name, reg in self.all().items():
            reg._items = dict(snapshot[name])
