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

Pretrained, offline: ``trimkit.adapter.load_pretrained("timm", "deit_small_patch16_224",
weights="deit_small.safetensors")`` (see :meth:`TimmViTAdapter.from_pretrained`).
"""

from __future__ import annotations

import sys
from pathlib import Path
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

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        seed: int | None = None, **options: Any) -> nn.Module:
        """A timm ViT with pretrained weights, read offline: ``source`` is a timm model name
        (optionally with its pretrained tag, ``"vit_base_patch16_224.augreg_in21k"``), ``weights``
        a local weights file (``.safetensors``, ``.pth``/``.bin``/``.pt``, or Google's ``.npz``)
        that timm loads as the model's pretrained weights (``pretrained=True,
        pretrained_cfg_overlay=dict(file=weights)``: its checkpoint filter adapts position
        tables, a classifier of another size is left random). Without ``weights``, the tag's
        weights are taken from the local Hugging Face cache (at ``revision``) or timm's torch-hub
        cache if they are there; nothing is downloaded. ``options`` go to ``timm.create_model``
        (``num_classes``, ``img_size``...); ``seed`` seeds the parts left random.
        """
        import timm
        from timm.models.vision_transformer import VisionTransformer

        from trimkit.adapter import PretrainedLoadError, PretrainedNotFoundError, set_base

        where = f"trimkit_timm.from_pretrained({source!r})"
        if not timm.is_model(source):
            import difflib

            close = difflib.get_close_matches(source.split(".")[0], timm.list_models(), n=5)
            raise PretrainedLoadError(f"{where}: {source!r} is not a timm model name"
                                      + (f" (close: {', '.join(close)})" if close else "")
                                      + "; timm.list_models('vit_*') lists the ViTs")
        cfg = timm.models.get_pretrained_cfg(source)
        try:
            with torch.device("meta"):  # the architecture, before reading any weights
                kind: type = type(timm.create_model(source, pretrained=False, **options))
        except (NotImplementedError, RuntimeError):  # an initialisation meta tensors do not support
            kind = VisionTransformer  # checked once built
        if not issubclass(kind, VisionTransformer):
            raise PretrainedLoadError(f"{where}: timm model {source!r} is a {kind.__name__}; adapter 'timm' trims "
                                      "timm VisionTransformer models (ViT, DeiT)")
        if weights is not None:
            if revision is not None:
                raise TypeError(f"{where}: revision={revision!r} selects weights in the Hugging Face cache; it has "
                                f"no meaning with weights={weights!r} (a file)")
            path = Path(weights).expanduser()
            if not path.is_file():
                there = "is a directory, not a weights file" if path.is_dir() else "does not exist"
                raise PretrainedNotFoundError(f"{where}: weights file {weights} {there}")
        else:
            path = _cached_weights(source, cfg, revision, where)
        overlay: dict[str, Any] = dict(file=str(path), custom_load=path.suffix == ".npz" and bool(cfg.custom_load))
        shapes = _shapes(path, where)
        classifier = cfg.classifier if isinstance(cfg.classifier, str) else (cfg.classifier or (None,))[0]
        if shapes is not None and f"{classifier}.weight" in shapes:
            # the classes of the file, not of the tag: timm keeps the classifier when they are the model's
            overlay["num_classes"] = shapes[f"{classifier}.weight"][0]
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = timm.create_model(source, pretrained=True, pretrained_cfg_overlay=overlay, **options)
        except RuntimeError as e:
            if "state_dict" in str(e) or "size mismatch" in str(e):
                raise PretrainedLoadError(f"{where}: the weights in {path} do not fit timm model {source!r}"
                                          + (f" with {options}" if options else "") + f": {e}") from None
            raise PretrainedLoadError(f"{where}: {path} could not be read as weights ({type(e).__name__}: {e}); the "
                                      "file is damaged or not a weights file") from e
        except Exception as e:  # a damaged pickle, an unexpected archive
            raise PretrainedLoadError(f"{where}: {path} could not be read as weights ({type(e).__name__}: {e}); the "
                                      "file is damaged or not a weights file") from e
        if not isinstance(model, VisionTransformer):
            raise PretrainedLoadError(f"{where}: timm model {source!r} is a {type(model).__name__}; adapter 'timm' "
                                      "trims timm VisionTransformer models (ViT, DeiT)")
        return set_base(model.eval(), source, revision)


def _shapes(path: Path, where: str) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of the tensors in a weights file, read without loading them (a safetensors
    header, a memory-mapped torch file); ``None`` for ``.npz``. Refuses an unreadable file."""
    from trimkit.adapter import PretrainedLoadError

    if path.suffix == ".npz":
        return None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # a file of torch's legacy format
    except Exception as e:
        raise PretrainedLoadError(f"{where}: {path} could not be read as weights ({type(e).__name__}: {e}); the "
                                  "file is damaged, truncated or not a weights file") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's checkpoint nestings
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise PretrainedLoadError(f"{where}: {path} holds a {type(sd).__name__}, not a state dict of weights")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _cached_weights(source: str, cfg: Any, revision: str | None, where: str) -> Path:
    """The locally cached weights of ``source``'s pretrained tag: its Hugging Face hub repo in the HF
    cache, else its URL's file in timm's torch-hub cache. Nothing is downloaded."""
    import os
    from urllib.parse import urlparse

    from trimkit.adapter import PretrainedNotFoundError

    looked = []
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, at = hub_id.partition("@")
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
        names += ["model.safetensors", "pytorch_model.bin"]
        for name in dict.fromkeys(names):
            found = try_to_load_from_cache(repo, name, revision=revision or at or None)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"Hugging Face repo {repo}{'@' + (revision or at) if revision or at else ''} in the HF cache "
                      f"({constants.HF_HUB_CACHE})")
    url = getattr(cfg, "url", None) if cfg is not None else None
    if url and revision is None:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        candidate = hub_dir / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return candidate
        looked.append(f"{candidate} (timm's torch-hub cache)")
    if not looked:
        raise PretrainedNotFoundError(f"{where}: timm has no pretrained weights for {source!r}: pass weights= a local "
                                      "weights file")
    raise PretrainedNotFoundError(f"{where}: the pretrained weights of {source!r} are not cached locally (looked in "
                                  f"{'; '.join(looked)}) and nothing is downloaded: pass weights= a local weights "
                                  "file, or download them where there is a network and bring the cache here")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("timm", TimmViTAdapter())
