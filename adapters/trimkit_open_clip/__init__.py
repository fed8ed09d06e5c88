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

Pretrained, offline: ``trimkit.adapter.load_pretrained("open_clip", "ViT-B-16",
weights="open_clip_model.safetensors")`` returns the image tower as ``build`` does (``part=``
for the others; see :meth:`OpenClipAdapter.from_pretrained`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
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

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        part: str = "visual", seed: int | None = None, **options: Any) -> nn.Module:
        """An open_clip model with pretrained weights, read offline; ``part`` as in :meth:`build`
        (``"visual"``: the image tower, ``"clip"``, ``"text_guided"``).

        ``source``: an open_clip model name (``open_clip.list_models()``, or one added with
        ``open_clip.add_model_config``) with ``weights`` a local checkpoint file
        (``open_clip.create_model(source, pretrained=weights)``, loaded strictly) or one of the
        model's pretrained tags (``"openai"``, ``"laion2b_s34b_b79k"``...) when its file is in the
        local Hugging Face cache; ``"tiny"`` (the adapter's ``build("tiny")`` model) with a
        ``weights`` file; ``"local-dir:PATH"`` (a directory with ``open_clip_config.json`` and its
        weights); or ``"hf-hub:org/repo"`` from the local HF cache (at ``revision``). Nothing is
        downloaded. ``options`` go to ``open_clip.create_model`` (``force_quick_gelu``...); ``seed``
        seeds what the checkpoint does not set.
        """
        import open_clip
        from open_clip.factory import get_model_config, parse_model_name
        from open_clip.transformer import VisionTransformer

        from trimkit.adapter import PretrainedLoadError, PretrainedNotFoundError, set_base

        from .text_guided import TextGuidedCLIP

        where = f"trimkit_open_clip.from_pretrained({source!r})"
        if part not in PARTS:
            raise ValueError(f"{where}: part must be one of {PARTS}, got {part!r}")
        schema, ident = parse_model_name(source)
        name, pretrained = source, None
        if schema is not None:
            if weights is not None:
                raise TypeError(f"{where}: weights={weights!r} is not used: a {schema}: source holds its weights")
            if schema == "hf-hub":
                name = f"local-dir:{_hub_snapshot(ident, revision, where)}"
            else:
                if revision is not None:
                    raise TypeError(f"{where}: revision={revision!r} has no meaning for a local directory")
                if not (Path(ident).expanduser() / "open_clip_config.json").is_file():
                    there = "has no open_clip_config.json" if Path(ident).expanduser().is_dir() else "does not exist"
                    raise PretrainedNotFoundError(f"{where}: directory {ident} {there} (a 'local-dir:' source holds "
                                                  "open_clip_config.json and its weights)")
        else:
            tiny = SIZES.get(source, source) is None
            known = tiny or get_model_config(SIZES.get(source, source).replace("/", "-")) is not None
            if not known:
                import difflib

                close = difflib.get_close_matches(source, open_clip.list_models(), n=5)
                raise PretrainedLoadError(f"{where}: {source!r} is not an open_clip model name"
                                          + (f" (close: {', '.join(close)})" if close else "")
                                          + "; open_clip.list_models() lists them")
            name = SIZES.get(source, source)
            vision = (get_model_config(name.replace("/", "-")) or {}).get("vision_cfg", {}) if name else {}
            if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
                tower = "a timm" if "timm_model_name" in vision else "a ModifiedResNet"
                raise PretrainedLoadError(f"{where}: open_clip model {source!r} has {tower} image tower; adapter "
                                          "'open_clip' trims ViT towers (open_clip.transformer.VisionTransformer)")
            pretrained = _weights_file(name or source, weights, revision, where)
        if seed is not None:
            torch.manual_seed(seed)
        try:
            if name is None:  # "tiny": the adapter's own configuration
                model = self.build("tiny", seed=0 if seed is None else seed, part="clip", **options)
                open_clip.load_checkpoint(model, pretrained, strict=True)
            else:
                model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True, **options)
        except RuntimeError as e:
            what = pretrained or name
            if "state_dict" in str(e) or "size mismatch" in str(e):
                raise PretrainedLoadError(f"{where}: the weights in {what} do not fit open_clip model {source!r}"
                                          + (f" with {options}" if options else "") + f": {e}") from None
            raise PretrainedLoadError(f"{where}: {what} could not be loaded ({type(e).__name__}: {e}); the file is "
                                      "damaged or not an open_clip checkpoint") from e
        except Exception as e:  # a damaged pickle or safetensors file, a broken local-dir config, resizing asserts
            raise PretrainedLoadError(f"{where}: {pretrained or name} could not be loaded into open_clip model "
                                      f"{source!r} ({type(e).__name__}: {e}); the file is damaged, or holds the "
                                      "weights of another model") from e
        if not isinstance(model.visual, VisionTransformer):
            raise PretrainedLoadError(f"{where}: open_clip model {source!r} has a {type(model.visual).__name__} image "
                                      "tower; adapter 'open_clip' trims ViT towers (open_clip.transformer."
                                      "VisionTransformer)")
        model = model.eval()
        out = {"visual": model.visual, "clip": model, "text_guided": TextGuidedCLIP(model).eval()}[part]
        return set_base(out, source, revision)


def _weights_file(name: str, weights: str | None, revision: str | None, where: str) -> str:
    """The local file of ``weights``: a path, or a pretrained tag of open_clip model ``name`` whose
    file is in the local Hugging Face cache (or open_clip's download cache). Nothing is downloaded."""
    import open_clip

    from trimkit.adapter import PretrainedNotFoundError

    tags = open_clip.list_pretrained_tags_by_model(name) if name else []
    if weights is None:
        raise PretrainedNotFoundError(f"{where}: pass weights= a local checkpoint file"
                                      + (f" or a pretrained tag cached locally ({', '.join(tags)})" if tags else ""))
    path = Path(weights).expanduser()
    if path.is_file():
        if revision is not None:
            raise TypeError(f"{where}: revision={revision!r} selects a tag's file in the Hugging Face cache; it has "
                            f"no meaning with weights={weights!r} (a file)")
        return str(path)
    cfg = open_clip.get_pretrained_cfg(name, weights) if name and not path.exists() else {}
    if not cfg:
        there = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise PretrainedNotFoundError(f"{where}: weights file {weights} {there}"
                                      + (f" (nor is it a pretrained tag of {name}: {', '.join(tags)})" if tags else ""))
    looked = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache
        from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(hub)  # open_clip's 'org/model/' (default file) or 'org/model/file'
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith(".bin"):
            names.insert(0, filename[:-4] + ".safetensors")
        for candidate in names:
            found = try_to_load_from_cache(repo, candidate, revision=revision)
            if isinstance(found, str):
                return found
        looked.append(f"Hugging Face repo {repo} in the HF cache ({constants.HF_HUB_CACHE})")
    url = cfg.get("url", "")
    if url and revision is None:
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
        looked.append(f"{candidate} (open_clip's download cache)")
    raise PretrainedNotFoundError(f"{where}: the weights of pretrained tag {weights!r} are not cached locally (looked "
                                  f"in {'; '.join(looked) or 'nowhere: the tag names no file'}) and nothing is "
                                  "downloaded: pass weights= a local checkpoint file, or download them where there is "
                                  "a network and bring the cache here")


def _hub_snapshot(repo: str, revision: str | None, where: str) -> Path:
    from huggingface_hub import constants, errors, snapshot_download

    from trimkit.adapter import PretrainedNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except errors.LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        raise PretrainedNotFoundError(f"{where}: the Hugging Face repo {repo!r}{at} is not in the local HF cache "
                                      f"({constants.HF_HUB_CACHE}) and nothing is downloaded: download it where there "
                                      "is a network and bring the cache here, or pass 'local-dir:PATH'") from None


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("open_clip", OpenClipAdapter())
