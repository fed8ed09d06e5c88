"""trimkit adapter for METER (Dou et al. 2022), the SmartTrim paper's first backbone.

Registered through the ``trimkit`` entry point exactly like a third-party adapter::

    from trimkit_meter import build_meter
    from trimkit import trim, TrimConfig
    tmodel = trim(build_meter("tiny"), TrimConfig(token_target={"vision": 0.5, "text": 0.8}))
"""

from __future__ import annotations

from typing import Any

from trimkit.plugins import hookimpl

from .convert import MeterCheckpointError, convert_meter_checkpoint, convert_meter_state_dict, load_meter_checkpoint
from .modeling import METER_BASE, METER_TINY, MeterConfig, MeterModel, build_meter
from .spec import describe_meter, meter_example_inputs

__all__ = [
    "METER_BASE", "METER_TINY", "MeterAdapter", "MeterCheckpointError", "MeterConfig", "MeterModel", "build_meter",
    "convert_meter_checkpoint", "convert_meter_state_dict", "describe_meter", "load_meter_checkpoint",
    "meter_example_inputs",
]


class MeterAdapter:
    """Describes :class:`MeterModel` to trimkit; builds ``tiny`` and ``base`` (paper, 288px) models."""

    def matches(self, model) -> bool:
        return isinstance(model, MeterModel)

    def describe(self, model: MeterModel):
        return describe_meter(model)

    def example_inputs(self, model: MeterModel, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
        return meter_example_inputs(model, batch_size=batch_size, seed=seed)

    def build(self, size: str = "tiny", seed: int = 0, **options: Any) -> MeterModel:
        import torch

        torch.manual_seed(seed)
        return build_meter(size, **options)

    def dataset_overrides(self, facts) -> dict[str, Any]:
        """Build options that fit a dataset (:class:`trimkit.adapter.DatasetFacts`): image and patch
        size, the tokenizer's vocabulary and special ids, ``num_labels``, ``task`` from the
        dataset's variant, and text lengths that hold its longest question."""
        out: dict[str, Any] = {}
        if facts.image_size is not None:
            out["image_size"] = facts.image_size
        if facts.patch_size is not None:
            out["patch_size"] = facts.patch_size
        tok = facts.tokenizer
        if tok is not None:
            out.update(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                       eos_token_id=tok.sep_token_id)
        if facts.num_labels is not None:
            out["num_labels"] = facts.num_labels
        if facts.variant is not None:
            out["task"] = facts.variant
        if facts.longest_text is not None:
            out.update(max_text_len=max(16, facts.longest_text), text_max_positions=max(32, facts.longest_text + 2))
        return out


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("meter", MeterAdapter())
