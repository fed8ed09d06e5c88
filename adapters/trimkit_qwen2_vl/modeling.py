"""The traceable wrapper of transformers' ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` (weights shared, not copied), its multimodal-RoPE positions
module and :func:`qwen2_vl_segment_starts`."""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trimkit.entry import restore_tokens
from trimkit.refs import Borrowed, borrowed

from trimkit_llava.modeling import default_trim_layers, llava_segment_starts

__all__ = ["MRopePositions", "Qwen2VLForTrimming", "TowerAttention", "TowerBlock", "VisionLayout",
           "batch_pixel_values", "flat_pixel_values", "qwen2_vl_segment_starts"]


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


class VisionLayout(nn.Module):
    """The vision tower's input as a batched stream (a leaf: its grid arithmetic runs for real):
    ``(pixel_values, image_grid_thw) -> (hidden (B, N, D), cos (B, N, d), sin (B, N, d), bias
    (B, 1, 1, N), real (B, N), window (B, N))``, N the largest image's patch count. The tower's own
    patch embedding and rotary table run on its flat ``(total patches, ...)`` sequence (the
    processor's patch order: each ``merge x merge`` group of patches consecutive) and are laid out per
    instance, zero padded; ``bias`` is the additive key mask of the padding, ``real`` 1 for each
    instance's patches. ``window``: each patch's attention window in Qwen2.5-VL's windowed blocks
    (the tower's own ``get_vision_window_index``; ids unique over the batch, -1 on padding), all 0 for
    Qwen2-VL. The patches stay in the processor's order: Qwen2.5-VL's tower reorders them by window
    before its blocks and back after its merger, which attention restricted to each window by a mask
    (:class:`TowerAttention`) does not need."""

    _visual = borrowed("visual", "The vision tower (registered in the wrapper's model).")

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self._borrowed = Borrowed(visual=visual)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        from transformers.vision_utils import get_vision_position_ids

        visual = self._visual
        patches = flat_pixel_values(pixel_values, image_grid_thw)
        flat = visual.patch_embed(patches.to(visual.patch_embed.proj.weight.dtype))
        cos, sin = visual.rotary_pos_emb(flat, get_vision_position_ids(image_grid_thw, visual.spatial_merge_size))
        counts = image_grid_thw.prod(-1).to(flat.device)
        n = int(counts.max())
        real = torch.arange(n, device=flat.device)[None] < counts[:, None]

        def batched(x: torch.Tensor, fill: float = 0) -> torch.Tensor:
            out = x.new_full((real.shape[0], n, *x.shape[1:]), fill)
            out[real] = x
            return out

        bias = torch.zeros(real.shape[0], 1, 1, n, dtype=flat.dtype, device=flat.device)
        bias = bias.masked_fill(~real[:, None, None, :], torch.finfo(flat.dtype).min)
        window = batched(self._windows(image_grid_thw, flat.shape[0]).to(flat.device), -1)
        return batched(flat), batched(cos), batched(sin), bias, real.long(), window

    def _windows(self, grid_thw: torch.Tensor, total: int) -> torch.Tensor:
        """``(total patches,)`` each patch's window, in the processor's patch order."""
        visual = self._visual
        if not hasattr(visual, "fullatt_block_indexes"):  # Qwen2-VL: every block attends over the whole image
            return torch.zeros(total, dtype=torch.long)
        from transformers.vision_utils import get_vision_window_index

        unit = int(visual.spatial_merge_size) ** 2
        order, cu = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=visual.spatial_merge_size,
                                            window_size=visual.window_size, patch_size=visual.patch_size)
        # order[k]: the merge group at slot k of the window-ordered sequence; cu: window bounds over its patches
        slot_window = torch.searchsorted(cu.long(), torch.arange(order.numel()) * unit, right=True) - 1
        group_window = torch.empty(order.numel(), dtype=torch.long)
        group_window[order] = slot_window
        return group_window.repeat_interleave(unit)


class TowerAttention(nn.Module):
    """Qwen2-VL's ``VisionAttention`` on a batched stream: ``(x (B, N, D), cos, sin (B, N, d), bias
    (B, 1, 1, N)) -> (B, N, D)``. Its own ``qkv`` and ``proj`` and the model's own rotary function;
    one ``F.scaled_dot_product_attention`` over each instance's patches (the module's flat form splits
    the images by ``cu_seqlens`` on the host, which a batched stream does not need). No parameters of
    its own: the module is borrowed."""

    attention = borrowed("attention", "The tower block's VisionAttention (registered in the wrapper's model).")

    def __init__(self, attention: nn.Module, windowed: bool = False) -> None:
        super().__init__()
        self._borrowed = Borrowed(attention=attention)
        self.num_heads = int(attention.num_heads)
        self.scaling = float(attention.scaling)
        self.windowed = windowed  # Qwen2.5-VL's window blocks: each patch attends within its window only
        self.rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                window: torch.Tensor) -> torch.Tensor:
        B, N = x.shape[0], x.shape[1]
        qkv = self.attention.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 1, 3, 4)
        q, k, v = qkv.unbind(0)  # (B, N, H, d)
        q, k = self.rotary(q, k, cos, sin)
        if self.windowed:  # (B, 1, N, N): the padding bias within each window, blocked across windows
            bias = torch.where(window[:, None, :, None] == window[:, None, None, :], bias, float("-inf"))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                                           scale=self.scaling)
        return self.attention.proj(y.transpose(1, 2).reshape(B, N, -1))


class TowerBlock(nn.Module):
    """A Qwen2-VL vision block on a batched stream, ``(hidden (B, N, D), cos, sin, bias) -> (B, N, D)``:
    the block's own norms and MLP around :class:`TowerAttention`, as the block's forward composes them.
    Borrows the block (its weights stay the model's, listed once)."""

    block = borrowed("block", "The tower's Qwen2VLVisionBlock (registered in the wrapper's model).")

    def __init__(self, block: nn.Module, windowed: bool = False) -> None:
        super().__init__()
        self._borrowed = Borrowed(block=block)
        self.attn = TowerAttention(block.attn, windowed)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                window: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.block.norm1(hidden_states), cos, sin, bias, window)
        return hidden_states + self.block.mlp(self.block.norm2(hidden_states))


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

    ``vision_trim_layers``: the vision tower's blocks that get token and head trimmers (default none, and the tower runs as one call). With any, the tower runs batched, block by block
    (:class:`VisionLayout`, :class:`TowerBlock`, the tower's own modules borrowed), as trimkit's stream
    ``vision``, padded to the batch's largest image; its own merger then makes one LM token of each
    ``spatial_merge_size ** 2`` consecutive patches, which the stream keeps or drops whole
    (``StreamSpec.group``), and :func:`trimkit.restore_tokens` puts the merged tokens of the kept
    groups back at their placeholders in modes remove/packed.
    """

    def __init__(self, model: nn.Module, output: str = "logits", trim_layers: Sequence[int] | None = None,
                 vision_trim_layers: Sequence[int] | None = None) -> None:
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
        visual = model.model.visual
        depth = len(visual.blocks)
        chosen = sorted(set(int(i) for i in (vision_trim_layers or ())))
        bad = [i for i in chosen if not 0 <= i < depth]
        if bad:
            raise ValueError(f"trimkit_qwen2_vl: vision_trim_layers {bad} are not blocks of the vision tower (0.."
                             f"{depth - 1})")
        self.vision_trim_layers = chosen
        self.merge = int(visual.spatial_merge_size) ** 2  # patches per LM image token
        if chosen:  # the tower run block by block on a batched stream (trimkit trims it as stream "vision")
            self.vision_layout = VisionLayout(visual)
            full = set(getattr(visual, "fullatt_block_indexes", range(depth)))  # Qwen2.5-VL: the others windowed
            self.vision_blocks = nn.ModuleList(TowerBlock(b, windowed=i not in full) for i, b in enumerate(visual.blocks))

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
        if self.vision_trim_layers:
            features = self._tower(pixel_values, image_grid_thw)
        else:
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

    def _tower(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The vision tower block by block on the batched stream (:class:`VisionLayout`), then its own
        merger per instance (each ``merge`` consecutive patches one token); the kept tokens back at their
        places (:func:`trimkit.restore_tokens`) and every instance's image tokens in order, flat, as the
        tower's ``pooler_output`` is."""
        visual = self.model.model.visual
        h, cos, sin, bias, real, window = self.vision_layout(pixel_values, image_grid_thw)
        for block in self.vision_blocks:
            h = block(h, cos, sin, bias, window)
        merged = visual.merger(h)  # (B * n / merge, D'): the merger flattens the batch
        merged = merged.view(h.shape[0], -1, merged.shape[-1])
        merged = restore_tokens(merged, "vision", 0)
        return merged[real[:, ::self.merge] != 0]
