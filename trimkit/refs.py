"""Modules that a trimkit module uses but does not own.

A rewritten layer calls the backbone's original layer and its trimmers; the root graph calls the
backbone's modules; an attention wrapper reads the attention module's weights. Each of those modules is
registered once, where it is owned (the backbone under ``TrimmedModel.model``, the trimmers under
``TrimmedModel.trimmers``). Registering it again under the user would list its parameters twice in
``named_parameters()`` and ``state_dict()`` and let ``.to()`` visit it twice.

``nn.Module.__setattr__`` registers every module assigned to an attribute, so a user keeps its
references in a :class:`Borrowed` (not a module: stored as a plain attribute) and exposes each as a
read-only attribute with :func:`borrowed`::

    class Wrapper(nn.Module):
        layer = borrowed("layer", "the backbone's layer (owned by the backbone)")

        def __init__(self, layer):
            super().__init__()
            self._borrowed = Borrowed(layer=layer)

Deep copies copy the referenced modules with the rest of the object graph (``copy.deepcopy``'s memo
keeps one copy of a module referenced from several places), so a copied ``TrimmedModel`` references
its own backbone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Borrowed", "borrowed"]


class Borrowed:
    """Named references to modules owned elsewhere (see the module docstring)."""

    def __init__(self, **refs: Any) -> None:
        self.__dict__.update(refs)

    def __repr__(self) -> str:
        return "Borrowed(" + ", ".join(f"{k}={type(v).__name__}" for k, v in self.__dict__.items()) + ")"


def borrowed(name: str, doc: str = "") -> property:
    """A read-only attribute reading ``self._borrowed.<name>`` (a :class:`Borrowed`)."""

    def get(self: Any) -> Any:
        return getattr(self._borrowed, name)  # plain attribute reads: torch.compile traces them

    return property(get, doc=doc or f"The {name} this module uses but does not own (:mod:`trimkit.refs`).")
