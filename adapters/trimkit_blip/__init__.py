"""trimkit adapter ``blip``: transformers' BLIP (v1) for VQA, image-text matching, captioning and NLVR2.

Wrap the model first (transformers' own forwards cannot be traced by torch.fx)::

    import trimkit
    from trimkit_blip import wrap
    model = wrap(BlipForQuestionAnswering.from_pretrained(...))   # or BlipForImageTextRetrieval
    tmodel = trimkit.trim(model, trimkit.TrimConfig(token_target={"vision": 0.5, "text": 0.8}))

Streams: ``vision`` (ViT layers; their cross-modal signal is the mean of the question's word
embeddings, :class:`~trimkit_blip.modeling.QuestionSummary`), ``text`` (question encoder layers,
which cross-attend to the image tokens) and, for VQA, ``answer`` (the answer decoder, declared only
so that it sees exactly the question tokens kept; its layers are ``trimmable=False``).

Supported: ``BlipForQuestionAnswering`` as answer ranking (:class:`BlipVQAForTrimming`: the
scores of K candidate answers per question; K = 1 gives the training log-likelihood) and
``BlipForImageTextRetrieval`` with its ITM head (:class:`BlipITMForTrimming`), and
``BlipForConditionalGeneration`` (captioning, :class:`BlipCaptionForTrimming`: teacher-forced
logits). Captions and free-form VQA answers are generated with :func:`generate`: the trimmed
encoder runs once, the decoder generates from the kept tokens only.

Evaluation as BLIP's released code does it (:mod:`trimkit_blip.evaluation`; ``trimkit eval`` and
the trainer's evaluation use it through the wrappers' ``task_evaluator`` / ``evaluate_task``
hooks): VQA by ranking the answer list (:func:`rank_answers`: top-k by first-token probability,
then full log-likelihood) or by generation (:func:`generate_answers`), captions generated with
BLIP's beam search (:func:`generate_captions`), retrieval by ITC similarity of every pair and ITM
reranking of the top k (:func:`evaluate_blip_retrieval`; the ITM wrapper's ``image_embeddings`` /
``text_embeddings``).

VQA *training* with the answer decoder (``build(task="vqa_decoder")``, ``from_pretrained(...,
task="vqa_decoder")``; the adapter picks it for a VQA v2 dataset read with ``answer_decoder: true``):
:class:`BlipVQADecoderForTrimming`, the same model and weights as :class:`BlipVQAForTrimming`,
whose forward returns the next-token logits of every ground-truth answer row (``(B * K, T - 1,
V)``, the K answers of a question decoded in one row), for ``trimkit_train``'s ``vqa_decoder`` task
(BLIP's answer LM loss weighted by the answers' soft scores); evaluated by ranking or generation.

VQA as classification (``build(task="vqa_classifier", num_labels=N)``,
:class:`BlipVQAClassifierForTrimming`): the VQA model's encoders with a linear head on the question
[CLS], for datasets with a fixed answer list such as digit-grid (the trainer's ``(B, num_labels)``
contract); the adapter's ``dataset_overrides`` picks it for ``vqa`` datasets. It stands in for the
answer decoder, which is how the paper (and :class:`BlipVQAForTrimming`) answers.

NLVR2 (``build(task="nlvr2")``): transformers has no BLIP NLVR2 model, so the adapter builds
Salesforce BLIP's, :class:`BlipNLVRForTrimming` (``forward(pixel_values, pixel_values_2, input_ids,
attention_mask) -> (B, 2)``), from transformers' BLIP blocks: the two images go through the ViT one
after the other and into one text encoder whose layers cross-attend to each image with their own
attention (paper, Appendix B). Each image is trimmed by its own decisions (same trimmers), and
each cross-attention sees only its image's kept tokens in every mode (masked, removed, packed).
:meth:`BlipNLVRForTrimming.from_blip` starts it from a pretrained BLIP image-text model.

Pretrained, offline and already wrapped: ``trimkit.adapter.load_pretrained("blip",
"Salesforce/blip-vqa-base")`` (a local directory, or a model id in the local HF cache; ``task=
"nlvr2"`` / ``"vqa_classifier"`` start those models from a checkpoint; see
:meth:`BlipAdapter.from_pretrained`).

Not supported: the retrieval model's contrastive (``use_itm_head=False``) path as a trimmed forward
(it is available untrimmed, for retrieval's first stage: ``BlipITMForTrimming.itc_similarity``). With masks (modes
``hard`` and ``sample``) a VQA batch of B > 1 questions must use K = 1: the core applies a
question's token mask to B rows, not to its K decoder rows. Ranking K > 1 candidates works at
batch 1 (mode ``remove``) and with the trimmers off. (:class:`BlipVQADecoderForTrimming` has no such
limit: its K answers share one decoder row.)
"""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .adapter import TINY, BlipAdapter, wrap

__all__ = ["BlipAdapter", "BlipCaptionForTrimming", "BlipITMForTrimming", "BlipNLVRForTrimming",
           "BlipVQAClassifierForTrimming", "BlipVQADecoderForTrimming", "BlipVQAForTrimming",
           "QuestionSummary", "TINY", "answer_candidates", "describe_blip", "encoder_states", "evaluate_blip_retrieval",
           "generate", "generate_answers", "generate_captions", "rank_answers", "wrap"]

_LAZY = {"BlipVQADecoderForTrimming": "modeling", "BlipITMForTrimming": "modeling", "BlipVQAForTrimming": "modeling", "BlipVQAClassifierForTrimming": "modeling", "BlipCaptionForTrimming": "modeling",
         "BlipNLVRForTrimming": "modeling", "QuestionSummary": "modeling", "describe_blip": "spec",
         "generate": "generation", "encoder_states": "generation", "answer_candidates": "evaluation",
         "evaluate_blip_retrieval": "evaluation", "generate_answers": "evaluation", "generate_captions": "evaluation",
         "rank_answers": "evaluation"}


def __getattr__(name: str):  # transformers' BLIP is imported on first use, not with the plugin
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("blip", BlipAdapter())
