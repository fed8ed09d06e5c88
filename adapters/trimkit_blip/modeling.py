"""Thin traceable wrappers around transformers' BLIP models (no transformers code copied or changed).

transformers' BLIP ``forward`` methods take ``**kwargs``, return ``ModelOutput`` objects and (for
VQA) need decoder inputs, so torch.fx cannot trace them as they are. Each wrapper holds the BLIP
model's own submodules *under the same names* (``vision_model``, ``text_encoder``...), so module
paths and ``state_dict`` keys are those of the BLIP model, and its forward names its inputs.

Both wrappers also compute :class:`QuestionSummary`: the masked mean of the question's word
embeddings (``text_encoder.embeddings``: embedding lookups and one LayerNorm, no matrix product,
far below 2 % of the MACs). The vision layers run before the text encoder, so this summary is the
cross-modal signal their token trimmers get in place of a text [CLS] (the embedding of the first
token is the same for every question and carries nothing).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering
from transformers.models.blip.modeling_blip import BlipAttention, BlipEncoderLayer
from transformers.models.blip.modeling_blip_text import BlipTextLayer

__all__ = ["QuestionSummary", "BlipVQAForTrimming", "BlipITMForTrimming", "make_layers_traceable", "padding_bias",
           "causal_bias"]

_ENCODER_LAYER_FORWARD = inspect.unwrap(BlipEncoderLayer.forward)
_TEXT_LAYER_FORWARD = inspect.unwrap(BlipTextLayer.forward)


class TraceableBlipEncoderLayer(BlipEncoderLayer):
    """``BlipEncoderLayer`` whose forward fx can trace as a root: transformers' own forward, without
    the gradient-checkpointing wrapper (``forward(self, *args, **kwargs)``) and with no ``**kwargs``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _ENCODER_LAYER_FORWARD(self, hidden_states)


class TraceableBlipTextLayer(BlipTextLayer):
    """``BlipTextLayer`` made traceable as a root, like :class:`TraceableBlipEncoderLayer`."""

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None,
                past_key_values=None):
        return _TEXT_LAYER_FORWARD(self, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                                   encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values)


class TraceableBlipAttention(BlipAttention):
    """``BlipAttention`` exposing its fused ``qkv`` linear as ``qkv_weight`` / ``qkv_bias`` (views, not
    new parameters), the ``in_proj`` form that :class:`trimkit.ops.TrimAttention` reads."""

    @property
    def qkv_weight(self) -> torch.Tensor:
        return self.qkv.weight

    @property
    def qkv_bias(self) -> torch.Tensor | None:
        return self.qkv.bias


for _cls in (TraceableBlipEncoderLayer, TraceableBlipTextLayer):  # undo GradientCheckpointingLayer's re-wrapping
    _cls.forward = inspect.unwrap(_cls.forward)

_TRACEABLE = {BlipEncoderLayer: TraceableBlipEncoderLayer, BlipTextLayer: TraceableBlipTextLayer,
              BlipAttention: TraceableBlipAttention}


def make_layers_traceable(model: nn.Module) -> nn.Module:
    """Give BLIP's layers and vision attentions (in place) the subclasses above; weights, ``state_dict``
    and outputs are unchanged.

    trimkit traces every trimmed layer on its own (``trimkit.rewrite.TrimmedLayer``), and fx cannot
    trace transformers 5.x layers as roots (a ``functools.wraps`` wrapper taking ``*args`` and a
    ``**kwargs`` parameter that becomes a symbolic placeholder). What is lost: gradient
    checkpointing of these layers (the trimmed forward never checkpoints them anyway).
    """
    for module in model.modules():
        traceable = _TRACEABLE.get(type(module))
        if traceable is not None:
            module.__class__ = traceable
    return model


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, N)`` 1/0 padding mask -> additive ``(B, 1, 1, N)`` bias: what transformers' eager
    ``create_bidirectional_mask`` builds, one query row (its rows are identical)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T)`` padding mask -> additive ``(B, 1, T, T)`` causal bias (eager ``create_causal_mask``)."""
    t = mask.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


class QuestionSummary(nn.Module):
    """``(B, N, D)`` token embeddings + ``(B, N)`` padding mask -> ``(B, 1, D)`` masked mean (no parameters)."""

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(embeddings.dtype)[..., None]
        return (embeddings * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1.0)


class _BlipEncoders(nn.Module):
    """Image encoder, then the question/caption encoder cross-attending to every image token.

    Masks are passed to transformers already 4-D (additive, as its eager masking utilities make
    them), which its masking utilities return as they are: under torch.fx they would otherwise see
    a *rebuilt* config (fx re-creates dataclass arguments field by field, losing
    ``_attn_implementation``) and return no mask at all. ``encoder_attention_mask`` is left out:
    transformers' BLIP never applies it (its cross-attention reads an unset argument).
    """

    def _summary(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.question_summary(self.text_encoder.embeddings(input_ids=input_ids), attention_mask)

    def _encode(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.text_encoder(input_ids=input_ids, attention_mask=padding_bias(attention_mask, image_embeds.dtype),
                                 encoder_hidden_states=image_embeds, use_cache=False).last_hidden_state


class BlipVQAForTrimming(_BlipEncoders):
    """:class:`~transformers.BlipForQuestionAnswering` as answer *ranking*: ``forward -> (B, K)`` scores.

    ``answer_ids`` / ``answer_attention_mask`` are ``(B * K, T)``: K candidate answers per question
    (rows ``b * K .. b * K + K - 1`` belong to question ``b``), each starting with the decoder's BOS
    token (``config.text_config.bos_token_id``) and padded on the right. The score of a candidate is
    the sum of its tokens' log-probabilities under the answer decoder (BLIP's ``rank_answer``
    without the top-k pre-selection); ``K = 1`` with the target answer gives the training
    log-likelihood. Like transformers' ``BlipForQuestionAnswering``, the decoder attends to every
    encoder output token.
    """

    def __init__(self, model: BlipForQuestionAnswering) -> None:
        super().__init__()
        self.config = model.config
        self.vision_model = model.vision_model
        self.text_encoder = model.text_encoder
        self.text_decoder = model.text_decoder
        self.question_summary = QuestionSummary()
        make_layers_traceable(self)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_attention_mask: torch.Tensor) -> torch.Tensor:
        self._summary(input_ids, attention_mask)  # traced once; the vision trimmers read it (context_source)
        question = self._encode(pixel_values, input_ids, attention_mask)
        k = answer_ids.shape[0] // question.shape[0]
        logits = self.text_decoder(input_ids=answer_ids, attention_mask=causal_bias(answer_attention_mask, question.dtype),
                                   encoder_hidden_states=question.repeat_interleave(k, 0),
                                   use_cache=False, return_logits=True)
        logp = logits.log_softmax(-1).gather(-1, answer_ids[:, 1:, None]).squeeze(-1)
        return (logp * answer_attention_mask[:, 1:].to(logp.dtype)).sum(-1).view(-1, k)


class BlipITMForTrimming(_BlipEncoders):
    """:class:`~transformers.BlipForImageTextRetrieval` with its ITM head: ``forward -> (B, 2)`` logits."""

    def __init__(self, model: BlipForImageTextRetrieval) -> None:
        super().__init__()
        self.config = model.config
        self.vision_model = model.vision_model
        self.text_encoder = model.text_encoder
        self.itm_head = model.itm_head
        self.question_summary = QuestionSummary()
        make_layers_traceable(self)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._summary(input_ids, attention_mask)
        return self.itm_head(self._encode(pixel_values, input_ids, attention_mask)[:, 0, :])
