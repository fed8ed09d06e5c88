"""A thin traceable wrapper around transformers' ``BridgeTowerModel`` (no transformers code copied).

``BridgeTowerModel.forward`` takes ``**kwargs`` behind a decorator, so torch.fx cannot trace it as
the root; :class:`BridgeTowerForTrimming` names its inputs and calls it. The text padding mask is
passed already 4-D (additive ``(B, 1, 1, N)``, what transformers' eager
``create_bidirectional_mask`` builds here), which transformers returns as it is: under torch.fx the
masking utility would otherwise receive a config that fx *rebuilt* field by field (configs are
dataclasses in transformers 5.x), without ``_attn_implementation``, and return no mask at all.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BridgeTowerModel

__all__ = ["BridgeTowerForTrimming", "padding_bias"]


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, N)`` 1/0 padding mask -> additive ``(B, 1, 1, N)`` bias (finfo.min on padding)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class BridgeTowerForTrimming(nn.Module):
    """``forward(pixel_values, input_ids, attention_mask)`` -> ``pooler_output`` ``(B, 2 * hidden)`` (what
    the retrieval / ITM heads read), or with ``token_outputs=True`` the tuple ``(text_features,
    image_features, pooler_output)``, whose token dimension shrinks when tokens are removed.

    ``interpolate_pos_encoding`` runs the model at an image size other than its config's.
    Wrapping changes nothing in the model: weights, ``state_dict`` (under the ``bridgetower.``
    prefix) and outputs are the model's own.
    """

    def __init__(self, model: BridgeTowerModel, token_outputs: bool = False, interpolate_pos_encoding: bool = False):
        super().__init__()
        self.bridgetower = model
        self.token_outputs = token_outputs
        self.interpolate_pos_encoding = interpolate_pos_encoding

    @property
    def config(self):
        return self.bridgetower.config

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.bridgetower(input_ids=input_ids, attention_mask=padding_bias(attention_mask, pixel_values.dtype),
                               pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)
        if self.token_outputs:
            return out.text_features, out.image_features, out.pooler_output
        return out.pooler_output
