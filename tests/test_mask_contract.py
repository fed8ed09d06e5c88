"""The mask contract (DESIGN.md): masked training forward == physically trimmed forward, and
all-masks-1 == the original model. Property-tested over random models, inputs and masks."""

import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st
from toyvlm import ToyAdapter, ToyVLM

from trimkit import TrimConfig, trim


@pytest.fixture(scope="module", autouse=True)
def _toy(request):
    request.getfixturevalue("toy_registry_module")


def _randomise(tmodel, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _build(seed, dim, heads, cross, uni_v, token_target=0.5):
    torch.manual_seed(seed)
    model = ToyVLM(dim=dim, heads=heads, cross=cross, uni_v=uni_v).eval()
    return model, trim(model, TrimConfig(token_target=token_target, head_target=0.5), adapter="toy")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), heads=st.sampled_from([1, 2, 4]), cross=st.integers(1, 3),
       uni_v=st.integers(0, 2), scale=st.floats(0.2, 2.0), text_len=st.integers(2, 9))
def test_hard_masks_equal_physical_removal(seed, heads, cross, uni_v, scale, text_len):
    model, tmodel = _build(seed, 32, heads, cross, uni_v)
    tmodel.eval()
    _randomise(tmodel, seed, scale)
    g = torch.Generator().manual_seed(seed)
    x = {"pixel_values": torch.randn(1, 3, 32, 32, generator=g),
         "input_ids": torch.randint(1, 50, (1, text_len), generator=g),
         "attention_mask": torch.ones(1, text_len, dtype=torch.long)}
    with torch.no_grad(), tmodel.mode("hard"):
        masked = tmodel(**x)
        hard_records = list(tmodel.records)
    with torch.no_grad(), tmodel.mode("remove"):
        removed = tmodel(**x)
        remove_records = list(tmodel.records)
    torch.testing.assert_close(removed, masked, atol=2e-5, rtol=1e-4)
    # the two modes took the same decisions
    for h, r in zip(hard_records, remove_records):
        assert h.key == r.key
        assert abs(float(h.keep) - float(r.keep)) < 1e-6, h.key


def test_trimming_really_happens_and_changes_output():
    """Guard against the contract holding vacuously because nothing was dropped."""
    model, tmodel = _build(0, 32, 4, 2, 2)
    tmodel.eval()
    _randomise(tmodel, 1, 1.0)
    x = ToyAdapter().example_inputs(model, 1, seed=3)
    with torch.no_grad():
        full = model(**x)
        out = tmodel(**x)
    token_keep = [float(r.keep) for r in tmodel.records if r.kind == "token"]
    head_keep = [float(r.keep) for r in tmodel.records if r.kind == "head"]
    assert min(token_keep) < 1.0 and min(head_keep) < 1.0
    assert (out - full).abs().max() > 1e-3


def test_all_masks_one_equals_original():
    """Stable init keeps every token and head: the trimmed model is the original model."""
    model, tmodel = _build(0, 32, 4, 2, 2)
    x = ToyAdapter().example_inputs(model, 3, seed=1)  # padded batch
    tmodel.eval()
    with torch.no_grad():
        ref = model(**x)
        torch.testing.assert_close(tmodel(**x), ref, atol=1e-5, rtol=1e-5)
        with tmodel.mode("remove"):
            one = {k: v[:1] for k, v in x.items()}
            torch.testing.assert_close(tmodel(**one), model(**one), atol=1e-5, rtol=1e-5)
        with tmodel.full():
            assert torch.equal(tmodel(**x), ref)
    assert all(float(r.keep.min()) == 1.0 for r in tmodel.records) or not tmodel.records


def test_cls_kept_masks_binary_and_monotone():
    model, tmodel = _build(2, 32, 4, 2, 2)
    _randomise(tmodel, 5, 1.5)
    x = ToyAdapter().example_inputs(model, 4, seed=2)
    tmodel.eval()
    with torch.no_grad():
        tmodel(**x)  # batch 4 -> hard masks
    prev: dict[str, torch.Tensor] = {}
    for r in tmodel.records:
        assert set(torch.unique(r.mask).tolist()) <= {0.0, 1.0}, r.key
        if r.kind == "token":
            assert bool((r.mask[:, 0] == 1).all()), f"{r.key}: [CLS] dropped"
            stream = "text" if r.key.startswith(("text", "cross_t")) else "vision"
            if stream in prev:
                assert bool((r.mask <= prev[stream]).all()), f"{r.key}: a dropped token came back"
            prev[stream] = r.mask


def test_training_masks_are_soft_and_differentiable():
    model, tmodel = _build(3, 32, 4, 1, 1)
    tmodel.train()
    x = ToyAdapter().example_inputs(model, 2, seed=0)
    out = tmodel(**x)
    token = [r for r in tmodel.records if r.kind == "token"]
    assert token and all(0 < float(r.mask.detach().min()) and float(r.mask.detach().max()) <= 1 for r in token)
    loss = sum(r.keep.mean() for r in tmodel.records) + out.sum()
    loss.backward()
    grads = [p.grad for p in tmodel.trimmers.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_dropped_tokens_are_neither_keys_nor_values():
    """Drop every text token but [CLS] at the first text layer: the output must not depend on them,
    in either mode (this covers the vision stream's cross-attention to text too)."""
    model, tmodel = _build(4, 32, 4, 2, 1)
    tmodel.eval()
    x = ToyAdapter().example_inputs(model, 1, seed=4)
    n_text = x["input_ids"].shape[1]
    tmodel.runtime.forced = {"text.0": torch.cat([torch.ones(1, 1), -torch.ones(1, n_text - 1)], 1)}
    x2 = dict(x, input_ids=x["input_ids"].clone())
    x2["input_ids"][:, 1:] = (x["input_ids"][:, 1:] + 7) % 50
    try:
        for mode in ("hard", "remove"):
            with torch.no_grad(), tmodel.mode(mode):
                torch.testing.assert_close(tmodel(**x), tmodel(**x2), atol=1e-6, rtol=1e-6)
    finally:
        tmodel.runtime.forced = {}
    with torch.no_grad():  # whereas the untrimmed model does depend on them
        with pytest.raises(AssertionError):
            torch.testing.assert_close(model(**x), model(**x2), atol=1e-6, rtol=1e-6)


class _Link(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, uni):
        return x + self.proj(uni)


class LinkedToyVLM(ToyVLM):
    """BridgeTower-like: each co-attention layer's vision input gets the uni-modal vision states
    (original length) added by a link module outside the layers."""

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


def test_token_args_outside_layers_are_gathered():
    import dataclasses

    from trimkit import TokenArg
    from trimkit.plugins import get_registry

    class LinkedAdapter(ToyAdapter):
        declare = True

        def describe(self, model):
            spec = super().describe(model)
            layers = [l for l in spec.layers if not l.path.startswith("vision.")]  # uni vision untrimmed
            extra = [TokenArg("link", "uni", "vision", 1)] if self.declare else []
            return dataclasses.replace(spec, layers=layers, token_args=extra)

    adapter = LinkedAdapter()
    get_registry().adapters.register("toy_linked", adapter, replace=True)
    torch.manual_seed(0)
    model = LinkedToyVLM(cross=2).eval()
    tmodel = trim(model, TrimConfig(), adapter="toy_linked")
    _randomise(tmodel, 3, 1.0)
    x = adapter.example_inputs(model, 1, seed=5)
    with torch.no_grad(), tmodel.mode("hard"):
        a = tmodel(**x)
    with torch.no_grad(), tmodel.mode("remove"):
        b = tmodel(**x)
    assert min(float(r.keep) for r in tmodel.records if r.key.startswith("cross_v")) < 1
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    adapter.declare = False  # without the declaration, removal cannot line the link's input up
    bad = trim(model, TrimConfig(), adapter="toy_linked")
    bad.trimmers.load_state_dict(tmodel.trimmers.state_dict())
    with torch.no_grad(), bad.mode("remove"), pytest.raises(RuntimeError):
        bad(**x)


def test_a_layers_own_parameter_reads_follow_new_tensors():
    """A layer that reads a parameter directly (here a gate ``x * self.gate``, like BEiT's
    ``lambda_1`` or EVA's ``q_bias``): its traced graph holds fx's copy of it. When the module gets a
    new tensor object (``load_state_dict(assign=True)``; FSDP does it around every step) the trimmed
    layer must read the new one (the stale copy would go on being used and trained)."""
    import toyvlm

    class GatedLayer(toyvlm.Layer):
        def __init__(self, dim, heads, cross):
            super().__init__(dim, heads, cross)
            self.gate = nn.Parameter(torch.ones(dim))

        def forward(self, x, context=None, bias=None, context_bias=None):
            return super().forward(x, context, bias, context_bias) * self.gate

    torch.manual_seed(0)
    model = ToyVLM(dim=32, heads=4, cross=1, uni_v=2).eval()
    for i, old in enumerate(model.vision):
        layer = GatedLayer(32, 4, False)
        layer.load_state_dict(old.state_dict(), strict=False)
        model.vision[i] = layer
    config = TrimConfig(token_target=0.5, head_target=0.5)
    tmodel = trim(model, config, adapter="toy").eval()
    _randomise(tmodel, 0, 1.0)
    x = ToyAdapter().example_inputs(model, 1, seed=3)
    with torch.no_grad():
        before = tmodel(**x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for k in state:
            if k.endswith(".gate"):
                state[k] = torch.rand_like(state[k]) + 0.5
        model.load_state_dict(state, assign=True)
        after = tmodel(**x)
        fresh = trim(model, config, adapter="toy").eval()  # traced on the new tensors, same trimmers
        fresh.trimmers.load_state_dict(tmodel.trimmers.state_dict())
        reference = fresh(**x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, reference, atol=0, rtol=0)
