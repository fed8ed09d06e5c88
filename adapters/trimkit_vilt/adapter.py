"""The ``vilt`` adapter object. Import-cheap: transformers' ViLT is imported only when a model is
described or built."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from trimkit.spec import AttentionSpec, AttnCall, LayerSpec, ModelSpec, Segment, StreamSpec

__all__ = ["TINY", "ViltAdapter", "describe_vilt", "wrap"]

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, max_position_embeddings=16, vocab_size=64, num_labels=5, max_image_length=-1)
"""``build("tiny")``: 3 layers of width 32, 32px images (16 patches + the image [CLS])."""

_TASKS = ("vqa", "retrieval", "model")
_ARCHITECTURES = {"ViltForQuestionAnswering": "vqa", "ViltForImageAndTextRetrieval": "retrieval", "ViltModel": "model"}
_HEADS = {"vqa": ("classifier.",), "retrieval": ("rank_output.",), "model": ()}


def wrap(model: nn.Module) -> nn.Module:
    """The traceable wrapper of a ``ViltModel``, ``ViltForQuestionAnswering`` or
    ``ViltForImageAndTextRetrieval`` (weights shared, not copied)."""
    from transformers import ViltForImageAndTextRetrieval, ViltForQuestionAnswering, ViltModel

    from .modeling import ViltForTrimming

    if isinstance(model, ViltForTrimming):
        return model
    if type(model) in (ViltModel, ViltForQuestionAnswering, ViltForImageAndTextRetrieval):
        return ViltForTrimming(model)
    raise TypeError(f"trimkit_vilt.wrap: expected ViltModel, ViltForQuestionAnswering or "
                    f"ViltForImageAndTextRetrieval, got {type(model).__name__}")


def _attention_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``ViltSelfAttention(hidden_states, attention_mask=None, output_attentions=False)``."""
    call = dict(zip(("hidden_states", "attention_mask", "output_attentions"), args)) | kwargs
    if call.get("output_attentions"):
        raise NotImplementedError("trimkit_vilt: output_attentions=True is not supported on trimmed attention")
    return AttnCall(call["hidden_states"], None, call.get("attention_mask"))


def _attention_output(y: torch.Tensor) -> tuple[torch.Tensor]:
    return (y,)  # ViltSelfAttention returns (context,) without attention weights


def describe_vilt(model: nn.Module) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of a wrapped ViLT (see the package docstring)."""
    from .modeling import ViltForTrimming

    if not isinstance(model, ViltForTrimming):
        raise TypeError(f"trimkit_vilt: a {type(model).__name__} cannot be traced as it is; trim "
                        "trimkit_vilt.wrap(model) (same weights) instead")
    heads = model.config.num_attention_heads
    attn = AttentionSpec("attention.attention", "self", heads, q="query", k="key", v="value", out=None,
                         inputs=_attention_inputs, output=_attention_output)
    vilt = model.prefix
    layers = [LayerSpec(f"{vilt}.encoder.layer.{i}", "joint", "uni", hidden="hidden_states",
                        hidden_token_args={"attention_mask": -1}, attentions=[attn])
              for i in range(len(model.vilt.encoder.layer))]
    spec = ModelSpec(
        streams=[StreamSpec("joint", padding_source=f"{vilt}.embeddings[1]",
                            segments=[Segment("text", "input_ids:1"), Segment("vision")])],
        layers=layers,
        # token_type_ids stays an input: ViltProcessor returns it (None means zeros, as in ViLT)
        input_names=["input_ids", "attention_mask", "pixel_values", "pixel_mask", "token_type_ids"],
        leaf_modules=[f"{vilt}.embeddings"],  # patch selection branches on values; one call
    )
    spec.validate()
    return spec


class ViltAdapter:
    """Describes wrapped ViLT models; builds ``tiny`` and ``base`` (``dandelin/vilt-b32`` shapes)."""

    def root(self, model: nn.Module) -> nn.Module:
        """The traceable root of ``model``: :func:`wrap` with its defaults (the model itself when it is a
        wrapper already), so ``trimkit.trim`` takes the transformers model directly."""
        return wrap(model)

    def matches(self, model: nn.Module) -> bool:
        if "transformers.models.vilt" not in sys.modules:  # no ViLT model can exist yet
            return False
        from transformers import ViltPreTrainedModel

        from .modeling import ViltForTrimming

        return isinstance(model, (ViltForTrimming, ViltPreTrainedModel))

    def describe(self, model: nn.Module) -> ModelSpec:
        """See :func:`describe_vilt`."""
        return describe_vilt(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0, text_len: int = 8) -> dict[str, Any]:
        """Random inputs: [CLS] first and [SEP] last (BERT ids 101/102 when the vocabulary has them);
        rows after the first are shorter (padded); full 1-valued pixel masks."""
        gen = torch.Generator().manual_seed(seed)
        cfg = model.config
        cls_id, sep_id = (101, 102) if cfg.vocab_size > 102 else (1, 2)
        input_ids = torch.randint(3, cfg.vocab_size, (batch_size, text_len), generator=gen)
        attention_mask = torch.ones_like(input_ids)
        for r in range(batch_size):
            length = text_len if r == 0 else int(torch.randint(2, text_len + 1, (1,), generator=gen))
            input_ids[r, 0], input_ids[r, length - 1] = cls_id, sep_id
            input_ids[r, length:], attention_mask[r, length:] = cfg.pad_token_id or 0, 0
        size = cfg.image_size
        param = next(model.parameters())
        return {"input_ids": input_ids.to(param.device), "attention_mask": attention_mask.to(param.device),
                "pixel_values": torch.randn(batch_size, 3, size, size, generator=gen).to(param.device, param.dtype),
                "pixel_mask": torch.ones(batch_size, size, size, dtype=torch.long, device=param.device)}

    def build(self, size: str = "tiny", seed: int = 0, task: str = "vqa", **options: Any) -> nn.Module:
        """A randomly initialised wrapped ViLT: ``task`` ``"vqa"`` (ViltForQuestionAnswering),
        ``"retrieval"`` (ViltForImageAndTextRetrieval) or ``"model"`` (pooled output);
        ``options`` override ``ViltConfig`` fields."""
        from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltForQuestionAnswering, ViltModel

        if size not in ("tiny", "base"):
            raise ValueError(f"trimkit_vilt.build: size must be 'tiny' or 'base', got {size!r}")
        if task not in _TASKS:
            raise ValueError(f"trimkit_vilt.build: task must be one of {_TASKS}, got {task!r}")
        torch.manual_seed(seed)
        config = ViltConfig(**{**(TINY if size == "tiny" else {}), **options})
        cls = {"vqa": ViltForQuestionAnswering, "retrieval": ViltForImageAndTextRetrieval, "model": ViltModel}[task]
        return wrap(cls(config).eval())

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        task: str | None = None, new_head: bool = False, seed: int | None = None,
                        **options: Any) -> nn.Module:
        """A pretrained wrapped ViLT (:class:`~trimkit_vilt.modeling.ViltForTrimming`, as :meth:`build`
        returns), read offline: ``source`` is a directory written by ``save_pretrained`` or a Hugging
        Face model id in the local HF cache (at ``revision``).

        ``task``: ``"vqa"``, ``"retrieval"`` or ``"model"`` (see :meth:`build`); by default the one
        the checkpoint was saved as (its config's ``architectures``). ``new_head=True`` lets the
        task head (``classifier`` / ``rank_output``) start random where the checkpoint has none or
        one of another size, e.g. ``task="vqa", num_labels=10, new_head=True`` from
        ``dandelin/vilt-b32-mlm``; ``seed`` seeds that initialisation. Other ``options`` set
        ``ViltConfig`` fields (``num_labels``, dropouts...) before the weights load; fields that
        change other weights' shapes are refused. ``weights`` is not used (the source holds them).
        """
        from transformers import ViltForImageAndTextRetrieval, ViltForQuestionAnswering, ViltModel

        from trimkit.adapter import PretrainedLoadError, load_transformers_pretrained, transformers_source

        if weights is not None:
            raise TypeError(f"trimkit_vilt.from_pretrained({source!r}): weights={weights!r} is not used: a ViLT "
                            "checkpoint is a directory or Hugging Face model id (source) holding its weights")
        src = transformers_source(source, revision, adapter="vilt", model_types=("vilt",))
        if task is None:
            task = next((_ARCHITECTURES[a] for a in src.architectures if a in _ARCHITECTURES), None)
            if task is None:
                raise PretrainedLoadError(f"trimkit_vilt.from_pretrained: {src} was saved as "
                                          f"{', '.join(src.architectures) or 'an unrecorded architecture'}, not one "
                                          f"of {', '.join(_ARCHITECTURES)}: pass task= one of {_TASKS} (with "
                                          "new_head=True for a task head the checkpoint does not have)")
        if task not in _TASKS:
            raise ValueError(f"trimkit_vilt.from_pretrained: task must be one of {_TASKS}, got {task!r}")
        cls = {"vqa": ViltForQuestionAnswering, "retrieval": ViltForImageAndTextRetrieval, "model": ViltModel}[task]
        return load_transformers_pretrained(src, cls, overrides=options, accepted=("task", "new_head", "seed"),
                                            wrap=wrap, head=_HEADS[task], new_head=new_head, seed=seed)
