"""Thin traceable wrappers around transformers' BLIP models (no transformers code copied or changed).

transformers' BLIP ``forward`` methods take ``**kwargs``, return ``ModelOutput`` objects and (for
VQA) need decoder inputs, so torch.fx cannot trace them as they are. Each wrapper holds the BLIP
model's own submodules *under the same names* (``vision_model``, ``text_encoder``...), so module
paths and ``state_dict`` keys are those of the BLIP model, and its forward names its inputs.

The VQA and ITM wrappers (and the NLVR2 model) also compute :class:`QuestionSummary`: the masked mean of the question's word
embeddings (``text_encoder.embeddings``: embedding lookups and one LayerNorm, no matrix product,
far below 2 % of the MACs). The vision layers run before the text encoder, so this summary is the
cross-modal signal their token trimmers get in place of a text [CLS] (the embedding of the first
token is the same for every question and carries nothing).

transformers has no BLIP NLVR2 model; :class:`BlipNLVRForTrimming` is Salesforce BLIP's
(``models/blip_nlvr.py``, ``models/nlvr_encoder.py``) built from transformers' BLIP building blocks.
"""

from __future__ import annotations


import torch
from torch import nn
from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                          BlipForQuestionAnswering, BlipTextModel, BlipVisionModel)
from transformers.models.blip.modeling_blip_text import (BlipTextAttention, BlipTextEmbeddings, BlipTextIntermediate,
                                                         BlipTextOutput, BlipTextSelfAttention)

__all__ = ["QuestionSummary", "BlipVQAForTrimming", "BlipVQADecoderForTrimming", "packed_answer_inputs", "BlipVQAClassifierForTrimming", "BlipITMForTrimming", "BlipCaptionForTrimming",
           "BlipNLVRForTrimming", "BlipTwinCrossAttention", "BlipNLVRTextLayer", "padding_bias", "causal_bias"]

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

    def task_evaluator(self, task, runner: nn.Module, dataset):
        """``trimkit_train``'s evaluation hook (see :mod:`trimkit_train.tasks.core`): a VQA split is
        answered by ranking its answer list (``task.inference == "rank"``, ``task.k_test``) or by
        generation (``"generate"``); :class:`trimkit_blip.evaluation.VQAEvaluator`."""
        from .evaluation import vqa_task_evaluator

        return vqa_task_evaluator(task, runner, dataset)


def packed_answer_inputs(answer_ids: torch.Tensor, answer_attention_mask: torch.Tensor, questions: int,
                         dtype: torch.dtype, trailing: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``K = rows // questions`` answers of each question in *one* decoder row: ids ``(B, K*T)``,
    positions ``(B, K*T)`` restarting at 0 for every answer, and the additive ``(B, 1, K*T, K*T)``
    bias of a block-diagonal causal mask (a token attends to the earlier real tokens of its own
    answer only). Each packed row computes what its K rows would compute one by one. ``trailing``
    padding tokens (masked, position 0) are appended to every row."""
    rows, t = answer_ids.shape
    k = rows // questions
    dev = answer_ids.device
    n = k * t + trailing
    ids = torch.cat([answer_ids.reshape(questions, k * t), answer_ids.new_zeros(questions, trailing)], dim=1)
    positions = torch.cat([torch.arange(t, device=dev).repeat(k), torch.zeros(trailing, dtype=torch.long, device=dev)])
    block = torch.cat([torch.arange(k * t, device=dev) // t, torch.full((trailing,), -1, dtype=torch.long, device=dev)])
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    keys = torch.cat([answer_attention_mask.reshape(questions, k * t).bool(),
                      torch.zeros(questions, trailing, dtype=torch.bool, device=dev)], dim=1)
    allowed = (causal & (block[:, None] == block[None, :]))[None, None] & keys[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
    return ids, positions[None].expand(questions, -1), bias


class BlipVQADecoderForTrimming(BlipVQAForTrimming):
    """BLIP VQA's answer decoder for **training** (the LM loss over each question's ground-truth
    answers, BLIP's ``train_vqa``): ``forward -> (B * K, T - 1, V)`` next-token logits of every
    answer row (row ``r`` predicts ``answer_ids[r, 1:]``).

    Same modules, names and weights as :class:`BlipVQAForTrimming` (a checkpoint of one loads into
    the other); its evaluation is the same (answer ranking or generation, ``task_evaluator``).
    ``answer_ids`` / ``answer_attention_mask`` ``(B * K, T)``: K answers per question, right-padded
    (rows of a question with fewer answers: anything, e.g. BOS alone; the task gives them weight 0).
    The first token of every row is set to the decoder's BOS (``config.text_config.bos_token_id``),
    as BLIP's ``forward`` does with the tokenizer's [CLS]. The K answers of a question are decoded
    in one row (:func:`packed_answer_inputs`: block-diagonal causal mask, positions restarting per
    answer), so the decoder batch is the question batch: the question's token mask (masked modes,
    ``sample`` in training) applies to its decoder row, for any K and any batch size.
    """

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_attention_mask: torch.Tensor) -> torch.Tensor:
        self._summary(input_ids, attention_mask)  # traced once; the vision trimmers read it (context_source)
        question = self.question_states(self._encode(pixel_values, input_ids, attention_mask))
        b, rows, t = question.shape[0], answer_ids.shape[0], answer_ids.shape[1]
        bos = torch.full_like(answer_ids[:, :1], self.config.text_config.bos_token_id)
        answer_ids = torch.cat([bos, answer_ids[:, 1:]], dim=1)
        # one trailing pad token: the decoder's return_logits drops the last position's logits
        ids, positions, bias = packed_answer_inputs(answer_ids, answer_attention_mask, b, question.dtype, trailing=1)
        logits = self.text_decoder(input_ids=ids, position_ids=positions, attention_mask=bias, use_cache=False,
                                   return_logits=True, encoder_hidden_states=question)  # (B, K*T, V)
        return logits.reshape(rows, t, logits.shape[-1])[:, :-1]


class BlipVQAClassifierForTrimming(_BlipEncoders):
    """BLIP's VQA encoders with a linear answer classifier: ``forward(pixel_values, input_ids,
    attention_mask) -> (B, num_labels)`` logits over a fixed answer list.

    The image encoder (``vision_model``, transformers' ``BlipVisionModel``) and the question encoder
    (``text_encoder``, ``BlipTextModel`` without pooler; its layers cross-attend to every image
    token) are :class:`BlipVQAForTrimming`'s, under the same names; ``classifier`` (one linear
    layer) reads the question encoder's [CLS]. This is the **digit-grid stand-in for BLIP's answer
    decoder**: the paper answers VQA by ranking candidate answers with the decoder
    (:class:`BlipVQAForTrimming`, ``build(task="vqa")``), which the trainer's contract
    (``model(**inputs) -> (B, num_labels)``, cross-entropy on ``labels``) does not fit. The encoders,
    and so the trimming (vision tokens with the :class:`QuestionSummary` as cross-modal signal,
    question tokens, heads), are exactly those of the VQA model; only the answer head differs.
    ``build(task="vqa_classifier", num_labels=...)``; :meth:`from_blip` copies the encoders of a
    (pretrained) BLIP VQA model.
    """

    def __init__(self, config: BlipConfig, num_labels: int, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.text_config.hidden_size, num_labels)
        self.question_summary = QuestionSummary()
        _bert_init(self.classifier, config.text_config.initializer_range)

    @classmethod
    def from_blip(cls, model: BlipForQuestionAnswering | BlipVQAForTrimming, num_labels: int,
                  interpolate_pos_encoding: bool = False) -> "BlipVQAClassifierForTrimming":
        """The encoders of a BLIP VQA model (copied), a new random ``classifier``."""
        clf = cls(model.config, num_labels, interpolate_pos_encoding)
        clf.vision_model.load_state_dict(model.vision_model.state_dict())
        clf.text_encoder.load_state_dict(model.text_encoder.state_dict())
        return clf.train(model.training)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
        self._summary(input_ids, attention_mask)  # traced once; the vision trimmers read it (context_source)
        return self.classifier(self._encode(pixel_values, input_ids, attention_mask)[:, 0, :])


class BlipITMForTrimming(_BlipEncoders):
    """:class:`~transformers.BlipForImageTextRetrieval` with its ITM head: ``forward -> (B, 2)`` logits.

    The image-text contrastive (ITC) side is there for retrieval's first stage (BLIP ranks every
    pair by ITC similarity, then reranks the top k with ITM: :func:`trimkit_blip.evaluate_blip_retrieval`):
    :meth:`image_embeddings` / :meth:`text_embeddings` are the normalised projections of the
    unimodal encoders' [CLS] (``vision_proj`` / ``text_proj``, held under the BLIP model's names),
    :meth:`itc_similarity` their similarity matrix. They run the wrapped modules directly: the
    trimmed forward (ITM) is not involved, so a trimmed model's ITC stage is its untrimmed
    backbone's. The projections get no gradient from the ITM objective and are frozen
    (``requires_grad=False``; the BLIP model's own modules, shared), so a multi-process run does not
    wait for their gradients; they are saved and loaded with the rest of the weights.
    """

    def __init__(self, model: BlipForImageTextRetrieval, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        self.config = model.config
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.vision_model = model.vision_model
        self.text_encoder = model.text_encoder
        self.itm_head = model.itm_head
        self.vision_proj = model.vision_proj.requires_grad_(False)
        self.text_proj = model.text_proj.requires_grad_(False)
        self.question_summary = QuestionSummary()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
        self._summary(input_ids, attention_mask)
        return self.itm_head(self._encode(pixel_values, input_ids, attention_mask)[:, 0, :])

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision encoder's output tokens ``(B, N, D)`` (untrimmed)."""
        return self.vision_model(pixel_values=pixel_values,
                                 interpolate_pos_encoding=self.interpolate_pos_encoding).last_hidden_state

    def image_embeddings(self, pixel_values: torch.Tensor | None = None, image_states: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """ITC image embeddings ``(B, E)``, L2-normalised: ``vision_proj`` of the image [CLS]
        (from ``pixel_values``, or from already computed :meth:`image_states`)."""
        if image_states is None:
            image_states = self.image_states(pixel_values)
        return nn.functional.normalize(self.vision_proj(image_states[:, 0, :]), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text embeddings ``(B, E)``, L2-normalised: ``text_proj`` of the [CLS] of the text
        encoder run alone (no cross-attention to an image), as transformers' ``use_itm_head=False``."""
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return nn.functional.normalize(self.text_proj(text[:, 0, :]), dim=-1)

    def itc_similarity(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                       ) -> torch.Tensor:
        """``(num_images, num_texts)`` cosine similarities of the ITC embeddings (transformers'
        ``BlipForImageTextRetrieval(..., use_itm_head=False)`` output)."""
        return self.image_embeddings(pixel_values) @ self.text_embeddings(input_ids, attention_mask).t()

    def itm_logits(self, image_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                   ) -> torch.Tensor:
        """The ITM logits ``(B, 2)`` of texts against precomputed :meth:`image_states` (untrimmed):
        what :meth:`forward` computes without re-running the vision encoder (BLIP's reranking reuses
        each image's tokens)."""
        text = self.text_encoder(input_ids=input_ids, attention_mask=padding_bias(attention_mask, image_states.dtype),
                                 encoder_hidden_states=image_states, use_cache=False).last_hidden_state
        return self.itm_head(text[:, 0, :])

    def evaluate_task(self, task, runner: nn.Module, dataset, **options):
        """``trimkit_train``'s whole-split evaluation hook: a retrieval split is evaluated as BLIP
        does (:func:`trimkit_blip.evaluate_blip_retrieval` with ``task.k_test`` and ``task.add_itc``);
        anything else returns ``None`` (the forward per batch)."""
        from .evaluation import retrieval_task_evaluation

        return retrieval_task_evaluation(task, runner, dataset, **options)


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

    def task_evaluator(self, task, runner: nn.Module, dataset):
        """``trimkit_train``'s evaluation hook: captions generated with ``task.generation`` (``None``:
        no generation, the teacher-forced proxy); :class:`trimkit_blip.evaluation.CaptionEvaluator`."""
        from .evaluation import caption_task_evaluator

        return caption_task_evaluator(task, runner, dataset)


# --- NLVR2: two images into one text encoder (Salesforce BLIP's NLVR2 model) -------------------------------


class BlipTwinSelfOutput(nn.Module):
    """Merges the two cross-attentions' per-head contexts: each goes through its own projection
    (``dense0`` / ``dense1``); the two are averaged, or, with ``merge``, concatenated and projected by
    ``merge_layer``; then dropout, the residual and ``LayerNorm``, as in a BERT self-output."""

    def __init__(self, config, merge: bool) -> None:
        super().__init__()
        h = config.hidden_size
        self.dense0 = nn.Linear(h, h)
        self.dense1 = nn.Linear(h, h)
        self.merge_layer = nn.Linear(2 * h, h) if merge else None
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context_0: torch.Tensor, context_1: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.dense0(context_0), self.dense1(context_1)
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + input_tensor)


class BlipTwinCrossAttention(nn.Module):
    """Two cross-attentions from the same text queries, ``self0`` to the first image's tokens and
    ``self1`` to the second's (transformers' ``BlipTextSelfAttention`` each), merged by
    :class:`BlipTwinSelfOutput`. Takes no image masks: every image token is real (trimkit adds its
    own key masks)."""

    def __init__(self, config, merge: bool) -> None:
        super().__init__()
        self.self0 = BlipTextSelfAttention(config, is_cross_attention=True)
        self.self1 = BlipTextSelfAttention(config, is_cross_attention=True)
        self.output = BlipTwinSelfOutput(config, merge)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_2: torch.Tensor) -> torch.Tensor:
        context_0, _ = self.self0(hidden_states, encoder_hidden_states=encoder_hidden_states)
        context_1, _ = self.self1(hidden_states, encoder_hidden_states=encoder_hidden_states_2)
        return self.output(context_0, context_1, hidden_states)


class BlipNLVRTextLayer(nn.Module):
    """A BLIP text-encoder layer with a twin cross-attention: self-attention (transformers'
    ``BlipTextAttention``), :class:`BlipTwinCrossAttention` to both images, feed-forward
    (``BlipTextIntermediate`` + ``BlipTextOutput``). ``attention_mask`` is the additive padding bias."""

    def __init__(self, config, layer_num: int, merge: bool) -> None:
        super().__init__()
        self.attention = BlipTextAttention(config, layer_idx=layer_num)
        self.crossattention = BlipTwinCrossAttention(config, merge)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_2: torch.Tensor) -> torch.Tensor:
        attention_output, _ = self.attention(hidden_states, attention_mask=attention_mask)
        attention_output = self.crossattention(attention_output, encoder_hidden_states, encoder_hidden_states_2)
        return self.output(self.intermediate(attention_output), attention_output)


class BlipNLVRTextEncoder(nn.Module):
    """``embeddings`` and ``encoder.layer.N``: the module paths of transformers' ``BlipTextModel``."""

    def __init__(self, config, merge_from: int) -> None:
        super().__init__()
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BlipNLVRTextLayer(config, i, merge=i >= merge_from)
                                            for i in range(config.num_hidden_layers)])


def _bert_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation (what transformers gives BLIP's text modules)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BlipNLVRForTrimming(nn.Module):
    """BLIP for NLVR2: ``forward(pixel_values, pixel_values_2, input_ids, attention_mask) -> (B, 2)``
    logits (is the statement true of the image pair?).

    Salesforce BLIP's NLVR2 model, as the SmartTrim paper uses it (Appendix B: "we directly feed the
    two images and the text to the encoder"): the ViT (``vision_model``, transformers'
    ``BlipVisionModel``) encodes each image; the text encoder's layers (:class:`BlipNLVRTextLayer`)
    cross-attend to each image with their own attention (``crossattention.self0`` / ``self1``) and
    merge the two: averaged in the first ``merge_from`` layers, concatenated and projected
    (``merge_layer``) from then on (Salesforce: 6 of 12, the default ``num_hidden_layers // 2``);
    ``cls_head`` (Linear-ReLU-Linear) classifies the text [CLS]. Salesforce sets the text's first
    token to its ``[ENC]`` token; here the first input id is used as given (pass the tokenizer's
    ``[ENC]`` id there). Module paths follow transformers' BLIP (``text_encoder.encoder.layer.N``...)
    and Salesforce's names inside a layer (``self0``, ``dense0``, ``merge_layer``), so a Salesforce
    checkpoint maps by renaming its vision keys as transformers' BLIP conversion does.

    Randomly initialised from a :class:`~transformers.BlipConfig`; :meth:`from_blip` starts from a
    pretrained BLIP as Salesforce does. The vision trimmers' cross-modal signal is the statement's
    :class:`QuestionSummary`.
    """

    def __init__(self, config: BlipConfig, merge_from: int | None = None, interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        text = config.text_config
        self.config = config
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.merge_from = text.num_hidden_layers // 2 if merge_from is None else merge_from
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipNLVRTextEncoder(text, self.merge_from)
        h = text.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
        self.question_summary = QuestionSummary()
        _bert_init(self.text_encoder, text.initializer_range)
        _bert_init(self.cls_head, text.initializer_range)

    @classmethod
    def from_blip(cls, model: BlipForImageTextRetrieval | BlipITMForTrimming, merge_from: int | None = None,
                  interpolate_pos_encoding: bool = False) -> "BlipNLVRForTrimming":
        """Start from a pretrained BLIP image-text model, as Salesforce's NLVR2 fine-tuning does: its
        vision tower and text encoder are copied, each layer's cross-attention into both ``self0``
        and ``self1`` and its output projection into both ``dense0`` and ``dense1``; ``merge_layer``
        and ``cls_head`` start random."""
        nlvr = cls(model.config, merge_from, interpolate_pos_encoding)
        nlvr.vision_model.load_state_dict(model.vision_model.state_dict())
        enc = model.text_encoder
        nlvr.text_encoder.embeddings.load_state_dict(enc.embeddings.state_dict())
        for theirs, ours in zip(enc.encoder.layer, nlvr.text_encoder.encoder.layer):
            for name in ("attention", "intermediate", "output"):
                getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
            cross = theirs.crossattention
            for twin in (ours.crossattention.self0, ours.crossattention.self1):
                twin.load_state_dict(cross.self.state_dict())
            out = ours.crossattention.output
            for dense in (out.dense0, out.dense1):
                dense.load_state_dict(cross.output.dense.state_dict())
            out.LayerNorm.load_state_dict(cross.output.LayerNorm.state_dict())
        return nlvr.train(model.training)

    def _image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values,
                                 interpolate_pos_encoding=self.interpolate_pos_encoding).last_hidden_state

    def forward(self, pixel_values: torch.Tensor, pixel_values_2: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder.embeddings(input_ids=input_ids)
        self.question_summary(hidden, attention_mask)  # traced once; the vision trimmers read it (context_source)
        image, image_2 = self._image(pixel_values), self._image(pixel_values_2)  # each vision layer runs twice
        bias = padding_bias(attention_mask, hidden.dtype)
        for layer in self.text_encoder.encoder.layer:
            hidden = layer(hidden, bias, image, image_2)
        return self.cls_head(hidden[:, 0])
