"""trimkit adapter ``timm``: timm ViT / DeiT (``timm.models.vision_transformer.VisionTransformer``).

How trimkit sees the model: one stream ``"vision"`` ([CLS] at 0, no padding); every
``blocks.N`` is a layer at site ``"uni"`` with no context stream (so a token policy gets
``cls_context=None``: the Local-policy semantics of the paper, and ``cross_modal`` runs with a
zero context); its attention ``attn`` is timm's ``Attention`` (fused ``qkv`` Linear, own ``proj``),
recomputed by :class:`trimkit.ops.TrimAttention` with its own weights. The traced input is ``x``
(``attn_mask``/``is_causal`` are fixed to their defaults).

Supported: ``global_pool="token"`` with a class token (ViT, DeiT, DeiT-3, register tokens, layer
scale, pre-norm). Refused with a ``ValueError`` naming the option: no class token, any other
pooling (average / attention pooling reads every patch token, so masked and removed tokens would
give different outputs), distillation token (``VisionTransformerDistilled``), ``dynamic_img_size``.
Attention with ``qk_norm``, ``scale_attn_norm`` or a gate runs as timm wrote it, with trimkit at its
``F.scaled_dot_product_attention`` call (``AttentionSpec(via="kernel")``; needs ``fused_attn``);
plain attention is recomputed from ``qkv``/``proj`` so dropped heads skip their projections too.
Register tokens (after [CLS]) are never dropped (``StreamSpec.protected`` = timm's
``num_prefix_tokens``); the [CLS] is the summary the trimmers read.

Known limits (both need core support): timm's ``attn_drop`` is not applied by the recomputed
attention, and ``DropPath`` inside a block is traced in eval mode, so stochastic depth is off
while fine-tuning in mode ``sample`` (mode ``off`` runs the block itself and keeps it).

>>> import trimkit, timm
>>> tmodel = trimkit.trim(timm.create_model("deit_small_patch16_224"), trimkit.TrimConfig(token_target=0.6))
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from trimkit.plugins import hookimpl
from trimkit.spec import AttentionSpec, AttnCall, LayerSpec, ModelSpec, StreamSpec

__all__ = ["TimmViTAdapter", "describe_timm_vit"]

SIZES = {"tiny": None, "base": "vit_base_patch16_224"}
"""``build`` sizes: ``tiny`` is a 2-block 64-wide ViT on 32px images; others are timm model names."""

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)

def _vit_class() -> type | None:
    if "timm" not in sys.modules:  # a timm model cannot exist without timm imported: stay cheap
        return None
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def _attn_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """timm ``Attention(x, attn_mask=None, is_causal=False)`` -> :class:`AttnCall` (sdpa mask convention)."""
    call = dict(zip(("x", "attn_mask", "is_causal"), args))
    call.update(kwargs)
    if call.get("is_causal"):
        raise NotImplementedError("trimkit_timm: is_causal=True attention is not supported")
    x, mask = call["x"], call.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:  # sdpa: True = may attend
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
    return AttnCall(x, None, mask)


def _name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _check(model: nn.Module) -> None:
    from timm.layers import Attention

    name = _name(model)

    def refuse(why: str) -> None:
        raise ValueError(f"trimkit_timm: cannot trim timm model {name!r}: {why}")

    if type(model).__name__ == "VisionTransformerDistilled" or getattr(model, "dist_token", None) is not None:
        refuse("it has a distillation token at position 1 that head_dist reads; trimming could drop it "
               "(use a non-distilled DeiT)")
    if not getattr(model, "has_class_token", model.cls_token is not None):
        refuse("class_token=False: trimkit needs a [CLS] token at position 0")
    if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        refuse(f"global_pool={model.global_pool!r} pools over patch tokens, so removed and masked tokens "
               "would give different outputs; use global_pool='token'")
    if getattr(model, "dynamic_img_size", False):
        refuse("dynamic_img_size=True: its shape-dependent position embedding cannot be traced by torch.fx")
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(attn) is not Attention:
            refuse(f"blocks.{i} ({type(block).__name__}) has attention {type(attn).__name__}; only "
                   "timm.layers.Attention as `attn` is supported")
        if _needs_kernel(attn) and not getattr(attn, "fused_attn", False):
            refuse(f"blocks.{i}.attn has qk_norm/scale_attn_norm/a gate and fused_attn=False; trimkit runs such "
                   "attention at its F.scaled_dot_product_attention call: enable timm's fused attention "
                   "(TIMM_FUSED_ATTN=1 or attn.fused_attn = True)")


def _needs_kernel(attn: nn.Module) -> bool:
    """Whether the attention does more than project, attend and project (qk-norm, a norm before the
    output projection, a gate), so trimkit must run it as it is and intercept its kernel."""
    return (not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity)
            or not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or getattr(attn, "gate", None) is not None)


def describe_timm_vit(model: nn.Module) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of a timm ``VisionTransformer`` (see the module docstring).

    Raises ``ValueError`` naming the option when the model is not supported.
    """
    _check(model)
    layers = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if _needs_kernel(attn):  # the module runs itself; heads masked at the kernel
            spec = AttentionSpec("attn", kind="self", num_heads=attn.num_heads, via="kernel")
        else:  # plain attention: recomputed from qkv/proj, so dropped heads skip their projections too
            spec = AttentionSpec("attn", kind="self", num_heads=attn.num_heads, qkv="qkv", out="proj",
                                 inputs=_attn_inputs, output=attn.proj_drop, scale=attn.scale)
        layers.append(LayerSpec(f"blocks.{i}", stream="vision", site="uni", hidden="x", attentions=[spec]))
    spec = ModelSpec(
        streams=[StreamSpec("vision", protected=getattr(model, "num_prefix_tokens", 1))],
        layers=layers,
        input_names=["x"],
        concrete_args={"attn_mask": None, "is_causal": False},
        leaf_modules=["patch_drop"],  # PatchDropout branches on self.training: keep it a runtime call
    )
    spec.validate()
    return spec


class TimmViTAdapter:
    """The ``timm`` adapter: describes timm ``VisionTransformer`` models (ViT, DeiT)."""

    def matches(self, model: nn.Module) -> bool:
        """True for any timm ``VisionTransformer`` (unsupported options are refused by :meth:`describe`)."""
        cls = _vit_class()
        return cls is not None and isinstance(model, cls)

    def describe(self, model: nn.Module) -> ModelSpec:
        """See :func:`describe_timm_vit`."""
        return describe_timm_vit(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
        """``{"x": images}``: standard-normal images at the model's input size."""
        gen = torch.Generator().manual_seed(seed)
        h, w = model.patch_embed.img_size
        param = next(model.parameters())
        x = torch.randn(batch_size, model.in_chans, h, w, generator=gen)
        return {"x": x.to(param.device, param.dtype)}

    def build(self, size: str = "tiny", seed: int = 0, **options: Any) -> nn.Module:
        """A randomly initialised ViT: ``"tiny"`` (:data:`TINY`, CPU-fast), ``"base"``
        (``vit_base_patch16_224``) or any timm model name; ``options`` go to the constructor."""
        import timm
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(seed)
        name = SIZES.get(size, size)
        model = VisionTransformer(**{**TINY, **options}) if name is None else timm.create_model(
            name, pretrained=False, **options)
        return model.eval()


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("timm", TimmViTAdapter())
