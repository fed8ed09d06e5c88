"""The packed engine (mode ``packed``): the kept tokens of a batch in one row matrix.

Equivalence, property-tested over random toy VLMs, padded inputs and trimmer weights: per instance,
packed == batch-1 ``remove`` == masked ``hard`` batch on the kept outputs, with the same decisions.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toyvlm import ToyAdapter, ToyVLM

from trimkit import TokenArg, TrimConfig, trim
from trimkit.engine import packed as P


@pytest.fixture(scope="module", autouse=True)
def _toy(request):
    request.getfixturevalue("toy_registry_module")


class SeqToyVLM(ToyVLM):
    """ToyVLM returning both streams' final token states, to compare every kept token."""

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
        return v, t


def _randomise(tmodel, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _inputs(batch, lengths, seed, side=32):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, 50, (batch, n), generator=g)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    return {"pixel_values": torch.randn(batch, 3, side, side, generator=g), "input_ids": ids, "attention_mask": mask}


def _last_token_records(records):
    """stream -> the last token record of the stream (keys: text.*, vision.*, cross_t.*, cross_v.*)."""
    last = {}
    for r in records:
        if r.kind == "token":
            last["text" if r.key.startswith(("text", "cross_t")) else "vision"] = r
    return last


def _kept(r, b):
    """Original positions of instance b's kept tokens in a packed token record."""
    start = sum(r.counts[:b])
    return r.index[start:start + r.counts[b]]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), heads=st.sampled_from([1, 2, 4]), cross=st.integers(1, 2),
       uni_v=st.integers(0, 2), scale=st.floats(0.3, 2.0), batch=st.integers(2, 4), data=st.data())
def test_packed_equals_remove_and_hard(seed, heads, cross, uni_v, scale, batch, data):
    lengths = data.draw(st.lists(st.integers(2, 8), min_size=batch, max_size=batch))
    torch.manual_seed(seed)
    model = SeqToyVLM(dim=32, heads=heads, cross=cross, uni_v=uni_v).eval()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="toy").eval()
    _randomise(tmodel, seed, scale)
    x = _inputs(batch, lengths, seed)
    with torch.no_grad():
        with tmodel.mode("hard"):
            hv, ht = tmodel(**x)
            hard = list(tmodel.records)
        with tmodel.mode("packed"):
            pv, pt = tmodel(**x)
            packed = list(tmodel.records)
        with tmodel.mode("padded"):  # the baseline engine: same decisions, (B, max kept, D) layers
            dv, dt = tmodel(**x)
            padded = list(tmodel.records)
        assert [r.key for r in hard] == [r.key for r in packed] == [r.key for r in padded]
        for d, p in zip(padded, packed):
            torch.testing.assert_close(d.keep, p.keep, atol=0, rtol=0, msg=d.key)
        for h, p in zip(hard, packed):  # the same decisions, per instance
            torch.testing.assert_close(p.keep, h.keep, atol=1e-6, rtol=0, msg=h.key)
        last = _last_token_records(packed)
        for b in range(batch):
            one = {k: v[b:b + 1, :lengths[b]] if k != "pixel_values" else v[b:b + 1] for k, v in x.items()}
            with tmodel.mode("remove"):
                rv, rt = tmodel(**one)
            for stream, hard_out, packed_out, padded_out, removed in (("vision", hv, pv, dv, rv), ("text", ht, pt, dt, rt)):
                r = last[stream]
                pos = _kept(r, b)
                n = r.counts[b]
                torch.testing.assert_close(packed_out[b, :n], hard_out[b, pos], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(padded_out[b, :n], packed_out[b, :n], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(packed_out[b, :n], removed[0], atol=2e-5, rtol=1e-4)
                assert bool((packed_out[b, n:] == 0).all())  # unpacked: zeros after the kept tokens


def test_packed_fresh_trimmers_equal_original_model():
    """Stable init keeps every token: packed (padding dropped) == the original model on real tokens."""
    torch.manual_seed(0)
    model = ToyVLM(dim=32, heads=4, cross=2, uni_v=1).eval()
    tmodel = trim(model, TrimConfig(), adapter="toy").eval()
    tmodel.inference = "packed"
    x = _inputs(3, [7, 3, 5], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(tmodel(**x), model(**x), atol=1e-5, rtol=1e-5)
    assert any(r.counts is not None for r in tmodel.records)  # it really ran packed


def test_inference_attribute_selects_the_engine():
    torch.manual_seed(0)
    model = ToyVLM(dim=32, heads=2, cross=1, uni_v=1).eval()
    tmodel = trim(model, TrimConfig(), adapter="toy").eval()
    _randomise(tmodel, 0, 1.0)
    x = _inputs(2, [6, 4], seed=0)
    with torch.no_grad():
        tmodel(**x)
        assert all(r.mask is not None for r in tmodel.records)  # default: masked batches
        tmodel.inference = "packed"
        tmodel(**x)
        assert [r.counts is not None for r in tmodel.records if r.kind == "token"] == [True] * 4
        tmodel(**{k: v[:1] for k, v in x.items()})
        assert all(r.index is not None and r.counts is None for r in tmodel.records)  # batch 1: removal
    with pytest.raises(ValueError, match="inference"):
        tmodel.inference = "fast"


def test_one_host_sync_per_layer(monkeypatch):
    torch.manual_seed(0)
    model = ToyVLM(dim=32, heads=4, cross=2, uni_v=2).eval()
    tmodel = trim(model, TrimConfig(), adapter="toy").eval()
    _randomise(tmodel, 3, 1.0)
    calls = []
    real = P.fetch
    monkeypatch.setattr(P, "fetch", lambda ts: calls.append(len(ts)) or real(ts))
    monkeypatch.setattr("trimkit.model.fetch", lambda ts: calls.append(len(ts)) or real(ts))
    real_row = P.fetch_row  # mode remove: a batch-1 layer's (1, n) logits
    monkeypatch.setattr(P, "fetch_row", lambda ts: calls.append(len(ts)) or real_row(ts))
    x = _inputs(3, [7, 4, 2], seed=2)
    with torch.no_grad(), tmodel.mode("packed"):
        tmodel(**x)
    n_layers = len(tmodel.spec.layers)
    assert len(calls) <= n_layers + 1  # one per layer + the padding counts once per forward
    calls.clear()
    with torch.no_grad(), tmodel.mode("remove"):
        tmodel(**{k: v[:1] for k, v in x.items()})
    assert len(calls) == n_layers  # remove: the token and every head decision of a layer in one transfer


class _Link(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, uni):
        return x + self.proj(uni)


class LinkedToyVLM(ToyVLM):
    """Side tensors at the original length outside the layers (BridgeTower-like link)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.link = _Link(self.head.in_features // 2)

    def forward(self, pixel_values, input_ids, attention_mask):
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)
        v = torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1) + self.pos
        t = self.embed(input_ids)
        t_bias = (1.0 - attention_mask[:, None, None, :].to(t.dtype)) * -1e9
        for layer in self.text:
            t = layer(t, bias=t_bias)
        uni = v
        for layer in self.vision:
            uni = layer(uni)
        v = uni
        for lv, lt in zip(self.cross_v, self.cross_t):
            v = self.link(v, uni)
            v, t = lv(v, t, None, t_bias), lt(t, v, t_bias, None)
        return self.head(torch.cat([v[:, 0], t[:, 0]], -1))


def test_token_args_outside_layers_in_packed_mode():
    from trimkit.plugins import get_registry

    class LinkedAdapter(ToyAdapter):
        def describe(self, model):
            spec = super().describe(model)
            layers = [l for l in spec.layers if not l.path.startswith("vision.")]
            return dataclasses.replace(spec, layers=layers, token_args=[TokenArg("link", "uni", "vision", 1)])

    get_registry().adapters.register("toy_linked_packed", LinkedAdapter(), replace=True)
    torch.manual_seed(0)
    model = LinkedToyVLM(cross=3).eval()
    tmodel = trim(model, TrimConfig(), adapter="toy_linked_packed").eval()
    _randomise(tmodel, 4, 1.0)
    x = _inputs(3, [7, 5, 2], seed=5)
    with torch.no_grad():
        with tmodel.mode("hard"):
            a = tmodel(**x)
        with tmodel.mode("packed"):
            b = tmodel(**x)
    assert min(float(r.keep.min()) for r in tmodel.records if r.key.startswith("cross_v")) < 1
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_non_padding_biases_are_refused():
    class BiasedToy(ToyVLM):
        """A key bias that is non-zero on real tokens: packing would change the result."""

        def forward(self, pixel_values, input_ids, attention_mask):
            v = self.patch(pixel_values).flatten(2).transpose(1, 2)
            v = torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1) + self.pos
            t = self.embed(input_ids)
            t_bias = attention_mask[:, None, None, :].to(t.dtype) * 0.5
            for lv, lt in zip(self.cross_v, self.cross_t):
                v, t = lv(v, t, None, t_bias), lt(t, v, t_bias, None)
            return self.head(torch.cat([v[:, 0], t[:, 0]], -1))

    class CausalToy(ToyVLM):
        def forward(self, pixel_values, input_ids, attention_mask):
            t = self.embed(input_ids)
            n = t.shape[1]
            causal = torch.full((n, n), float("-inf")).triu(1)[None, None].expand(t.shape[0], 1, n, n)
            for layer in self.text:
                t = layer(t, bias=causal)
            return t[:, 0]

    class CausalAdapter(ToyAdapter):
        def describe(self, model):
            spec = super().describe(model)
            return dataclasses.replace(spec, layers=[l for l in spec.layers if l.path.startswith("text.")])

    from trimkit.plugins import get_registry

    get_registry().adapters.register("toy_causal", CausalAdapter(), replace=True)
    x = _inputs(2, [5, 3], seed=0)
    torch.manual_seed(0)
    biased = trim(BiasedToy(cross=1, uni_v=0, uni_t=0).eval(), TrimConfig(), adapter="toy").eval()
    with torch.no_grad(), biased.mode("packed"), pytest.raises(NotImplementedError, match="padding-only"):
        biased(**x)
    causal = trim(CausalToy(uni_t=1).eval(), TrimConfig(), adapter="toy_causal").eval()
    with torch.no_grad(), causal.mode("packed"), pytest.raises(NotImplementedError, match="key-padding"):
        causal(**x)


def test_meter_tiny_packed_equals_hard():
    from trimkit_meter import build_meter, meter_example_inputs

    torch.manual_seed(0)
    model = build_meter("tiny").eval()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="meter").eval()
    _randomise(tmodel, 1, 0.5)
    x = meter_example_inputs(model, batch_size=4, seed=3)  # padded text rows
    assert int(x["attention_mask"].sum()) < x["attention_mask"].numel()
    with torch.no_grad():
        with tmodel.mode("hard"):
            a = tmodel(**x)
        with tmodel.mode("packed"):
            b = tmodel(**x)
    assert min(float(r.keep.min()) for r in tmodel.records) < 1
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (varlen_attn)")
def test_cuda_varlen_packed_matches_hard_bf16():
    """On GPU the packed path runs torch.nn.attention.varlen.varlen_attn (flash, bf16)."""
    g = torch.Generator().manual_seed(0)
    counts_q, counts_k = [5, 17, 1, 9], [8, 3, 12, 4]

    def packing(counts):
        bidx = torch.cat([torch.full((c,), b) for b, c in enumerate(counts)]).cuda()
        pos = torch.cat([torch.arange(c) for c in counts]).cuda()
        return P.Packing(counts, counts, P._cu(torch.tensor(counts).cuda()), pos, bidx, max(counts))

    qp, kp = packing(counts_q), packing(counts_k)
    q = torch.randn(qp.total, 4, 64, generator=g).cuda().bfloat16()
    k = torch.randn(kp.total, 4, 64, generator=g).cuda().bfloat16()
    v = torch.randn(kp.total, 4, 64, generator=g).cuda().bfloat16()
    assert P._varlen_flash_ok(q)
    y = P.varlen_attention(q, k, v, qp, kp)
    ref = P.varlen_attention(q.float(), k.float(), v.float(), qp, kp)  # per-instance SDPA
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)

    torch.manual_seed(0)
    model = ToyVLM(dim=64, heads=2, cross=2, uni_v=1).eval()
    tmodel = trim(model, TrimConfig(), adapter="toy").eval()
    x = _inputs(4, [7, 2, 5, 3], seed=0)
    n_v = model.pos.shape[1]
    forced = {"vision.0": torch.randn(4, n_v, generator=g).cuda(), "cross_t.0": torch.randn(4, 7, generator=g).cuda()}
    tmodel.runtime.forced = forced
    tmodel.cuda().bfloat16()
    x = {k: (v.cuda().bfloat16() if v.is_floating_point() else v.cuda()) for k, v in x.items()}
    try:
        with torch.no_grad():
            with tmodel.mode("hard"):
                a = tmodel(**x)
            with tmodel.mode("packed"):
                b = tmodel(**x)
    finally:
        tmodel.runtime.forced = {}
    torch.testing.assert_close(b.float(), a.float(), atol=1e-1, rtol=1e-1)  # bf16 through several layers


def test_fetch_row_keeps_positions_exact_next_to_low_precision_logits():
    """Mode remove sends a layer's logits and integer parts (positions, segment ids) in one transfer:
    bfloat16 logits must not drag the positions into bfloat16 (301 is not a bfloat16 value)."""
    logits = torch.tensor([[0.5, -1.25, 3.0]], dtype=torch.bfloat16)
    positions = torch.tensor([[300, 301, 16777215]])
    flags = torch.tensor([[True, False]])
    out = P.fetch_row([logits, positions, flags])
    assert out == [[0.5, -1.25, 3.0], [300, 301, 16777215], [1, 0]]
    assert P.fetch_row([]) == []
