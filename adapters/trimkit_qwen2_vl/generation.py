"""Greedy generation for a trimmed Qwen2-VL / Qwen2.5-VL with a KV cache that holds only the kept
tokens: ``trimkit_llava.generation``'s, shared (prefill trimmed per instance or packed, each decoder
layer's own attention filling a ``DynamicCache`` with the keys of the tokens it computed, decode
untrimmed on that cache). What differs is passed to it: ``image_grid_thw`` as a per-instance input,
and the decode positions: new token ``t`` of an instance with ``n`` real prompt tokens is at M-RoPE
position ``n + t + delta`` (the model's ``rope_deltas`` from ``get_rope_index``, all three sections
equal for text), not ``n + t`` nor the kept count."""

from __future__ import annotations

import torch
from torch import nn

from trimkit_llava.generation import KeptCache, LlavaGeneration, decode_step
from trimkit_llava.generation import generate as _generate
from trimkit_llava.generation import prefill as _prefill

from .modeling import batch_pixel_values

__all__ = ["KeptCache", "LlavaGeneration", "decode_step", "generate", "prefill"]


def _batched(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    return batch_pixel_values(pixel_values, image_grid_thw) if pixel_values.dim() == 2 else pixel_values


def prefill(tmodel: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
            attention_mask: torch.Tensor | None = None, mode: str = "remove") -> tuple[torch.Tensor, KeptCache]:
    """``trimkit_llava.prefill`` for Qwen2-VL: ``(next-token logits (B, V), KeptCache)`` whose
    ``offsets`` are the instances' M-RoPE deltas. ``pixel_values`` batched ``(B, patches, dim)`` or the
    processor's flat ``(total patches, dim)``; ``image_grid_thw`` ``(B, 3)``; right padding only."""
    return _prefill(tmodel, input_ids, _batched(pixel_values, image_grid_thw), attention_mask, mode,
                    inputs={"image_grid_thw": image_grid_thw})


def generate(tmodel: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20, **options) -> LlavaGeneration:
    """Greedy or sampled generation from ``trimkit.trim(trimkit_qwen2_vl.wrap(model), config)`` (eval
    mode) whose KV cache holds only the kept tokens; ``options`` as ``trimkit_llava.generate``'s
    (``mode``, ``eos_token_id``, ``pad_token_id``, ``return_logits``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``generator``, ``num_beams``, ``length_penalty``, ``early_stopping``); a
    left-padded batch is right-aligned. Every fresh (keep-all) trimmer gives transformers' own
    ``generate(do_sample=False)`` (and ``generate(num_beams=k)`` with ``num_beams=k``)."""
    return _generate(tmodel, input_ids, _batched(pixel_values, image_grid_thw), attention_mask, max_new_tokens,
                     inputs={"image_grid_thw": image_grid_thw}, **options)
