"""How trimkit sees BLIP (the wrappers of :mod:`trimkit_blip.modeling`): streams, layers, attentions.

Streams and trimmed layers, in forward order:

* ``vision``: ``vision_model.encoder.layers.N`` (``BlipEncoderLayer``), self-attention
  ``self_attn`` (``BlipAttention``: one fused ``qkv`` linear, own ``projection``). Their trimmers'
  cross-modal input is ``question_summary`` (``context_source``; see :mod:`trimkit_blip.modeling`).
* ``text`` (padding from ``attention_mask``; every model but captioning), site ``"cross"``: ``text_encoder.encoder.layer.N``
  (``BlipTextLayer``), self-attention ``attention.self`` and cross-attention
  ``crossattention.self`` to the image tokens (``encoder_hidden_states``); both return per-head
  contexts, the layer applies ``output.dense``.
* ``answer`` (VQA only): ``text_decoder.bert.encoder.layer.N``, declared so that their
  cross-attention to the question tokens honours the text stream's trimming (key masks in
  training, gathered keys at inference); ``trimmable=False``, so they never get trimmers. The
  training wrapper (:class:`~trimkit_blip.modeling.BlipVQADecoderForTrimming`) decodes a
  question's K answers in one row (block-diagonal causal bias, a leaf function), so its decoder
  batch is the question batch.
* ``caption`` (captioning only, in place of ``text``): the caption decoder's layers, declared
  like ``answer`` so that their cross-attention reads only the kept image tokens; the vision
  trimmers have no cross-modal input (the prompt is fixed).

The VQA classifier (:class:`~trimkit_blip.modeling.BlipVQAClassifierForTrimming`, the digit-grid
stand-in for answer ranking) has the VQA model's ``vision`` and ``text`` streams and no ``answer``.

NLVR2 (:class:`~trimkit_blip.modeling.BlipNLVRForTrimming`): each ``vision`` layer is called twice
per forward, once per image; trimkit follows each call's data flow, so each image is trimmed by its
own decisions (same trimmers, two token states). The ``text`` layers have three attentions:
``attention.self``, ``crossattention.self0`` to the first image (the layer's ``context``,
``encoder_hidden_states``) and ``crossattention.self1`` to the second (its own
``AttentionSpec.context``, ``encoder_hidden_states_2``): each cross-attention sees only its own
image's kept tokens, and its head trimmer reads its own image's [CLS]. The text *token* trimmers
read the first image's [CLS] (a layer has one context for them). Every mode works, packed batches
included.

transformers' BLIP v1 attention does not go through ``AttentionInterface``. The wrappers give the
text encoder a ``(B, 1, 1, N)`` padding bias, declared as a token argument on its last
dimension; a ``(B, 1, N, N)`` bias (what transformers builds itself: identical rows) is cut to its
first row by the attention inputs, since only one token dimension per argument can be declared.
"""

from __future__ import annotations

from transformers import masking_utils
from torch import nn

from trimkit.spec import AttentionSpec, AttnCall, LayerSpec, ModelSpec, StreamSpec

from .modeling import (BlipCaptionForTrimming, BlipITMForTrimming, BlipNLVRForTrimming, BlipVQAForTrimming, causal_bias,
                       packed_answer_inputs, padding_bias)

__all__ = ["describe_blip"]

_TEXT_ATTN_ARGS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask")


def _text_call(args: tuple, kwargs: dict) -> dict:
    call = dict(zip(_TEXT_ATTN_ARGS, args))
    call.update(kwargs)
    return call


def _encoder_self_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``BlipTextSelfAttention`` as encoder self-attention: padding bias, first query row only."""
    bias = _text_call(args, kwargs).get("attention_mask")
    return AttnCall(args[0] if args else kwargs["hidden_states"], None, None if bias is None else bias[:, :, :1])


def _decoder_self_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``BlipTextSelfAttention`` as causal decoder self-attention: the full (B, 1, T, T) bias."""
    call = _text_call(args, kwargs)
    return AttnCall(call["hidden_states"], None, call.get("attention_mask"))


def _cross_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``BlipTextSelfAttention`` as cross-attention: transformers applies no mask (it reads the
    unset ``encoder_attention_mask``), and neither does trimkit beyond its own key mask."""
    call = _text_call(args, kwargs)
    return AttnCall(call["hidden_states"], call["encoder_hidden_states"], call.get("encoder_attention_mask"))


def _vision_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``BlipAttention(hidden_states)``: unmasked self-attention."""
    return AttnCall(args[0] if args else kwargs["hidden_states"])


def _pair(y):
    """What BLIP's attention modules return: ``(output, attention_probs)``."""
    return y, None


def _text_layers(stack: nn.ModuleList, prefix: str, stream: str, site: str, self_inputs, context_stream: str,
                 trimmable: bool) -> list[LayerSpec]:
    layers = []
    for i, layer in enumerate(stack):
        heads = layer.attention.self.num_attention_heads
        attentions = [AttentionSpec("attention.self", "self", heads, inputs=self_inputs, output=_pair)]
        if hasattr(layer, "crossattention"):
            attentions.append(AttentionSpec("crossattention.self", "cross", heads, inputs=_cross_inputs, output=_pair))
        layers.append(LayerSpec(f"{prefix}.{i}", stream, site, hidden=0, context="encoder_hidden_states",
                                context_stream=context_stream,
                                hidden_token_args={"attention_mask": -1} if trimmable else {},
                                attentions=attentions, trimmable=trimmable))
    return layers


def _nlvr_text_layers(model: BlipNLVRForTrimming) -> list[LayerSpec]:
    layers = []
    for i, layer in enumerate(model.text_encoder.encoder.layer):
        heads = layer.attention.self.num_attention_heads
        attentions = [
            AttentionSpec("attention.self", "self", heads, inputs=_encoder_self_inputs, output=_pair),
            AttentionSpec("crossattention.self0", "cross", heads, inputs=_cross_inputs, output=_pair),
            AttentionSpec("crossattention.self1", "cross", heads, inputs=_cross_inputs, output=_pair,
                          context="encoder_hidden_states_2"),
        ]
        layers.append(LayerSpec(f"text_encoder.encoder.layer.{i}", "text", "cross", hidden=0,
                                context="encoder_hidden_states", context_stream="vision",
                                hidden_token_args={"attention_mask": -1}, attentions=attentions))
    return layers


def describe_blip(model: nn.Module) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of a BLIP wrapper (VQA ranking, VQA classifier, ITM,
    captioning or NLVR2)."""
    caption = isinstance(model, BlipCaptionForTrimming)
    vision = []
    for i, layer in enumerate(model.vision_model.encoder.layers):
        attn = AttentionSpec("self_attn", "self", layer.self_attn.num_heads, qkv="qkv", out="projection",
                             inputs=_vision_inputs, output=_pair, scale=layer.self_attn.scale)
        vision.append(LayerSpec(f"vision_model.encoder.layers.{i}", "vision", "uni", hidden=0,
                                context_source=None if caption else "question_summary",
                                context_stream=None if caption else "text", attentions=[attn]))
    inputs = ["pixel_values", "input_ids", "attention_mask"]
    leaves = ["vision_model.embeddings"]
    if isinstance(model, BlipNLVRForTrimming):
        layers = vision + _nlvr_text_layers(model)
        streams = [StreamSpec("vision"), StreamSpec("text", padding_input="attention_mask")]
        inputs = ["pixel_values", "pixel_values_2", "input_ids", "attention_mask"]
        leaves += ["text_encoder.embeddings", "question_summary"]
    elif caption:  # the caption decoder is declared (not trimmed) so that it reads only the kept image tokens
        layers = vision + _text_layers(model.text_decoder.bert.encoder.layer, "text_decoder.bert.encoder.layer",
                                       "caption", "decoder", _decoder_self_inputs, "vision", trimmable=False)
        streams = [StreamSpec("vision"), StreamSpec("caption")]
        leaves.append("text_decoder.bert.embeddings")
    else:
        layers = vision + _text_layers(model.text_encoder.encoder.layer, "text_encoder.encoder.layer", "text", "cross",
                                       _encoder_self_inputs, "vision", trimmable=True)
        streams = [StreamSpec("vision"), StreamSpec("text", padding_input="attention_mask")]
        leaves += ["text_encoder.embeddings", "question_summary"]
    if isinstance(model, BlipVQAForTrimming):
        layers += _text_layers(model.text_decoder.bert.encoder.layer, "text_decoder.bert.encoder.layer", "answer",
                               "decoder", _decoder_self_inputs, "text", trimmable=False)
        streams.append(StreamSpec("answer"))
        inputs += ["answer_ids", "answer_attention_mask"]
        leaves.append("text_decoder.bert.embeddings")
    spec = ModelSpec(
        streams=streams, layers=layers, input_names=inputs, leaf_modules=leaves,
        autowrap_functions=(masking_utils.create_causal_mask, masking_utils.create_bidirectional_mask, padding_bias,
                            causal_bias, packed_answer_inputs),
    )
    spec.validate()
    return spec
