"""trimkit adapter ``qwen2_vl``: transformers' ``Qwen2VLForConditionalGeneration`` (Qwen2-VL) and
``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL): a vision tower whose merged patch features
replace the ``<|image_pad|>`` placeholders, and a Qwen2 decoder with multimodal RoPE. Trimmed
prefill, and greedy generation whose KV cache holds only the kept tokens (``trimkit_llava``'s,
shared).

How trimkit sees it (as ``llava``): the decoder's sequence is one stream ``seq`` laid out as
``[prompt ... <|vision_start|>][<|image_pad|> x n][<|vision_end|> question][right padding]``, three
segments whose bounds differ per instance (``StreamSpec(segment_starts="segment_starts")``, an input
made by :func:`qwen2_vl_segment_starts`): ``prompt`` (summary: its first token), ``image`` (summary:
the mean of its kept tokens) and ``question`` (summary: its last real token; always kept, so the
next-token logits are there in every mode). Padding is ``attention_mask``, on the right only in the
wrapper's forward (left padding is refused by name; :func:`generate` right-aligns a left-padded batch). Token and head trimmers sit in the decoder layers ``trim_layers`` (a
build / from_pretrained / :func:`wrap` option; default: the middle half); the others are rewritten
so the kept-token state reaches them. Attention is trimmed at the kernel (transformers'
``AttentionInterface``): the model's RoPE, grouped-query heads and causal masking run unchanged.

Multimodal RoPE: image tokens get (temporal, height, width) positions and the text after an image
continues from the image's largest one, so positions are not token indices. The wrapper computes the
``(3, B, N)`` position ids once, on the full sequence, with the model's own ``get_rope_index``
(:class:`~trimkit_qwen2_vl.modeling.MRopePositions`, a leaf), then the rotary table; the table is a
token argument of every layer, so each kept token keeps its original rotary position (removed,
packed or masked). With nothing trimmed the logits are the HF model's own.

The wrapper :class:`~trimkit_qwen2_vl.modeling.Qwen2VLForTrimming` (:func:`wrap`, same weights)
takes ``(pixel_values, input_ids, image_grid_thw, attention_mask, segment_starts)``:
``pixel_values`` batched ``(B, patches, dim)`` (instance ``b``'s first ``prod(image_grid_thw[b])``
rows; :func:`batch_pixel_values` makes it from the processor's output) or the processor's flat
``(total patches, dim)``; ``image_grid_thw`` ``(B, 3)``, one image per instance. It returns per-token
logits (or hidden states, ``output="hidden"``), with the same row conventions as ``llava``'s.

>>> import trimkit, trimkit_qwen2_vl
>>> model = trimkit.adapter.load_pretrained("qwen2_vl", "Qwen/Qwen2.5-VL-3B-Instruct")  # offline: a local copy
>>> tmodel = trimkit.trim(model, trimkit.TrimConfig(token_target={"image": 0.3, "prompt": 0.8, "question": 0.8}))
>>> starts = trimkit_qwen2_vl.qwen2_vl_segment_starts(ids, model.config.image_token_id)
>>> logits = tmodel(pixel_values=pv, input_ids=ids, image_grid_thw=grid, attention_mask=mask, segment_starts=starts)
>>> out = trimkit_qwen2_vl.generate(tmodel.eval(), ids, pv, grid, mask, max_new_tokens=32)

Generation (:mod:`trimkit_qwen2_vl.generation`) is ``trimkit_llava.generation``'s: ``image_grid_thw``
goes in as a per-instance input and each instance's decode positions are offset by its M-RoPE delta
(new token ``t`` after ``n`` real prompt tokens is at ``n + t + delta``, transformers'
``rope_deltas``; the wrapper's ``decode_position_offsets``). Fresh (keep-all) trimmers give
transformers' own ``generate(do_sample=False)``.

``from_pretrained`` (:meth:`Qwen2VLAdapter.from_pretrained`) reads a ``save_pretrained`` directory or
a model id in the local HF cache, nothing downloaded; ``config.json``'s ``model_type`` (``qwen2_vl``
or ``qwen2_5_vl``) picks the class. ``build("tiny", variant="qwen2_vl" | "qwen2_5_vl")`` makes a
random one.

Trimming the vision tower too: ``vision_trim_layers=[...]`` (a build / from_pretrained /
:func:`wrap` option) runs the tower batched, block by block, as stream ``vision``
(:class:`~trimkit_qwen2_vl.modeling.VisionLayout`, :class:`~trimkit_qwen2_vl.modeling.TowerBlock`:
the tower's own modules, borrowed), padded to the largest image of the batch. Its merger makes one LM
token of each 2x2 patch group, so the stream drops patches in whole groups
(``StreamSpec(group=4)``) and the LM's image segment takes one token per group
(:class:`trimkit.TokensFrom`); a group the tower dropped is never computed by the LM. Qwen2.5-VL's
windowed blocks attend within each window by a mask over the processor's patch order (its tower's
reorder-attend-restore, computed the same), which mode packed refuses by name (key-padding biases only).

Not supported yet: videos (refused), several images per instance, mode packed with Qwen2.5-VL's tower
trimmed (refused), sliding-window decoder layers (refused), left padding in
the wrapper's forward (refused by name; :func:`generate` right-aligns a left-padded batch),
beam sampling (greedy, sampled and beam-search decoding are supported), a cache in the wrapper's own forward.
"""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .adapter import TINY_TEXT, TINY_VISION, TINY_VISION_2_5, Qwen2VLAdapter, describe_qwen2_vl, wrap

__all__ = ["TINY_TEXT", "TINY_VISION", "TINY_VISION_2_5", "MRopePositions", "Qwen2VLAdapter", "Qwen2VLForTrimming",
           "batch_pixel_values", "describe_qwen2_vl", "flat_pixel_values", "generate", "prefill", "qwen2_vl_segment_starts",
           "wrap"]

_LAZY = {"Qwen2VLForTrimming": "modeling", "MRopePositions": "modeling", "batch_pixel_values": "modeling",
         "flat_pixel_values": "modeling", "qwen2_vl_segment_starts": "modeling", "generate": "generation",
         "prefill": "generation"}


def __getattr__(name: str):  # modeling is imported on first use (keeps the plugin minimal)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("qwen2_vl", Qwen2VLAdapter())
