"""METER (Dou et al., 2022) as a plain PyTorch model: CLIP ViT + RoBERTa + a co-attention encoder.

The structure and the module names follow the official code (``meter/modules/meter_module.py``)
so that its checkpoints load with a thin key mapping (:mod:`trimkit_meter.convert`):

``vit_model``
    open_clip's :class:`~open_clip.transformer.VisionTransformer` (CLIP ViT, QuickGELU). METER
    keeps *all* visual tokens after ``ln_post`` ([CLS] first); ``proj`` and pooling are unused.
    METER's CLIP copy builds ``layers - 1`` blocks, so METER's ViT-B/16 has 11 blocks, not 12.
``text_transformer``
    a RoBERTa encoder (:class:`MeterTextEncoder`, a ``RobertaModel`` without pooler) whose call
    returns the last hidden state. trimkit treats it as one opaque module.
``cross_modal_{text,image}_transform`` / ``token_type_embeddings``
    project each stream to the cross-modal width and add a modality type (text 0, image 1, the
    second NLVR2 image 2).
``cross_modal_{image,text}_layers``
    :class:`MeterCrossLayer` stacks (BERT post-LN: self-attention, cross-attention, FFN) updated
    in parallel: both streams read the previous layer's outputs.
``cross_modal_{image,text}_pooler`` and the task head
    ``vqa_classifier``, ``nlvr2_classifier``, ``snli_classifier`` or ``itm_score`` on the
    concatenated [text CLS, image CLS] pooled features.

NLVR2 follows METER: each example is two (image, text) pairs encoded separately and the two
pooled vectors are concatenated. Here the text is encoded once and each image runs the vision
encoder and the co-attention layers with it (each layer is called twice; trimkit tracks the two
calls separately); the result is identical to METER's two passes.

Every module call in :meth:`MeterModel.forward` is fx-traceable: make ``text_transformer``, each
``vit_model.transformer.resblocks.N`` and each cross layer leaves (see ``trimkit_meter.spec``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from trimkit._compat import ensure_torchvision

ensure_torchvision()

from open_clip.transformer import QuickGELU, VisionTransformer  # noqa: E402
from transformers import RobertaConfig, RobertaModel  # noqa: E402

__all__ = [
    "DEFAULT_NUM_LABELS",
    "METER_BASE",
    "METER_TINY",
    "MeterAttention",
    "MeterConfig",
    "MeterCrossLayer",
    "MeterModel",
    "MeterTextEncoder",
    "build_meter",
    "padding_bias",
]

Task = Literal["vqa", "nlvr2", "snli_ve", "itm"]

DEFAULT_NUM_LABELS: dict[str, int] = {"vqa": 3129, "nlvr2": 2, "snli_ve": 3, "itm": 2}
"""Output classes per task when ``num_labels`` is not given (VQAv2's 3,129 answers, as in METER)."""

HEAD_NAMES: dict[str, str] = {"vqa": "vqa_classifier", "nlvr2": "nlvr2_classifier",
                              "snli_ve": "snli_classifier", "itm": "itm_score"}
"""The task head's attribute name per task (METER's names)."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
class MeterConfig(BaseModel):
    """Sizes of a METER model. Immutable; build variants with :func:`build_meter` overrides.

    Vision (CLIP ViT): ``image_size`` (a multiple of ``patch_size``), ``vision_width``,
    ``vision_layers`` (METER's ViT-B/16 has 11: its CLIP copy drops the last block),
    ``vision_heads``, ``vision_mlp_ratio``, ``vision_act``.
    Text (RoBERTa): ``vocab_size``, ``text_hidden``, ``text_layers``, ``text_heads``,
    ``text_intermediate``, ``max_text_len`` (tokens per input), ``text_max_positions`` (size of
    RoBERTa's position table, which starts at ``pad_token_id + 1``), ``pad_token_id``,
    ``cls_token_id`` (``<s>``), ``eos_token_id`` (``</s>``), ``text_layer_norm_eps``.
    Cross-modal encoder: ``hidden_size``, ``cross_layers`` (6 in the paper), ``cross_heads``,
    ``cross_intermediate``, ``cross_layer_norm_eps`` (BertConfig's 1e-12), ``dropout``.
    Task: ``task`` and ``num_labels`` (defaults per task: :data:`DEFAULT_NUM_LABELS`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # vision (patch_size first: image_size's validator reads it)
    patch_size: int = Field(16, gt=0)
    image_size: int = Field(288, gt=0, description="input resolution (square), a multiple of patch_size")
    vision_width: int = Field(768, gt=0)
    vision_layers: int = Field(11, gt=0)
    vision_heads: int = Field(12, gt=0)
    vision_mlp_ratio: float = Field(4.0, gt=0)
    vision_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # text
    vocab_size: int = Field(50265, gt=0)
    text_hidden: int = Field(768, gt=0)
    text_layers: int = Field(12, gt=0)
    text_heads: int = Field(12, gt=0)
    text_intermediate: int = Field(3072, gt=0)
    max_text_len: int = Field(40, gt=1)
    text_max_positions: int = Field(514, gt=0)
    pad_token_id: int = Field(1, ge=0)
    cls_token_id: int = Field(0, ge=0)
    eos_token_id: int = Field(2, ge=0)
    text_layer_norm_eps: float = Field(1e-5, gt=0)
    # cross-modal
    hidden_size: int = Field(768, gt=0)
    cross_layers: int = Field(6, gt=0)
    cross_heads: int = Field(12, gt=0)
    cross_intermediate: int = Field(3072, gt=0)
    cross_layer_norm_eps: float = Field(1e-12, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    # task
    task: Task = "vqa"
    num_labels: int = Field(None, gt=0, description="defaults to DEFAULT_NUM_LABELS[task]")  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _default_num_labels(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("num_labels") is None and data.get("task", "vqa") in DEFAULT_NUM_LABELS:
            data = {**data, "num_labels": DEFAULT_NUM_LABELS[data.get("task", "vqa")]}
        return data

    @field_validator("image_size")
    @classmethod
    def _image_size_multiple_of_patch(cls, v: int, info: ValidationInfo) -> int:
        patch = info.data.get("patch_size")
        if patch is not None and v % patch:
            raise ValueError(f"image_size={v} must be a multiple of patch_size={patch}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "MeterConfig":
        for width, heads in (("vision_width", "vision_heads"), ("text_hidden", "text_heads"),
                             ("hidden_size", "cross_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width}={getattr(self, width)} must be divisible by "
                                 f"{heads}={getattr(self, heads)}")
        if self.text_max_positions < self.max_text_len + self.pad_token_id + 1:
            raise ValueError(f"text_max_positions={self.text_max_positions} is too small for max_text_len="
                             f"{self.max_text_len}: RoBERTa positions start at pad_token_id+1, so it must be "
                             f">= {self.max_text_len + self.pad_token_id + 1}")
        for name in ("pad_token_id", "cls_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} must be < vocab_size={self.vocab_size}")
        return self

    @property
    def num_token_types(self) -> int:
        """Rows of ``token_type_embeddings``: text, image (and a second image for NLVR2)."""
        return 3 if self.task == "nlvr2" else 2

    @property
    def num_patches(self) -> int:
        """Visual tokens per image, without [CLS]."""
        return (self.image_size // self.patch_size) ** 2


METER_BASE = MeterConfig()
"""The paper's METER: CLIP ViT-B/16 at 288px (11 blocks kept by METER), RoBERTa-base, 6 co-attention
layers of width 768 (12 heads, FFN 3072), VQA head."""

METER_TINY = MeterConfig(
    image_size=64, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
    vocab_size=100, text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128,
    max_text_len=16, text_max_positions=32,
    hidden_size=64, cross_layers=2, cross_heads=4, cross_intermediate=128,
)
"""A small METER for tests (~0.5M parameters, most in the VQA head; 16 patches + [CLS], 16 text tokens)."""

_PRESETS = {"base": METER_BASE, "tiny": METER_TINY}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def padding_bias(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, N) in ``like``'s dtype from a (B, N) mask (1 = real token).

    Real tokens get 0 and padding ``torch.finfo(dtype).min``. Registered with ``torch.fx.wrap``, so
    a trace records it as one call instead of tracing the dtype logic.
    """
    dtype = like.dtype
    bias = torch.zeros(mask.shape, dtype=dtype, device=like.device)
    bias = bias.masked_fill(mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


torch.fx.wrap("padding_bias")


class MeterAttention(nn.Module):
    """Multi-head attention with separate ``query``/``key``/``value`` projections (BERT style).

    ``forward(x, context=None, bias=None)`` returns the per-head contexts concatenated (B, Nq, D),
    *before* the output projection (which is the parent's ``output.dense``). ``context`` None means
    self-attention; ``bias`` is an additive float mask broadcastable to (B, heads, Nq, Nk).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        src = x if context is None else context
        B, Nq, D = x.shape
        Nk = src.shape[1]
        q = self.query(x).view(B, Nq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(src).view(B, Nk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(src).view(B, Nk, self.num_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, Nq, D)


class MeterResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: BERT's ``SelfOutput`` / ``Output``."""

    def __init__(self, in_features: int, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)  # noqa: N815 (checkpoint key name)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class MeterAttentionBlock(nn.Module):
    """Attention plus output projection and post-LN residual: ``.self`` and ``.output``."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.self = MeterAttention(hidden_size, num_heads, dropout)
        self.output = MeterResidualOutput(hidden_size, hidden_size, eps, dropout)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden, context, bias), hidden)


class MeterIntermediate(nn.Module):
    """FFN expansion: ``gelu(dense(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class MeterCrossLayer(nn.Module):
    """One stream's half of a co-attention layer (METER's ``BertCrossLayer``, post-LN).

    ``forward(hidden, context, attention_bias, context_bias)``: self-attention over ``hidden``
    (masked by ``attention_bias``), cross-attention from ``hidden`` to ``context`` (masked by
    ``context_bias``), then the FFN. Biases are additive (B, 1, 1, N) masks. Returns the updated
    hidden states (B, N, D).
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        self.attention = MeterAttentionBlock(hidden_size, num_heads, eps, dropout)
        self.crossattention = MeterAttentionBlock(hidden_size, num_heads, eps, dropout)
        self.intermediate = MeterIntermediate(hidden_size, intermediate_size)
        self.output = MeterResidualOutput(intermediate_size, hidden_size, eps, dropout)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, attention_bias: torch.Tensor,
                context_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(hidden, None, attention_bias)
        x = self.crossattention(x, context, context_bias)
        return self.output(self.intermediate(x), x)


class MeterPooler(nn.Module):
    """``tanh(dense(x[:, 0]))`` on the [CLS] token (METER's ``heads.Pooler``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x[:, 0]))


class MeterITMHead(nn.Module):
    """Image-text matching head: one linear layer ``fc`` (METER's ``heads.ITMHead``)."""

    def __init__(self, in_features: int, num_labels: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _classifier(in_features: int, hidden: int, num_labels: int) -> nn.Sequential:
    """METER's task MLP: Linear, LayerNorm, GELU, Linear (keys ``.0``, ``.1``, ``.3``)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, num_labels))


class MeterTextEncoder(RobertaModel):
    """RoBERTa without pooler whose call returns the last hidden state (B, N, D).

    A ``RobertaModel`` subclass, so its parameter names are the official ``text_transformer.*``
    keys and ``MeterTextEncoder.from_pretrained`` works for RoBERTa weights.
    """

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _init_weights(module: nn.Module) -> None:
    """METER's ``objectives.init_weights``: N(0, 0.02) linears/embeddings, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class MeterModel(nn.Module):
    """METER for one task; ``forward(pixel_values, input_ids, attention_mask, pixel_values_2=None)``.

    ``pixel_values`` (B, 3, S, S) normalized images, ``input_ids`` (B, N) RoBERTa ids with
    ``<s>`` first, ``attention_mask`` (B, N) with 1 for real tokens; ``pixel_values_2`` is the
    second image of NLVR2 (required for ``task="nlvr2"``, rejected otherwise). Returns logits
    (B, num_labels).
    """

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.vit_model = VisionTransformer(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_ratio=c.vision_mlp_ratio,
            act_layer=QuickGELU if c.vision_act == "quick_gelu" else nn.GELU,
        )
        self.vit_model.proj = None  # METER uses every token before any projection
        if not self.vit_model.transformer.batch_first:
            raise RuntimeError("trimkit_meter expects open_clip's batch-first Transformer")
        self.text_transformer = MeterTextEncoder(RobertaConfig(
            vocab_size=c.vocab_size, hidden_size=c.text_hidden, num_hidden_layers=c.text_layers,
            num_attention_heads=c.text_heads, intermediate_size=c.text_intermediate,
            max_position_embeddings=c.text_max_positions, type_vocab_size=1, pad_token_id=c.pad_token_id,
            bos_token_id=c.cls_token_id, eos_token_id=c.eos_token_id, layer_norm_eps=c.text_layer_norm_eps,
            hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
        ))
        h = c.hidden_size
        self.cross_modal_text_transform = nn.Linear(c.text_hidden, h)
        self.cross_modal_image_transform = nn.Linear(c.vision_width, h)
        self.token_type_embeddings = nn.Embedding(c.num_token_types, h)

        def layer() -> MeterCrossLayer:
            return MeterCrossLayer(h, c.cross_heads, c.cross_intermediate, c.cross_layer_norm_eps, c.dropout)

        self.cross_modal_image_layers = nn.ModuleList(layer() for _ in range(c.cross_layers))
        self.cross_modal_text_layers = nn.ModuleList(layer() for _ in range(c.cross_layers))
        self.cross_modal_image_pooler = MeterPooler(h)
        self.cross_modal_text_pooler = MeterPooler(h)

        self.head_name = HEAD_NAMES[c.task]
        if c.task == "itm":
            head: nn.Module = MeterITMHead(2 * h, c.num_labels)
        elif c.task == "nlvr2":
            head = _classifier(4 * h, 2 * h, c.num_labels)  # two (image, text) pairs
        else:
            head = _classifier(2 * h, 2 * h, c.num_labels)
        self.add_module(self.head_name, head)

        for name, child in self.named_children():
            if name not in ("vit_model", "text_transformer"):  # those have their own init
                child.apply(_init_weights)

    @property
    def head(self) -> nn.Module:
        """The task head (``vqa_classifier``, ``nlvr2_classifier``, ``snli_classifier`` or ``itm_score``)."""
        return getattr(self, self.head_name)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + positions + ``ln_pre``: the ViT blocks' input (B, 1+P, width)."""
        vit = self.vit_model
        x = vit.conv1(pixel_values)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = vit.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)
        return vit.ln_pre(x)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values_2: torch.Tensor | None = None) -> torch.Tensor:
        nlvr2 = self.config.task == "nlvr2"
        if nlvr2 and pixel_values_2 is None:
            raise ValueError("task 'nlvr2' needs pixel_values_2 (the second image of each example)")
        if not nlvr2 and pixel_values_2 is not None:
            raise ValueError(f"pixel_values_2 is only used by task 'nlvr2' (this model's task is {self.config.task!r})")
        # text first: it is cheap, and the vision trimmers read its [CLS] (cross-modal signal)
        t = self.text_transformer(input_ids, attention_mask)
        t = self.cross_modal_text_transform(t)
        t = t + self.token_type_embeddings(torch.zeros_like(attention_mask, dtype=torch.long))
        t_bias = padding_bias(attention_mask, t)
        feats = self.encode_pair(pixel_values, t, t_bias, image_type=1)
        if nlvr2:  # METER's NLVR2: a second (image, text) pair, its image typed 2, pooled side by side
            feats = torch.cat([feats, self.encode_pair(pixel_values_2, t, t_bias, image_type=2)], dim=-1)
        return self.head(feats)

    def encode_pair(self, pixel_values: torch.Tensor, t: torch.Tensor, t_bias: torch.Tensor,
                    image_type: int = 1) -> torch.Tensor:
        """Vision encoder + co-attention for one image with the encoded text; returns pooled (B, 2h)."""
        v = self.embed_image(pixel_values)
        # every visual token is real; made here, at the stream's original length (trimkit gathers
        # such per-token tensors to the kept tokens itself)
        image_mask = torch.ones_like(v[:, :, 0], dtype=torch.long)
        for blk in self.vit_model.transformer.resblocks:
            v = blk(v)
        v = self.vit_model.ln_post(v)
        v = self.cross_modal_image_transform(v)
        v = v + self.token_type_embeddings(torch.full_like(v[:, :, 0], image_type, dtype=torch.long))
        v_bias = padding_bias(image_mask, v)

        # co-attention: both streams read the previous layer's outputs
        for image_layer, text_layer in zip(self.cross_modal_image_layers, self.cross_modal_text_layers):
            v_next = image_layer(v, t, v_bias, t_bias)
            t_next = text_layer(t, v, t_bias, v_bias)
            v, t = v_next, t_next
        return torch.cat([self.cross_modal_text_pooler(t), self.cross_modal_image_pooler(v)], dim=-1)


def build_meter(size: Literal["tiny", "base"] = "tiny", **overrides: Any) -> MeterModel:
    """Build a randomly initialised METER from a preset (``"tiny"`` or ``"base"``).

    ``overrides`` are :class:`MeterConfig` fields, validated like the preset (a bad value raises
    ``pydantic.ValidationError`` naming the field). Changing ``task`` without ``num_labels`` gives
    that task's default number of labels.
    """
    if size not in _PRESETS:
        raise ValueError(f"size must be one of {sorted(_PRESETS)}, got {size!r}")
    fields = _PRESETS[size].model_dump()
    if "task" in overrides and "num_labels" not in overrides:
        fields.pop("num_labels")
    fields.update(overrides)
    return MeterModel(MeterConfig(**fields))
