"""The built-in tasks (a trimkit plugin: entry point ``tasks`` of the ``trimkit`` group).

Registers, through the ``trimkit_register_tasks`` hook, :class:`trimkit.protocols.Task` objects
under the names datasets give in their ``task`` attribute:

* ``classification``: cross-entropy, accuracy (the default; digit-grid and any dataset without a
  ``task`` attribute);
* ``nlvr2``, ``snli_ve``: the same, under their names;
* ``vqa``: METER's soft-score BCE, ``vqa_score`` (and accuracy); a model with an answer decoder
  (BLIP) is evaluated by ranking the answer vocabulary (top 128 by first-token probability, then the
  full log-likelihood); ``vqa_generate``: the same task, evaluated on generated free-form answers;
* ``vqa_decoder``: VQA trained with an answer decoder as BLIP (the LM loss of each ground-truth
  answer weighted by its soft score, label smoothing 0.1; token KL), evaluated as ``vqa`` (ranking;
  ``vqa_decoder_generate``: generation);
* ``captioning``: token cross-entropy, BLEU-4 and CIDEr, on captions the model generates (BLIP's
  beam search of 3, 5 to 20 tokens) where it can, else on the teacher-forced argmax;
  ``captioning_greedy``: greedy decoding;
* ``decoder_vqa``: VQA with a decoder LM (LLaVA-style): the LM cross-entropy of the answer
  token(s) only (``labels``: next-token targets, -100 on the prompt, image and question), token KL
  for self-distillation, ``accuracy`` of the greedy answer (``digit_grid_decoder`` names it);
* ``retrieval``: ITM cross-entropy, recall@1/5/10 both ways (:func:`evaluate_retrieval` ranks every
  pair or reranks the top-k of a coarse score; BLIP: ITC for every pair, ITM for the top 128).

How a model takes part in these evaluation protocols: :mod:`trimkit_train.tasks.core`.

Importing this package needs only torch (BLEU / CIDEr import pycocoevalcap when computed).
"""

from __future__ import annotations

from typing import Any

from trimkit.plugins import hookimpl

from .caption_metrics import caption_scores, tokenize_caption
from .core import (BLIP_CAPTION_GENERATION, AccuracyMetric, CaptionMetric, CaptioningTask, ClassificationTask,
                   DecoderAnswerMetric, DecoderVQATask,
                   RetrievalMetric, RetrievalTask, VQADecoderTask, VQAMetric, VQATask, bernoulli_kl, categorical_kl, model_hook)
from .retrieval import evaluate_retrieval, itm_score, retrieval_recalls

__all__ = [
    "AccuracyMetric", "BLIP_CAPTION_GENERATION", "CaptionMetric", "CaptioningTask", "ClassificationTask",
    "DecoderAnswerMetric", "DecoderVQATask",
    "DEFAULT_TASK", "RetrievalMetric", "RetrievalTask", "VQADecoderTask", "VQAMetric", "VQATask", "bernoulli_kl", "builtin_tasks",
    "caption_scores", "categorical_kl", "evaluate_retrieval", "get_task", "itm_score", "model_hook",
    "retrieval_recalls", "tokenize_caption",
]

DEFAULT_TASK = "classification"
"""The task of a dataset without a ``task`` attribute."""


def builtin_tasks() -> dict[str, Any]:
    """Fresh instances of the built-in tasks, by registered name."""
    greedy = {**BLIP_CAPTION_GENERATION, "num_beams": 1}
    return {"classification": ClassificationTask("classification"), "nlvr2": ClassificationTask("nlvr2"),
            "snli_ve": ClassificationTask("snli_ve"), "vqa": VQATask(),
            "vqa_generate": VQATask("vqa_generate", inference="generate"), "vqa_decoder": VQADecoderTask(),
            "vqa_decoder_generate": VQADecoderTask("vqa_decoder_generate", inference="generate"),
            "captioning": CaptioningTask(),
            "captioning_greedy": CaptioningTask(generation=greedy, name="captioning_greedy"),
            "retrieval": RetrievalTask(), "decoder_vqa": DecoderVQATask()}


@hookimpl
def trimkit_register_tasks(registry) -> None:
    for name, task in builtin_tasks().items():
        registry.tasks.register(name, task)


def get_task(name_or_dataset: Any = None) -> Any:
    """The registered task named ``name_or_dataset`` (a string), or the one a dataset names in its
    ``task`` attribute (:data:`DEFAULT_TASK` when it has none, or for ``None``)."""
    from trimkit.plugins import get_registry

    name = name_or_dataset if isinstance(name_or_dataset, str) else \
        getattr(name_or_dataset, "task", None) or DEFAULT_TASK
    return get_registry().tasks.get(name)
