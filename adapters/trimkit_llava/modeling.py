"""The traceable wrapper of transformers' ``LlavaForConditionalGeneration`` (weights shared, not
copied) and :func:`llava_segment_starts`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trimkit.entry import restore_tokens

__all__ = ["LlavaForTrimming", "default_trim_layers", "llava_segment_starts"]


def llava_segment_starts(input_ids: torch.Tensor, image_token_id: int, *,
                         caller: str = "llava_segment_starts") -> torch.Tensor:
    """``(B, 3)`` long tensor ``[0, image start, image end]`` per instance: where the segments
    ``prompt`` / ``image`` / ``question`` start in each row of ``input_ids`` (the image placeholders
    are ``image_token_id``, one per image token, as LLaVA's processor expands ``<image>``). Each row
    must hold one contiguous run of at least one placeholder; an empty prompt is refused by trimkit
    (a segment starts with a token), so keep the BOS token before the image. ``caller`` names the
    function in error messages (``trimkit_qwen2_vl`` shares this one)."""
    is_image = input_ids == image_token_id
    count = is_image.sum(1)
    if bool((count == 0).any()):
        raise ValueError(f"{caller}: rows {torch.nonzero(count == 0).flatten().tolist()} hold no image "
                         f"token (id {image_token_id})")
    first = is_image.int().argmax(1)
    end = first + count
    span = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    inside = (span >= first[:, None]) & (span < end[:, None])
    if not torch.equal(inside, is_image):
        raise ValueError(f"{caller}: a row's image tokens are not one contiguous run (one image per "
                         "instance is supported)")
    return torch.stack([torch.zeros_like(first), first, end], 1).long()


def default_trim_layers(num_layers: int) -> list[int]:
    """The middle half of the decoder layers (``[n//4, n - n//4)``; every layer when ``n < 4``)."""
    lo = num_layers // 4
    return list(range(lo, num_layers - lo))


class LlavaForTrimming(nn.Module):
    """``LlavaForConditionalGeneration`` as one traceable prefill forward
    ``(pixel_values, input_ids, attention_mask=None, segment_starts=None)`` -> logits ``(B, N, V)``
    (``output="logits"``) or the final-norm hidden states ``(B, N, D)`` (``output="hidden"``).

    It runs the model's own modules: the vision tower (one call; the feature layer and the
    ``default`` strategy's [CLS] crop as ``LlavaModel.get_image_features`` selects them) and the
    projector, scatters the image features into the text embeddings at the image-token positions
    (``masked_scatter``, as LLaVA does), then the language model's rotary table, decoder layers
    (causal, through transformers' ``AttentionInterface``), final norm and ``lm_head``.

    ``attention_mask`` and ``segment_starts`` are read by trimkit (padding, segment bounds), not
    here: padding must be on the right (``padding_side="right"``), where causal attention already
    keeps real tokens from reading it, so the outputs at real positions are the model's own. Rows
    of left padding would be wrong. ``trim_layers``: indices of the decoder layers that get
    trimmers (default :func:`default_trim_layers`); the others are only rewritten.

    ``vision_trim_layers``: indices of the vision tower's encoder layers that get token and head
    trimmers (default: none, and the tower runs as one call). With any, the wrapper runs the tower's
    own modules one by one (embeddings, pre-norm, encoder layers up to ``vision_feature_layer``; the
    layers after it, whose output LLaVA never reads, are not run) so trimkit can trim them as stream
    ``vision``; the LM's image segment then starts from the tower's kept tokens
    (:class:`trimkit.TokensFrom`), and in modes remove/packed :func:`trimkit.restore_tokens` puts the
    projected kept tokens back at their placeholders.
    """

    def __init__(self, model: nn.Module, output: str = "logits", trim_layers: Sequence[int] | None = None,
                 vision_trim_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        if output not in ("logits", "hidden"):
            raise ValueError(f"trimkit_llava: output must be 'logits' or 'hidden', got {output!r}")
        cfg = model.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise NotImplementedError("trimkit_llava: vision_feature_layer must be one int (a list of layers is "
                                      "not supported yet)")
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"trimkit_llava: unknown vision_feature_select_strategy "
                             f"{cfg.vision_feature_select_strategy!r}")
        self.model = model
        self.output = output
        n = cfg.text_config.num_hidden_layers
        self.trim_layers = sorted(set(default_trim_layers(n) if trim_layers is None else (int(i) % n for i in trim_layers)))
        self.feature_layer = layer
        self.crop_cls = cfg.vision_feature_select_strategy == "default"
        self.image_token_id = cfg.image_token_id
        depth = cfg.vision_config.num_hidden_layers
        if not -(depth + 1) <= layer <= depth:
            raise ValueError(f"trimkit_llava: vision_feature_layer {layer} is outside the tower's hidden states "
                             f"(0..{depth}, or negative from the end)")
        self.vision_layers = layer % (depth + 1)  # hidden_states[i] is the output of the first i encoder layers
        chosen = sorted(set(int(i) for i in (vision_trim_layers or ())))
        late = [i for i in chosen if not 0 <= i < self.vision_layers]
        if late:
            raise ValueError(f"trimkit_llava: vision_trim_layers {late} are not run: LLaVA reads the tower's hidden "
                             f"states after {self.vision_layers} of its {depth} layers (vision_feature_layer {layer}); "
                             f"choose among 0..{self.vision_layers - 1}")
        self.vision_trim_layers = chosen
        self.tower_path = "model.vision_tower"
        if chosen and hasattr(model.model.vision_tower, "vision_model"):
            import transformers

            raise NotImplementedError(
                f"trimkit_llava: vision_trim_layers needs transformers >= 5 (installed {transformers.__version__}): "
                "its CLIP encoder layers are called as block(hidden, mask) there; the 4.x layers take a causal mask "
                "and return tuples")

    @property
    def config(self):
        return self.model.config

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                segment_starts: torch.Tensor | None = None) -> torch.Tensor:
        llava = self.model.model
        lm = llava.language_model
        pixels = pixel_values.to(llava.multi_modal_projector.linear_1.weight.dtype)
        if self.vision_trim_layers:  # the tower's modules one by one, as its own forward runs them
            tower = self.model.get_submodule(self.tower_path)
            features = tower.pre_layrnorm(tower.embeddings(pixels))
            for block in tower.encoder.layers[:self.vision_layers]:
                features = block(features, None)
        else:
            features = llava.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states[
                self.feature_layer]
        if self.crop_cls:
            features = features[:, 1:]
        features = llava.multi_modal_projector(features)
        if self.vision_trim_layers:  # the kept tokens back at their places (the tower's drops start dropped in the LM)
            features = restore_tokens(features, "vision", skip=int(self.crop_cls))
        h = lm.embed_tokens(input_ids)
        is_image = (input_ids == self.image_token_id)[..., None].expand_as(h)
        h = h.masked_scatter(is_image, features.to(h.dtype))
        pe = lm.rotary_emb(h, torch.arange(h.shape[1], device=h.device)[None])
        for layer in lm.layers:
            h = layer(h, position_embeddings=pe)
        h = lm.norm(h)
        if self.output == "hidden":
            return h
        return self.model.lm_head(h)
