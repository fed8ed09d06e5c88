"""The ``bridgetower`` adapter object. Import-cheap: transformers' BridgeTower is imported only when
a model is described or built (the plugin is loaded with every trimkit registry)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["BridgeTowerAdapter", "TINY", "wrap"]

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            text_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                             vocab_size=64, max_position_embeddings=40),
            vision_config=dict(hidden_size=64, num_hidden_layers=4, image_size=32, patch_size=8))
"""``build("tiny")``: 4 uni-modal layers per tower (vision width 64: BridgeTower's ViT has one head
per 64 channels), 3 cross-modal layers of width 32, 32px images (17 image tokens)."""


def wrap(model: nn.Module, token_outputs: bool = False, interpolate_pos_encoding: bool = False) -> nn.Module:
    """The traceable wrapper of a ``BridgeTowerModel`` (weights shared, not copied); see
    :class:`~trimkit_bridgetower.modeling.BridgeTowerForTrimming` for ``token_outputs``."""
    from transformers import BridgeTowerModel

    from .modeling import BridgeTowerForTrimming

    if isinstance(model, BridgeTowerForTrimming):
        return model
    if type(model) is BridgeTowerModel:
        return BridgeTowerForTrimming(model, token_outputs, interpolate_pos_encoding)
    raise TypeError(f"trimkit_bridgetower.wrap: expected a BridgeTowerModel, got {type(model).__name__}")


class BridgeTowerAdapter:
    """Describes :class:`~trimkit_bridgetower.modeling.BridgeTowerForTrimming`; builds ``tiny`` and
    ``base`` (transformers' default config: BridgeTower base, 288px) models."""

    def root(self, model: nn.Module) -> nn.Module:
        """The traceable root of ``model``: :func:`wrap` with its defaults (the model itself when it is a
        wrapper already), so ``trimkit.trim`` takes the transformers model directly."""
        return wrap(model)

    def matches(self, model: nn.Module) -> bool:
        if "transformers.models.bridgetower" not in sys.modules:  # no BridgeTower model can exist yet
            return False
        from transformers import BridgeTowerModel

        from .modeling import BridgeTowerForTrimming

        return isinstance(model, (BridgeTowerForTrimming, BridgeTowerModel))

    def describe(self, model: nn.Module):
        from transformers import BridgeTowerModel

        from .spec import describe_bridgetower

        if isinstance(model, BridgeTowerModel):
            raise TypeError("trimkit_bridgetower: a BridgeTowerModel cannot be traced as it is; trim "
                            "trimkit_bridgetower.wrap(model) (same weights) instead")
        return describe_bridgetower(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0, text_len: int = 8) -> dict[str, Any]:
        """Random inputs: ``<s>`` first, ``</s>`` last; rows after the first are shorter (padded)."""
        gen = torch.Generator().manual_seed(seed)
        text = model.config.text_config
        size = model.config.vision_config.image_size
        low = max(text.bos_token_id, text.eos_token_id, text.pad_token_id) + 1
        input_ids = torch.randint(low, text.vocab_size, (batch_size, text_len), generator=gen)
        attention_mask = torch.ones_like(input_ids)
        for r in range(batch_size):
            length = text_len if r == 0 else int(torch.randint(2, text_len + 1, (1,), generator=gen))
            input_ids[r, 0], input_ids[r, length - 1] = text.bos_token_id, text.eos_token_id
            input_ids[r, length:], attention_mask[r, length:] = text.pad_token_id, 0
        return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=gen), "input_ids": input_ids,
                "attention_mask": attention_mask}

    def build(self, size: str = "tiny", seed: int = 0, token_outputs: bool = False, **options: Any) -> nn.Module:
        """A randomly initialised wrapped model; ``options`` override ``BridgeTowerConfig`` fields."""
        from transformers import BridgeTowerConfig, BridgeTowerModel

        if size not in ("tiny", "base"):
            raise ValueError(f"trimkit_bridgetower.build: size must be 'tiny' or 'base', got {size!r}")
        torch.manual_seed(seed)
        config = BridgeTowerConfig(**{**(TINY if size == "tiny" else {}), **options})
        return wrap(BridgeTowerModel(config).eval(), token_outputs=token_outputs)

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        token_outputs: bool = False, interpolate_pos_encoding: bool = False,
                        **options: Any) -> nn.Module:
        """A pretrained wrapped ``BridgeTowerModel`` (as :meth:`build` returns), read offline:
        ``source`` is a directory written by ``save_pretrained`` or a Hugging Face model id in the
        local HF cache (at ``revision``), e.g. ``BridgeTower/bridgetower-base`` (any
        ``BridgeTowerFor*`` checkpoint: its ``BridgeTowerModel`` is loaded, task heads left out).
        ``token_outputs`` / ``interpolate_pos_encoding`` are :func:`wrap`'s; other ``options`` set
        ``BridgeTowerConfig`` fields before the weights load (``text_config`` / ``vision_config``
        dicts set fields of those); fields that change weight shapes are refused. ``weights`` is
        not used (the source holds them).
        """
        from transformers import BridgeTowerModel

        from trimkit.adapter import load_transformers_pretrained, transformers_source

        if weights is not None:
            raise TypeError(f"trimkit_bridgetower.from_pretrained({source!r}): weights={weights!r} is not used: a "
                            "BridgeTower checkpoint is a directory or Hugging Face model id (source) holding its "
                            "weights")
        src = transformers_source(source, revision, adapter="bridgetower", model_types=("bridgetower",))
        return load_transformers_pretrained(
            src, BridgeTowerModel, overrides=options, accepted=("token_outputs", "interpolate_pos_encoding"),
            wrap=lambda model: wrap(model, token_outputs=token_outputs,
                                    interpolate_pos_encoding=interpolate_pos_encoding))
