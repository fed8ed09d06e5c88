"""Bucketed and compiled batch-1 removal (:mod:`trimkit.engine.buckets`, ``TrimmedModel.compile``).

What must hold: padding kept counts to buckets changes nothing a user sees (outputs, decisions,
kept masks are mode ``remove``'s; ``trimkit check`` compares every registered adapter, see
test_conformance); a compiled model really runs its layers compiled, reuses each graph, reads its
weights as they are at each call, and runs eager (said in a warning) what it cannot compile.

Most tests hand ``compile`` a backend that runs each exported graph as it is (everything of the
compiled path except inductor's code generation, which takes seconds per graph); one test compiles
with inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._pytree import tree_leaves

from trimkit import TrimConfig, trim
from trimkit.engine.buckets import Bucketing, bucket_size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _toy(request):
    request.getfixturevalue("toy_registry_module")


def _exported_as_is(gm, example_inputs):
    return gm


def _model(seed=0):
    from trimkit.plugins import get_registry

    impl = get_registry().adapters.get("toy")
    model = impl.build(seed=seed).eval()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="toy").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return impl, model, tmodel


def _diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def _decisions(tmodel):
    return [(r.key, r.index.tolist()) for r in tmodel.records if r.index is not None]


@given(st.integers(1, 300), st.integers(0, 300), st.integers(1, 12))
def test_bucket_sizes(length, n, buckets):
    n = min(n, length)
    k = bucket_size(n, length, buckets)
    assert n <= k <= length
    step = -(-length // buckets)
    assert k - n < step  # the slack is less than one step
    assert k == n if n in (0, length) else True
    sizes = {bucket_size(m, length, buckets) for m in range(1, length + 1)}
    assert len(sizes) <= buckets + 1  # every multiple of the step, and the length itself


def test_bad_settings_are_refused_by_name():
    _, _, tmodel = _model()
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="buckets must be a positive integer"):
            Bucketing(bad)
        with pytest.raises(ValueError, match="buckets must be a positive integer"):
            tmodel.compile(buckets=bad)
    with pytest.raises(TypeError, match="Bucketing or None"):
        tmodel.bucketing = 4
    with pytest.raises(ValueError, match="tmodel.compile"):
        tmodel.bucketing = Bucketing(4, compiled=True)


def test_compiled_removal_is_removal_and_reuses_its_graphs():
    impl, model, tmodel = _model()
    xs = [impl.example_inputs(model, 1, seed=s) for s in range(5)]
    with torch.no_grad():
        ref = [tmodel(**x) for x in xs]
        ref_decisions = []
        for x in xs:
            tmodel(**x)
            ref_decisions.append(_decisions(tmodel))
    tmodel.compile(buckets=3, backend=_exported_as_is)
    b = tmodel.bucketing
    layers = [l._compiled for l in tmodel._trimmed_layers()]
    with torch.no_grad():
        for x, r, d in zip(xs, ref, ref_decisions):
            out = tmodel(**x)
            assert _diff(out, r) < 1e-5
            assert _decisions(tmodel) == d  # the decisions are mode remove's
        assert b.padded > 0 and not b.failures
        assert b.compiled_calls == b.calls  # every layer call ran compiled
        graphs = sum(len(c.graphs) for c in layers)
        assert all(len(c.graphs) <= 3 ** 2 for c in layers)  # at most buckets x buckets per layer
        for x, r in zip(xs, ref):  # again: the same signatures, no new graph
            assert _diff(tmodel(**x), r) < 1e-5
        assert sum(len(c.graphs) for c in layers) == graphs
        calls = b.compiled_calls
        with tmodel.eager():  # exact counts, eager layers
            assert _diff(tmodel(**xs[0]), ref[0]) < 1e-5
        assert b.compiled_calls == calls and tmodel.bucketing is b
    out = tmodel(**xs[1])  # gradients enabled: eager (the compiled graphs are inference graphs)
    assert b.compiled_calls == calls and _diff(out, ref[1]) < 1e-5
    assert out.requires_grad


def test_compiled_layers_read_the_weights_at_each_call():
    impl, model, tmodel = _model()
    x = impl.example_inputs(model, 1, seed=3)
    tmodel.compile(buckets=3, backend=_exported_as_is)
    with torch.no_grad():
        before = tmodel(**x)
        model.cross_t[-1].mlp[0].weight.mul_(1.5)  # in place, after the graphs were built
        model.cross_t[-1].mlp[0].bias.add_(0.3)
        after = tmodel(**x)
        calls = tmodel.bucketing.compiled_calls
        with tmodel.eager():
            expected = tmodel(**x)
    assert tmodel.bucketing.compiled_calls == calls > 0
    assert _diff(before, after) > 1e-3  # the change reaches the output...
    assert _diff(after, expected) < 1e-5  # ...as it does eager


def test_a_layer_that_cannot_compile_runs_eager_with_a_warning(monkeypatch):
    from trimkit.engine import compiled

    impl, model, tmodel = _model()
    x = impl.example_inputs(model, 1, seed=4)
    with torch.no_grad():
        ref = tmodel(**x)
    tmodel.compile(buckets=3, backend=_exported_as_is)
    victim = tmodel._trimmed_layers()[0]._compiled
    real = compiled.compile_graph

    def compile_graph(body, example, options, backend):
        if getattr(body, "inner", None) is victim.inner:
            raise RuntimeError("data-dependent branch\nmore")
        return real(body, example, options, backend)

    monkeypatch.setattr(compiled, "compile_graph", compile_graph)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=rf"layer '{victim.path}' runs eager.*data-dependent branch\)$"):
        out = tmodel(**x)
    b = tmodel.bucketing
    assert _diff(out, ref) < 1e-5
    assert b.failures == {victim.path: "RuntimeError: data-dependent branch"}
    assert 0 < b.compiled_calls < b.calls


def test_modules_outside_the_layers_run_compiled_too():
    """METER's text encoder runs whole, outside the described layers: compile() compiles it as well
    (and only modules with submodules); MACs are still counted eager, with the exact kept counts."""
    from trimkit.engine.compiled import CompiledModule
    from trimkit.macs import count_macs
    from trimkit.plugins import get_registry

    impl = get_registry().adapters.get("meter")
    model = impl.build(size="tiny", seed=0).eval()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="meter").eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    xs = [impl.example_inputs(model, 1, seed=s) for s in (1, 2)]
    with torch.no_grad():
        ref = [tmodel(**x) for x in xs]
        macs = count_macs(tmodel, **xs[0]).total
    tmodel.compile(buckets=3, backend=_exported_as_is)
    wrapped = {m.graphs.path: m for m in tmodel._graph.modules() if isinstance(m, CompiledModule)}
    assert list(wrapped) == ["text_transformer"]
    assert wrapped["text_transformer"].module is model.text_transformer
    with torch.no_grad():
        for x, r in zip(xs, ref):
            assert _diff(tmodel(**x), r) < 1e-5
        assert count_macs(tmodel, **xs[0]).total == macs
    assert len(wrapped["text_transformer"].graphs.graphs) == 1 and not tmodel.bucketing.failures
    assert set(tmodel.state_dict()) == set(trim(model, TrimConfig(), adapter="meter").state_dict())


def test_inductor_compiled_removal_is_removal():
    """One model through inductor itself (C++ kernels and wrapper): the outputs are mode remove's."""
    impl, model, tmodel = _model()
    xs = [impl.example_inputs(model, 1, seed=s) for s in (5, 6)]
    with torch.inference_mode():
        ref = [tmodel(**x) for x in xs]
    tmodel.compile(buckets=2)
    with torch.inference_mode():
        outs = [tmodel(**x) for x in xs]
    b = tmodel.bucketing
    assert not b.failures and b.compiled_calls == b.calls > 0
    for out, r in zip(outs, ref):
        assert _diff(out, r) < 1e-5


def test_train_mode_hooks_and_autocast_run_eager_and_nothing_sticks():
    """Calls a compiled graph would get wrong run eager: the model in train mode (dropout: a graph built
    then would keep it), a forward hook on one of the layer's modules (it must fire), autocast."""
    impl, model, tmodel = _model()
    model.cross_t[0].mlp.append(torch.nn.Dropout(0.5))  # a layer with dropout, active in train mode
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="toy").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = impl.example_inputs(model, 1, seed=2)
    with torch.no_grad():
        ref = tmodel(**x)
    tmodel.compile(buckets=3, backend=_exported_as_is)
    b = tmodel.bucketing
    tmodel.train()
    with torch.no_grad(), tmodel.mode("remove"):
        tmodel(**x)  # train mode, forced removal: eager, no graph built with dropout in it
    assert b.compiled_calls == 0
    tmodel.eval()
    with torch.no_grad():
        assert _diff(tmodel(**x), ref) < 1e-5 and _diff(tmodel(**x), ref) < 1e-5  # deterministic: no dropout
    calls = b.compiled_calls
    assert calls > 0
    seen = []
    handle = model.cross_t[0].mlp[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            assert _diff(tmodel(**x), ref) < 1e-5
    finally:
        handle.remove()
    assert len(seen) == 1  # the hook fired, on the exact kept tokens (the layer ran unpadded)
    with torch.no_grad():
        tmodel(**x)
        layer = next(l for l in tmodel._trimmed_layers() if l.spec.path == "cross_t.0")
        n_kept = len(next(r for r in tmodel.records if r.key == "cross_t.0").index)
    assert seen[0][1] == n_kept
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = b.compiled_calls
        tmodel(**x)
    assert b.compiled_calls == before and layer is not None


def test_replaced_weights_and_copies_read_their_own_weights():
    import copy

    impl, model, tmodel = _model()
    x = impl.example_inputs(model, 1, seed=3)
    tmodel.compile(buckets=3, backend=_exported_as_is)
    with torch.no_grad():
        tmodel(**x)
    state = {k: v * 1.3 if k.endswith("weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new parameter objects
    with torch.no_grad():
        compiled = tmodel(**x)
        with tmodel.eager():
            eager = tmodel(**x)
    assert _diff(compiled, eager) < 1e-5
    twin = copy.deepcopy(tmodel)
    with torch.no_grad():
        for p in twin.model.parameters():
            p.mul_(0.7)
        got = twin(**x)
        with twin.eager():
            want = twin(**x)
    assert twin.bucketing.compiled_calls > 0
    assert _diff(got, want) < 1e-5 and _diff(got, compiled) > 1e-3


def test_an_attention_reading_the_layers_context_argument_as_its_own_masks_the_slack():
    """AttentionSpec.context naming the layer's own context argument: the slack padded into it is masked."""
    import dataclasses

    from toyvlm import ToyAdapter

    from trimkit.plugins import get_registry

    class OwnContext(ToyAdapter):
        def describe(self, model):
            spec = super().describe(model)
            layers = [dataclasses.replace(l, attentions=[dataclasses.replace(a, context="context")
                                                         if a.kind == "cross" else a for a in l.attentions])
                      if l.context is not None else l for l in spec.layers]
            return dataclasses.replace(spec, layers=layers)

    get_registry().adapters.register("toy_own_context", OwnContext(), replace=True)
    impl, model, _ = _model()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="toy_own_context").eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    assert any(a.context == "context" for l in tmodel.spec.layers for a in l.attentions)
    for s in range(4):
        x = impl.example_inputs(model, 1, seed=s)
        with torch.no_grad():
            tmodel.bucketing = None
            ref = tmodel(**x)
            tmodel.bucketing = Bucketing(3)
            assert _diff(tmodel(**x), ref) < 1e-5
    assert tmodel.bucketing.padded > 0


def test_decoders_compile_their_kernel_route_layers_and_fastv_stays_exact():
    """LLaVA: the decoder's layers (attention intercepted at the kernel, weights shared by the wrapper)
    compile, every call; a FastV model (its attention probe records the exact kept tokens) pads nothing
    where the probe reads and equals mode remove."""
    import trimkit
    from trimkit.plugins import get_registry

    adapter = get_registry().adapters.get("llava")
    model = adapter.build()
    tmodel = trimkit.trim(model, TrimConfig(token_target={"image": 0.5, "prompt": 0.8, "question": 0.8},
                                            head_target=0.6), adapter="llava").eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = {k: v[:1] for k, v in adapter.example_inputs(model, 1, seed=8).items()}
    with torch.no_grad():
        ref = tmodel(**x)
    tmodel.compile(buckets=3, backend=_exported_as_is)
    with torch.no_grad():
        assert _diff(tmodel(**x), ref) < 1e-5
    b = tmodel.bucketing
    assert not b.failures and b.compiled_calls == b.calls > 0
    fastv = trimkit.trim(model, TrimConfig(token_policy="fastv", token_layers=["seq.uni.2"], token_target={"image": 0.5},
                                           trim_heads=False), adapter="llava").eval()
    for s in range(3):
        x = {k: v[:1] for k, v in adapter.example_inputs(model, 1, seed=20 + s).items()}
        with torch.no_grad():
            fastv.bucketing = None
            ref = fastv(**x)
            fastv.bucketing = Bucketing(2)
            assert _diff(fastv(**x), ref) < 1e-5
