"""BLIP's released evaluation protocols, through a trimmed (or plain) BLIP wrapper.

* VQA by **answer ranking** (:func:`rank_answers`, Salesforce BLIP's ``rank_answer``): the question
  is encoded once (trimmed), the answer decoder scores the first token of every candidate answer
  from a BOS token, the ``k`` candidates whose first token is most probable are scored by their full
  log-likelihood (every token, [SEP] included), and the best of those is the answer. BLIP's
  released code scores with its training loss, label smoothing 0.1 included
  (``label_smoothing=0.1`` reproduces that); the default is the plain log-likelihood. Candidates
  are the answer list tokenised as BLIP does (:func:`answer_candidates`: BOS first, padded to the
  longest answer).
* VQA by **generation** (:func:`generate_answers`): BLIP's ``inference='generate'`` (beam search of
  3, at most 10 tokens), decoded with special tokens skipped.
* **captioning** (:func:`generate_captions`): BLIP's decoding (``configs/caption_coco.yaml``: beam
  search of 3, 5 to 20 tokens with the prompt ``"a picture of "``; the first token is the model's
  BOS, as BLIP sets ``[DEC]``), the decoder reading only the kept image tokens.
* **retrieval** (:func:`evaluate_blip_retrieval`, BLIP's ``train_retrieval.evaluation``): ITC
  similarities of every (image, text) pair from the projections of the unimodal encoders, then the
  ``k`` best texts of each image and the ``k`` best images of each text are rescored by ITM (its
  match logit) plus their ITC similarity; everything else ranks last.

Decoding reads the encoder's output as the trimmed forward computed it
(:func:`trimkit_blip.generation.encoder_states`): at batch 1 in mode ``remove`` only the kept
tokens exist, in batches the dropped ones are masked out of every decoder cross-attention.

The per-batch evaluators (:class:`VQAEvaluator`, :class:`CaptionEvaluator`) are what the wrappers'
``task_evaluator`` hands to ``trimkit_train``'s evaluation (``trimkit eval``, the trainer's
``evaluate``); ``evaluate_task`` runs :func:`evaluate_blip_retrieval` (see
:mod:`trimkit_train.tasks.core`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .generation import cross_attention_mask, encoder_states, generate, unwrapped

__all__ = ["BLIP_CAPTION_GENERATION", "BLIP_RETRIEVAL_K", "BLIP_VQA_GENERATION", "BLIP_VQA_K", "CaptionEvaluator",
           "VQAEvaluator", "answer_candidates", "evaluate_blip_retrieval", "generate_answers", "generate_captions",
           "rank_answers"]

BLIP_VQA_K = 128
"""``k_test`` of BLIP's VQA ranking (``configs/vqa.yaml``)."""
BLIP_VQA_GENERATION: dict[str, Any] = {"num_beams": 3, "max_length": 10, "min_length": 1}
"""BLIP's free-form VQA decoding (``models/blip_vqa.py``, ``inference='generate'``)."""
BLIP_CAPTION_GENERATION: dict[str, Any] = {"num_beams": 3, "max_length": 20, "min_length": 5}
"""BLIP's caption decoding (``configs/caption_coco.yaml``; NoCaps adds ``repetition_penalty=1.1``)."""
BLIP_RETRIEVAL_K = 128
"""``k_test`` of BLIP's retrieval reranking on Flickr30k (COCO: 256)."""


# --- VQA -------------------------------------------------------------------------------------------------
def answer_candidates(tokenizer: Any, answers: Sequence[str], bos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer list as decoder inputs, as BLIP's ``train_vqa`` builds them: each answer
    tokenised with its special tokens ([CLS] answer [SEP]), padded to the longest, the first token
    replaced by the decoder's BOS. Returns ``(ids, attention_mask)``, ``(A, T)`` each."""
    if not len(answers):
        raise ValueError("answer_candidates: the answer list is empty")
    enc = tokenizer(list(answers), padding="longest", return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = int(bos_token_id)
    return ids, enc["attention_mask"].clone()


def _log_likelihood(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, label_smoothing: float
                    ) -> torch.Tensor:
    """Sum over the answer tokens (after BOS, padding excluded) of their log-probabilities under
    next-token ``logits`` ``(R, T - 1, V)``; with label smoothing ``e``, of ``(1 - e) log p(y) + e
    mean_v log p(v)`` (minus the smoothed cross-entropy, BLIP's ranking score)."""
    logp = logits.float().log_softmax(-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if label_smoothing:
        tok = (1.0 - label_smoothing) * tok + label_smoothing * logp.mean(-1)
    return (tok * mask[:, 1:].to(tok.dtype)).sum(-1)


@torch.no_grad()
def rank_answers(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 answer_ids: torch.Tensor, answer_attention_mask: torch.Tensor, k: int = BLIP_VQA_K, *,
                 label_smoothing: float = 0.0, max_rows: int = 1024) -> torch.Tensor:
    """Score the candidate answers of every question as BLIP's ``rank_answer``: ``(B, A)`` scores.

    ``model``: a :class:`trimkit.TrimmedModel` of :class:`~trimkit_blip.BlipVQAForTrimming` (in
    eval mode) or the wrapper itself. ``answer_ids`` / ``answer_attention_mask`` ``(A, T)``: every
    candidate, BOS first (:func:`answer_candidates`). The ``k`` candidates with the most probable
    first token (given BOS) get their full log-likelihood (see :func:`_log_likelihood`), the others
    ``-inf``; the argmax is BLIP's answer. The decoder reads the kept question tokens and ignores
    the question's padding (BLIP passes the question mask as ``encoder_attention_mask``; the
    wrapper's forward, like transformers' ``BlipForQuestionAnswering``, attends to it), so a
    padded question scores as the same question unpadded. ``max_rows`` bounds the decoder rows
    (questions x k) of one scoring call.
    """
    from .generation import _bos
    from .modeling import BlipVQAForTrimming, causal_bias

    wrapper = unwrapped(model)
    if not isinstance(wrapper, BlipVQAForTrimming):
        raise TypeError(f"trimkit_blip.rank_answers: needs BLIP's VQA model (BlipVQAForTrimming), got "
                        f"{type(wrapper).__name__}")
    states, keep = encoder_states(model, pixel_values, input_ids, attention_mask)
    decoder = wrapper.text_decoder
    dev, dtype = states.device, states.dtype
    answer_ids, answer_attention_mask = answer_ids.to(dev), answer_attention_mask.to(dev)
    batch, num = states.shape[0], answer_ids.shape[0]
    k = max(1, min(int(k), num))
    start = _bos(batch, int(answer_ids[0, 0]), dev)
    with cross_attention_mask(decoder, keep):
        first = decoder(input_ids=start, attention_mask=causal_bias(torch.ones_like(start), dtype),
                        encoder_hidden_states=states, use_cache=False).logits[:, 0]
    prob_first = first.float().softmax(-1).index_select(1, answer_ids[:, 1])
    top = prob_first.topk(k, dim=1).indices  # (B, k)
    scores = torch.full((batch, num), float("-inf"), device=dev)
    per = max(1, int(max_rows) // k)
    for s in range(0, batch, per):
        e = min(batch, s + per)
        idx = top[s:e]
        rows, rows_mask = answer_ids[idx.reshape(-1)], answer_attention_mask[idx.reshape(-1)]
        with cross_attention_mask(decoder, keep[s:e]):
            logits = decoder(input_ids=rows, attention_mask=causal_bias(rows_mask, dtype), use_cache=False,
                             encoder_hidden_states=states[s:e].repeat_interleave(k, 0), return_logits=True)
        scores[s:e].scatter_(1, idx, _log_likelihood(logits, rows, rows_mask, label_smoothing).view(e - s, k))
    return scores


@torch.no_grad()
def generate_answers(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, tokenizer: Any, **generate_kwargs: Any) -> list[str]:
    """Free-form answers as BLIP's ``inference='generate'`` (:data:`BLIP_VQA_GENERATION`, which
    ``generate_kwargs`` override), decoded with special tokens skipped."""
    seq = generate(model, pixel_values, input_ids, attention_mask, **{**BLIP_VQA_GENERATION, **generate_kwargs})
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in seq]


class _WithAnswers:
    """A VQA dataset whose batches also carry answer candidates (``answer_ids`` / ``answer_attention_mask``,
    ``k`` rows per question): what MACs are counted on (the wrapper's forward needs them)."""

    def __init__(self, dataset: Any, ids: torch.Tensor, mask: torch.Tensor, collate: Any) -> None:
        self.dataset, self.ids, self.mask, self._collate = dataset, ids, mask, collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def collate_fn(self, items: list) -> dict[str, Any]:
        batch = self._collate(items)
        rows = len(items)
        batch["answer_ids"] = self.ids.repeat(rows, 1)
        batch["answer_attention_mask"] = self.mask.repeat(rows, 1)
        return batch


def _collate_of(dataset: Any) -> Any:
    collate = getattr(dataset, "collate_fn", None)
    if collate is None:
        raise ValueError(f"trimkit_blip: the dataset {type(dataset).__name__} has no collate_fn")
    return collate


class VQAEvaluator:
    """One batch of a VQA dataset through BLIP's answer decoder (``trimkit_train``'s per-batch
    evaluation hook): ``inference="rank"`` returns the ``(B, A)`` :func:`rank_answers` scores over
    the dataset's ``answers`` (what ``VQAMetric`` takes as logits); ``"generate"`` puts the
    :func:`generate_answers` strings in ``batch["generated"]`` and returns ``None``.

    ``macs_dataset``: the dataset with the decoder inputs MACs are counted with: the ``k``
    candidates of a ranking (all rows are padded to the longest answer, so which ``k`` does not
    change the count; the first-token pass, one token per question, is not counted), BOS alone for
    generation (one decoder step).
    """

    def __init__(self, model: nn.Module, dataset: Any, inference: str = "rank", k: int = BLIP_VQA_K,
                 label_smoothing: float = 0.0, generation: dict[str, Any] | None = None) -> None:
        if inference not in ("rank", "generate"):
            raise ValueError(f"VQAEvaluator: inference must be 'rank' or 'generate', got {inference!r}")
        tokenizer = getattr(dataset, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"trimkit_blip: BLIP VQA evaluation needs the dataset's tokenizer; "
                             f"{type(dataset).__name__} has no `tokenizer`")
        wrapper = unwrapped(model)
        bos = wrapper.config.text_config.bos_token_id
        self.model, self.tokenizer, self.inference = model, tokenizer, inference
        self.k, self.label_smoothing, self.generation = int(k), float(label_smoothing), dict(generation or {})
        device = next(wrapper.parameters()).device
        if inference == "rank":
            answers = getattr(dataset, "answers", None)
            if not answers:
                raise ValueError(f"trimkit_blip: BLIP VQA answer ranking needs the dataset's answer list; "
                                 f"{type(dataset).__name__} has no `answers` (or use task vqa_generate)")
            self.answer_ids, self.answer_mask = (t.to(device) for t in answer_candidates(tokenizer, answers, bos))
            k = min(self.k, self.answer_ids.shape[0])
            macs = (self.answer_ids[:k].cpu(), self.answer_mask[:k].cpu())
        else:
            macs = (torch.full((1, 1), bos, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))
        self.macs_dataset = _WithAnswers(dataset, *macs, _collate_of(dataset))

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor | None:
        x = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        if self.inference == "rank":
            return rank_answers(self.model, *x, self.answer_ids, self.answer_mask, self.k,
                                label_smoothing=self.label_smoothing)
        batch["generated"] = generate_answers(self.model, *x, self.tokenizer, **self.generation)
        return None


# --- captioning ------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_captions(model: nn.Module, pixel_values: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                      **generate_kwargs: Any) -> torch.Tensor:
    """Caption token ids ``(B, L)`` (the prompt first) as BLIP's ``generate``: ``prompt_ids`` ``(P,)``
    (BOS and the prompt, no [SEP]; default BOS alone) with its first token set to the model's BOS,
    decoded with :data:`BLIP_CAPTION_GENERATION` (``generate_kwargs`` override it)."""
    wrapper = unwrapped(model)
    bos = wrapper.config.text_config.bos_token_id
    batch = pixel_values.shape[0]
    prompt = torch.tensor([bos]) if prompt_ids is None or not len(prompt_ids) else prompt_ids.reshape(-1).clone()
    prompt[0] = bos
    prompt = prompt.to(pixel_values.device)[None].expand(batch, -1).contiguous()
    return generate(model, pixel_values, prompt, torch.ones_like(prompt),
                    **{**BLIP_CAPTION_GENERATION, **generate_kwargs})


class CaptionEvaluator:
    """One batch of a captioning dataset through BLIP's decoder: ``batch["generated"]`` gets the
    generated ids (prompt first; ``CaptionMetric`` decodes them and removes the prompt) and the
    call returns ``None``. The prompt is the dataset's (``prompt_ids()``: BOS and the prompt);
    decoding options are :data:`BLIP_CAPTION_GENERATION`, then ``generation``, then the dataset's
    own ``generation`` attribute (NoCaps: ``repetition_penalty`` 1.1, as BLIP evaluates it)."""

    def __init__(self, model: nn.Module, dataset: Any, generation: dict[str, Any] | None = None) -> None:
        prompt = getattr(dataset, "prompt_ids", None)
        self.prompt = prompt() if callable(prompt) else None
        self.model = model
        self.generation = {**BLIP_CAPTION_GENERATION, **dict(generation or {}),
                           **dict(getattr(dataset, "generation", None) or {})}

    def __call__(self, batch: dict[str, Any]) -> None:
        batch["generated"] = generate_captions(self.model, batch["pixel_values"], self.prompt, **self.generation)
        return None


# --- retrieval -------------------------------------------------------------------------------------------
class _ImagesView:
    """A retrieval dataset restricted to its first ``images`` images and their texts (``instances``),
    or with placeholder pixels (``pixels=False``: the reranking reads cached image states)."""

    def __init__(self, dataset: Any, images: int | None = None, pixels: bool = True) -> None:
        import numpy as np

        gt = np.asarray(dataset.text_to_image, dtype=np.int64)
        m = int(dataset.num_images) if images is None else min(int(images), int(dataset.num_images))
        self.texts = [t for t in range(len(gt)) if gt[t] < m]
        self.dataset, self.pixels = dataset, pixels
        self.num_images, self.num_texts = m, len(self.texts)
        self.text_to_image = gt[self.texts]
        self.input_ids = [dataset.input_ids[t] for t in self.texts]
        self.collate_fn = _collate_of(dataset)

    def image(self, i: int) -> torch.Tensor:
        if i >= self.num_images:
            raise IndexError(i)
        return self.dataset.image(i) if self.pixels else torch.zeros(0)


def _retrieval_dataset(dataset: Any) -> bool:
    return all(hasattr(dataset, a) for a in ("image", "input_ids", "num_images", "num_texts", "text_to_image"))


@torch.no_grad()
def evaluate_blip_retrieval(model: nn.Module, dataset: Any, k: int | None = BLIP_RETRIEVAL_K, batch_size: int = 64, *,
                            add_itc: bool = True, itm: str = "match", instances: int | None = None,
                            device: torch.device | str | None = None, progress: bool = False,
                            return_scores: bool = False) -> dict[str, Any]:
    """Image-text retrieval as BLIP evaluates it: recall@1/5/10 both ways (``i2t_*``, ``t2i_*``,
    ``r_mean``: :func:`trimkit_train.tasks.retrieval.retrieval_recalls`).

    ``model``: a :class:`trimkit.TrimmedModel` of :class:`~trimkit_blip.BlipITMForTrimming` or the
    wrapper; ``dataset``: a retrieval dataset (``trimkit_train.data.KarpathyRetrieval``'s attributes
    ``image(i)``, ``input_ids``, ``num_images``, ``num_texts``, ``text_to_image``, ``collate_fn``).

    1. ITC: :meth:`~trimkit_blip.BlipITMForTrimming.image_embeddings` of every image and
       :meth:`~trimkit_blip.BlipITMForTrimming.text_embeddings` of every text (the unimodal encoders,
       untrimmed), their cosine similarities for every pair;
    2. ITM reranking (:func:`trimkit_train.tasks.evaluate_retrieval`): the ``k`` most similar
       texts of each image and images of each text are scored by ITM, ``itm="match"``: the match
       logit (BLIP), ``"log_odds"``: match minus no-match logit, plus the similarity when
       ``add_itc`` (BLIP), in batches of ``batch_size`` pairs; the other pairs rank last. A
       TrimmedModel scores each pair with its trimmed forward (the vision trimmers read the text,
       so every pair runs the whole model); the plain wrapper reuses each image's encoder states
       (BLIP's own shortcut, the same scores). ``k=None``: every pair is scored by ITM alone.

    ``instances``: only the first ``ceil(instances / num_texts)`` images and their texts (the
    dataset's items are its pairs, image-major). Returns the recalls, ``n`` (pairs of the evaluated
    split), ``pairs_scored`` (ITM forwards), ``keep`` (a TrimmedModel's mean kept fraction per
    trimmer over the ITM forwards) and, with ``return_scores``, the two score matrices.
    """
    from trimkit import TrimmedModel

    try:
        from trimkit_train.tasks.retrieval import evaluate_retrieval, itm_score
    except ImportError as err:  # the training extras
        raise ImportError(f"trimkit_blip.evaluate_blip_retrieval uses trimkit_train's retrieval evaluation: {err}"
                          ) from None
    from .modeling import BlipITMForTrimming

    wrapper = unwrapped(model)
    if not isinstance(wrapper, BlipITMForTrimming):
        raise TypeError(f"trimkit_blip.evaluate_blip_retrieval: needs BLIP's ITM model (BlipITMForTrimming), got "
                        f"{type(wrapper).__name__}")
    if not _retrieval_dataset(dataset):
        raise TypeError(f"trimkit_blip.evaluate_blip_retrieval: {type(dataset).__name__} is not a retrieval dataset "
                        "(image(i), input_ids, num_images, num_texts, text_to_image)")
    if itm not in ("match", "log_odds"):
        raise ValueError(f"evaluate_blip_retrieval: itm must be 'match' or 'log_odds', got {itm!r}")
    trimmed = isinstance(model, TrimmedModel)
    dev = torch.device(device) if device is not None else next(wrapper.parameters()).device
    images = None if instances is None else math.ceil(int(instances) / max(1, int(dataset.num_texts)))
    view = _ImagesView(dataset, images, pixels=True)
    was = model.training
    model.eval()
    keep_sum: dict[str, float] = {}
    keep_n: dict[str, int] = {}
    scored = [0]
    try:
        # 1. ITC: every image and every text once, through the unimodal encoders (untrimmed)
        image_emb, states = [], []
        for s in range(0, view.num_images, batch_size):
            px = torch.stack([view.image(i) for i in range(s, min(view.num_images, s + batch_size))]).to(dev)
            st = wrapper.image_states(px)
            image_emb.append(wrapper.image_embeddings(image_states=st).double().cpu())
            if not trimmed:
                states.extend(st.cpu())
        text_emb = []
        for s in range(0, view.num_texts, batch_size):
            texts = view.collate_fn([{"input_ids": view.input_ids[t]}
                                     for t in range(s, min(view.num_texts, s + batch_size))])
            text_emb.append(wrapper.text_embeddings(texts["input_ids"].to(dev), texts["attention_mask"].to(dev))
                            .double().cpu())
        coarse = torch.cat(image_emb) @ torch.cat(text_emb).t()

        # 2. ITM on the top k
        def score(batch: dict[str, Any]) -> torch.Tensor:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if trimmed:
                logits = model(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask)
                for r in model.records:
                    keep_sum[r.key] = keep_sum.get(r.key, 0.0) + float(r.keep.float().sum())
                    keep_n[r.key] = keep_n.get(r.key, 0) + int(r.keep.numel())
            else:
                st = torch.stack([states[i] for i in batch["image_index"]]).to(dev)
                logits = wrapper.itm_logits(st, ids, mask)
            scored[0] += int(ids.shape[0])
            return logits[:, 1] if itm == "match" else itm_score(logits)

        rerank = view if trimmed else _ImagesView(dataset, images, pixels=False)
        out = evaluate_retrieval(score, rerank, k, coarse_scores=coarse if k is not None else None,
                                 add_coarse=add_itc and k is not None, batch_size=batch_size, device=dev,
                                 progress=progress, return_scores=return_scores, cache_images=trimmed)
    finally:
        model.train(was)
    out.update(n=view.num_images * view.num_texts, pairs_scored=scored[0],
               keep={key: keep_sum[key] / keep_n[key] for key in keep_sum})
    return out


# --- the hooks trimkit_train's tasks call (see trimkit_train.tasks.core) ----------------------------------
def vqa_task_evaluator(task: Any, runner: nn.Module, dataset: Any) -> VQAEvaluator:
    return VQAEvaluator(runner, dataset, inference=getattr(task, "inference", "rank"),
                        k=getattr(task, "k_test", BLIP_VQA_K),
                        label_smoothing=getattr(task, "rank_label_smoothing", 0.0),
                        generation=getattr(task, "generation", None))


def caption_task_evaluator(task: Any, runner: nn.Module, dataset: Any) -> CaptionEvaluator | None:
    generation = getattr(task, "generation", {})
    if generation is None:
        return None
    return CaptionEvaluator(runner, dataset, generation)


def retrieval_task_evaluation(task: Any, runner: nn.Module, dataset: Any, *, batch_size: int = 64,
                              instances: int | None = None, device: Any = None, progress: bool = False
                              ) -> dict[str, Any] | None:
    if not _retrieval_dataset(dataset):
        return None  # not a retrieval split: the forward and the task's metric
    return evaluate_blip_retrieval(runner, dataset, getattr(task, "k_test", BLIP_RETRIEVAL_K), batch_size,
                                   add_itc=getattr(task, "add_itc", True), instances=instances, device=device,
                                   progress=progress)
