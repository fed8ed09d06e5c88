"""The adapter interface: what a backbone package provides to trimkit.

An adapter is any object with these members, registered under a name by a plugin's
``trimkit_register_adapters`` hook. Only :meth:`describe` and :meth:`example_inputs` are needed
to trim a model; :meth:`matches` lets trimkit pick the adapter from a model; :meth:`build` lets
``trimkit check`` and the benchmarks make one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from .spec import ModelSpec


@runtime_checkable
class Adapter(Protocol):
    """What trimkit needs from a backbone adapter."""

    def matches(self, model: nn.Module) -> bool:
        """True if this adapter knows how to describe ``model``."""

    def describe(self, model: nn.Module) -> ModelSpec:
        """The model's streams, layers and attention modules (see :mod:`trimkit.spec`)."""

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
        """Random valid inputs for ``model`` (keyword arguments of its forward)."""

    def build(self, size: str = "tiny", seed: int = 0, **options: Any) -> nn.Module:
        """A randomly initialised model of a named size (``"tiny"`` must be fast on a CPU)."""
