"""How trimkit sees METER: two streams, the ViT blocks and the co-attention layers.

Trimmed layers, in forward order:

* ``vit_model.transformer.resblocks.N`` (stream ``vision``, site ``"uni"``): open_clip blocks
  whose attention is an ``nn.MultiheadAttention`` (fused ``in_proj``, own ``out_proj``). Their
  trimmers read the text [CLS] from the text encoder's output (``context_source``), which the
  forward computes first.
* ``cross_modal_image_layers.N`` (stream ``vision``) and ``cross_modal_text_layers.N`` (stream
  ``text``), site ``"cross"``: :class:`~trimkit_meter.modeling.MeterCrossLayer` called as
  ``layer(hidden, context, attention_bias, context_bias)``; self-attention ``attention.self`` and
  cross-attention ``crossattention.self`` are :class:`~trimkit_meter.modeling.MeterAttention`
  (separate ``query``/``key``/``value``; the output projection is the layer's ``output.dense``).

The text encoder (``text_transformer``) is one opaque leaf: its tokens are not trimmed.

NLVR2: the text is encoded once and each image runs the vision blocks and co-attention layers
with it, so every layer is called twice; trimkit tracks each call's token state separately.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trimkit.spec import AttentionSpec, AttnCall, LayerSpec, ModelSpec, StreamSpec, multihead_attention

from .modeling import MeterAttention, MeterModel

__all__ = ["TEXT_ENCODER_PATH", "describe_meter", "meter_example_inputs"]

TEXT_ENCODER_PATH = "text_transformer"
"""Module path of METER's text encoder (one leaf call returning the text hidden states)."""



def _meter_attention_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``MeterAttention(x, context=None, bias=None)`` (positional or keyword) -> :class:`AttnCall`."""
    call = dict(zip(("x", "context", "bias"), args))
    call.update(kwargs)
    return AttnCall(call["x"], call.get("context"), call.get("bias"))


def _meter_attention(path: str, kind: str, module: nn.Module) -> AttentionSpec:
    if not isinstance(module, MeterAttention):
        raise TypeError(f"{path!r} is a {type(module).__name__}, expected MeterAttention")
    return AttentionSpec(path, kind=kind, num_heads=module.num_heads, q="query", k="key", v="value",
                         out=None, inputs=_meter_attention_inputs)


def describe_meter(model: MeterModel) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of a :class:`~trimkit_meter.modeling.MeterModel`.

    Streams ``vision`` (no padding) and ``text`` (padding from the ``attention_mask`` input), the
    ViT blocks as ``"uni"`` layers and both co-attention stacks as ``"cross"`` layers. Inputs are
    ``pixel_values, input_ids, attention_mask`` (+ ``pixel_values_2`` for NLVR2, otherwise fixed
    to ``None``); the text encoder is a leaf.
    """
    if not isinstance(model, MeterModel):
        raise TypeError(f"describe_meter needs a MeterModel, got {type(model).__name__}")
    batch_first = bool(model.vit_model.transformer.batch_first)
    layers: list[LayerSpec] = []
    for i, block in enumerate(model.vit_model.transformer.resblocks):
        attn = multihead_attention("attn", block.attn)
        layers.append(LayerSpec(f"vit_model.transformer.resblocks.{i}", stream="vision", site="uni", hidden=0,
                                context_source=TEXT_ENCODER_PATH, context_stream="text", attentions=[attn],
                                batch_first=batch_first))
    for stack, stream, other in (("cross_modal_image_layers", "vision", "text"),
                                 ("cross_modal_text_layers", "text", "vision")):
        for i, layer in enumerate(getattr(model, stack)):
            layers.append(LayerSpec(
                f"{stack}.{i}", stream=stream, site="cross", hidden=0, context=1, context_stream=other,
                hidden_token_args={2: -1}, context_token_args={3: -1},
                attentions=[_meter_attention("attention.self", "self", layer.attention.self),
                            _meter_attention("crossattention.self", "cross", layer.crossattention.self)],
            ))
    nlvr2 = model.config.task == "nlvr2"
    spec = ModelSpec(
        streams=[StreamSpec("vision"), StreamSpec("text", padding_input="attention_mask")],
        layers=layers,
        input_names=["pixel_values", "input_ids", "attention_mask"] + (["pixel_values_2"] if nlvr2 else []),
        concrete_args={} if nlvr2 else {"pixel_values_2": None},
        leaf_modules=[TEXT_ENCODER_PATH],
    )
    spec.validate()
    return spec


def meter_example_inputs(model: MeterModel, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """Random valid inputs for ``model``: keyword arguments of its forward.

    Pixels are standard normal (already "normalized" images); ``input_ids`` start with ``<s>``
    (``cls_token_id``), end with ``</s>`` (``eos_token_id``) and are padded with ``pad_token_id``;
    row 0 is ``max_text_len`` long and every other row is shorter (padded).
    NLVR2 models also get ``pixel_values_2``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    n = c.max_text_len
    low = max(c.pad_token_id, c.cls_token_id, c.eos_token_id) + 1
    input_ids = torch.randint(low if low < c.vocab_size else 0, c.vocab_size, (batch_size, n), generator=gen)
    attention_mask = torch.ones(batch_size, n, dtype=torch.long)
    for row in range(batch_size):
        length = n if row == 0 or n == 2 else int(torch.randint(2, n, (1,), generator=gen))
        input_ids[row, 0] = c.cls_token_id
        input_ids[row, length - 1] = c.eos_token_id
        input_ids[row, length:] = c.pad_token_id
        attention_mask[row, length:] = 0

    def image() -> torch.Tensor:
        return torch.randn(batch_size, 3, c.image_size, c.image_size, generator=gen).to(param.device, param.dtype)

    inputs: dict[str, Any] = {"pixel_values": image(), "input_ids": input_ids.to(param.device),
                              "attention_mask": attention_mask.to(param.device)}
    if c.task == "nlvr2":
        inputs["pixel_values_2"] = image()
    return inputs
