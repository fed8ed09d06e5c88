"""Head removal on the kernel route by slicing the declared projections (``AttentionSpec.head_slices``).

The fears: that slicing silently does nothing (the MACs of mode remove must fall by the dropped heads'
projections), that it changes the function (sliced removal must equal the masked model and removal
with full projections, grouped-query keys/values included, where some groups lose every query head
and others only some), and that a module that shapes its projections by head *count* gives a wrong
answer instead of an error.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_trimmers
from torch import nn

import trimkit
from trimkit import AttentionSpec, LayerSpec, ModelSpec, StreamSpec, TrimConfig
from trimkit.macs import count_macs
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


class GQAAttention(nn.Module):
    """Separate q/k/v projections shaped by head size, ``kv_heads`` key/value heads (GQA), a rotation
    of q and k per channel (what the module does to them after its projections), F.scaled_dot_product_attention (traced: the fx route)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, by_count: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d, self.by_count = heads, kv_heads, dim // heads, by_count
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, kv_heads * self.d)
        self.v_proj = nn.Linear(dim, kv_heads * self.d)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        # by_count: the head count fixed and the size inferred, which slicing cannot follow
        shape = (lambda h, B, N: (B, N, h, -1)) if self.by_count else (lambda h, B, N: (B, N, -1, self.d))
        q = self.q_proj(x).view(shape(self.heads, B, N)).transpose(1, 2)
        k = self.k_proj(x).view(shape(self.kv_heads, B, N)).transpose(1, 2)
        v = self.v_proj(x).view(shape(self.kv_heads, B, N)).transpose(1, 2)
        angle = torch.arange(q.shape[-1], dtype=x.dtype) * 0.3  # per channel (per position would need position ids)
        q, k = q * angle.cos() + q.flip(-1) * angle.sin(), k * angle.cos() + k.flip(-1) * angle.sin()
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, by_count: bool) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = GQAAttention(dim, heads, kv_heads, by_count)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class Tower(nn.Module):
    """A [CLS] + patch tower: 8 heads over 2 key/value heads (groups of 4)."""

    def __init__(self, dim: int = 32, heads: int = 8, kv_heads: int = 2, depth: int = 3, by_count: bool = False):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, by_count) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, patches):
        x = torch.cat([self.cls.expand(patches.shape[0], -1, -1), self.embed(patches)], 1)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


class TowerAdapter:
    def __init__(self, slices: bool) -> None:
        self.slices = slices

    def matches(self, model) -> bool:
        return isinstance(model, Tower)

    def describe(self, model: Tower) -> ModelSpec:
        attn = AttentionSpec("attn", "self", model.blocks[0].attn.heads, via="kernel", q="q_proj", k="k_proj",
                             v="v_proj", out="o_proj", head_slices=self.slices)
        layers = [LayerSpec(f"blocks.{i}", "x", attentions=[attn]) for i in range(len(model.blocks))]
        return ModelSpec(streams=[StreamSpec("x")], layers=layers, input_names=["patches"])

    def build(self, **kwargs) -> Tower:
        return Tower(**kwargs).eval()

    def example_inputs(self, model, batch_size: int = 1, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {"patches": torch.randn(batch_size, 12, 6, generator=gen)}


@pytest.fixture(scope="module")
def towers():
    registry = get_registry()
    registry.adapters.register("tower-sliced", TowerAdapter(True), replace=True)
    registry.adapters.register("tower-full", TowerAdapter(False), replace=True)
    torch.manual_seed(0)
    model = Tower().eval()
    cfg = TrimConfig(token_target=0.7, head_target=0.5)
    sliced = trimkit.trim(model, cfg, adapter="tower-sliced").eval()
    full = trimkit.trim(model, cfg, adapter="tower-full").eval()
    return model, sliced, full


def _same_trimmers(a, b, seed: int) -> None:
    randomize_trimmers(a, seed)
    b.trimmers.load_state_dict(a.trimmers.state_dict())


def _head_sets(tmodel) -> list[list[int]]:
    return [r.index.tolist() for r in tmodel.records if r.kind == "head"]


def test_sliced_removal_is_removal_with_full_projections_and_the_masked_model(towers):
    model, sliced, full = towers
    partial_group = whole_group = False
    for seed in range(6):
        _same_trimmers(sliced, full, seed)
        x = {"patches": torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(100 + seed))}
        with torch.no_grad():
            with sliced.mode("hard"):
                hard = sliced(**x)
            with full.mode("remove"):
                ref = full(**x)
                ref_heads = _head_sets(full)
            with sliced.mode("remove"):
                got = sliced(**x)
                assert _head_sets(sliced) == ref_heads
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, hard, atol=1e-5, rtol=0)
        for kept in ref_heads:
            groups = [sum(1 for h in kept if h // 4 == g) for g in range(2)]
            partial_group |= any(0 < n < 4 for n in groups)
            whole_group |= 0 in groups and len(kept) > 0
    assert partial_group and whole_group  # both GQA cases ran: a group kept for some of its heads, one dropped whole


def test_slices_remove_the_dropped_heads_projections(towers):
    """The MACs of mode remove fall by exactly the dropped heads' q/k/v rows and out columns."""
    model, sliced, full = towers
    _same_trimmers(sliced, full, 3)
    x = {"patches": torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(7))}
    with full.mode("remove"):
        m_full = count_macs(full, **x).total
    tokens: list[int] = []  # tokens each layer computes, read at its first norm (no hook on the attention)
    handles = [b.n1.register_forward_hook(lambda m, a, out: tokens.append(out.shape[1])) for b in model.blocks]
    try:
        with sliced.mode("remove"):
            m_sliced = count_macs(sliced, **x).total
            heads = _head_sets(sliced)
    finally:
        for h in handles:
            h.remove()
    assert len(heads) == len(tokens) == 3 and any(len(h) < 8 for h in heads)
    # per layer of n tokens: q and out lose n * 32 * 4 MACs per dropped query head, k and v as much per
    # dropped key/value head (a group of 4 query heads all dropped); no head kept: nothing sliced
    expect = 0
    for n, kept in zip(tokens, heads):
        if kept:
            dropped_kv = 2 - len({h // 4 for h in kept})
            expect += n * 32 * 4 * (2 * (8 - len(kept)) + 2 * dropped_kv)
    assert expect > 0
    assert m_full - m_sliced == expect


def test_hooked_projections_fall_back_to_full_projections(towers):
    model, sliced, full = towers
    _same_trimmers(sliced, full, 4)
    x = {"patches": torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(8))}
    with full.mode("remove"):
        ref = full(**x)
        m_full = count_macs(full, **x).total
    seen = []
    handle = model.blocks[1].attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
    try:
        with sliced.mode("remove"):
            got = sliced(**x)
            m_hooked = count_macs(sliced, **x).total
    finally:
        handle.remove()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert seen and all(w == 32 for w in seen)  # the hook saw the full projection
    with sliced.mode("remove"):
        m_sliced = count_macs(sliced, **x).total
    assert m_sliced < m_hooked < m_full  # only the hooked layer's attention fell back


def test_a_module_shaping_by_head_count_is_refused_with_its_name():
    """The silent case: plain multi-head attention (8 heads of 4) that views q, k and v as (B, N, 8, -1).
    With 4 heads kept its sliced projections (16 features) reshape without an error into 8 heads of 2;
    only the kernel's check of the head size stops it."""
    get_registry().adapters.register("tower-sliced", TowerAdapter(True), replace=True)
    torch.manual_seed(1)
    model = Tower(kv_heads=8, by_count=True).eval()
    tmodel = trimkit.trim(model, TrimConfig(head_target=0.5), adapter="tower-sliced").eval()
    logits = torch.full((1, 8), -5.0)
    logits[0, [0, 1, 4, 6]] = 5.0  # two runs, an even count
    tmodel.runtime.forced = {f"blocks.{i}.0": logits for i in range(3)}
    x = {"patches": torch.randn(1, 12, 6)}
    with tmodel.mode("hard"), torch.no_grad():
        tmodel(**x)  # the masked modes do not slice
        assert all(float(r.keep.max()) == 0.5 for r in tmodel.records if r.kind == "head")
    with tmodel.mode("remove"), pytest.raises(RuntimeError, match=r"'blocks\.0\.attn'.*head_slices: its kernel got q "
                                                               r"\(1, 8, 13, 2\)"):
        tmodel(**x)
    for block in model.blocks:  # and the module is left as it was
        assert type(block.attn.q_proj) is nn.Linear and block.attn.q_proj.out_features == 32


def test_sliced_removal_trains_after_inference_mode(towers):
    """Index tensors cached under inference_mode must not reach a later forward with gradients."""
    model, sliced, full = towers
    _same_trimmers(sliced, full, 2)
    x = {"patches": torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(9))}
    with sliced.mode("remove"):
        with torch.inference_mode():
            ref = sliced(**x)
        out = sliced(**x)
        assert any(0 < len(r.index) < r.total for r in sliced.records if r.kind == "head")
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=0)
    assert model.blocks[0].attn.q_proj.weight.grad is not None
    model.zero_grad()


def test_a_cache_passed_positionally_is_not_sliced():
    from trimkit.kernels import KernelAttention

    class Cached(GQAAttention):
        def forward(self, x, cache=None):
            return super().forward(x)

    attn = Cached(32, 8, 2)
    spec = AttentionSpec("attn", "self", 8, via="kernel", q="q_proj", k="k_proj", v="v_proj", out="o_proj",
                         head_slices=True)
    ka = KernelAttention(attn, "attn", {}, {"x", "cache"}, spec=spec)
    assert ka._given_cache((torch.zeros(1), object()), {}) and ka._given_cache((torch.zeros(1),), {"cache": 1})
    assert not ka._given_cache((torch.zeros(1), None), {})


def test_head_slices_description_errors():
    with pytest.raises(ValueError, match="via='kernel' only"):
        AttentionSpec("attn", "self", 4, head_slices=True, out="o")
    with pytest.raises(ValueError, match="fused qkv"):
        AttentionSpec("attn", "self", 4, via="kernel", qkv="qkv", out="proj", head_slices=True)
    with pytest.raises(ValueError, match="out="):
        AttentionSpec("attn", "self", 4, via="kernel", q="q_proj", head_slices=True)

    class Misnamed(TowerAdapter):
        def describe(self, model):
            spec = super().describe(model)
            layers = [dataclasses.replace(l, attentions=[dataclasses.replace(l.attentions[0], v="value")])
                      for l in spec.layers]
            return dataclasses.replace(spec, layers=layers)

    get_registry().adapters.register("tower-misnamed", Misnamed(True), replace=True)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn.*v projection 'value' does not exist"):
        trimkit.trim(Tower().eval(), TrimConfig(head_target=0.5), adapter="tower-misnamed")


def test_decoder_adapters_slice_and_count_fewer_macs():
    """The llava adapter declares head_slices on its decoder's attentions: with the same trimmers the
    sliced model computes fewer MACs than one described without slices, and the same outputs."""
    llava = get_registry().adapters.get("llava")

    class Unsliced:
        def __getattr__(self, name):
            return getattr(llava, name)

        def describe(self, model):
            spec = llava.describe(model)
            layers = [dataclasses.replace(l, attentions=[dataclasses.replace(a, head_slices=False)
                                                         for a in l.attentions]) for l in spec.layers]
            return dataclasses.replace(spec, layers=layers)

    get_registry().adapters.register("llava-unsliced", Unsliced(), replace=True)
    model = llava.build()
    cfg = TrimConfig(token_target=0.7, head_target=0.5)
    sliced = trimkit.trim(model, cfg, adapter="llava").eval()
    full = trimkit.trim(model, cfg, adapter="llava-unsliced").eval()
    assert any(a.head_slices for l in sliced.spec.layers for a in l.attentions)
    assert "kernel/attention_interface (head slices)" in str(sliced.plan)
    assert "(head slices)" not in str(full.plan)
    _same_trimmers(sliced, full, 11)
    x = llava.example_inputs(model, 1, seed=3)
    with torch.no_grad(), sliced.mode("remove"), full.mode("remove"):
        a, b = sliced(**x), full(**x)
        trimmed = [r.key for r in sliced.records if r.kind == "head" and 0 < len(r.index) < r.total]
        assert trimmed
        m_sliced, m_full = count_macs(sliced, **x).total, count_macs(full, **x).total
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert m_sliced < m_full

    class Wrapped(nn.Module):  # what LoRA or a quantiser puts in a projection's place after trimming
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    layer = trimmed[0].rsplit(".", 1)[0]  # a decoder layer whose heads were sliced ("<layer path>.<attention>")
    attn = model.get_submodule(layer).self_attn
    attn.q_proj = Wrapped(attn.q_proj)
    with torch.no_grad(), sliced.mode("remove"):
        c = sliced(**x)
        m_wrapped = count_macs(sliced, **x).total
    torch.testing.assert_close(c, b, atol=1e-4, rtol=0)
    assert m_sliced < m_wrapped < m_full  # that layer fell back to its full projections, the others still slice


def test_kept_heads_give_zero_where_a_query_has_no_key_left():
    """A window mask plus dropped keys can leave a query no key: every kernel path gives 0 there (not NaN),
    kept-head runs (unsliced removal) as the dense path and the sliced path do. (torch 2.13's CPU SDPA
    already returns 0 for such a row; trimkit zeroes it itself for backends that give NaN.)"""
    from trimkit.kernels import attend
    from trimkit.ops import AttnTrim, SlicedHeads

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g) for _ in range(3))
    window = torch.ones(6, 6, dtype=torch.bool).tril(1).triu(-1)[None, None]  # each query sees its neighbours
    key_mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])  # query 3 sees keys 2-4: all dropped
    heads = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    dense = attend(q, k, v, window, trim=AttnTrim(key_mask=key_mask, head_mask=heads))
    runs = attend(q, k, v, window, trim=AttnTrim(key_mask=key_mask, head_runs=[(0, 1), (2, 4)]))
    kept = torch.tensor([0, 2, 3])
    sliced = attend(q[:, kept], k[:, kept], v[:, kept], window,
                    trim=AttnTrim(key_mask=key_mask, sliced=SlicedHeads("a", kept, 4, 8, 3, None)))
    assert not dense.isnan().any() and float(dense[0, :, 3].abs().max()) == 0.0
    torch.testing.assert_close(runs, dense)
    torch.testing.assert_close(sliced, dense[:, kept])
