"""The traceable wrapper of a transformers ViLT model (weights shared, not copied)."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

__all__ = ["ViltForTrimming", "additive_mask"]


def additive_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N) 1/0 mask -> (B, 1, 1, N) additive bias in ``like``'s dtype: 0 on real tokens, the
    dtype's minimum on padding (what transformers' eager bidirectional mask adds)."""
    return (1.0 - mask[:, None, None, :].to(like.dtype)) * torch.finfo(like.dtype).min


torch.fx.wrap("additive_mask")  # a call in the trace: finfo of a dtype is decided at run time


class ViltForTrimming(nn.Module):
    """``ViltModel`` / ``ViltForQuestionAnswering`` / ``ViltForImageAndTextRetrieval`` as one
    traceable forward ``(input_ids, attention_mask, pixel_values, pixel_mask=None, token_type_ids=None)``.

    Returns the task head's logits, or the pooled output for a bare ``ViltModel``. Runs ViLT's own
    embeddings, encoder layers, final LayerNorm, pooler and head; only the glue of
    ``ViltModel.forward`` (shape checks, the mask) is written here.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from transformers import ViltModel

        self.model = model
        self.prefix = "model" if isinstance(model, ViltModel) else "model.vilt"  # the ViltModel's path here
        head = getattr(model, "classifier", None) or getattr(model, "rank_output", None)
        self.head_name = "classifier" if getattr(model, "classifier", None) is not None else (
            "rank_output" if head is not None else None)
        if self.get_submodule(self.prefix).pooler is None:
            raise ValueError("trimkit_vilt: the ViltModel has no pooler (add_pooling_layer=False); trimkit needs "
                             "an output that reads the text [CLS]")

    @property
    def vilt(self) -> nn.Module:
        """The ``ViltModel`` (not registered twice: module paths stay unique for tracing)."""
        return self.get_submodule(self.prefix)

    @property
    def config(self):
        return self.vilt.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                pixel_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        vilt = self.vilt
        if pixel_mask is None:
            pixel_mask = torch.ones_like(pixel_values[:, 0], dtype=torch.long)
        x, mask = vilt.embeddings(input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, None, None)
        bias = additive_mask(mask, x)
        for layer in vilt.encoder.layer:
            x = layer(x, bias)[0]
        pooled = vilt.pooler(vilt.layernorm(x))
        if self.head_name is None:
            return pooled
        return getattr(self.model, self.head_name)(pooled)
