"""trimkit adapter ``llava``: transformers' ``LlavaForConditionalGeneration`` (a CLIP vision tower,
a projector and a Llama-style decoder): trimmed prefill, and greedy generation whose KV cache holds
only the kept tokens.

How trimkit sees it: the decoder's sequence is one stream ``seq`` laid out as LLaVA's
``[prompt][image tokens][question][right padding]``, three segments whose bounds differ per
instance (``StreamSpec(segment_starts="segment_starts")``, an input made by
:func:`llava_segment_starts`): ``prompt`` (summary: its first token, BOS), ``image`` (summary: the
mean of its kept tokens) and ``question`` (summary: its last real token, which has read the whole
prompt; always kept, so the next-token logits are there in every mode). Padding is
``attention_mask``. Token and head trimmers sit in the decoder layers ``trim_layers`` (a build /
from_pretrained / :func:`wrap` option; default: the middle half of the layers); the others are
rewritten so the kept-token state reaches them, without trimmers. Attention is trimmed at the
kernel (``via="kernel"``, transformers' ``AttentionInterface``): the model's own RoPE, grouped-query
heads and causal masking run unchanged; dropped tokens are masked out of the keys (or removed at
batch 1 / packed), dropped heads skip their attention but not their q/k/v projections.

The wrapper :class:`~trimkit_llava.modeling.LlavaForTrimming` (:func:`wrap`, same weights) names
the inputs ``(pixel_values, input_ids, attention_mask, segment_starts)`` and calls the model's own
vision tower, projector, embeddings (image features scattered at the image tokens), rotary table,
decoder layers, norm and ``lm_head``; it returns per-token logits (or hidden states, with
``output="hidden"``). In mode ``remove`` (batch 1) the rows are the kept tokens only (their
original positions: the last token record's ``index``); in ``packed`` mode ``tmodel.kept_mask("seq")``
says which rows are real; the last row of each instance is always its question's last token.

Generation (:func:`trimkit_llava.generate`, in :mod:`trimkit_llava.generation`): greedy decoding
with a KV cache that holds only what each decoder layer computed. The prefill runs trimmed (mode
``remove``: each instance alone at batch 1; ``mode="packed"``: the whole batch in one packed
forward) while every decoder layer's own attention module fills a transformers ``DynamicCache``
(its ``cache`` argument set by a forward pre-hook): keys after RoPE, of the tokens that layer
kept, at their original positions, so layer ``i``'s cache is as long as the tokens kept at its
input. Decode steps then run the model's own decoder layers untrimmed on that cache: new token
``t`` of an instance with ``n`` real prompt tokens is at RoPE position ``n + t`` (not the kept
count), and in a batch each layer's cache rows are padded to the longest instance and masked per
instance. Every fresh (keep-all) trimmer gives transformers' own ``generate(do_sample=False)``.

>>> out = trimkit_llava.generate(tmodel, input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=32)
>>> out.tokens            # (B, T) new token ids; pad_token_id after an instance's EOS
>>> out.cache_lengths     # per instance, per decoder layer: keys cached (the tokens that layer computed)
>>> out.sequences(ids)    # per instance: its prompt and its generated tokens up to its EOS

``mode="hard"`` runs the same prefill masked (full-length cache, each layer's dropped keys masked:
the reference) and ``mode="off"`` untrimmed; ``trimkit_llava.prefill`` and
``trimkit_llava.generation.decode_step`` are the two halves. Decoding is untrimmed (new tokens use
every head and are never dropped); the prompt's dropped heads still cached their keys (the
projections ran), and decode tokens read them.

Not trimmed yet: the CLIP vision tower (it runs whole, as one call); left padding (pad on the
right; :func:`generate` refuses left-padded masks by name); several images per instance or
``vision_feature_layer`` lists; sampling or beam search (greedy only); the wrapper's own forward
takes no cache (``use_cache`` is not supported there; :func:`generate` is the way to decode).

>>> import trimkit
>>> from trimkit_llava import llava_segment_starts, wrap
>>> tmodel = trimkit.trim(wrap(LlavaForConditionalGeneration.from_pretrained(...)),
...                       trimkit.TrimConfig(token_target={"image": 0.3, "prompt": 0.8, "question": 0.8}))
>>> logits = tmodel(pixel_values=pv, input_ids=ids, attention_mask=mask,
...                 segment_starts=llava_segment_starts(ids, model.config.image_token_id))

Pretrained, offline and already wrapped: ``trimkit.adapter.load_pretrained("llava", "llava-hf/llava-1.5-7b-hf")``
(a local directory, or a model id in the local HF cache; see :meth:`LlavaAdapter.from_pretrained`).
"""

from __future__ import annotations

from trimkit.plugins import hookimpl

from .adapter import TINY_TEXT, TINY_VISION, LlavaAdapter, describe_llava, wrap

__all__ = ["TINY_TEXT", "TINY_VISION", "KeptCache", "LlavaAdapter", "LlavaForTrimming", "LlavaGeneration",
           "describe_llava", "generate", "llava_segment_starts", "prefill", "wrap"]

_LAZY = {"LlavaForTrimming": "modeling", "llava_segment_starts": "modeling", "generate": "generation",
         "prefill": "generation", "LlavaGeneration": "generation", "KeptCache": "generation"}


def __getattr__(name: str):  # modeling is imported on first use (it is cheap, but keeps the plugin minimal)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("llava", LlavaAdapter())
