"""A co-attention layer that updates both streams in one call, using one cross-attention module
twice in opposite roles (text queries on image keys, then image queries on text keys): what the
first description could not express (both calls got one key mask). Written as a third party would:
the model from scratch, the adapter a description only (``LayerSpec.updates``,
``AttentionSpec.call`` and ``query_stream``)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers, shorter_rows
from toyvlm import Attention, _attn_inputs
from torch import nn

from trimkit import AttentionSpec, LayerSpec, ModelSpec, StreamSpec, StreamUpdate, TrimConfig, trim
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


class BiLayer(nn.Module):
    """Self-attention per stream, then one shared cross-attention module both ways, FFN per stream."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_v, self.norm_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_v, self.self_t = Attention(dim, heads), Attention(dim, heads)
        self.cross = Attention(dim, heads)  # shared: called twice, in opposite roles
        self.ffn_v = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ffn_t = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, v, t, t_bias):
        v = v + self.self_v(self.norm_v(v))
        t = t + self.self_t(self.norm_t(t), None, t_bias)
        t2 = t + self.cross(t, v)  # text queries, image keys
        v2 = v + self.cross(v, t, t_bias)  # image queries, text keys (padding masked)
        return v2 + self.ffn_v(v2), t2 + self.ffn_t(t2)


class BiVLM(nn.Module):
    def __init__(self, dim=32, heads=4, depth=3, labels=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.embed = nn.Embedding(40, dim)
        self.layers = nn.ModuleList(BiLayer(dim, heads) for _ in range(depth))
        self.head = nn.Linear(2 * dim, labels)

    def forward(self, pixel_values, input_ids, attention_mask):
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)
        v = torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1)
        t = self.embed(input_ids)
        t_bias = (1.0 - attention_mask[:, None, None, :].to(t.dtype)) * -1e9
        for layer in self.layers:
            v, t = layer(v, t, t_bias)
        return self.head(torch.cat([v[:, 0], t[:, 0]], -1))


class BiAdapter:
    def matches(self, m):
        return isinstance(m, BiVLM)

    def describe(self, m):
        h = m.layers[0].cross.num_heads
        spec = lambda path, kind, **kw: AttentionSpec(path, kind, h, out="out", inputs=_attn_inputs, **kw)  # noqa: E731
        attentions = [spec("self_v", "self"), spec("self_t", "self", query_stream="text"),
                      spec("cross", "cross", call=0, query_stream="text"),  # text -> vision
                      spec("cross", "cross", call=1)]  # vision -> text
        layers = [LayerSpec(f"layers.{i}", "vision", "co", hidden="v", output=0, attentions=attentions,
                            updates=[StreamUpdate("text", "t", output=1, token_args={"t_bias": -1})])
                  for i in range(len(m.layers))]
        return ModelSpec([StreamSpec("vision"), StreamSpec("text", padding_input="attention_mask")], layers,
                         ["pixel_values", "input_ids", "attention_mask"])

    def example_inputs(self, m, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 40, (batch_size, 7), generator=g)
        mask = shorter_rows(batch_size, 7)
        return {"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=g), "input_ids": ids,
                "attention_mask": mask}

    def build(self, size="tiny", seed=0):
        torch.manual_seed(seed)
        return BiVLM().eval()


@pytest.fixture(scope="module")
def bi():
    get_registry().adapters.register("bi_toy", BiAdapter(), replace=True)
    model = BiAdapter().build()
    return model, trim(model, TrimConfig(token_target={"vision": 0.5, "text": 0.8}, head_target=0.6),
                       adapter="bi_toy").eval()


def test_both_streams_get_trimmers_and_targets(bi):
    _, tmodel = bi
    assert tmodel.final_targets["layers.0"] == 0.5 and tmodel.final_targets["layers.0@text"] == 0.8
    assert set(tmodel.trimmers["layers_0"].heads) == {"0", "1", "2", "3"}
    plan = str(tmodel.plan)
    assert "layers.0: updates vision (co) reads text; tokens keep 0.50" in plan
    assert "and updates text in the same call; its tokens keep 0.80" in plan
    assert "gathered with the kept tokens: t_bias (dim -1, as text)" in plan and "6 token trimmers" in plan
    assert "attention 2 cross call 0: cross, queries text -> keys vision" in plan
    assert "attention 3 cross call 1: cross, queries vision -> keys text" in plan
    x = BiAdapter().example_inputs(tmodel.model, 1)
    with torch.no_grad():
        tmodel(**x)
    assert [r.key for r in tmodel.records if r.kind == "token"] == [
        k for i in range(3) for k in (f"layers.{i}@text", f"layers.{i}")]


def test_head_targets_follow_the_query_stream(bi):
    model, _ = bi
    tmodel = trim(model, TrimConfig(head_target={"text": 0.3, "vision": 0.7}), adapter="bi_toy")
    # attentions: self_v (vision queries), self_t (text), cross call 0 (text), cross call 1 (vision)
    assert [tmodel.final_targets[f"layers.0.{j}"] for j in range(4)] == [0.7, 0.3, 0.3, 0.7]


def test_fresh_trimmers_are_the_model(bi):
    model, tmodel = bi
    with torch.no_grad():
        for batch, modes in ((1, ("hard", "remove")), (3, ("hard", "packed", "padded"))):
            x = BiAdapter().example_inputs(model, batch, seed=batch)
            ref = model(**x)
            for mode in modes:
                with tmodel.mode(mode):
                    torch.testing.assert_close(tmodel(**x), ref, atol=1e-5, rtol=0, msg=f"{mode} batch {batch}")


def test_masked_removed_packed_agree_with_both_streams_trimmed(bi):
    model, tmodel = bi
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped = {"vision": 0, "text": 0}
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, seed)
            with torch.no_grad():
                one = BiAdapter().example_inputs(model, 1, seed=10 + seed)
                with tmodel.mode("hard"):
                    hard = tmodel(**one)
                with tmodel.mode("remove"):
                    removed = tmodel(**one)
                for r in tmodel.records:
                    if r.kind == "token" and float(r.keep) < 1:
                        dropped["text" if "@text" in r.key else "vision"] += 1
                torch.testing.assert_close(removed, hard, atol=1e-4, rtol=0)
                batch = BiAdapter().example_inputs(model, 3, seed=20 + seed)
                with tmodel.mode("hard"):
                    hard = tmodel(**batch)
                for mode in ("packed", "padded"):
                    with tmodel.mode(mode):
                        torch.testing.assert_close(tmodel(**batch), hard, atol=1e-4, rtol=0, msg=mode)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert dropped["vision"] > 0 and dropped["text"] > 0


def test_each_role_sees_its_own_keys(bi):
    """Drop every text token but [CLS] at the first layer: the image-queries call (keys: text) sees one
    key, the text-queries call (keys: vision) sees every image token; masked and removed agree."""
    model, tmodel = bi
    x = BiAdapter().example_inputs(model, 1, seed=5)
    tmodel.runtime.forced["layers.0@text"] = torch.full((1, 7), -1.0)
    try:
        with torch.no_grad():
            with tmodel.mode("hard"):
                hard = tmodel(**x)
            with tmodel.mode("remove"):
                removed = tmodel(**x)
                text = next(r for r in tmodel.records if r.key == "layers.0@text")
                vision = next(r for r in tmodel.records if r.key == "layers.0")
    finally:
        tmodel.runtime.forced.clear()
    assert text.index.tolist() == [0] and float(vision.keep) == 1.0
    torch.testing.assert_close(removed, hard, atol=1e-4, rtol=0)
    with torch.no_grad():
        assert float((hard - model(**x)).abs().max()) > 1e-3


def test_a_shared_module_described_once_gets_a_hint(bi):
    """The mistake a new user made: the cross-attention used both ways described once (call=None).
    The size mismatch that follows names the likely fix instead of only torch's shapes."""

    class Once(BiAdapter):
        def describe(self, m):
            spec = BiAdapter.describe(self, m)
            h = m.layers[0].cross.num_heads
            attentions = [*spec.layers[0].attentions[:2],
                          AttentionSpec("cross", "cross", h, out="out", inputs=_attn_inputs)]
            return ModelSpec(spec.streams, [LayerSpec(l.path, l.stream, l.site, hidden=l.hidden, output=l.output,
                                                      attentions=attentions, updates=l.updates) for l in spec.layers],
                             spec.input_names)

    get_registry().adapters.register("bi_once", Once(), replace=True)
    model, _ = bi
    tmodel = trim(model, TrimConfig(token_target=0.5), adapter="bi_once").eval()
    randomize_trimmers(tmodel, 0)
    x = BiAdapter().example_inputs(model, 1, seed=1)
    with torch.no_grad(), tmodel.mode("hard"), pytest.raises(RuntimeError, match=r"layer 'layers\.0' failed after "
                                                                                  r"trimming .*call index and query_stream"):
        tmodel(**x)
