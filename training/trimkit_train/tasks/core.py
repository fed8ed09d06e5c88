"""The built-in tasks: losses, self-distillation terms and metric accumulators.

Every task follows :class:`trimkit.protocols.Task`: ``loss(logits, labels)``, ``distill(logits,
full_logits, labels)`` (0 when the two outputs are equal; gradients reach both, as in Eq. 11 where
the full pass is the same model), ``metric()`` and ``main_metric``.

* classification: labels long ``(B,)`` class indices; cross-entropy; distill KL(softmax trim ||
  softmax full); ``accuracy``;
* vqa: labels float ``(B, A)`` soft scores; BCE x A (METER); distill the Bernoulli KL(full || trim)
  per answer (soft-target BCE minus its entropy); ``vqa_score``;
* captioning: labels long ``(B, T)`` token ids aligned with ``input_ids``, -100 not scored; token
  cross-entropy; distill the token KL; ``cider``;
* retrieval: labels long ``(B,)``, 1 match / 0 not; ITM cross-entropy (BCE for one logit); distill
  the KL of the two-class softmaxes; ``r_mean``.

``nlvr2`` and ``snli_ve`` are classification tasks under their own names.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .caption_metrics import caption_scores
from .retrieval import itm_score, retrieval_recalls

IGNORE_INDEX = -100
"""Token label of a position that is not scored (``trimkit_train.data.common.IGNORE_INDEX``)."""

__all__ = [
    "IGNORE_INDEX", "AccuracyMetric", "CaptionMetric", "CaptioningTask", "ClassificationTask", "RetrievalMetric",
    "RetrievalTask", "VQAMetric", "VQATask", "categorical_kl", "bernoulli_kl",
]


def categorical_kl(logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(logits) || softmax(full_logits))`` over the last dimension."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(full_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def bernoulli_kl(logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(Bernoulli(sigmoid(full)) || Bernoulli(sigmoid(logits)))``: the soft-target
    BCE of ``logits`` against ``sigmoid(full_logits)`` minus that target's entropy (same gradient in
    ``logits`` as the BCE, and exactly 0 when the two are equal)."""
    logits, full_logits = logits.float(), full_logits.float()
    q = torch.sigmoid(full_logits)
    return (F.binary_cross_entropy_with_logits(logits, q, reduction="none")
            - F.binary_cross_entropy_with_logits(full_logits, q, reduction="none"))


# --- metric accumulators ---------------------------------------------------------------------------------
class AccuracyMetric:
    """``accuracy``: the fraction of rows whose argmax is ``batch["labels"]``."""

    def __init__(self) -> None:
        self.correct, self.n = 0, 0

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        labels = batch["labels"].to(logits.device)
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.n += int(labels.shape[0])

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.n if self.n else float("nan")}


class VQAMetric:
    """``vqa_score``: the mean soft score (``batch["labels"]``) of the argmax answer (METER's
    ``VQAScore``; the official accuracy for answers in the vocabulary); ``accuracy``: the fraction
    whose argmax answer is a most common annotator answer (the highest score, above 0)."""

    def __init__(self) -> None:
        self.score, self.correct, self.n = 0.0, 0, 0

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        scores = batch["labels"].to(logits.device).float()
        got = scores.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
        best = scores.max(-1).values
        self.score += float(got.sum())
        self.correct += int(((got == best) & (best > 0)).sum())
        self.n += int(scores.shape[0])

    def compute(self) -> dict[str, float]:
        if not self.n:
            return {"vqa_score": float("nan"), "accuracy": float("nan")}
        return {"vqa_score": self.score / self.n, "accuracy": self.correct / self.n}


class CaptionMetric:
    """BLEU-1..4 and CIDEr(-D) of captions against references (pycocoevalcap's scorers, see
    :func:`~trimkit_train.tasks.caption_metrics.caption_scores`).

    Hypotheses: ``batch["generated"]`` when present, a list of strings or a ``(B, L)`` tensor of
    generated token ids (decoded with the tokenizer, special tokens skipped, a leading ``prompt``
    removed); otherwise the **teacher-forced argmax** of ``logits`` at the scored positions (labels
    not -100): a cheap proxy, not a generated caption. References: ``batch["references"]`` (lists of
    strings), else the decoded target caption of ``labels``. Decoding needs a ``tokenizer`` (the
    dataset's, see :meth:`CaptioningTask.metric`).
    """

    def __init__(self, tokenizer: Any = None, prompt: str = "") -> None:
        self.tokenizer, self.prompt = tokenizer, prompt.strip().lower()
        self.references: list[list[str]] = []
        self.hypotheses: list[str] = []

    def _decode(self, ids: Any) -> str:
        if self.tokenizer is None:
            raise ValueError("CaptionMetric: token ids need a tokenizer to decode (task.metric(dataset), or pass "
                             "batch['generated'] as strings)")
        ids = [int(i) for i in ids if int(i) >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _strip_prompt(self, text: str) -> str:
        if self.prompt and text.lower().startswith(self.prompt):
            return text[len(self.prompt):].strip()
        return text

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        labels = batch.get("labels")
        generated = batch.get("generated")
        if generated is not None:
            if isinstance(generated, torch.Tensor):
                hyps = [self._strip_prompt(self._decode(row.tolist())) for row in generated]
            else:
                hyps = [self._strip_prompt(str(g)) for g in generated]
        else:
            logits, targets = _align_tokens(logits, labels)
            pred = logits.argmax(-1)
            hyps = [self._decode(p[t != IGNORE_INDEX].tolist()) for p, t in zip(pred, targets)]
        refs = batch.get("references")
        if refs is None:
            if labels is None:
                raise ValueError("CaptionMetric: the batch has neither references nor labels")
            refs = [[self._decode(row[row != IGNORE_INDEX].tolist())] for row in labels]
        if len(refs) != len(hyps):
            raise ValueError(f"CaptionMetric: {len(hyps)} captions but {len(refs)} reference lists")
        self.hypotheses.extend(hyps)
        self.references.extend([list(r) for r in refs])

    def compute(self) -> dict[str, float]:
        if not self.hypotheses:
            return {"bleu4": float("nan"), "cider": float("nan")}
        return caption_scores(self.references, self.hypotheses)


class RetrievalMetric:
    """``itm_accuracy`` of the match / no-match decision and, when the batches carry
    ``image_index`` and ``text_index`` (the eval view of a retrieval dataset: every pair), the
    recalls of :func:`~trimkit_train.tasks.retrieval.retrieval_recalls` on the score matrix of the
    pairs seen (:func:`~trimkit_train.tasks.retrieval.itm_score`; pairs not seen score -inf). The
    ground truth comes from the pairs labelled 1; texts whose match was not seen are left out."""

    def __init__(self) -> None:
        self.correct, self.n = 0, 0
        self.rows: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        labels = batch["labels"].to(logits.device).long().reshape(-1)
        score = itm_score(logits).float()
        self.correct += int(((score > 0).long() == labels).sum())
        self.n += int(labels.numel())
        if "image_index" in batch and "text_index" in batch:
            img = torch.as_tensor(batch["image_index"]).reshape(-1).double().cpu()
            txt = torch.as_tensor(batch["text_index"]).reshape(-1).double().cpu()
            self.rows.append(torch.stack([img, txt, score.detach().double().cpu(), labels.double().cpu()], 1))

    def compute(self) -> dict[str, float]:
        out = {"itm_accuracy": self.correct / self.n if self.n else float("nan")}
        if self.rows:
            rows = torch.cat(self.rows)
            img, txt, score, label = rows[:, 0].long(), rows[:, 1].long(), rows[:, 2], rows[:, 3]
            n_img, n_txt = int(img.max()) + 1, int(txt.max()) + 1
            matrix = torch.full((n_img, n_txt), float("-inf"), dtype=torch.float64)
            matrix[img, txt] = score
            t2i = torch.full((n_txt,), -1, dtype=torch.long)
            pos = label > 0
            t2i[txt[pos]] = img[pos]
            seen = t2i >= 0
            if bool(seen.any()):
                out.update(retrieval_recalls(matrix[:, seen], t2i[seen]))
        return out


# --- tasks -------------------------------------------------------------------------------------------------
class ClassificationTask:
    """Single-label classification: cross-entropy, KL of the softmaxes, ``accuracy``."""

    main_metric = "accuracy"

    def __init__(self, name: str = "classification") -> None:
        self.name = name

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels.long())

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return categorical_kl(logits, full_logits).mean()

    def metric(self, dataset: Any = None) -> AccuracyMetric:
        return AccuracyMetric()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class VQATask:
    """VQA as METER: multi-label BCE over the answer vocabulary against soft scores, times the
    number of answers (``binary_cross_entropy_with_logits(logits, scores) * A``); distillation: the
    soft-target BCE of the trimmed logits against ``sigmoid(full_logits)`` on the same scale, minus
    its entropy (so 0 at equality); metrics ``vqa_score`` and ``accuracy`` (:class:`VQAMetric`)."""

    name = "vqa"
    main_metric = "vqa_score"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)) * labels.shape[-1]

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bernoulli_kl(logits, full_logits).sum(-1).mean()

    def metric(self, dataset: Any = None) -> VQAMetric:
        return VQAMetric()

    def __repr__(self) -> str:
        return "VQATask()"


def _align_tokens(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits and their targets: ``labels`` ``(B, T)`` are aligned with ``input_ids``;
    logits ``(B, T - 1, V)`` already predict positions 1..T-1 (BLIP's captioning wrapper), logits
    ``(B, T, V)`` predict from every position (the last one is dropped)."""
    if labels is None or labels.dim() != 2 or logits.dim() != 3:
        raise ValueError(f"captioning: expected logits (B, T-1 or T, V) and token labels (B, T), got "
                         f"{tuple(logits.shape)} and {None if labels is None else tuple(labels.shape)}")
    t = labels.shape[1]
    if logits.shape[1] == t:
        logits = logits[:, :-1]
    elif logits.shape[1] != t - 1:
        raise ValueError(f"captioning: logits cover {logits.shape[1]} positions, labels {t} (expected {t - 1} or {t})")
    return logits, labels[:, 1:].to(logits.device)


class CaptioningTask:
    """Captioning: next-token cross-entropy over the positions whose label is not -100
    (``label_smoothing``: BLIP fine-tunes with 0.1); distillation: the per-token KL of the softmaxes
    over the same positions; metrics BLEU-1..4 and ``cider`` (:class:`CaptionMetric`)."""

    name = "captioning"
    main_metric = "cider"
    metric_on_train_steps = False  # BLEU/CIDEr of teacher-forced argmax tokens per step: slow, and no signal

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, targets = _align_tokens(logits, labels)
        if not bool((targets != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, targets = _align_tokens(logits, labels)
        full_logits, _ = _align_tokens(full_logits, labels)
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return categorical_kl(logits[keep], full_logits[keep]).mean()

    def metric(self, dataset: Any = None) -> CaptionMetric:
        """A :class:`CaptionMetric`; ``dataset`` (optional) gives the tokenizer and the prompt."""
        return CaptionMetric(getattr(dataset, "tokenizer", None), getattr(dataset, "prompt", "") or "")

    def __repr__(self) -> str:
        return f"CaptioningTask(label_smoothing={self.label_smoothing})"


class RetrievalTask:
    """Image-text matching: cross-entropy over ``(B, 2)`` ITM logits (or BCE for one logit per pair)
    against 1 (match) / 0; distillation: the KL of the two-class softmaxes (Bernoulli KL for one
    logit); metrics ``itm_accuracy`` and, on every-pair evaluation batches, recall@1/5/10 in both
    directions (:class:`RetrievalMetric`)."""

    name = "retrieval"
    main_metric = "r_mean"
    metric_on_train_steps = False  # recall@K over one training batch's pairs means nothing

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 2 and logits.shape[-1] == 2:
            return F.cross_entropy(logits, labels.long().reshape(-1))
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), labels.reshape(-1).to(logits.dtype))

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 2 and logits.shape[-1] == 2:
            return categorical_kl(logits, full_logits).mean()
        return bernoulli_kl(logits.reshape(-1), full_logits.reshape(-1)).mean()

    def metric(self, dataset: Any = None) -> RetrievalMetric:
        return RetrievalMetric()

    def __repr__(self) -> str:
        return "RetrievalTask()"
