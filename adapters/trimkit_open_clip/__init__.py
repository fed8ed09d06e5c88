"""trimkit adapter ``open_clip``: the ViT image tower of open_clip models.

How trimkit sees the model: one stream ``"vision"`` ([CLS] at 0, no padding); every
``transformer.resblocks.N`` of the ``open_clip.transformer.VisionTransformer`` is a layer at site
``"uni"`` with no context stream (a token policy gets ``cls_context=None``; in the text-guided
mode below it gets the text embedding); its attention ``attn`` is an ``nn.MultiheadAttention``
(fused ``in_proj_weight``/``in_proj_bias``, own ``out_proj``) called as
``attn(q, k, v, need_weights=False, attn_mask=...)`` and returning ``(out, None)``.
:class:`trimkit.ops.TrimAttention` recomputes it with its weights, which routes head trimming
around the fused ``nn.MultiheadAttention`` kernel.

Three ways to use it, all picked from the model by ``trimkit.trim``:

* ``trim(model.visual)`` (an ``open_clip.transformer.VisionTransformer``, input ``x``): the
  trimmed image encoder. For zero-shot classification, encode the class prompts once with
  ``model.encode_text`` and compare them with ``tvisual(images)`` (normalise both). This is the
  recommended form: the text features are cached, only images are run.
* ``trim(model)`` for a whole ``open_clip.CLIP`` / ``CustomTextCLIP``: the same vision layers
  (``visual.transformer.resblocks.N``); the text tower is traced as one leaf and left untrimmed.
  ``tmodel(image=..., text=...)`` returns what ``model(image, text)`` does (pass both).
* Text-guided, for re-ranking a shortlist: ``trim(TextGuidedCLIP(model))``
  (:class:`~trimkit_open_clip.text_guided.TextGuidedCLIP`, or ``build(part="text_guided")``)
  scores image-text *pairs*, ``tmodel(image=..., text=...) -> (B,)`` logits (row ``i``: ``image[i]``
  with ``text[i]``; the diagonal of ``model.get_logits``). Its text tower is one module ``text``,
  traced as a leaf and untrimmed; every vision layer names it as its ``context_source`` (context
  stream ``"text"``, which has no trimmed layers), so the token trimmers get the pair's (B, E) text
  embedding as their cross-modal context: with the ``cross_modal`` policy the same image keeps
  different tokens for different texts (the ``local`` policy ignores the context). Head trimmers
  of the self-attention layers read the image [CLS] only. Each pair runs the text tower once; to
  re-rank K images for one query, repeat the query's tokens K times (``text.expand(K, -1)``).
  Parameters are the model's own (shared), so fine-tuning the wrapper fine-tunes the model.

Supported: ``pool_type="tok"`` towers with the default ``ResidualAttentionBlock`` (open_clip's
ViT-B/L/H/g CLIP models). Refused with a ``ValueError`` naming the option: ``pool_type`` other
than ``"tok"`` and attentional pooling (they read every patch token, so masked and removed tokens
would give different outputs), ``output_tokens=True`` (the token output's length changes when
tokens are removed), custom attention blocks (``qk_norm``, scaled cosine attention, ...),
``nn.MultiheadAttention`` with separate q/k/v weights or ``bias_k``, and non-ViT towers
(ModifiedResNet; timm towers: trim ``model.visual.trunk`` with the ``timm`` adapter).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from trimkit.plugins import hookimpl
from trimkit.spec import LayerSpec, ModelSpec, StreamSpec, multihead_attention

__all__ = ["OpenClipAdapter", "describe_open_clip", "TextGuidedCLIP", "CLIPTextTower"]

PARTS = ("visual", "clip", "text_guided")

SIZES = {"tiny": None, "base": "ViT-B-16"}
"""``build`` sizes: ``tiny`` is :data:`TINY_VISION`/:data:`TINY_TEXT`; others are open_clip model names."""

TINY_VISION = dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=4, layers=1)



def _open_clip_classes() -> tuple[type, ...]:
    if "open_clip" not in sys.modules:  # an open_clip model cannot exist without open_clip imported
        return ()
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import VisionTransformer

    from .text_guided import TextGuidedCLIP

    return VisionTransformer, CLIP, CustomTextCLIP, TextGuidedCLIP


def __getattr__(name: str) -> Any:
    """``TextGuidedCLIP`` / ``CLIPTextTower`` import open_clip: loaded on first use, not with the plugin."""
    if name in ("TextGuidedCLIP", "CLIPTextTower"):
        from . import text_guided

        return getattr(text_guided, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_tower(visual: nn.Module, where: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    def refuse(why: str) -> None:
        raise ValueError(f"trimkit_open_clip: cannot trim {where} ({type(visual).__name__}): {why}")

    if not isinstance(visual, VisionTransformer):
        hint = "; trim model.visual.trunk with the 'timm' adapter" if hasattr(visual, "trunk") else ""
        refuse(f"only open_clip's ViT image tower is supported{hint}")
    if visual.attn_pool is not None:
        refuse("attentional_pool=True pools over every patch token; use pool_type='tok' without attentional pooling")
    if visual.pool_type != "tok":
        refuse(f"pool_type={visual.pool_type!r} reads every patch token, so removed and masked tokens would give "
               "different outputs; use pool_type='tok'")
    if visual.output_tokens:
        refuse("output_tokens=True returns the patch tokens, whose number changes when tokens are removed")
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            refuse(f"transformer.resblocks.{i} is a {type(block).__name__} (block_type='custom': qk_norm, "
                   "scaled cosine attention, ...); only the default ResidualAttentionBlock is supported")
        mha = block.attn
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
            refuse(f"transformer.resblocks.{i}.attn is an nn.MultiheadAttention with separate q/k/v weights, "
                   "bias_k/bias_v or add_zero_attn")


def describe_open_clip(model: nn.Module) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of an open_clip ViT tower, a whole CLIP model or a
    :class:`~trimkit_open_clip.text_guided.TextGuidedCLIP`.

    See the module docstring. Raises ``ValueError`` naming the option when unsupported.
    """
    from open_clip.transformer import VisionTransformer

    from .text_guided import TextGuidedCLIP

    tower = isinstance(model, VisionTransformer)
    guided = isinstance(model, TextGuidedCLIP)
    visual = model if tower else model.visual
    _check_tower(visual, "the image tower" if tower else "model.visual")
    prefix = "" if tower else "visual."
    batch_first = bool(getattr(visual.transformer, "batch_first", True))
    # TextGuidedCLIP: the text tower is its child ``text``; its (B, E) output is every vision layer's context
    context = dict(context_source="text", context_stream="text") if guided else {}
    layers = []
    for i, block in enumerate(visual.transformer.resblocks):
        attn = multihead_attention("attn", block.attn)
        layers.append(LayerSpec(f"{prefix}transformer.resblocks.{i}", stream="vision", site="uni", hidden="q_x",
                                attentions=[attn], batch_first=batch_first, **context))
    text_leaf = "text" if hasattr(model, "text") else "transformer"  # CustomTextCLIP, TextGuidedCLIP / CLIP
    spec = ModelSpec(
        streams=[StreamSpec("vision")] + ([StreamSpec("text")] if guided else []),
        layers=layers,
        input_names=["x"] if tower else ["image", "text"],
        leaf_modules=[f"{prefix}patch_dropout"] + ([] if tower else [text_leaf]),  # PatchDropout: training-time
    )
    spec.validate()
    return spec


class OpenClipAdapter:
    """The ``open_clip`` adapter: open_clip ViT image towers, whole CLIP models and text-guided pair
    scorers (vision trimmed)."""

    def matches(self, model: nn.Module) -> bool:
        """True for ``open_clip.transformer.VisionTransformer``, ``open_clip.CLIP``, ``CustomTextCLIP``
        and :class:`~trimkit_open_clip.text_guided.TextGuidedCLIP`."""
        classes = _open_clip_classes()
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> ModelSpec:
        """See :func:`describe_open_clip`."""
        return describe_open_clip(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
        """``{"x": images}`` for a tower; ``{"image": images, "text": tokens}`` for a CLIP model or a
        ``TextGuidedCLIP`` (row ``i`` of each is one pair).

        Tokens follow the CLIP BPE layout: start-of-text ``vocab_size - 2``, random words, end-of-text
        ``vocab_size - 1`` (the highest id, which ``argmax`` pooling finds), zero padding.
        """
        from open_clip.transformer import VisionTransformer

        gen = torch.Generator().manual_seed(seed)
        visual = model if isinstance(model, VisionTransformer) else model.visual
        param = next(model.parameters())
        h, w = visual.image_size
        images = torch.randn(batch_size, 3, h, w, generator=gen).to(param.device, param.dtype)
        if visual is model:
            return {"x": images}
        text_tower = getattr(model, "text", model)
        length, vocab = text_tower.context_length, text_tower.vocab_size
        text = torch.zeros(batch_size, length, dtype=torch.long)
        for row in range(batch_size):
            n = int(torch.randint(3, length + 1, (1,), generator=gen))
            text[row, 0], text[row, n - 1] = vocab - 2, vocab - 1
            text[row, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=gen)
        return {"image": images, "text": text.to(param.device)}

    def build(self, size: str = "tiny", seed: int = 0, part: str = "visual", **options: Any) -> nn.Module:
        """A randomly initialised open_clip model (no weights are downloaded).

        size: ``"tiny"`` (CPU-fast), ``"base"`` (``ViT-B-16``) or any open_clip model name.
        part: ``"visual"`` returns the image tower, ``"clip"`` the whole CLIP model,
        ``"text_guided"`` a :class:`~trimkit_open_clip.text_guided.TextGuidedCLIP` around it.
        options: for ``tiny``, ``vision``/``text`` dicts overriding :data:`TINY_VISION`/:data:`TINY_TEXT`,
        ``custom_text=True`` for an ``open_clip.CustomTextCLIP`` (text tower ``model.text``) and
        other keyword arguments of ``open_clip.CLIP`` (``init_logit_bias``...); otherwise keyword
        arguments of ``open_clip.create_model`` (e.g. ``force_custom_text=True``).
        """
        import open_clip
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

        from .text_guided import TextGuidedCLIP

        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        torch.manual_seed(seed)
        name = SIZES.get(size, size)
        if name is None:
            vision = CLIPVisionCfg(**{**TINY_VISION, **options.pop("vision", {})})
            text = CLIPTextCfg(**{**TINY_TEXT, **options.pop("text", {})})
            cls = CustomTextCLIP if options.pop("custom_text", False) else CLIP
            model = cls(embed_dim=32, vision_cfg=vision, text_cfg=text, **options)
        else:
            model = open_clip.create_model(name, pretrained=None, **options)
        model = model.eval()
        return {"visual": model.visual, "clip": model, "text_guided": TextGuidedCLIP(model).eval()}[part]


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("open_clip", OpenClipAdapter())
