"""The ``qwen2_vl`` adapter object. Import-cheap: transformers' Qwen2-VL is imported only when a model
is described or built."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import nn

from trimkit.spec import AttentionSpec, LayerSpec, ModelSpec, StreamSpec, TokensFrom
from trimkit_llava.adapter import decoder_spec

__all__ = ["TINY_TEXT", "TINY_VISION", "TINY_VISION_2_5", "Qwen2VLAdapter", "describe_qwen2_vl", "wrap"]

TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
"""``build("tiny")``'s decoder: 4 layers of width 32, 4 query heads over 2 key/value heads, head dim 8
(multimodal RoPE sections 2 + 1 + 1 = head dim / 2)."""
TINY_VISION = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2)
"""``build("tiny")``'s Qwen2-VL vision tower: 4px patches, 2x2 merged into one token (an image of
``h x w`` patches gives ``h*w/4`` image tokens)."""
TINY_VISION_2_5 = dict(depth=2, hidden_size=16, intermediate_size=32, out_hidden_size=32, num_heads=2, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
"""``build("tiny", variant="qwen2_5_vl")``'s Qwen2.5-VL vision tower (window attention in block 0)."""
SPECIAL = dict(image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6)
"""The tiny vocabulary's special tokens (PAD 0, BOS 1, EOS 2)."""
GRIDS = [(1, 4, 4), (1, 4, 6), (1, 6, 4), (1, 2, 4)]
"""``example_inputs``' image grids (t, h, w patches), instance ``b`` gets ``GRIDS[b % 4]``: 4, 6, 6, 2 image tokens."""

VARIANTS = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}
_OWN_OPTIONS = ("output", "trim_layers", "vision_trim_layers")


def _classes() -> dict[str, type]:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def wrap(model: nn.Module, output: str = "logits", trim_layers: Sequence[int] | None = None,
         vision_trim_layers: Sequence[int] | None = None) -> nn.Module:
    """The traceable wrapper of a ``Qwen2VLForConditionalGeneration`` or
    ``Qwen2_5_VLForConditionalGeneration`` (weights shared, not copied); ``vision_trim_layers``: the
    vision tower's blocks that get token and head trimmers (see
    :class:`~trimkit_qwen2_vl.modeling.Qwen2VLForTrimming`)."""
    from .modeling import Qwen2VLForTrimming

    if isinstance(model, Qwen2VLForTrimming):
        return model
    if not isinstance(model, tuple(_classes().values())):
        raise TypeError(f"trimkit_qwen2_vl.wrap: expected a Qwen2VLForConditionalGeneration or "
                        f"Qwen2_5_VLForConditionalGeneration, got {type(model).__name__}"
                        + (" (the bare Qwen2VLModel / Qwen2_5_VLModel has no lm_head: load the "
                           "ForConditionalGeneration class)" if type(model).__name__.endswith("VLModel") else ""))
    return Qwen2VLForTrimming(model, output=output, trim_layers=trim_layers, vision_trim_layers=vision_trim_layers)


def describe_qwen2_vl(model: nn.Module) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of a wrapped Qwen2-VL / Qwen2.5-VL (see the package docstring)."""
    from .modeling import Qwen2VLForTrimming, flat_pixel_values

    if not isinstance(model, Qwen2VLForTrimming):
        raise TypeError(f"trimkit_qwen2_vl: a {type(model).__name__} cannot be traced as it is; trim "
                        "trimkit_qwen2_vl.wrap(model) (same weights) instead")
    inputs = ["pixel_values", "input_ids", "image_grid_thw", "attention_mask", "segment_starts"]
    rotary = "model.model.language_model.rotary_emb"
    if not model.vision_trim_layers:
        # the vision tower (its grid arithmetic is host code), the M-RoPE positions (get_rope_index loops over
        # the rows) and the rotary table run as single calls
        return decoder_spec(model.config.text_config, model.trim_layers, input_names=inputs,
                            leaf_modules=["model.model.visual", "positions", rotary],
                            autowrap_functions=[flat_pixel_values])
    # the tower trimmed too: its blocks are stream "vision" (batched, padded to the largest image), which
    # drops patches in whole merge groups (its merger makes one LM token of each); the first group is kept,
    # as the LM image segment's first token always is; no [CLS]: summarised by the mean of its kept patches
    vision = model.config.vision_config
    attn = AttentionSpec("attn", "self", vision.num_heads, via="kernel")
    chosen = set(model.vision_trim_layers)
    tower = [LayerSpec(f"vision_blocks.{i}", "vision", site="vision", hidden="hidden_states",
                       hidden_token_args={"cos": 1, "sin": 1, "bias": 3, "window": 1}, attentions=[attn], trimmable=i in chosen)
             for i in range(len(model.vision_blocks))]
    stream = StreamSpec("vision", padding_source="vision_layout[4]", protected=model.merge, summary="mean",
                        group=model.merge)
    return decoder_spec(model.config.text_config, model.trim_layers, input_names=inputs,
                        leaf_modules=["vision_layout", "positions", rotary],
                        vision=(stream, tower, TokensFrom("vision")))


class Qwen2VLAdapter:
    """Describes wrapped Qwen2-VL and Qwen2.5-VL models; builds ``tiny`` (``variant="qwen2_vl"`` or
    ``"qwen2_5_vl"``)."""

    def root(self, model: nn.Module) -> nn.Module:
        """The traceable root of ``model``: :func:`wrap` with its defaults (the model itself when it is a
        wrapper already), so ``trimkit.trim`` takes the transformers model directly."""
        return wrap(model)

    def matches(self, model: nn.Module) -> bool:
        if not any(f"transformers.models.{v}" in sys.modules for v in VARIANTS):  # no such model can exist yet
            return False
        from .modeling import Qwen2VLForTrimming

        return isinstance(model, (Qwen2VLForTrimming, *_classes().values()))

    def describe(self, model: nn.Module) -> ModelSpec:
        """See :func:`describe_qwen2_vl`."""
        return describe_qwen2_vl(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0,
                       prompts: Sequence[int] | None = None, questions: Sequence[int] | None = None,
                       grids: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """Random ``[prompt <|vision_start|>][<|image_pad|> x n][<|vision_end|> question][right padding]``
        rows: prompt and question lengths and the image grid differ per instance (``prompts`` /
        ``questions`` / ``grids`` set them; grids in patches, h and w multiples of the merge size), so
        the image starts elsewhere and is of another size in each row, and rows after the first are
        padded. ``pixel_values`` is batched, ``(B, max patches, dim)``."""
        from .modeling import qwen2_vl_segment_starts

        gen = torch.Generator().manual_seed(seed)
        cfg = model.config
        text, vision = cfg.text_config, cfg.vision_config
        merge = vision.spatial_merge_size
        prompts = list(prompts) if prompts is not None else [3 + (3 * b) % 5 for b in range(batch_size)]
        questions = list(questions) if questions is not None else [4 - b % 3 if b else 4 for b in range(batch_size)]
        grids = [tuple(g) for g in grids] if grids is not None else [GRIDS[b % len(GRIDS)] for b in range(batch_size)]
        if not len(prompts) == len(questions) == len(grids) == batch_size:
            raise ValueError("trimkit_qwen2_vl.example_inputs: one prompt and question length and one grid per instance")
        n_image = [t * h * w // merge ** 2 for t, h, w in grids]
        total = [p + n + q for p, n, q in zip(prompts, n_image, questions)]
        N = max(total)
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        special = {pad, text.bos_token_id, text.eos_token_id, cfg.image_token_id, cfg.video_token_id,
                   cfg.vision_start_token_id, cfg.vision_end_token_id}
        vocab = torch.tensor([i for i in range(min(text.vocab_size, 4096)) if i not in special])
        ids = torch.full((batch_size, N), pad, dtype=torch.long)
        mask = torch.zeros(batch_size, N, dtype=torch.long)
        for b, (p, n, t) in enumerate(zip(prompts, n_image, total)):
            ids[b, :t] = vocab[torch.randint(0, len(vocab), (t,), generator=gen)]
            ids[b, p - 1] = cfg.vision_start_token_id
            ids[b, p:p + n] = cfg.image_token_id
            ids[b, p + n] = cfg.vision_end_token_id
            mask[b, :t] = 1
        dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        patches = [t * h * w for t, h, w in grids]
        pixels = torch.zeros(batch_size, max(patches), dim)
        for b, n in enumerate(patches):
            pixels[b, :n] = torch.randn(n, dim, generator=gen)
        param = next(model.parameters())
        return {"pixel_values": pixels.to(param.device, param.dtype), "input_ids": ids.to(param.device),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=param.device),
                "attention_mask": mask.to(param.device),
                "segment_starts": qwen2_vl_segment_starts(ids, cfg.image_token_id).to(param.device)}

    def build(self, size: str = "tiny", seed: int = 0, variant: str = "qwen2_vl", output: str = "logits",
              trim_layers: Sequence[int] | None = None, vision_trim_layers: Sequence[int] | None = None,
              **options: Any) -> nn.Module:
        """A randomly initialised wrapped Qwen2-VL (``variant="qwen2_vl"``) or Qwen2.5-VL
        (``"qwen2_5_vl"``), sdpa attention: ``output`` ``"logits"`` or ``"hidden"``; ``trim_layers``
        the decoder layers that get trimmers (default: the middle half); ``options`` override the
        config's fields (a dict for ``vision_config``/``text_config`` updates those sub-configs)."""
        if size != "tiny":
            raise ValueError(f"trimkit_qwen2_vl.build: only size 'tiny' is built (random weights); load a pretrained "
                             f"Qwen2-VL with from_pretrained, got {size!r}")
        if variant not in VARIANTS:
            raise ValueError(f"trimkit_qwen2_vl.build: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        import transformers

        cls = _classes()[variant]
        config_cls = getattr(transformers, f"{VARIANTS[variant]}Config")
        options = dict(options)
        vision = {**(TINY_VISION if variant == "qwen2_vl" else TINY_VISION_2_5), **options.pop("vision_config", {})}
        text = {**TINY_TEXT, **options.pop("text_config", {})}
        config = config_cls(text_config=text, vision_config=vision, **{**SPECIAL, **options})
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return wrap(cls(config).eval(), output=output, trim_layers=trim_layers, vision_trim_layers=vision_trim_layers)

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        output: str = "logits", trim_layers: Sequence[int] | None = None,
                        vision_trim_layers: Sequence[int] | None = None, **options: Any) -> nn.Module:
        """A pretrained wrapped Qwen2-VL or Qwen2.5-VL, read offline: ``source`` is a directory written
        by ``save_pretrained`` (of a ``Qwen2VLForConditionalGeneration`` /
        ``Qwen2_5_VLForConditionalGeneration`` or this wrapper's ``model``) or a Hugging Face model id
        in the local HF cache (at ``revision``); its ``config.json``'s ``model_type`` picks the class;
        loaded with sdpa attention. ``output``/``trim_layers`` as in :meth:`build`; other ``options``
        set config fields that do not change weight shapes. ``weights`` is not used."""
        from trimkit.adapter import load_transformers_pretrained, transformers_source

        if weights is not None:
            raise TypeError(f"trimkit_qwen2_vl.from_pretrained({source!r}): weights={weights!r} is not used: a Qwen2-VL "
                            "checkpoint is a directory or Hugging Face model id (source) holding its weights")
        src = transformers_source(source, revision, adapter="qwen2_vl", model_types=tuple(VARIANTS))

        def _wrap(model: nn.Module) -> nn.Module:
            for cfg in (model.config, model.config.text_config, model.config.vision_config):
                cfg._attn_implementation = "sdpa"
            return wrap(model, output=output, trim_layers=trim_layers, vision_trim_layers=vision_trim_layers)

        return load_transformers_pretrained(src, _classes()[src.model_type], overrides=options,
                                            accepted=_OWN_OPTIONS, wrap=_wrap)
