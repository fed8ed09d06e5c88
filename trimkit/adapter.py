"""The adapter interface: what a backbone package provides to trimkit.

An adapter is any object with these members, registered under a name by a plugin's
``trimkit_register_adapters`` hook. Only :meth:`describe` and :meth:`example_inputs` are needed
to trim a model; :meth:`matches` lets trimkit pick the adapter from a model; :meth:`build` lets
``trimkit check`` and the benchmarks make one. :meth:`dataset_overrides` is optional: it lets the
trainer build a model that fits a dataset (image size, vocabulary, labels...) without the core
knowing any adapter's build options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .spec import ModelSpec


@dataclass(frozen=True)
class DatasetFacts:
    """What a dataset says about the model it needs, independent of any backbone.

    Read by :meth:`DatasetFacts.of` from the dataset's attributes (``None`` where it has none):
    ``image_size`` and ``patch_size`` (pixels; the patch is the smallest meaningful image unit,
    digit-grid's cell), ``num_labels`` (answer classes), ``variant`` (the task's kind, e.g.
    ``"vqa"`` or ``"nlvr2"``: NLVR2 items carry a second image), ``tokenizer`` (with
    ``vocab_size``, ``pad_token_id``, ``cls_token_id``, ``sep_token_id``) and ``longest_text``
    (tokens in the longest ``input_ids``, special tokens included).
    """

    image_size: int | None = None
    patch_size: int | None = None
    num_labels: int | None = None
    variant: str | None = None
    tokenizer: Any = None
    longest_text: int | None = None

    @classmethod
    def of(cls, dataset: Any) -> "DatasetFacts":
        ids = getattr(dataset, "input_ids", None)
        longest = max((len(x) for x in ids), default=None) if ids is not None else None
        return cls(image_size=getattr(dataset, "image_size", None), patch_size=getattr(dataset, "patch_size", None),
                   num_labels=getattr(dataset, "num_labels", None), variant=getattr(dataset, "variant", None),
                   tokenizer=getattr(dataset, "tokenizer", None), longest_text=longest)


@runtime_checkable
class Adapter(Protocol):
    """What trimkit needs from a backbone adapter.

    Optional member (not part of the runtime check; the trainer looks for it with ``getattr``):

    ``dataset_overrides(facts: DatasetFacts) -> dict``
        :meth:`build` options that make a model fit a dataset: the :class:`DatasetFacts` mapped to
        this adapter's option names (e.g. ``num_labels`` to the size of its classifier,
        ``tokenizer.vocab_size`` to its embedding table). The trainer's ``build_model`` passes
        them to :meth:`build` under the config's own ``model.overrides`` (those win; dict-valued
        options are merged key by key). Map only the facts that are not ``None``.
    """

    def matches(self, model: nn.Module) -> bool:
        """True if this adapter knows how to describe ``model``."""

    def describe(self, model: nn.Module) -> ModelSpec:
        """The model's streams, layers and attention modules (see :mod:`trimkit.spec`)."""

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
        """Random valid inputs for ``model`` (keyword arguments of its forward)."""

    def build(self, size: str = "tiny", seed: int = 0, **options: Any) -> nn.Module:
        """A randomly initialised model of a named size (``"tiny"`` must be fast on a CPU)."""
