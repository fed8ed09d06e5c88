"""The ``blip`` adapter object. Import-cheap: transformers' BLIP is imported only when a model is
described or built (the plugin is loaded with every trimkit registry)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["BlipAdapter", "TINY", "wrap"]

"""Selectors for ``TrimConfig.token_layers`` / ``head_layers``: never trim the VQA answer decoder."""

TINY = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
    text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     encoder_hidden_size=32, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                     sep_token_id=3),
)
"""``build("tiny")``: 2 vision + 2 text (+ 2 decoder) layers of width 32, 32px images (17 image tokens)."""

_ARCHITECTURES = {"BlipForQuestionAnswering": "vqa", "BlipForImageTextRetrieval": "itm",
                  "BlipForConditionalGeneration": "caption"}
"""The ``from_pretrained`` task of a checkpoint saved as each transformers class (config ``architectures``)."""


def wrap(model: nn.Module, interpolate_pos_encoding: bool = False) -> nn.Module:
    """The traceable wrapper of a transformers BLIP model (weights shared, not copied);
    ``interpolate_pos_encoding`` runs it at an image size other than its config's."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

    from .modeling import (_BlipEncoders, BlipCaptionForTrimming, BlipITMForTrimming, BlipNLVRForTrimming,
                           BlipVQAForTrimming)

    if isinstance(model, (_BlipEncoders, BlipCaptionForTrimming, BlipNLVRForTrimming)):
        return model
    if isinstance(model, BlipForQuestionAnswering):
        return BlipVQAForTrimming(model, interpolate_pos_encoding)
    if isinstance(model, BlipForImageTextRetrieval):
        return BlipITMForTrimming(model, interpolate_pos_encoding)
    if isinstance(model, BlipForConditionalGeneration):
        return BlipCaptionForTrimming(model, interpolate_pos_encoding)
    raise TypeError(f"trimkit_blip.wrap: no BLIP wrapper for {type(model).__name__} (supported: "
                    "BlipForQuestionAnswering, BlipForImageTextRetrieval, BlipForConditionalGeneration)")


class BlipAdapter:
    """Describes the BLIP wrappers; builds ``tiny`` and ``base`` (BLIP base; paper: 288px) models."""

    def root(self, model: nn.Module) -> nn.Module:
        """The traceable root of ``model``: :func:`wrap` with its defaults (the model itself when it is a
        wrapper already), so ``trimkit.trim`` takes the transformers model directly."""
        return wrap(model)

    def matches(self, model: nn.Module) -> bool:
        if "transformers.models.blip" not in sys.modules:  # no BLIP model can exist yet: stay cheap
            return False
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

        from .modeling import _BlipEncoders, BlipCaptionForTrimming, BlipNLVRForTrimming

        return isinstance(model, (_BlipEncoders, BlipCaptionForTrimming, BlipNLVRForTrimming,
                                  BlipForQuestionAnswering, BlipForImageTextRetrieval, BlipForConditionalGeneration))

    def describe(self, model: nn.Module):
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

        from .spec import describe_blip

        if isinstance(model, (BlipForQuestionAnswering, BlipForImageTextRetrieval, BlipForConditionalGeneration)):
            raise TypeError(f"trimkit_blip: a {type(model).__name__} cannot be traced as it is; trim "
                            "trimkit_blip.wrap(model) (same weights) instead")
        return describe_blip(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0, num_answers: int = 1,
                       text_len: int = 8, answer_len: int = 4) -> dict[str, Any]:
        """Random inputs; rows after the first are padded. VQA adds ``num_answers`` candidate answers
        per question (``(batch_size * num_answers, answer_len)``, BOS first); captioning gives
        BOS-first caption ids; NLVR2 adds the second image ``pixel_values_2``."""
        from .modeling import BlipCaptionForTrimming, BlipNLVRForTrimming, BlipVQAForTrimming

        gen = torch.Generator().manual_seed(seed)
        text = model.config.text_config
        size = model.config.vision_config.image_size
        low = max(text.pad_token_id, text.sep_token_id) + 1

        def ids(rows: int, length: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randint(low, text.vocab_size, (rows, length), generator=gen)
            x[:, 0] = first
            mask = torch.ones_like(x)
            for r in range(1, rows):
                mask[r, int(torch.randint(2, length + 1, (1,), generator=gen)):] = 0
            return x.masked_fill(mask == 0, text.pad_token_id), mask

        caption = isinstance(model, BlipCaptionForTrimming)
        input_ids, attention_mask = ids(batch_size, text_len, text.bos_token_id if caption else low)
        inputs = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=gen),
                  "input_ids": input_ids, "attention_mask": attention_mask}
        if isinstance(model, BlipNLVRForTrimming):
            inputs["pixel_values_2"] = torch.randn(batch_size, 3, size, size, generator=gen)
        if isinstance(model, BlipVQAForTrimming):
            inputs["answer_ids"], inputs["answer_attention_mask"] = ids(batch_size * num_answers, answer_len,
                                                                        text.bos_token_id)
        return inputs

    def build(self, size: str = "tiny", seed: int = 0, task: str = "vqa", image_size: int | None = None,
              **options: Any) -> nn.Module:
        """A randomly initialised wrapped model: ``task`` ``"vqa"``, ``"itm"``, ``"caption"``, ``"nlvr2"``
        (:class:`~trimkit_blip.modeling.BlipNLVRForTrimming`; option ``merge_from``), ``"vqa_decoder"``
        (:class:`~trimkit_blip.modeling.BlipVQADecoderForTrimming`: the VQA model whose forward gives
        the answer decoder's token logits, for training) or
        ``"vqa_classifier"`` (:class:`~trimkit_blip.modeling.BlipVQAClassifierForTrimming`, the VQA
        encoders with a linear answer head; option ``num_labels``, default 2); ``size`` ``"tiny"`` or
        ``"base"`` (transformers' default ``BlipConfig``: BLIP base, 384px); ``image_size``
        overrides. Other options are ``BlipConfig`` arguments; ``vision_config`` / ``text_config``
        dicts are merged into the preset's (``text_config={"hidden_size": 64}`` keeps the rest; a
        vision ``hidden_size`` is also the text's ``encoder_hidden_size`` unless that is given)."""
        from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                                  BlipForQuestionAnswering)

        from .modeling import BlipNLVRForTrimming, BlipVQAClassifierForTrimming, BlipVQADecoderForTrimming

        if size not in ("tiny", "base"):
            raise ValueError(f"trimkit_blip.build: size must be 'tiny' or 'base', got {size!r}")
        classes = {"vqa": BlipForQuestionAnswering, "itm": BlipForImageTextRetrieval,
                   "caption": BlipForConditionalGeneration, "nlvr2": BlipNLVRForTrimming,
                   "vqa_classifier": BlipVQAClassifierForTrimming, "vqa_decoder": BlipForQuestionAnswering}
        if task not in classes:
            raise ValueError(f"trimkit_blip.build: task must be one of {sorted(classes)}, got {task!r}")
        kwargs = {k: dict(v) for k, v in TINY.items()} if size == "tiny" else {"vision_config": {}, "text_config": {}}
        given = {part: dict(options.pop(part, None) or {}) for part in ("vision_config", "text_config")}
        if "hidden_size" in given["vision_config"]:  # the text layers' cross-attention reads the image tokens
            given["text_config"].setdefault("encoder_hidden_size", given["vision_config"]["hidden_size"])
        for part, values in given.items():
            kwargs[part].update(values)
        if image_size is not None:
            kwargs["vision_config"]["image_size"] = image_size
        # transformers' BlipVisionConfig initialises with std 1e-10 (fine for checkpoints, degenerate for
        # random models: every image token would be the same); random models here use BERT's 0.02
        kwargs["vision_config"].setdefault("initializer_range", 0.02)
        torch.manual_seed(seed)
        if task == "nlvr2":
            merge_from = options.pop("merge_from", None)
            return BlipNLVRForTrimming(BlipConfig(**kwargs, **options), merge_from=merge_from).eval()
        if task == "vqa_classifier":
            num_labels = options.pop("num_labels", 2)
            return BlipVQAClassifierForTrimming(BlipConfig(**kwargs, **options), num_labels).eval()
        if task == "vqa_decoder":
            return BlipVQADecoderForTrimming(BlipForQuestionAnswering(BlipConfig(**kwargs, **options)).eval()).eval()
        return wrap(classes[task](BlipConfig(**kwargs, **options)).eval())

    def dataset_overrides(self, facts) -> dict[str, Any]:
        """Build options that fit a dataset (:class:`trimkit.adapter.DatasetFacts`). A ``"vqa"``
        dataset with answer classes (digit-grid) gets ``task="vqa_classifier"`` (BLIP's encoders and
        a linear head over its answers, the trainer-compatible stand-in for the answer decoder)
        with ``num_labels``; ``"nlvr2"`` gets ``task="nlvr2"`` (two classes); ``"captioning"``
        (Karpathy / NoCaps captioning) ``task="caption"``; ``"itm"`` / ``"retrieval"`` (Karpathy
        retrieval) ``task="itm"`` (BLIP's two-class ITM head). Image size, patch size
        (digit-grid: one patch per cell), the tokenizer's vocabulary and special ids (pad; its
        first token, [CLS], as BLIP's BOS; [SEP]) and enough text positions for the longest text
        go into ``vision_config`` / ``text_config``."""
        out: dict[str, Any] = {}
        vision: dict[str, Any] = {}
        text: dict[str, Any] = {}
        if facts.variant == "nlvr2":
            if facts.num_labels not in (None, 2):
                raise ValueError(f"trimkit_blip: BLIP's NLVR2 head has 2 classes, the dataset {facts.num_labels}")
            out["task"] = "nlvr2"
        elif facts.variant == "captioning":
            out["task"] = "caption"
        elif facts.variant == "vqa_decoder":  # VQA v2 with answer-decoder targets (answer_decoder: true)
            out["task"] = "vqa_decoder"
        elif facts.variant in ("itm", "retrieval"):
            if facts.num_labels not in (None, 2):
                raise ValueError(f"trimkit_blip: BLIP's ITM head has 2 classes, the dataset {facts.num_labels}")
            out["task"] = "itm"
        elif facts.variant == "vqa" or facts.num_labels is not None:
            out["task"] = "vqa_classifier"
            if facts.num_labels is not None:
                out["num_labels"] = facts.num_labels
        if facts.image_size is not None:
            out["image_size"] = facts.image_size
        if facts.patch_size is not None:
            vision["patch_size"] = facts.patch_size
        tok = facts.tokenizer
        if tok is not None:
            text.update(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                        sep_token_id=tok.sep_token_id)
        if facts.longest_text is not None:
            text["max_position_embeddings"] = max(32, facts.longest_text + 2)
        if vision:
            out["vision_config"] = vision
        if text:
            out["text_config"] = text
        return out

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        task: str | None = None, image_size: int | None = None,
                        interpolate_pos_encoding: bool = False, num_labels: int | None = None,
                        merge_from: int | None = None, new_head: bool = False, seed: int | None = None,
                        **options: Any) -> nn.Module:
        """A pretrained wrapped BLIP (what :meth:`build` returns for ``task``), read offline:
        ``source`` is a directory written by ``save_pretrained`` or a Hugging Face model id in the
        local HF cache (at ``revision``), e.g. ``Salesforce/blip-vqa-base``.

        ``task``: ``"vqa"`` (``BlipForQuestionAnswering``), ``"itm"`` (``BlipForImageTextRetrieval``),
        ``"caption"`` (``BlipForConditionalGeneration``), by default the one the checkpoint was saved
        as (config ``architectures``); ``"vqa_decoder"`` (a VQA checkpoint as
        :class:`~trimkit_blip.modeling.BlipVQADecoderForTrimming`, for answer-decoder training);
        ``"vqa_classifier"`` (the encoders of a VQA or ITM
        checkpoint and a new random ``classifier`` of ``num_labels``, default 2) and ``"nlvr2"``
        (:meth:`BlipNLVRForTrimming.from_blip` of an ITM checkpoint, option ``merge_from``) are
        built from the checkpoint as Salesforce's fine-tuning starts. ``image_size``: the
        resolution to run at; the position table is resized to it once (bicubic, [CLS] row kept)
        and the config says so, as BLIP's fine-tuning at 288px from 384px does.
        ``interpolate_pos_encoding`` is :func:`wrap`'s (interpolate at every call instead).
        ``new_head=True`` lets the ITM head start random where the checkpoint lacks it; ``seed``
        seeds random parts. Other ``options`` set ``BlipConfig`` fields before the weights load
        (``vision_config`` / ``text_config`` dicts set fields of those); fields that change weight
        shapes are refused. ``weights`` is not used (the source holds them).
        """
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

        from trimkit.adapter import PretrainedLoadError, load_transformers_pretrained, transformers_source

        from .modeling import BlipNLVRForTrimming, BlipVQAClassifierForTrimming, BlipVQADecoderForTrimming

        where = f"trimkit_blip.from_pretrained({source!r})"
        if weights is not None:
            raise TypeError(f"{where}: weights={weights!r} is not used: a BLIP checkpoint is a directory or Hugging "
                            "Face model id (source) holding its weights")
        src = transformers_source(source, revision, adapter="blip", model_types=("blip",))
        if task is None:
            task = next((_ARCHITECTURES[a] for a in src.architectures if a in _ARCHITECTURES), None)
            if task is None:
                raise PretrainedLoadError(
                    f"{where}: {src} was saved as {', '.join(src.architectures) or 'an unrecorded architecture'}, not "
                    f"one of {', '.join(_ARCHITECTURES)}: pass task= (vqa, itm, caption, vqa_classifier or nlvr2)")
        if num_labels is not None and task != "vqa_classifier":
            raise TypeError(f"{where}: num_labels is an option of task 'vqa_classifier', not {task!r}")
        if merge_from is not None and task != "nlvr2":
            raise TypeError(f"{where}: merge_from is an option of task 'nlvr2', not {task!r}")
        interp = interpolate_pos_encoding

        def resized(model: nn.Module) -> nn.Module:
            if image_size is not None:
                _resize_positions(model.vision_model, image_size, where)
            return model

        encoders = ("vision_model.", "text_encoder.")
        plans = {
            "vqa": (BlipForQuestionAnswering, lambda m: wrap(resized(m), interp), None, ()),
            "vqa_decoder": (BlipForQuestionAnswering, lambda m: BlipVQADecoderForTrimming(resized(m), interp), None, ()),
            "itm": (BlipForImageTextRetrieval, lambda m: wrap(resized(m), interp), None, ("itm_head.",)),
            "caption": (BlipForConditionalGeneration, lambda m: wrap(resized(m), interp), None, ()),
            "vqa_classifier": (BlipForQuestionAnswering, lambda m: BlipVQAClassifierForTrimming.from_blip(
                resized(m), 2 if num_labels is None else num_labels, interp), encoders, ()),
            "nlvr2": (BlipForImageTextRetrieval, lambda m: BlipNLVRForTrimming.from_blip(
                resized(m), merge_from, interp), encoders, ()),
        }
        if task not in plans:
            raise ValueError(f"{where}: task must be one of {sorted(plans)}, got {task!r}")
        if task in ("vqa_classifier", "nlvr2") and src.architectures and not set(src.architectures) & set(
                _ARCHITECTURES):
            raise PretrainedLoadError(f"{where}: task {task!r} starts from a BLIP VQA or ITM checkpoint, {src} was "
                                      f"saved as {', '.join(src.architectures)}")
        cls, make, uses, head = plans[task]
        accepted = ("task", "image_size", "interpolate_pos_encoding", "num_labels", "merge_from", "new_head", "seed")
        return load_transformers_pretrained(src, cls, overrides=options, accepted=accepted, wrap=make, uses=uses,
                                            head=head, new_head=new_head, seed=seed)


def _resize_positions(vision_model: nn.Module, image_size: int, where: str) -> None:
    """Resize a ``BlipVisionModel``'s position table to ``image_size`` (bicubic over the patch grid,
    [CLS] row kept) and update its config to match."""
    import torch.nn.functional as F

    emb = vision_model.embeddings
    config = vision_model.config
    if image_size <= 0 or image_size % emb.patch_size:
        raise ValueError(f"{where}: image_size={image_size} must be a positive multiple of the patch size "
                         f"{emb.patch_size}")
    if image_size == emb.image_size:
        return
    table = emb.position_embedding.data
    before, after = round((table.shape[1] - 1) ** 0.5), image_size // emb.patch_size
    grid = table[:, 1:].reshape(1, before, before, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(after, after), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, after * after, -1).to(table.dtype)
    emb.position_embedding = nn.Parameter(torch.cat([table[:, :1], grid], dim=1),
                                          requires_grad=emb.position_embedding.requires_grad)
    emb.image_size, emb.num_patches, emb.num_positions = image_size, after * after, after * after + 1
    config.image_size = image_size
