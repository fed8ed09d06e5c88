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
batch 1 / packed), dropped heads skip their attention and, at batch 1 (mode remove), their rows of
the q/k/v projections and columns of the output projection too (``AttentionSpec.head_slices``:
1.05-1.14x faster than without at widths 256-2048, ``benchmarks/kernel_head_slices.py``).

The wrapper :class:`~trimkit_llava.modeling.LlavaForTrimming` (:func:`wrap`, same weights) names
the inputs ``(pixel_values, input_ids, attention_mask, segment_starts)`` and calls the model's own
vision tower, projector, embeddings (image features scattered at the image tokens), rotary table,
decoder layers, norm and ``lm_head``; it returns per-token logits (or hidden states, with
``output="hidden"``). In mode ``remove`` (batch 1) the rows are the kept tokens only (their
original positions: the last token record's ``index``); in ``packed`` mode ``tmodel.kept_mask("seq")``
says which rows are real; the last row of each instance is always its question's last token.

**The cross-modal signal in a decoder.** SmartTrim's token trimmer (paper Eq. 3-6) scores a token
from its own hidden state (the local term) plus a global term ``g W H'^T`` with ``g =
MLP([cls_self, cls_other])``, the two streams' [CLS]. A decoder has no text [CLS]. trimkit runs one
trimmer per segment (:class:`trimkit.segments.SegmentTokenTrimmer`): ``cls_self`` is the segment's
own summary and ``cls_other`` the **mean of the other segments' summaries**, at the trimmed layer's
input. For LLaVA that means:

* image tokens: ``cls_self`` = the mean of the kept image tokens (``summary="mean"``, declared in
  :func:`describe_llava`: image tokens have no [CLS], the CLIP [CLS] is cropped by the
  ``default`` feature strategy); ``cls_other`` = the mean of the prompt's summary (its first token,
  BOS) and the question's (its last real token);
* question tokens: ``cls_self`` = the question's last real token; ``cls_other`` = the mean of BOS and
  the image mean; prompt tokens likewise with BOS as their own summary.

Why the question's *last* token: attention is causal, so it is the only question position that has
read the whole question (and every image token): it is the decoder's analogue of the text [CLS],
and the position whose next-token logits answer. The image tokens come *before* the question, so in
a decoder their own hidden states have never seen it: the local term can only rank image tokens by
their content, and the question reaches their keep decisions only through ``cls_other``. BOS has
read nothing but itself, so its hidden state is the same for every instance: it adds a constant to
``cls_other``, whose instance-dependent part is half the question's last token. (This is the
design; whether it beats the Local policy is measured in benchmarks/results/decoder_policy.md.)
In training the answer must not be in the question segment, or its last token would be an answer
token and the image decisions would read the answer: ``digit_grid_decoder`` makes the answer the
next-token target of the question's last token instead (task ``decoder_vqa``).

Fine-tuning with SmartTrim: ``trimkit train --config examples/llava_digit_grid.yaml`` (a tiny random
LLaVA on digit-grid VQA as decoder rows; :meth:`LlavaAdapter.dataset_overrides` sizes the model from
the dataset: image and patch size, vocabulary, special ids, ``image_token_id``). Loss: the LM
cross-entropy of the answer token(s) only; self-distillation: KL(trimmed || full) of the next-token
distributions there; cost loss as for every model.

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

The CLIP vision tower is trimmed too with ``vision_trim_layers`` (``wrap``/``build``/
``from_pretrained``): its layers become stream ``vision`` and the LM's image segment starts from
its kept tokens (:class:`trimkit.TokensFrom`, :func:`trimkit.restore_tokens`); generation caches
only the tokens the tower kept and the LM layers then kept.

Left padding: :func:`generate` takes left-padded batches (transformers' batched-generation layout) and
prefills them right-aligned (:func:`right_align`: the same positions, so the same tokens); the wrapper's
own forward and :func:`prefill` take right padding only and refuse left padding by name.

Not supported yet: several images per instance or
``vision_feature_layer`` lists; beam sampling (greedy, sampled and beam-search decoding are supported); the wrapper's own forward
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
           "describe_llava", "generate", "llava_segment_starts", "prefill", "right_align", "wrap"]

_LAZY = {"LlavaForTrimming": "modeling", "llava_segment_starts": "modeling", "generate": "generation",
         "prefill": "generation", "LlavaGeneration": "generation", "KeptCache": "generation",
         "right_align": "generation"}


def __getattr__(name: str):  # modeling is imported on first use (it is cheap, but keeps the plugin minimal)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("llava", LlavaAdapter())
