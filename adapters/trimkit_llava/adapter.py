"""The ``llava`` adapter object. Import-cheap: transformers' LLaVA is imported only when a model is
described or built."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import nn

from trimkit.spec import AttentionSpec, LayerSpec, ModelSpec, Segment, StreamSpec, TokensFrom

__all__ = ["TINY_TEXT", "TINY_VISION", "LlavaAdapter", "describe_llava", "wrap"]

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=24, patch_size=8, projection_dim=32)
"""``build("tiny")``'s CLIP vision tower: 24px images, 9 patches (9 image tokens after the [CLS] crop)."""
TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
"""``build("tiny")``'s Llama: 4 decoder layers of width 32, 4 query heads over 2 key/value heads."""
IMAGE_TOKEN = 3  # the tiny vocabulary's image placeholder (BOS 1, EOS 2, PAD 0)

_OWN_OPTIONS = ("output", "trim_layers", "vision_trim_layers")


def wrap(model: nn.Module, output: str = "logits", trim_layers: Sequence[int] | None = None,
         vision_trim_layers: Sequence[int] | None = None) -> nn.Module:
    """The traceable wrapper of a ``LlavaForConditionalGeneration`` (weights shared, not copied)."""
    from transformers import LlavaForConditionalGeneration

    from .modeling import LlavaForTrimming

    if isinstance(model, LlavaForTrimming):
        return model
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"trimkit_llava.wrap: expected a LlavaForConditionalGeneration, got {type(model).__name__}")
    return LlavaForTrimming(model, output=output, trim_layers=trim_layers, vision_trim_layers=vision_trim_layers)


def describe_llava(model: nn.Module) -> ModelSpec:
    """The :class:`~trimkit.spec.ModelSpec` of a wrapped LLaVA (see the package docstring)."""
    from .modeling import LlavaForTrimming

    if not isinstance(model, LlavaForTrimming):
        raise TypeError(f"trimkit_llava: a {type(model).__name__} cannot be traced as it is; trim "
                        "trimkit_llava.wrap(model) (same weights) instead")
    inputs = ["pixel_values", "input_ids", "attention_mask", "segment_starts"]
    if not model.vision_trim_layers:
        # the vision tower runs as one call (its ModelOutput's hidden_states are indexed after it); the
        # rotary table as LlamaRoot's
        return decoder_spec(model.config.text_config, model.trim_layers, input_names=inputs,
                            leaf_modules=["model.model.vision_tower", "model.model.language_model.rotary_emb"])
    # the tower trimmed too: its encoder layers (up to the feature layer) are stream "vision"; its first
    # patch is protected with its [CLS]: it is the LM image segment's first token, which is always kept
    vision = model.config.vision_config
    crop = int(model.crop_cls)
    attn = AttentionSpec("self_attn", "self", vision.num_attention_heads, via="kernel", q="q_proj", k="k_proj",
                         v="v_proj", out="out_proj", head_slices=True)
    chosen = set(model.vision_trim_layers)
    path = f"model.{model.tower_path}"
    tower = [LayerSpec(f"{path}.encoder.layers.{i}", "vision", site="vision", hidden="hidden_states",
                       attentions=[attn], trimmable=i in chosen) for i in range(model.vision_layers)]
    return decoder_spec(model.config.text_config, model.trim_layers, input_names=inputs,
                        leaf_modules=[f"{path}.embeddings", "model.model.language_model.rotary_emb"],
                        vision=(StreamSpec("vision", protected=crop + 1), tower, TokensFrom("vision", skip=crop)))


def decoder_spec(text_config: Any, trim_layers: Sequence[int], *, input_names: Sequence[str],
                 leaf_modules: Sequence[str], autowrap_functions: Sequence[Any] = (),
                 layers_path: str = "model.model.language_model.layers",
                 vision: tuple[StreamSpec, Sequence[LayerSpec], TokensFrom] | None = None) -> ModelSpec:
    """The description of a decoder VLM whose LM sequence is prompt / image / question (one stream
    ``seq`` of three segments with per-instance starts from the input ``segment_starts``, padding from
    ``attention_mask``; the image summarised by the mean of its kept tokens, the question by its last
    token): every decoder layer at ``layers_path.{i}`` with its ``self_attn`` at the attention kernel
    (RoPE and grouped-query heads stay the module's), token trimmers in ``trim_layers``. Shared by
    the llava and qwen2_vl adapters; ``input_names``, ``leaf_modules`` and ``autowrap_functions`` are
    the wrapper's. ``vision``: a trimmed vision tower (its stream, its layers, and where the image
    segment's tokens come from in it); ``None``: the tower is not described."""
    attn = AttentionSpec("self_attn", "self", text_config.num_attention_heads, via="kernel", q="q_proj", k="k_proj",
                         v="v_proj", out="o_proj", head_slices=True)
    chosen = set(trim_layers)
    layers = [LayerSpec(f"{layers_path}.{i}", "seq", hidden="hidden_states",
                        hidden_token_args={"position_embeddings": 1}, attentions=[attn], trimmable=i in chosen)
              for i in range(text_config.num_hidden_layers)]
    source = vision[2] if vision is not None else None
    segments = [Segment("prompt"), Segment("image", summary="mean", tokens_from=source),
                Segment("question", summary="last")]
    spec = ModelSpec(
        streams=[StreamSpec("seq", padding_input="attention_mask", segments=segments,
                            segment_starts="segment_starts")] + ([vision[0]] if vision is not None else []),
        layers=(list(vision[1]) if vision is not None else []) + layers,
        input_names=list(input_names),
        leaf_modules=list(leaf_modules),
        autowrap_functions=list(autowrap_functions),
    )
    spec.validate()
    return spec


class LlavaAdapter:
    """Describes wrapped LLaVA models (``LlavaForConditionalGeneration``); builds ``tiny``."""

    def root(self, model: nn.Module) -> nn.Module:
        """The traceable root of ``model``: :func:`wrap` with its defaults (the model itself when it is a
        wrapper already), so ``trimkit.trim`` takes the transformers model directly."""
        return wrap(model)

    def matches(self, model: nn.Module) -> bool:
        if "transformers.models.llava" not in sys.modules:  # no LLaVA model can exist yet
            return False
        from transformers import LlavaForConditionalGeneration

        from .modeling import LlavaForTrimming

        return isinstance(model, (LlavaForTrimming, LlavaForConditionalGeneration))

    def describe(self, model: nn.Module) -> ModelSpec:
        """See :func:`describe_llava`."""
        return describe_llava(model)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0,
                       prompts: Sequence[int] | None = None, questions: Sequence[int] | None = None) -> dict[str, Any]:
        """Random ``[BOS prompt][image tokens][question][right padding]`` rows: prompt (BOS included)
        and question lengths differ per instance (``prompts``/``questions`` set them), so the image
        starts elsewhere in each row and rows after the first are padded."""
        from .modeling import llava_segment_starts

        gen = torch.Generator().manual_seed(seed)
        cfg = model.config
        text, vision = cfg.text_config, cfg.vision_config
        n_image = (vision.image_size // vision.patch_size) ** 2 + (0 if model.crop_cls else 1)
        prompts = list(prompts) if prompts is not None else [2 + (3 * b) % 5 for b in range(batch_size)]
        questions = list(questions) if questions is not None else [4 - b % 3 if b else 4 for b in range(batch_size)]
        if len(prompts) != batch_size or len(questions) != batch_size:
            raise ValueError("trimkit_llava.example_inputs: one prompt and one question length per instance")
        total = [p + n_image + q for p, q in zip(prompts, questions)]
        n = max(total)
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        bos = text.bos_token_id if text.bos_token_id is not None else 1
        special = {pad, bos, cfg.image_token_id, text.eos_token_id}
        vocab = [i for i in range(min(text.vocab_size, 4096)) if i not in special]
        ids = torch.full((batch_size, n), pad, dtype=torch.long)
        mask = torch.zeros(batch_size, n, dtype=torch.long)
        for b, (p, t) in enumerate(zip(prompts, total)):
            pick = torch.randint(0, len(vocab), (t,), generator=gen)
            ids[b, :t] = torch.tensor(vocab)[pick]
            ids[b, 0] = bos
            ids[b, p:p + n_image] = cfg.image_token_id
            mask[b, :t] = 1
        param = next(model.parameters())
        size = vision.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=gen).to(param.device, param.dtype),
                "input_ids": ids.to(param.device), "attention_mask": mask.to(param.device),
                "segment_starts": llava_segment_starts(ids, cfg.image_token_id).to(param.device)}

    def dataset_overrides(self, facts) -> dict[str, Any]:
        """Build options that fit a decoder dataset (:class:`trimkit.adapter.DatasetFacts`; e.g.
        ``digit_grid_decoder``): the vision tower's ``image_size`` and ``patch_size`` (one image token
        per patch after the [CLS] crop), the text vocabulary and special ids from the tokenizer
        (``vocab_size``, ``pad_token_id``, ``bos_token_id``, ``eos_token_id``), ``image_token_id``
        (the tokenizer's ``image_token_id``) and enough positions for the longest row. A dataset
        whose tokenizer has no ``image_token_id`` is not a decoder dataset: it gets nothing from
        the tokenizer (its ids would not name an image placeholder)."""
        out: dict[str, Any] = {}
        vision: dict[str, Any] = {}
        if facts.image_size is not None:
            vision["image_size"] = int(facts.image_size)
        if facts.patch_size is not None:
            vision["patch_size"] = int(facts.patch_size)
        if vision:
            out["vision_config"] = vision
        tok = facts.tokenizer
        if tok is not None and getattr(tok, "image_token_id", None) is not None:
            text: dict[str, Any] = {"vocab_size": int(tok.vocab_size)}
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if getattr(tok, name, None) is not None:
                    text[name] = int(getattr(tok, name))
            if facts.longest_text is not None:
                text["max_position_embeddings"] = max(TINY_TEXT["max_position_embeddings"], int(facts.longest_text) + 32)
            out["text_config"] = text
            out["image_token_id"] = int(tok.image_token_id)
        return out

    def build(self, size: str = "tiny", seed: int = 0, output: str = "logits",
              trim_layers: Sequence[int] | None = None, vision_trim_layers: Sequence[int] | None = None,
              **options: Any) -> nn.Module:
        """A randomly initialised wrapped ``LlavaForConditionalGeneration`` (sdpa attention):
        ``output`` ``"logits"`` or ``"hidden"``; ``trim_layers`` the decoder layers that get
        trimmers (default: the middle half); ``vision_trim_layers`` the vision tower's layers that
        get them (default none: the tower runs whole); ``options`` override ``LlavaConfig`` fields (a dict
        for ``vision_config``/``text_config`` updates those sub-configs)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        if size != "tiny":
            raise ValueError(f"trimkit_llava.build: only size 'tiny' is built (random weights); load a "
                             f"pretrained LLaVA with from_pretrained, got {size!r}")
        options = dict(options)
        vision = CLIPVisionConfig(**{**TINY_VISION, **options.pop("vision_config", {})})
        text = LlamaConfig(**{**TINY_TEXT, **options.pop("text_config", {})})
        options.setdefault("image_token_id", IMAGE_TOKEN)
        options.setdefault("projector_hidden_act", "gelu")
        config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **options)
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return wrap(LlavaForConditionalGeneration(config).eval(), output=output, trim_layers=trim_layers,
                    vision_trim_layers=vision_trim_layers)

    def from_pretrained(self, source: str, *, revision: str | None = None, weights: str | None = None,
                        output: str = "logits", trim_layers: Sequence[int] | None = None,
                        vision_trim_layers: Sequence[int] | None = None, **options: Any) -> nn.Module:
        """A pretrained wrapped LLaVA, read offline: ``source`` is a directory written by
        ``save_pretrained`` (of a ``LlavaForConditionalGeneration`` or this wrapper's ``model``) or
        a Hugging Face model id in the local HF cache (at ``revision``); loaded with sdpa attention.
        ``output``/``trim_layers``/``vision_trim_layers`` as in :meth:`build`; other ``options`` set ``LlavaConfig`` fields
        that do not change weight shapes. ``weights`` is not used (the source holds them)."""
        from transformers import LlavaForConditionalGeneration

        from trimkit.adapter import load_transformers_pretrained, transformers_source

        if weights is not None:
            raise TypeError(f"trimkit_llava.from_pretrained({source!r}): weights={weights!r} is not used: a LLaVA "
                            "checkpoint is a directory or Hugging Face model id (source) holding its weights")
        src = transformers_source(source, revision, adapter="llava", model_types=("llava",))

        def _wrap(model: nn.Module) -> nn.Module:
            model.config._attn_implementation = "sdpa"
            for sub in (model.config.text_config, model.config.vision_config):
                sub._attn_implementation = "sdpa"
            return wrap(model, output=output, trim_layers=trim_layers, vision_trim_layers=vision_trim_layers)

        return load_transformers_pretrained(src, LlavaForConditionalGeneration, overrides=options,
                                            accepted=_OWN_OPTIONS, wrap=_wrap)
