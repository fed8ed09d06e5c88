"""Shapes of models the first description vocabulary could not express, each written as a third
party would (a model from scratch, or a transformers model with a thin root naming its inputs):

* an HF decoder (Llama: RoPE, grouped-query heads, causal) whose attention goes through
  transformers' ``AttentionInterface``, trimmed at the kernel;
* one attention module called twice in one layer in different roles (``AttentionSpec.call``);
* an attention child named ``self`` directly under a layer;
* a root whose forward takes ``**kwargs``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_trimmers
from torch import nn

from trimkit import AttentionSpec, LayerSpec, ModelSpec, StreamSpec, TrimConfig, trim
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


def _register(name, adapter):
    get_registry().adapters.register(name, adapter, replace=True)
    return name


def _kept_positions(tmodel, stream_prefix):
    return [r for r in tmodel.records if r.kind == "token" and r.key.startswith(stream_prefix)][-1].index


# --- an HF decoder through AttentionInterface --------------------------------------------------

class LlamaRoot(nn.Module):
    """A thin root that names the inputs and calls the LM's own modules (no re-implementation:
    embeddings, rotary table, decoder layers and norm are transformers' code)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        h = self.lm.embed_tokens(input_ids)
        pe = self.lm.rotary_emb(h, torch.arange(h.shape[1], device=h.device)[None])
        for layer in self.lm.layers:
            h = layer(h, position_embeddings=pe)
        return self.lm.norm(h)


class LlamaAdapter:
    def matches(self, m):
        return isinstance(m, LlamaRoot)

    def describe(self, m):
        heads = m.lm.config.num_attention_heads
        attn = AttentionSpec("self_attn", "self", heads, via="kernel")
        layers = [LayerSpec(f"lm.layers.{i}", "text", hidden="hidden_states",
                            hidden_token_args={"position_embeddings": 1}, attentions=[attn])
                  for i in range(len(m.lm.layers))]
        return ModelSpec([StreamSpec("text")], layers, ["input_ids"], leaf_modules=["lm.rotary_emb"])

    def example_inputs(self, m, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, m.lm.config.vocab_size, (batch_size, 11), generator=g)}

    def build(self, size="tiny", seed=0):
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return LlamaRoot(LlamaModel(cfg).eval())


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    name = _register("llama_toy", LlamaAdapter())
    root = LlamaAdapter().build()
    return root, trim(root, TrimConfig(token_target=0.5, head_target=0.5), adapter=name).eval()


def test_hf_decoder_runs_at_the_attention_interface_and_is_exact(llama):
    root, tmodel = llama
    kernels = [m for m in tmodel._graph.modules() if type(m).__name__ == "KernelAttention"]
    assert [k.route for k in kernels] == ["attention_interface"] * 3
    assert str(tmodel.plan).count("kernel/attention_interface") == 3
    x = LlamaAdapter().example_inputs(root, 2, seed=1)
    with torch.no_grad():
        reference = root.lm(input_ids=x["input_ids"], use_cache=False).last_hidden_state
        assert float((root(**x) - reference).abs().max()) == 0  # the thin root is the model
        with tmodel.mode("hard"):
            hard = tmodel(**x)
        with tmodel.mode("remove"):
            one = tmodel(input_ids=x["input_ids"][:1])
    torch.testing.assert_close(hard, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(one, reference[:1], atol=1e-5, rtol=0)
    assert root.lm.config._attn_implementation == "sdpa"  # selected per call only, then restored


def test_hf_decoder_masked_equals_removed_with_rope_gqa_and_causality(llama):
    root, tmodel = llama
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped = {"token": 0, "head": 0}
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, seed)
            x = LlamaAdapter().example_inputs(root, 1, seed=10 + seed)
            with torch.no_grad():
                with tmodel.mode("remove"):
                    removed = tmodel(**x)
                kept = _kept_positions(tmodel, "lm.layers.2")
                for r in tmodel.records:
                    dropped[r.kind] += float(r.keep) < 1
                with tmodel.mode("hard"):
                    hard = tmodel(**x)
            assert removed.shape[1] == kept.numel() < x["input_ids"].shape[1]
            torch.testing.assert_close(removed, hard[:, kept], atol=1e-4, rtol=0)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert dropped["token"] > 0 and dropped["head"] > 0


def test_hf_decoder_packed_batches_are_causal_per_instance(llama):
    """Packed mode at the kernel with causal attention: each instance's kept rows attend causally in
    their original order, so a packed batch equals the masked batch at every kept position and each
    instance removed alone; mode padded (a causal mask over padded rows) is refused by name."""
    root, tmodel = llama
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    counts_differ = False
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, 20 + seed)
            x = LlamaAdapter().example_inputs(root, 3, seed=30 + seed)
            with torch.no_grad():
                with tmodel.mode("hard"):
                    hard = tmodel(**x)
                with tmodel.mode("packed"):
                    packed = tmodel(**x)
                last = [r for r in tmodel.records if r.kind == "token"][-1]
                counts, pos = last.counts, last.index.tolist()
                counts_differ |= len(set(counts)) > 1
                assert sum(counts) < 3 * x["input_ids"].shape[1]
                start = 0
                for b, n in enumerate(counts):
                    kept = pos[start:start + n]
                    start += n
                    torch.testing.assert_close(packed[b, :n], hard[b, kept], atol=1e-4, rtol=0)
                    with tmodel.mode("remove"):
                        alone = tmodel(input_ids=x["input_ids"][b:b + 1])
                    torch.testing.assert_close(alone[0], hard[b, kept], atol=1e-4, rtol=0)
                with tmodel.mode("padded"), pytest.raises(NotImplementedError, match="causal"):
                    tmodel(**x)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert counts_differ


# --- one module, two roles in one layer ---------------------------------------------------------

class Mix(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context=None, bias=None):
        c = x if context is None else context
        B, N, D = x.shape
        h = self.heads
        q = self.q(x).view(B, N, h, -1).transpose(1, 2)
        k = self.k(c).view(B, c.shape[1], h, -1).transpose(1, 2)
        v = self.v(c).view(B, c.shape[1], h, -1).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, N, D))


class SharedRoleLayer(nn.Module):
    """Uses one attention module twice: on its own stream, then on the other stream's tokens."""

    def __init__(self, dim, heads):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self = Mix(dim, heads)  # an attention child named ``self``, directly under the layer

    def forward(self, x, context):
        x = x + self.self(self.n1(x))
        return x + self.self(self.n2(x), context)


class TwoRoles(nn.Module):
    def __init__(self, dim=16, heads=4, layers=2):
        super().__init__()
        self.img = nn.Linear(6, dim)
        self.txt = nn.Embedding(30, dim)
        self.text_layer = SharedRoleLayer(dim, heads)
        self.layers = nn.ModuleList(SharedRoleLayer(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, 3)

    def forward(self, patches, input_ids, **kwargs):  # **kwargs: a root like HF task models
        v, t = self.img(patches), self.txt(input_ids)
        t = t + self.text_layer.n1(t)
        for layer in self.layers:
            v = layer(v, t)
        return self.head(v[:, 0])


class TwoRolesAdapter:
    def matches(self, m):
        return isinstance(m, TwoRoles)

    def describe(self, m):
        heads = m.layers[0].self.heads
        roles = [AttentionSpec("self", "self", heads, via="kernel", call=0),
                 AttentionSpec("self", "cross", heads, via="kernel", call=1)]
        layers = [LayerSpec(f"layers.{i}", "vision", "cross", hidden="x", context="context", context_stream="text",
                            attentions=roles) for i in range(len(m.layers))]
        return ModelSpec([StreamSpec("vision"), StreamSpec("text")], layers, ["patches", "input_ids"])

    def example_inputs(self, m, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        return {"patches": torch.randn(batch_size, 10, 6, generator=g),
                "input_ids": torch.randint(0, 30, (batch_size, 5), generator=g)}

    def build(self, size="tiny", seed=0):
        torch.manual_seed(seed)
        return TwoRoles().eval()


def test_one_module_called_in_two_roles():
    name = _register("two_roles", TwoRolesAdapter())
    model = TwoRolesAdapter().build()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter=name).eval()
    plan = str(tmodel.plan)
    assert "attention 0 self call 0: self, queries vision -> keys vision, kernel/fx" in plan
    assert "attention 1 self call 1: cross, queries vision -> keys text, kernel/fx" in plan
    assert tmodel.plan.layer("layers.1").reads == ("text",)
    # one head trimmer per role: the cross-attention call's trimmer reads the text [CLS] too
    heads = tmodel.trimmers["layers_0"].heads if "layers_0" in tmodel.trimmers else None
    assert heads is not None and set(heads) == {"0", "1"}
    x = TwoRolesAdapter().example_inputs(model, 1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(tmodel(**x), model(**x), atol=1e-5, rtol=0)
        for seed in range(3):
            randomize_trimmers(tmodel, seed)
            with tmodel.mode("hard"):
                hard = tmodel(**x)
            with tmodel.mode("remove"):
                removed = tmodel(**x)
            torch.testing.assert_close(removed, hard, atol=1e-4, rtol=0)
            assert any(r.kind == "token" and float(r.keep) < 1 for r in tmodel.records)
        # trimming through both roles really changed the computation
        assert not torch.allclose(removed, model(**x), atol=1e-4)


def test_the_same_call_described_twice_is_refused():
    with pytest.raises(ValueError, match="described twice for the same call"):
        ModelSpec([StreamSpec("v")], [LayerSpec("l", "v", attentions=[
            AttentionSpec("a", "self", 2, call=0), AttentionSpec("a", "self", 2, call=0)])], ["x"]).validate()
    with pytest.raises(ValueError, match="described twice for the same call"):
        ModelSpec([StreamSpec("v")], [LayerSpec("l", "v", attentions=[
            AttentionSpec("a", "self", 2), AttentionSpec("a", "self", 2, call=1)])], ["x"]).validate()


def test_a_described_call_that_never_happens_is_named():
    from trimkit.trace import TraceError

    class Bad(TwoRolesAdapter):
        def describe(self, m):
            spec = super().describe(m)
            extra = AttentionSpec("self", "self", 4, via="kernel", call=2)
            return ModelSpec(spec.streams, [LayerSpec(l.path, l.stream, l.site, hidden=l.hidden, context=l.context,
                                                      context_stream=l.context_stream,
                                                      attentions=[*l.attentions, extra]) for l in spec.layers],
                             spec.input_names)

    name = _register("two_roles_bad", Bad())
    with pytest.raises(TraceError, match=r"layers\.0.*\['self \(call 2\)'\].*calls seen: \{'self': 2\}"):
        trim(TwoRolesAdapter().build(), TrimConfig(), adapter=name)


# --- call-site constants and per-call kernel traces ---------------------------------------------

class ScaledLayer(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.n = nn.LayerNorm(dim)
        self.attn = Mix(dim, heads)

    def forward(self, x, scale=1.0, bias=None):
        y = x * scale + self.attn(self.n(x))  # first call: no bias
        return y + self.attn(self.n(y), None, bias)  # second call: with the bias


class ConstNet(nn.Module):
    def __init__(self, scales=(3.0, 3.0)):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.layers = nn.ModuleList(ScaledLayer() for _ in scales)
        self.scales = scales

    def forward(self, input_ids):
        x = self.emb(input_ids)
        # a real effect: keys equal to the last token are blocked, in the second call only
        bias = (input_ids == input_ids[:, -1:]).to(x.dtype)[:, None, None, :] * -1e4
        for layer, s in zip(self.layers, self.scales):
            x = layer(x, s, bias)
        return x[:, 0]


class ConstAdapter(TwoRolesAdapter):
    def matches(self, m):
        return isinstance(m, ConstNet)

    def describe(self, m):
        attn = AttentionSpec("attn", "self", 4, via="kernel")  # every call, each traced at its own call site
        return ModelSpec([StreamSpec("text")], [LayerSpec(f"layers.{i}", "text", hidden="x",
                                                          hidden_token_args={"bias": -1}, attentions=[attn])
                                                for i in range(len(m.layers))], ["input_ids"])

    def example_inputs(self, m, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, 30, (batch_size, 6), generator=g)}


def test_call_site_constants_and_per_call_arguments_are_kept():
    """A layer called with a non-default constant (scale=3.0) and a module whose second call passes an
    argument the first does not: both were silently traced with the defaults of the first call."""
    name = _register("const_toy", ConstAdapter())
    torch.manual_seed(0)
    model = ConstNet().eval()
    tmodel = trim(model, TrimConfig(token_target=0.5), adapter=name).eval()
    x = ConstAdapter().example_inputs(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(tmodel(**x), model(**x), atol=1e-5, rtol=0)


def test_a_layer_called_with_different_constants_is_refused():
    from trimkit.trace import TraceError

    name = _register("const_toy", ConstAdapter())

    class Shared(ConstNet):
        def forward(self, input_ids):
            x = self.emb(input_ids)
            return self.layers[0](self.layers[0](x, 2.0), 3.0)[:, 0]

    class SharedAdapter(ConstAdapter):
        def matches(self, m):
            return isinstance(m, Shared)

        def describe(self, m):
            spec = super().describe(m)
            return ModelSpec(spec.streams, spec.layers[:1], spec.input_names)

    name = _register("const_shared", SharedAdapter())
    with pytest.raises(TraceError, match=r"layers\.0.*different constant arguments"):
        trim(Shared(), TrimConfig(), adapter=name)


# --- configs passed to autowrapped functions; trace errors name the function -------------------

import dataclasses  # noqa: E402


@dataclasses.dataclass
class FlagConfig:
    scale: float = 2.0

    def __post_init__(self):
        self._mode = "scaled"  # not a field: lost if fx rebuilds the config from its fields


def scale_by_config(x, config):
    return x * config.scale if getattr(config, "_mode", None) == "scaled" else x


class ConfigNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = FlagConfig()
        self.emb = nn.Embedding(30, 16)
        self.layers = nn.ModuleList([ScaledLayer()])

    def forward(self, input_ids):
        x = scale_by_config(self.emb(input_ids), config=self.config)
        return self.layers[0](x)[:, 0]


class ConfigAdapter(ConstAdapter):
    def matches(self, m):
        return isinstance(m, ConfigNet)

    def describe(self, m):
        spec = super().describe(m)
        return ModelSpec(spec.streams, spec.layers, spec.input_names, autowrap_functions=[scale_by_config])


def test_a_config_reaches_autowrapped_functions_as_it_is():
    """transformers' mask functions take config=self.config; fx rebuilt dataclass configs from their
    fields, dropping _attn_implementation, so masks silently vanished (VisualBERT). The config now
    travels by reference."""
    name = _register("config_toy", ConfigAdapter())
    torch.manual_seed(0)
    model = ConfigNet().eval()
    tmodel = trim(model, TrimConfig(), adapter=name).eval()
    x = ConfigAdapter().example_inputs(model, 2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(tmodel(**x), model(**x), atol=1e-6, rtol=0)
    assert any(n.op == "get_attr" and n.target == "config" for n in tmodel._graph.graph.nodes)


def test_a_trace_error_names_the_function_that_branched():
    from trimkit.trace import TraceError

    def gate(x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x

    class Branchy(ConfigNet):
        def forward(self, input_ids):
            return self.layers[0](gate(self.emb(input_ids)))[:, 0]

    class BranchyAdapter(ConfigAdapter):
        def matches(self, m):
            return isinstance(m, Branchy)

    name = _register("branchy_toy", BranchyAdapter())
    with pytest.raises(TraceError, match=r"model Branchy \(at tests/test_description_shapes\.py:\d+ in gate\)"):
        trim(Branchy(), TrimConfig(), adapter=name)
