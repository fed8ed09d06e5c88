"""The traceable wrapper of transformers' ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` (weights shared, not copied), its multimodal-RoPE positions
module and :func:`qwen2_vl_segment_starts`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trimkit.refs import Borrowed, borrowed

from trimkit_llava.modeling import default_trim_layers, llava_segment_starts

__all__ = ["MRopePositions", "Qwen2VLForTrimming", "batch_pixel_values", "flat_pixel_values",
           "qwen2_vl_segment_starts"]


def qwen2_vl_segment_starts(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``(B, 3)`` long tensor ``[0, image start, image end]`` per instance: where the segments
    ``prompt`` (up to and including ``<|vision_start|>``), ``image`` (the ``<|image_pad|>`` run, one
    placeholder per merged image token, as Qwen2-VL's processor expands it) and ``question``
    (``<|vision_end|>`` onwards) start in each row. One image per instance, one contiguous run of
    placeholders, at least one token before it."""
    return llava_segment_starts(input_ids, image_token_id, caller="qwen2_vl_segment_starts")


def flat_pixel_values(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision tower's input ``(total patches, C*T*P*P)``: ``pixel_values`` as Qwen2-VL's image
    processor returns it (already flat) is returned as it is; the wrapper's batched form
    ``(B, patches, C*T*P*P)`` (instance ``b``'s first ``prod(image_grid_thw[b])`` rows, zero padding
    after them) is flattened instance by instance. Listed in the description's ``autowrap_functions``:
    it runs for real at each call."""
    if pixel_values.dim() == 2:
        return pixel_values
    if pixel_values.dim() != 3:
        raise ValueError(f"trimkit_qwen2_vl: pixel_values must be (patches, dim) as the image processor returns it or "
                         f"(batch, patches, dim), got {tuple(pixel_values.shape)}")
    if image_grid_thw.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"trimkit_qwen2_vl: {image_grid_thw.shape[0]} image grids for {pixel_values.shape[0]} rows of "
                         "pixel_values (one image per instance)")
    counts = image_grid_thw.prod(-1)
    if bool((counts > pixel_values.shape[1]).any()):
        raise ValueError(f"trimkit_qwen2_vl: image_grid_thw asks for {counts.tolist()} patches but pixel_values holds "
                         f"{pixel_values.shape[1]} per instance")
    real = torch.arange(pixel_values.shape[1], device=pixel_values.device)[None] < counts.to(pixel_values.device)[:, None]
    return pixel_values[real]


def batch_pixel_values(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`flat_pixel_values`: the processor's ``(total patches, dim)`` (one image per
    instance, in order) as ``(B, max patches, dim)``, zero padded; what the per-instance paths
    (slicing a batch, generation) need."""
    counts = image_grid_thw.prod(-1).tolist()
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(f"trimkit_qwen2_vl.batch_pixel_values: image_grid_thw covers {sum(counts)} patches, "
                         f"pixel_values has {pixel_values.shape[0]}")
    out = pixel_values.new_zeros(len(counts), max(counts), pixel_values.shape[-1])
    for b, rows in enumerate(torch.split(pixel_values, counts)):
        out[b, :rows.shape[0]] = rows
    return out


class MRopePositions(nn.Module):
    """``(input_ids, image_grid_thw, attention_mask) -> (3, B, N)`` multimodal-RoPE position ids, from
    the model's own ``get_rope_index`` on the full sequence (a leaf: it runs for real, once, before any
    token is dropped, so kept tokens keep their original rotary positions). It also refuses what the
    wrapper cannot run: left padding, videos, one image grid per instance missing."""

    _owner = borrowed("owner", "The Qwen2VLModel whose get_rope_index runs (registered in the wrapper).")

    def __init__(self, owner: nn.Module, image_token_id: int, video_token_id: int | None) -> None:
        super().__init__()
        self._borrowed = Borrowed(owner=owner)  # the Qwen2VLModel, registered in the wrapper
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id

    def forward(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N = input_ids.shape
        if image_grid_thw is None or image_grid_thw.shape[0] != B:
            got = "none" if image_grid_thw is None else image_grid_thw.shape[0]
            raise ValueError(f"trimkit_qwen2_vl: image_grid_thw must hold one (t, h, w) row per instance ({B}), got "
                             f"{got} (one image per instance is supported)")
        if self.video_token_id is not None and bool((input_ids == self.video_token_id).any()):
            raise NotImplementedError("trimkit_qwen2_vl: video tokens are not supported (images only)")
        if attention_mask is not None:
            real = attention_mask != 0
            prefix = torch.arange(N, device=real.device)[None] < real.sum(1, keepdim=True)
            bad = (real != prefix).any(1)
            if bool(bad.any()):
                raise ValueError(f"trimkit_qwen2_vl: rows {torch.nonzero(bad).flatten().tolist()} of attention_mask "
                                 "are not right-padded (a 0 before a 1): left padding is not supported; pad on the "
                                 "right (processor.tokenizer.padding_side = 'right')")
        types = (input_ids == self.image_token_id).int()
        positions, _ = self._owner.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw,
                                                  attention_mask=attention_mask)
        return positions

    def deltas(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` rope deltas: a new token ``t`` after ``n`` real prompt tokens is at position ``n + t + delta``."""
        types = (input_ids == self.image_token_id).int()
        _, deltas = self._owner.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw,
                                               attention_mask=attention_mask)
        return deltas.reshape(-1)


class Qwen2VLForTrimming(nn.Module):
    """``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL's) as one traceable prefill forward
    ``(pixel_values, input_ids, image_grid_thw, attention_mask=None, segment_starts=None)`` -> logits
    ``(B, N, V)`` (``output="logits"``) or the final-norm hidden states ``(B, N, D)`` (``"hidden"``).

    It runs the model's own modules: the vision tower (one call, with ``image_grid_thw``; its merged
    ``pooler_output`` is what ``get_image_features`` returns), the image features scattered into the
    token embeddings at the image placeholders (``masked_scatter``, as the model does), the 3-D
    position ids of the model's ``get_rope_index`` (:class:`MRopePositions`), the language model's
    rotary table on them, its decoder layers (causal, through transformers' ``AttentionInterface``),
    final norm and ``lm_head``.

    ``pixel_values``: ``(B, patches, dim)`` (instance ``b``'s first ``prod(image_grid_thw[b])`` rows
    real) or the processor's flat ``(total patches, dim)``; ``image_grid_thw`` ``(B, 3)``, one image
    per instance. ``attention_mask`` (read by the positions and by trimkit as padding) must be right
    padding. ``segment_starts``: :func:`qwen2_vl_segment_starts`, read by trimkit only.
    """

    def __init__(self, model: nn.Module, output: str = "logits", trim_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        if output not in ("logits", "hidden"):
            raise ValueError(f"trimkit_qwen2_vl: output must be 'logits' or 'hidden', got {output!r}")
        cfg = model.config
        text = cfg.text_config
        if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
            raise NotImplementedError("trimkit_qwen2_vl: sliding-window decoder layers (use_sliding_window=True) are "
                                      "not supported; the wrapper runs every layer with full causal attention")
        self.model = model
        self.output = output
        n = text.num_hidden_layers
        self.trim_layers = sorted(set(default_trim_layers(n) if trim_layers is None else (int(i) % n for i in trim_layers)))
        self.image_token_id = int(cfg.image_token_id)
        video = getattr(cfg, "video_token_id", None)
        self.positions = MRopePositions(model.model, self.image_token_id, None if video is None else int(video))

    @property
    def config(self):
        return self.model.config

    def decode_position_offsets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                                inputs: dict) -> torch.Tensor:
        """Per instance its M-RoPE delta (``trimkit_llava.generation``'s decode positions: the new token
        ``t`` after ``n`` real prompt tokens is at ``n + t + delta``, as transformers' ``rope_deltas``)."""
        if "image_grid_thw" not in inputs:
            raise ValueError("trimkit_qwen2_vl.generate: image_grid_thw is needed (one (t, h, w) row per instance)")
        return self.positions.deltas(input_ids, inputs["image_grid_thw"], attention_mask)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, image_grid_thw: torch.Tensor,
                attention_mask: torch.Tensor | None = None, segment_starts: torch.Tensor | None = None) -> torch.Tensor:
        qwen = self.model.model
        lm = qwen.language_model
        visual = qwen.visual
        patches = flat_pixel_values(pixel_values, image_grid_thw)
        features = visual(patches.to(visual.dtype), grid_thw=image_grid_thw).pooler_output
        h = lm.embed_tokens(input_ids)
        is_image = (input_ids == self.image_token_id)[..., None].expand_as(h)
        h = h.masked_scatter(is_image, features.to(h.dtype))
        pe = lm.rotary_emb(h, self.positions(input_ids, image_grid_thw, attention_mask))
        for layer in lm.layers:
            h = layer(h, position_embeddings=pe)
        h = lm.norm(h)
        if self.output == "hidden":
            return h
        return self.model.lm_head(h)
