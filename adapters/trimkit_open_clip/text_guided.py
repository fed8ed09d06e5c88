"""Text-guided CLIP: a traceable image-text pair scorer whose text embedding is one module call.

trimkit's vision trimmers can read a cross-modal context only from a *module call* in the traced
forward (``LayerSpec.context_source``). open_clip computes CLIP's pooled text embedding in the
method ``encode_text``, partly with the model's own attributes, so :class:`TextGuidedCLIP` holds
the CLIP model's submodules under a small module tree in which the whole text tower is the one
child ``text``. Nothing is copied: every parameter is the CLIP model's own object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

__all__ = ["CLIPTextTower", "TextGuidedCLIP"]

# what open_clip.CLIP.__init__ lifts from its text tower onto the model, i.e. what CLIP.encode_text
# reads from ``self`` (names missing in an open_clip version are skipped)
_CLIP_TEXT_ATTRS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection",
                    "attn_mask", "context_length", "vocab_size", "text_pool_type", "text_eos_id")


class CLIPTextTower(nn.Module):
    """The text tower of an ``open_clip.CLIP`` as one module: ``forward(text) -> (B, E)`` text features
    (not normalised), computed by ``open_clip.model.CLIP.encode_text`` itself.

    It registers the CLIP model's own text submodules and parameters (shared, not copied) under the
    names ``encode_text`` reads, so its ``state_dict`` keys are those of the same tower inside an
    ``open_clip.CustomTextCLIP`` (``model.text``).
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        for name in _CLIP_TEXT_ATTRS:
            if not hasattr(model, name):
                continue
            value = getattr(model, name)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                self.register_buffer(name, value, persistent=name in model.state_dict())
            else:
                setattr(self, name, value)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return CLIP.encode_text(self, text)


class TextGuidedCLIP(nn.Module):
    """Scores image-text *pairs* with an open_clip ``CLIP`` or ``CustomTextCLIP``:
    ``forward(image, text) -> (B,)`` logits, row ``i`` pairing ``image[i]`` with ``text[i]``.

    The logit is ``logit_scale.exp() * <normalize(image_features_i), normalize(text_features_i)>``
    (``+ logit_bias`` when the model has one): the diagonal of ``model.get_logits(image, text)[0]``.
    Trimmed with ``trimkit.trim``, the text features are the context of the image tower's token
    trimmers (see :mod:`trimkit_open_clip`): the text decides which image tokens are kept.

    Children: ``visual`` (the model's image tower), ``text`` (``model.text`` for a
    ``CustomTextCLIP``, a :class:`CLIPTextTower` over the model's text submodules for a ``CLIP``),
    ``logit_scale`` and ``logit_bias`` (the model's parameters). All are shared with ``model``, so
    training the wrapper trains the model; the ``state_dict`` keys are the ``CustomTextCLIP`` layout
    (for a ``CLIP``: ``open_clip.model.convert_to_custom_text_state_dict(model.state_dict())``).
    """

    def __init__(self, model: CLIP | CustomTextCLIP) -> None:
        super().__init__()
        if not isinstance(model, (CLIP, CustomTextCLIP)):
            raise TypeError(f"TextGuidedCLIP wraps an open_clip CLIP or CustomTextCLIP, got {type(model).__name__}")
        self.visual = model.visual
        self.text = model.text if isinstance(model, CustomTextCLIP) else CLIPTextTower(model)
        self.logit_scale = model.logit_scale
        self.logit_bias = getattr(model, "logit_bias", None)  # absent in older open_clip versions

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        text_features = F.normalize(self.text(text), dim=-1)
        image_features = F.normalize(self.visual(image), dim=-1)
        logits = self.logit_scale.exp() * (image_features * text_features).sum(-1)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits
