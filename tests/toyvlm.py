"""A small co-attention VLM written from scratch, plus its adapter: what a third party would write.

Used by the tests as an independent model (not the METER adapter): uni-modal vision and text
layers, then co-attention layers with METER's parallel update; attention modules own their output
projection (timm/open_clip style). ``ToyAdapter`` only *describes* it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimkit import AttentionSpec, AttnCall, LayerSpec, ModelSpec, StreamSpec


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context=None, bias=None):
        ctx = x if context is None else context
        B, N, D = x.shape
        h = self.num_heads
        q = self.query(x).view(B, N, h, D // h).transpose(1, 2)
        k = self.key(ctx).view(B, ctx.shape[1], h, D // h).transpose(1, 2)
        v = self.value(ctx).view(B, ctx.shape[1], h, D // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, cross: bool) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross = Attention(dim, heads) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, context=None, bias=None, context_bias=None):
        x = x + self.attn(self.ln1(x), None, bias)
        if self.cross is not None:
            x = x + self.cross(self.ln2(x), context, context_bias)
        return x + self.mlp(self.ln3(x))


class ToyVLM(nn.Module):
    def __init__(self, dim=32, heads=4, image=32, patch=8, vocab=50, uni_v=2, uni_t=1, cross=2, labels=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.embed = nn.Embedding(vocab, dim)
        self.vision = nn.ModuleList(Layer(dim, heads, False) for _ in range(uni_v))
        self.text = nn.ModuleList(Layer(dim, heads, False) for _ in range(uni_t))
        self.cross_v = nn.ModuleList(Layer(dim, heads, True) for _ in range(cross))
        self.cross_t = nn.ModuleList(Layer(dim, heads, True) for _ in range(cross))
        self.head = nn.Linear(2 * dim, labels)

    def forward(self, pixel_values, input_ids, attention_mask):
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)
        v = torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1) + self.pos
        t = self.embed(input_ids)
        t_bias = (1.0 - attention_mask[:, None, None, :].to(t.dtype)) * -1e9
        for layer in self.text:
            t = layer(t, bias=t_bias)
        for layer in self.vision:
            v = layer(v)
        for lv, lt in zip(self.cross_v, self.cross_t):
            v, t = lv(v, t, None, t_bias), lt(t, v, t_bias, None)
        return self.head(torch.cat([v[:, 0], t[:, 0]], -1))


def _attn_inputs(args, kwargs):
    x = args[0]
    ctx = args[1] if len(args) > 1 else kwargs.get("context")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return AttnCall(x, ctx, bias)


class ToyAdapter:
    """The adapter a user writes: a description of ToyVLM, nothing else."""

    def matches(self, model) -> bool:
        return isinstance(model, ToyVLM)

    def describe(self, model: ToyVLM) -> ModelSpec:
        heads = model.cross_v[0].attn.num_heads
        self_attn = AttentionSpec("attn", "self", heads, out="out", inputs=_attn_inputs)
        cross_attn = AttentionSpec("cross", "cross", heads, out="out", inputs=_attn_inputs)
        layers = [LayerSpec(f"text.{i}", "text", "uni", hidden_token_args={"bias": -1}, attentions=[self_attn])
                  for i in range(len(model.text))]
        layers += [LayerSpec(f"vision.{i}", "vision", "uni",
                             attentions=[self_attn]) for i in range(len(model.vision))]
        for i in range(len(model.cross_v)):
            layers.append(LayerSpec(f"cross_v.{i}", "vision", "cross", context="context", context_stream="text",
                                    hidden_token_args={"bias": -1}, context_token_args={"context_bias": -1},
                                    attentions=[self_attn, cross_attn]))
            layers.append(LayerSpec(f"cross_t.{i}", "text", "cross", context="context", context_stream="vision",
                                    hidden_token_args={"bias": -1}, context_token_args={"context_bias": -1},
                                    attentions=[self_attn, cross_attn]))
        return ModelSpec(
            streams=[StreamSpec("vision"), StreamSpec("text", padding_input="attention_mask")],
            layers=layers,
            input_names=["pixel_values", "input_ids", "attention_mask"],
        )

    def example_inputs(self, model: ToyVLM, batch_size: int = 1, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        size = model.pos.shape[1] - 1
        side = int(size ** 0.5) * model.patch.kernel_size[0]
        ids = torch.randint(1, model.embed.num_embeddings, (batch_size, 7), generator=g)
        mask = torch.ones_like(ids)
        if batch_size > 1:
            mask[1:, 5:] = 0
        return {"pixel_values": torch.randn(batch_size, 3, side, side, generator=g), "input_ids": ids, "attention_mask": mask}

    def build(self, size: str = "tiny", seed: int = 0, **options) -> ToyVLM:
        torch.manual_seed(seed)
        return ToyVLM(**options)
