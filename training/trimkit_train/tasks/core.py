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
* decoder_vqa: labels long ``(B, N)`` next-token targets (-100 not scored: only the answer is);
  the LM cross-entropy there; distill the token KL there; ``accuracy`` of the greedy answer;
* retrieval: labels long ``(B,)``, 1 match / 0 not; ITM cross-entropy (BCE for one logit); distill
  the KL of the two-class softmaxes; ``r_mean``.

``nlvr2`` and ``snli_ve`` are classification tasks under their own names.

Evaluation protocols that are not "one forward per batch" (answer ranking, generation, ITC+ITM
reranking) come from the model: the tasks' optional hooks ``evaluator(model, dataset)`` (per
batch) and ``evaluate_dataset(model, dataset, ...)`` (the whole split; see
:class:`trimkit.protocols.Task`) ask the underlying model (``TrimmedModel.model``, else the
model) for its optional methods

* ``task_evaluator(task, runner, dataset) -> Callable[[batch], output] | None``: the per-batch
  evaluation (e.g. BLIP VQA: rank the dataset's answers with the decoder, or generate an answer and
  put it in ``batch["generated"]``; BLIP captioning: generate captions into ``batch["generated"]``);
* ``evaluate_task(task, runner, dataset, *, batch_size, instances, device, progress) -> dict | None``:
  a whole-split evaluation (BLIP retrieval: ITC similarities of every pair, ITM reranking of the
  top ``k_test``);

``runner`` is what the trainer evaluates (the :class:`trimkit.TrimmedModel`, or the model itself):
the trimmed forward runs through it. Options of a protocol are the task's attributes (``inference``,
``k_test``, ``generation``...); a model without these methods is evaluated by its forward.
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
    "IGNORE_INDEX", "AccuracyMetric", "BLIP_CAPTION_GENERATION", "CaptionMetric", "CaptioningTask",
    "ClassificationTask", "DecoderAnswerMetric", "DecoderVQATask", "RetrievalMetric", "RetrievalTask", "VQAMetric", "VQADecoderTask", "VQATask", "categorical_kl",
    "bernoulli_kl", "model_hook",
]

BLIP_CAPTION_GENERATION: dict[str, Any] = {"num_beams": 3, "max_length": 20, "min_length": 5}
"""BLIP's caption decoding (``configs/caption_coco.yaml``): beam search of 3, at most 20 and at
least 5 tokens, the prompt included."""


def model_hook(model: Any, name: str) -> Any:
    """The optional evaluation method ``name`` of the model under ``model`` (a
    :class:`trimkit.TrimmedModel`'s ``model``, else ``model`` itself), or ``None``."""
    from trimkit import TrimmedModel

    base = model.model if isinstance(model, TrimmedModel) else model
    hook = getattr(base, name, None)
    return hook if callable(hook) else None


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
    """``vqa_score``: the mean soft score (``batch["labels"]``) of the predicted answer (METER's
    ``VQAScore``; the official accuracy for answers in the vocabulary); ``accuracy``: the fraction
    whose predicted answer is a most common annotator answer (the highest score, above 0).

    The prediction is the argmax of ``logits`` over the answer vocabulary, or, when the batch has
    ``batch["generated"]`` (free-form answers, strings), that answer normalised as the official
    evaluation does (:func:`trimkit_train.data.vqa_v2.normalize_answer`) and looked up in
    ``answers`` (the vocabulary, e.g. the dataset's; normalised the same way): an answer outside the
    vocabulary scores 0 (the soft scores cover only the vocabulary's answers).
    """

    def __init__(self, answers: Any = None) -> None:
        self.score, self.correct, self.n = 0.0, 0, 0
        self.answers = None if answers is None else [str(a) for a in answers]
        self._index: dict[str, int] | None = None

    def _label(self, answer: str) -> int | None:
        """The vocabulary index of a free-form answer (normalised), or ``None``."""
        from ..data.vqa_v2 import normalize_answer

        if self._index is None:
            if self.answers is None:
                raise ValueError("VQAMetric: scoring generated answers needs the answer vocabulary "
                                 "(task.metric(dataset) with a dataset that has `answers`, or VQAMetric(answers))")
            self._index = {}
            for i, a in enumerate(self.answers):
                self._index.setdefault(normalize_answer(a), i)
        return self._index.get(normalize_answer(str(answer)))

    def update(self, logits: torch.Tensor | None, batch: dict[str, Any]) -> None:
        generated = batch.get("generated")
        labels = batch["labels"]
        if isinstance(labels, dict):  # answer-decoder batches (task vqa_decoder): the soft scores are labels["scores"]
            labels = labels["scores"]
        if generated is not None:
            scores = labels.float()
            labels = [self._label(a) for a in generated]
            if len(labels) != scores.shape[0]:
                raise ValueError(f"VQAMetric: {len(labels)} generated answers for {scores.shape[0]} questions")
            index = torch.tensor([-1 if i is None else i for i in labels], device=scores.device)
            got = scores.gather(1, index.clamp_min(0)[:, None]).squeeze(1).masked_fill(index < 0, 0.0)
        else:
            scores = labels.to(logits.device).float()
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
        self.domains: list[Any] = []

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
        domains = batch.get("domain")
        self.domains.extend(list(domains) if domains is not None else [None] * len(hyps))

    def compute(self) -> dict[str, float]:
        if not self.hypotheses:
            return {"bleu4": float("nan"), "cider": float("nan")}
        out = caption_scores(self.references, self.hypotheses)
        # NoCaps-style subsets (batch["domain"]: in-domain, near-domain, out-domain): CIDEr of each
        for domain in sorted({d for d in self.domains if d is not None}, key=str):
            idx = [i for i, d in enumerate(self.domains) if d == domain]
            sub = caption_scores([self.references[i] for i in idx], [self.hypotheses[i] for i in idx])
            out[f"cider_{str(domain).replace('-', '_')}"] = sub["cider"]
        return out


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
    its entropy (so 0 at equality); metrics ``vqa_score`` and ``accuracy`` (:class:`VQAMetric`).

    Evaluation: a classifier's logits (METER, BLIP's ``vqa_classifier``); a model with a
    ``task_evaluator`` (BLIP's answer decoder) answers by its own protocol, chosen by
    ``inference``: ``"rank"`` (BLIP's: the ``k_test`` answers of the vocabulary most probable as a
    first token, then the best full log-likelihood among them; ``rank_label_smoothing`` scores with
    the training loss's label smoothing as BLIP's released code does, 0.1) or ``"generate"`` (a
    free-form answer, ``generation``: keyword arguments of the decoder's ``generate`` over BLIP's
    beam search of 3, at most 10 tokens; scored by :class:`VQAMetric` after normalisation).
    """

    main_metric = "vqa_score"

    def __init__(self, name: str = "vqa", inference: str = "rank", k_test: int = 128,
                 rank_label_smoothing: float = 0.0, generation: dict[str, Any] | None = None) -> None:
        if inference not in ("rank", "generate"):
            raise ValueError(f"VQATask: inference must be 'rank' or 'generate', got {inference!r}")
        if int(k_test) < 1:
            raise ValueError(f"VQATask: k_test must be >= 1, got {k_test!r}")
        self.name, self.inference, self.k_test = name, inference, int(k_test)
        self.rank_label_smoothing = float(rank_label_smoothing)
        self.generation = dict(generation or {})

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)) * labels.shape[-1]

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bernoulli_kl(logits, full_logits).sum(-1).mean()

    def metric(self, dataset: Any = None) -> VQAMetric:
        """A :class:`VQAMetric`; ``dataset`` (optional) gives the answer vocabulary (``answers``)."""
        return VQAMetric(getattr(dataset, "answers", None))

    def evaluator(self, model: Any, dataset: Any) -> Any:
        """The model's per-batch VQA protocol (its ``task_evaluator``), or ``None``: its forward."""
        hook = model_hook(model, "task_evaluator")
        return hook(self, model, dataset) if hook is not None else None

    def __repr__(self) -> str:
        return f"VQATask({self.name!r}, inference={self.inference!r}, k_test={self.k_test})"


class VQADecoderTask(VQATask):
    """VQA trained with an answer decoder, as BLIP's ``train_vqa``: the decoder's LM loss over each
    question's ground-truth answers, each weighted by its soft score, summed and averaged over the
    questions (``loss = sum_b sum_k w_bk * NLL(answer_bk) / #questions``; BLIP divides by the batch,
    here only questions with at least one answer count). ``NLL`` sums the answer's token
    cross-entropies ([SEP] included, BOS and padding not), with ``label_smoothing`` (BLIP's decoder
    loss: 0.1, the default; 0: ``-sum_k w_k log p(answer_k)``).

    ``logits``: the model's ``(B * K, T - 1, V)`` next-token logits of the answer rows
    (:class:`trimkit_blip.BlipVQADecoderForTrimming`); ``labels``: the dict of
    :func:`trimkit_train.data.vqa_v2.decoder_collate` (``answer_ids``, ``answer_attention_mask``
    ``(B * K, T)``, ``weights`` ``(B, K)``, ``scores``). Distillation: the KL(trimmed || full) of the
    two decoders' token distributions, averaged over the real tokens of the answers that weigh
    (0 when the two are equal). Evaluation is :class:`VQATask`'s (``inference``: BLIP's ranking of
    the answer list, or generation; ``vqa_score``); no metric on training steps (the logits are
    token logits, not answer scores).

    Registered as ``vqa_decoder`` (ranking) and ``vqa_decoder_generate``; the VQA v2 reader names it
    with ``answer_decoder: true``. Another ``label_smoothing`` is a task of your own:
    ``VQADecoderTask("my_task", label_smoothing=0.0)`` registered by a plugin.
    """

    metric_on_train_steps = False

    def __init__(self, name: str = "vqa_decoder", label_smoothing: float = 0.1, **options: Any) -> None:
        super().__init__(name, **options)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"VQADecoderTask: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def _targets(self, logits: torch.Tensor, labels: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(targets, token mask, weights)`` on the logits' device, checked against the logits."""
        if not isinstance(labels, dict) or not {"answer_ids", "answer_attention_mask", "weights"} <= set(labels):
            raise ValueError(f"{self.name}: labels must be the answer-decoder targets (a dict with answer_ids, "
                             "answer_attention_mask and weights: the vqa_v2 reader with answer_decoder: true), got "
                             f"{type(labels).__name__}")
        ids = labels["answer_ids"].to(logits.device)
        mask = labels["answer_attention_mask"].to(logits.device)
        weights = labels["weights"].to(logits.device, torch.float32)
        rows, t = ids.shape
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (rows, t - 1) or weights.numel() != rows:
            raise ValueError(f"{self.name}: expected the answer decoder's next-token logits ({rows}, {t - 1}, V) for "
                             f"answer_ids {tuple(ids.shape)} and weights {tuple(weights.shape)}, got "
                             f"{tuple(logits.shape)} (a model with an answer decoder: BLIP, build task vqa_decoder)")
        return ids[:, 1:], mask[:, 1:].bool(), weights

    def loss(self, logits: torch.Tensor, labels: Any) -> torch.Tensor:
        targets, mask, weights = self._targets(logits, labels)
        token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none",
                                label_smoothing=self.label_smoothing).view(targets.shape)
        nll = (token * mask).sum(-1).view(weights.shape)  # (B, K)
        answered = int((weights > 0).any(-1).sum())
        if not answered:
            return logits.sum() * 0.0
        return (weights * nll).sum() / answered

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: Any) -> torch.Tensor:
        _, mask, weights = self._targets(logits, labels)
        keep = mask & (weights.reshape(-1, 1) > 0)
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return categorical_kl(logits[keep], full_logits[keep]).mean()

    def __repr__(self) -> str:
        return (f"VQADecoderTask({self.name!r}, label_smoothing={self.label_smoothing}, inference={self.inference!r}, "
                f"k_test={self.k_test})")


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

    main_metric = "cider"
    metric_on_train_steps = False  # BLEU/CIDEr of teacher-forced argmax tokens per step: slow, and no signal

    def __init__(self, label_smoothing: float = 0.0, generation: dict[str, Any] | None = BLIP_CAPTION_GENERATION,
                 name: str = "captioning") -> None:
        self.label_smoothing = float(label_smoothing)
        self.generation = None if generation is None else dict(generation)
        self.name = name

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

    def evaluator(self, model: Any, dataset: Any) -> Any:
        """Generated captions (the model's ``task_evaluator``, e.g. BLIP's decoder reading the kept
        image tokens, decoding with ``generation``), or ``None`` (``generation=None``, or a model
        that does not generate): the teacher-forced proxy of :class:`CaptionMetric`."""
        if self.generation is None:
            return None
        hook = model_hook(model, "task_evaluator")
        return hook(self, model, dataset) if hook is not None else None

    def __repr__(self) -> str:
        return (f"CaptioningTask(label_smoothing={self.label_smoothing}, generation={self.generation}, "
                f"name={self.name!r})")


class DecoderAnswerMetric:
    """``accuracy``: the fraction of instances whose every scored next-token target (``labels`` not
    -100) is the argmax of the logits there: with teacher forcing over the answer, exactly the
    instances greedy decoding answers right (a one-token answer: the greedy next token after the
    question). ``token_accuracy``: the same per scored token.

    ``logits`` ``(B, N, V)`` aligned with ``labels`` ``(B, N)`` (next-token targets, see
    :class:`DecoderVQATask`), or ``(B, V)``: each instance's next-token logits at its last real
    token (what :meth:`DecoderVQATask.evaluator` gives for trimmed layouts whose rows are the kept
    tokens only), scored against the target there."""

    def __init__(self) -> None:
        self.correct, self.n, self.tokens_correct, self.tokens = 0, 0, 0, 0

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        labels = batch["labels"].to(logits.device)
        scored = labels != IGNORE_INDEX
        if logits.dim() == 2:
            target = _last_real_target(labels, batch.get("attention_mask"), "DecoderAnswerMetric")
            hit = logits.argmax(-1) == target
            self.correct += int(hit.sum())
            self.tokens_correct += int(hit.sum())
            self.tokens += int(hit.numel())
            self.n += int(hit.numel())
            return
        _check_aligned(logits, labels, "DecoderAnswerMetric")
        hit = (logits.argmax(-1) == labels) | ~scored
        self.correct += int(hit.all(-1)[scored.any(-1)].sum())
        self.n += int(scored.any(-1).sum())
        self.tokens_correct += int((hit & scored).sum())
        self.tokens += int(scored.sum())

    def compute(self) -> dict[str, float]:
        nan = float("nan")
        return {"accuracy": self.correct / self.n if self.n else nan,
                "token_accuracy": self.tokens_correct / self.tokens if self.tokens else nan}


def _check_aligned(logits: torch.Tensor, labels: Any, who: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or logits.dim() != 3 \
            or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"{who}: expected next-token logits (B, N, V) for next-token targets (B, N) (labels[b, t] is what "
                         f"the logits at position t predict, -100 not scored), got logits {tuple(logits.shape)} and "
                         f"labels {None if not isinstance(labels, torch.Tensor) else tuple(labels.shape)}")


def _last_real_target(labels: torch.Tensor, attention_mask: Any, who: str) -> torch.Tensor:
    """Each row's target at its last real position; every scored target must be there."""
    n = labels.shape[1]
    real = attention_mask.to(labels.device).bool() if isinstance(attention_mask, torch.Tensor) \
        else torch.ones_like(labels, dtype=torch.bool)
    last = torch.where(real, torch.arange(n, device=labels.device).expand_as(labels), -1).amax(-1)
    scored = labels != IGNORE_INDEX
    at_last = torch.zeros_like(scored).scatter_(1, last.clamp_min(0)[:, None], True)
    if bool((scored & ~at_last).any()) or not bool(scored.gather(1, last.clamp_min(0)[:, None]).all()):
        raise ValueError(f"{who}: the model returned one row per kept token (a trimmed layout: mode remove or packed), "
                         "which is scored at each instance's last real token only, but the targets are elsewhere too "
                         "(a multi-token answer): evaluate it masked (tmodel.inference = 'remove' with batches > 1, or "
                         "'hard')")
    return labels.gather(1, last[:, None]).squeeze(1)


class DecoderVQATask:
    """VQA with a decoder LM (LLaVA-style): the language-modelling loss on the answer token(s) only.

    ``labels`` ``(B, N)`` long are **next-token targets** aligned with the model's per-position logits
    ``(B, N, V)``: ``labels[b, t]`` is the token the logits at position ``t`` should predict, -100
    (:data:`IGNORE_INDEX`) where nothing is scored: the prompt, image and question positions. (Not
    Hugging Face's convention, where labels repeat ``input_ids`` and are shifted by the loss: here
    the answer need not be in the input: ``digit_grid_decoder`` puts its one-token answer as the
    target of the question's last token, so the question's summary, its last token, never reads
    the answer; see that module.) Loss: the mean cross-entropy over the scored positions
    (``label_smoothing``, default 0). Distillation: the mean over the same positions of
    ``KL(softmax(trimmed) || softmax(full))`` of the two next-token distributions (0 when they are
    equal). Metric: :class:`DecoderAnswerMetric` (``accuracy``: every answer token the argmax,
    i.e. the greedy answer; ``token_accuracy``).

    Evaluation (:meth:`evaluator`): a trimmed model's eval forward at batch 1 (mode ``remove``) or
    packed returns rows for the kept tokens only; those outputs are reduced to each instance's last
    kept row, its last real token (always kept: the question's summary), and scored there.
    """

    main_metric = "accuracy"

    def __init__(self, name: str = "decoder_vqa", label_smoothing: float = 0.0) -> None:
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"DecoderVQATask: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.name, self.label_smoothing = name, float(label_smoothing)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_aligned(logits, labels, self.name)
        labels = labels.to(logits.device)
        scored = labels != IGNORE_INDEX
        if not bool(scored.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[scored].float(), labels[scored], label_smoothing=self.label_smoothing)

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_aligned(logits, labels, self.name)
        _check_aligned(full_logits, labels, self.name)
        scored = labels.to(logits.device) != IGNORE_INDEX
        if not bool(scored.any()):
            return logits.sum() * 0.0
        return categorical_kl(logits[scored], full_logits[scored]).mean()

    def metric(self, dataset: Any = None) -> DecoderAnswerMetric:
        return DecoderAnswerMetric()

    def evaluator(self, model: Any, dataset: Any) -> Any:
        """Per batch: the model's forward, as it is when its rows are the positions (masked modes),
        else (a :class:`trimkit.TrimmedModel` whose rows are its kept tokens: remove, packed) each
        instance's next-token logits at its last kept row ``(B, V)``."""
        from trimkit import TrimmedModel

        from ..trainer import _logits, model_inputs

        def step(batch: dict[str, Any]) -> torch.Tensor:
            logits = _logits(model(**model_inputs(model, batch)))
            if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(batch["input_ids"].shape):
                return logits
            kept = None
            if isinstance(model, TrimmedModel):
                streams = [s.name for s in model.spec.streams]
                kept = model.kept_mask(streams[0]) if len(streams) == 1 else None
            if kept is None or logits.dim() != 3 or tuple(kept.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"{self.name}: the model returned {tuple(logits.shape)} for input_ids "
                                 f"{tuple(batch['input_ids'].shape)} and its kept tokens are not known")
            n = kept.shape[1]
            last = torch.where(kept, torch.arange(n, device=kept.device), -1).amax(-1)
            return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]

        return step

    def __repr__(self) -> str:
        return f"DecoderVQATask({self.name!r}, label_smoothing={self.label_smoothing})"


class RetrievalTask:
    """Image-text matching: cross-entropy over ``(B, 2)`` ITM logits (or BCE for one logit per pair)
    against 1 (match) / 0; distillation: the KL of the two-class softmaxes (Bernoulli KL for one
    logit); metrics ``itm_accuracy`` and, on every-pair evaluation batches, recall@1/5/10 in both
    directions (:class:`RetrievalMetric`)."""

    name = "retrieval"
    main_metric = "r_mean"
    metric_on_train_steps = False  # recall@K over one training batch's pairs means nothing

    def __init__(self, k_test: int | None = 128, add_itc: bool = True) -> None:
        if k_test is not None and int(k_test) < 1:
            raise ValueError(f"RetrievalTask: k_test must be >= 1 or None, got {k_test!r}")
        self.k_test = None if k_test is None else int(k_test)
        self.add_itc = bool(add_itc)

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

    def evaluate_dataset(self, model: Any, dataset: Any, **options: Any) -> dict[str, Any] | None:
        """The model's own retrieval protocol over the whole split (its ``evaluate_task``: BLIP ranks
        every pair by ITC similarity and reranks the top ``k_test`` texts / images with ITM, adding
        the ITC score when ``add_itc``), or ``None``: every pair through the forward and
        :class:`RetrievalMetric` (METER's protocol)."""
        hook = model_hook(model, "evaluate_task")
        return hook(self, model, dataset, **options) if hook is not None else None

    def __repr__(self) -> str:
        return f"RetrievalTask(k_test={self.k_test}, add_itc={self.add_itc})"
