"""Attention at the kernel (``AttentionSpec(via="kernel")``): the module runs itself, only its
``softmax(QK^T)V`` is intercepted, so rotary position encodings, grouped-query heads and qk-norm
keep working. The bug this guards against: the first core recomputed attention from the module's
weights and never applied RoPE, so a model with identical weights and nothing trimmed gave other
outputs (up to 4.5 on values of 7.7).

The model below is written from scratch as a third party would (two streams, RoPE + GQA + qk-norm
in every attention, a cross-attention whose keys/values have fewer heads, a padded text stream);
its description names attention modules only, never their projections.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_trimmers, shorter_rows
from torch import nn

from trimkit import AttentionSpec, LayerSpec, ModelSpec, StreamSpec, TrimConfig, trim

pytestmark = pytest.mark.usefixtures("one_thread")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat([-b, a], -1) * sin


class RopeGQAAttention(nn.Module):
    """Queries with ``heads`` heads, keys/values with ``kv_heads`` (GQA), per-head qk-norm, RoPE on
    q (and on k for self-attention), ``F.scaled_dot_product_attention`` with GQA."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)
        self.q_norm, self.k_norm = nn.LayerNorm(self.d), nn.LayerNorm(self.d)
        self.o = nn.Linear(heads * self.d, dim)

    def forward(self, x, rope, context=None, context_rope=None, mask=None):
        src = x if context is None else context
        src_rope = rope if context is None else context_rope
        B, N, _ = x.shape
        M = src.shape[1]
        q = self.q_norm(self.q(x).view(B, N, self.heads, self.d).transpose(1, 2))
        k, v = self.kv(src).view(B, M, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4)
        k = self.k_norm(k)
        q = rotate(q, rope[0][:, None], rope[1][:, None])
        k = rotate(k, src_rope[0][:, None], src_rope[1][:, None])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, N, self.heads * self.d))


class RopeLayer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, cross: bool) -> None:
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = RopeGQAAttention(dim, heads, kv_heads)
        self.cross = RopeGQAAttention(dim, heads, kv_heads) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, rope, mask=None, context=None, context_rope=None, context_mask=None):
        x = x + self.attn(self.n1(x), rope, mask=mask)
        if self.cross is not None:
            x = x + self.cross(self.n2(x), rope, context, context_rope, context_mask)
        return x + self.mlp(self.n3(x))


def rope_table(positions: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = positions.float()[..., None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


class RopeVLM(nn.Module):
    """Image patches and text, each with its own [CLS] at 0 and RoPE over positions; uni-modal
    layers, then co-attention layers (parallel update)."""

    def __init__(self, dim=32, heads=4, kv_heads=2, patch=8, image=32, vocab=40, uni=1, cross=2, labels=5):
        super().__init__()
        self.d = dim // heads
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.embed = nn.Embedding(vocab, dim)
        self.vision = nn.ModuleList(RopeLayer(dim, heads, kv_heads, False) for _ in range(uni))
        self.text = nn.ModuleList(RopeLayer(dim, heads, kv_heads, False) for _ in range(uni))
        self.cross_v = nn.ModuleList(RopeLayer(dim, heads, kv_heads, True) for _ in range(cross))
        self.cross_t = nn.ModuleList(RopeLayer(dim, heads, kv_heads, True) for _ in range(cross))
        self.head = nn.Linear(2 * dim, labels)

    def forward(self, pixel_values, input_ids, attention_mask):
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)
        v = torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1)
        t = self.embed(input_ids)
        B = v.shape[0]
        v_rope = rope_table(torch.arange(v.shape[1]).expand(B, -1), self.d)
        t_rope = rope_table(attention_mask.cumsum(1) - 1, self.d)
        t_mask = (1.0 - attention_mask[:, None, None, :].to(t.dtype)) * -1e9
        for layer in self.vision:
            v = layer(v, v_rope)
        for layer in self.text:
            t = layer(t, t_rope, t_mask)
        for lv, lt in zip(self.cross_v, self.cross_t):
            v, t = (lv(v, v_rope, None, t, t_rope, t_mask), lt(t, t_rope, t_mask, v, v_rope, None))
        return self.head(torch.cat([v[:, 0], t[:, 0]], -1))


class RopeAdapter:
    """A description only: attention modules by path, at the kernel."""

    def matches(self, model) -> bool:
        return isinstance(model, RopeVLM)

    def describe(self, model: RopeVLM) -> ModelSpec:
        heads = model.vision[0].attn.heads
        self_attn = AttentionSpec("attn", "self", heads, via="kernel")
        cross_attn = AttentionSpec("cross", "cross", heads, via="kernel")
        rope = {"rope": 1}
        layers = [LayerSpec(f"vision.{i}", "vision", hidden_token_args=rope, attentions=[self_attn])
                  for i in range(len(model.vision))]
        layers += [LayerSpec(f"text.{i}", "text", hidden_token_args={**rope, "mask": -1}, attentions=[self_attn])
                   for i in range(len(model.text))]
        for i in range(len(model.cross_v)):
            for stack, stream, other in (("cross_v", "vision", "text"), ("cross_t", "text", "vision")):
                own = {**rope, "mask": -1} if stream == "text" else rope
                ctx = {"context_rope": 1, "context_mask": -1} if other == "text" else {"context_rope": 1}
                layers.append(LayerSpec(f"{stack}.{i}", stream, "cross", context="context", context_stream=other,
                                        hidden_token_args=own, context_token_args=ctx,
                                        attentions=[self_attn, cross_attn]))
        return ModelSpec(streams=[StreamSpec("vision"), StreamSpec("text", padding_input="attention_mask")],
                         layers=layers, input_names=["pixel_values", "input_ids", "attention_mask"])

    def example_inputs(self, model: RopeVLM, batch_size: int = 1, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.embed.num_embeddings, (batch_size, 7), generator=g)
        mask = shorter_rows(batch_size, 7)
        return {"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=g), "input_ids": ids,
                "attention_mask": mask}

    def build(self, size: str = "tiny", seed: int = 0, **options) -> RopeVLM:
        torch.manual_seed(seed)
        return RopeVLM(**options).eval()


@pytest.fixture(scope="module")
def rope_registry():
    from trimkit.plugins import get_registry

    registry = get_registry()
    registry.adapters.register("rope_toy", RopeAdapter(), replace=True)
    return registry


@pytest.fixture(scope="module")
def models(rope_registry):
    model = RopeAdapter().build(seed=0)
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="rope_toy").eval()
    return model, tmodel


def _max(a, b):
    return float((a - b).abs().max())


def test_kernel_route_is_the_model_when_nothing_is_trimmed(models):
    model, tmodel = models
    assert {type(m).__name__ for m in tmodel._graph.modules()} >= {"KernelAttention"}
    with torch.no_grad():
        for batch in (1, 3):
            x = RopeAdapter().example_inputs(model, batch, seed=batch)
            ref = model(**x)
            assert ref.abs().max() > 0.1
            for mode in ("hard", "remove", "packed") if batch == 1 else ("hard", "packed", "padded"):
                with tmodel.mode(mode):
                    out = tmodel(**x)
                assert _max(out, ref) < 1e-5, (mode, batch, _max(out, ref))
                assert all(float(r.keep.min()) == 1 for r in tmodel.records)


def test_kernel_route_masked_equals_removed_and_packed(rope_registry):
    model = RopeAdapter().build(seed=2)
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="rope_toy").eval()
    dropped_tokens = dropped_heads = 0
    counts_differ = False
    for seed in range(4):
        randomize_trimmers(tmodel, seed)
        with torch.no_grad():
            one = RopeAdapter().example_inputs(model, 1, seed=10 + seed)
            with tmodel.mode("hard"):
                hard = tmodel(**one)
            with tmodel.mode("remove"):
                removed = tmodel(**one)
            dropped_tokens += sum(r.kind == "token" and float(r.keep) < 1 for r in tmodel.records)
            dropped_heads += sum(r.kind == "head" and float(r.keep) < 1 for r in tmodel.records)
            assert _max(hard, removed) < 1e-4, (seed, _max(hard, removed))
            batch = RopeAdapter().example_inputs(model, 3, seed=20 + seed)
            with tmodel.mode("hard"):
                hard = tmodel(**batch)
            with tmodel.mode("packed"):
                packed = tmodel(**batch)
            counts_differ |= any(r.counts is not None and len(set(r.counts)) > 1 for r in tmodel.records)
            assert _max(hard, packed) < 1e-4, (seed, _max(hard, packed))
            with tmodel.mode("padded"):
                padded = tmodel(**batch)
            assert _max(hard, padded) < 1e-4, (seed, _max(hard, padded))
    assert dropped_tokens > 0 and dropped_heads > 0 and counts_differ


def test_dropping_changes_the_output(rope_registry):
    """Trimming through the kernel really acts: forcing every patch token out changes the logits."""
    model = RopeAdapter().build(seed=1)
    tmodel = trim(model, TrimConfig(token_target=0.5), adapter="rope_toy").eval()
    x = RopeAdapter().example_inputs(model, 1, seed=3)
    with torch.no_grad():
        full = model(**x)
        tmodel.runtime.forced["vision.0"] = torch.full((1, 17), -1.0)
        try:
            with tmodel.mode("remove"):
                out = tmodel(**x)
        finally:
            tmodel.runtime.forced.clear()
    assert _max(out, full) > 1e-3
    rec = next(r for r in tmodel.records if r.key == "vision.0")
    assert rec.index.tolist() == [0]  # only the [CLS] is left


def test_kernel_route_refuses_a_module_without_sdpa(rope_registry):
    from trimkit.trace import TraceError

    class Explicit(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return (self.lin(x) @ x.transpose(1, 2)).softmax(-1) @ x

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = Explicit()

        def forward(self, x):
            return x + self.mix(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])

        def forward(self, x):
            return self.blocks[0](x)

    class A:
        def matches(self, m):
            return isinstance(m, Net)

        def describe(self, m):
            return ModelSpec([StreamSpec("x")], [LayerSpec("blocks.0", "x", attentions=[
                AttentionSpec("mix", "self", 2, via="kernel")])], ["x"])

        def example_inputs(self, m, batch_size=1, seed=0):
            return {"x": torch.randn(batch_size, 5, 8)}

        def build(self, size="tiny", seed=0):
            return Net()

    rope_registry.adapters.register("explicit_toy", A(), replace=True)
    with pytest.raises(TraceError, match=r"blocks\.0\.mix.*never calls F\.scaled_dot_product_attention.*via='projections'"):
        trim(Net(), TrimConfig(), adapter="explicit_toy")


def test_a_query_left_without_keys_gives_zeros_not_nan(monkeypatch):
    """A module mask per query row (Qwen2.5-VL's window blocks) plus trimkit's dropped keys can leave a
    query row no key at all (its whole window dropped). Some SDPA backends (CUDA's fused kernels) return
    NaN for such a row, and a NaN hidden state spreads through its value to every query of the next
    layer even where its weight is 0; the kernel must give 0 there. Simulated with a naive softmax
    backend (the CPU math backend already returns 0)."""
    import trimkit.kernels as K
    from trimkit.ops import AttnTrim

    def naive(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            s = s + attn_mask
        return torch.softmax(s, dim=-1) @ v  # NaN on a row that is all -inf

    monkeypatch.setattr(K.F, "scaled_dot_product_attention", naive)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    window = torch.tensor([0, 0, 1, 1])
    mask = torch.where(window[None, None, :, None] == window[None, None, None, :], 0.0, float("-inf"))
    keep = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # window 1 dropped entirely
    y = K.attend(q, k, v, mask, trim=AttnTrim(key_mask=keep))
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, :, 2:], torch.zeros_like(y[:, :, 2:]))  # the rows with no key left
    torch.testing.assert_close(y[:, :, :2], naive(q[:, :, :2], k[:, :, :2], v[:, :, :2]))
    assert torch.isnan(naive(q, k, v, mask + K.key_bias(keep, q.dtype))).any()  # the backend alone gives NaN
