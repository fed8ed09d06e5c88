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


import torch
from torch import nn
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

__all__ = ["QuestionSummary", "BlipVQAForTrimming", "BlipITMForTrimming", "BlipCaptionForTrimming",
           "padding_bias", "causal_bias"]

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
    ``interpolate_pos_encoding`` (constructor) is passed to the vision model, to run a checkpoint at
    another resolution (the paper fine-tunes at 288px).
    """

    def _summary(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.question_summary(self.text_encoder.embeddings(input_ids=input_ids), attention_mask)

    def _encode(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values,
                                         interpolate_pos_encoding=self.interpolate_pos_encoding).last_hidden_state
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

    def __init__(self, model: BlipForQuestionAnswering, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.config = model.config
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.vision_model = model.vision_model
        self.text_encoder = model.text_encoder
        self.text_decoder = model.text_decoder
        self.question_summary = QuestionSummary()
        # no-op marker: the question encoder's output as the trimmed graph computes it (only the kept
        # question tokens at batch 1); trimkit_blip.generate reads it with a forward hook
        self.question_states = nn.Identity()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_attention_mask: torch.Tensor) -> torch.Tensor:
        self._summary(input_ids, attention_mask)  # traced once; the vision trimmers read it (context_source)
        question = self.question_states(self._encode(pixel_values, input_ids, attention_mask))
        k = answer_ids.shape[0] // question.shape[0]
        bias = causal_bias(answer_attention_mask, question.dtype)
        logits = self.text_decoder(input_ids=answer_ids, attention_mask=bias, use_cache=False, return_logits=True,
                                   encoder_hidden_states=question.repeat_interleave(k, 0))
        logp = logits.log_softmax(-1).gather(-1, answer_ids[:, 1:, None]).squeeze(-1)
        return (logp * answer_attention_mask[:, 1:].to(logp.dtype)).sum(-1).view(-1, k)


class BlipITMForTrimming(_BlipEncoders):
    """:class:`~transformers.BlipForImageTextRetrieval` with its ITM head: ``forward -> (B, 2)`` logits."""

    def __init__(self, model: BlipForImageTextRetrieval, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.config = model.config
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.vision_model = model.vision_model
        self.text_encoder = model.text_encoder
        self.itm_head = model.itm_head
        self.question_summary = QuestionSummary()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
        self._summary(input_ids, attention_mask)
        return self.itm_head(self._encode(pixel_values, input_ids, attention_mask)[:, 0, :])


class BlipCaptionForTrimming(nn.Module):
    """:class:`~transformers.BlipForConditionalGeneration` (captioning), teacher-forced:
    ``forward(pixel_values, input_ids, attention_mask) -> (B, T - 1, V)`` next-token logits.

    ``input_ids`` start with the decoder's BOS token (``config.text_config.bos_token_id``; BLIP's
    prompt is "a picture of") and are padded on the right; position ``t`` of the output predicts
    token ``t + 1`` (the captioning loss is their cross-entropy). The decoder cross-attends to the
    vision encoder's output: once trimmed, only to the kept image tokens. Captions are generated
    with :func:`trimkit_blip.generate`, which runs the trimmed vision encoder once and decodes from
    its kept tokens. The vision trimmers get no cross-modal signal (a fixed prompt carries none):
    use them with the ``local`` policy or let ``cross_modal`` fall back to its own [CLS].
    """

    def __init__(self, model: BlipForConditionalGeneration, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.config = model.config
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.vision_model = model.vision_model
        self.text_decoder = model.text_decoder
        self.image_states = nn.Identity()  # no-op marker read by trimkit_blip.generate (see BlipVQAForTrimming)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values,
                                  interpolate_pos_encoding=self.interpolate_pos_encoding).last_hidden_state
        image = self.image_states(image)
        return self.text_decoder(input_ids=input_ids, attention_mask=causal_bias(attention_mask, image.dtype),
                                 encoder_hidden_states=image, use_cache=False, return_logits=True)
