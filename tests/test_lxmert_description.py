"""transformers' LXMERT described, not wrapped: a language stream with [CLS] (padding from
``attention_mask``), a stream of region features with no [CLS] (``summary="mean"``, padding from
``visual_attention_mask``), language and relational layers of one stream each, and cross-modality
``LxmertXLayer``s that update both streams in one call and run ONE cross-attention module
(``visual_attention.att``) twice in opposite roles (language queries on region keys, then region
queries on language keys). Written from the guide by a new user: ``LayerSpec.updates``,
``AttentionSpec.call`` / ``query_stream``, BERT-style attention without its own output projection
(``out=None``, ``output=lambda y: (y,)``)."""

from __future__ import annotations

import pytest
import torch
from conformance import assert_conforms
from conftest import randomize_trimmers, shorter_rows

from trimkit import AttentionSpec, AttnCall, LayerSpec, ModelSpec, StreamSpec, StreamUpdate, TrimConfig, trim
from trimkit.plugins import get_registry

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, REGIONS = 7, 9  # tokens per instance ([CLS] included) and region features per image
ATOL = 1e-5
X_LAYERS = ("encoder.x_layers.0", "encoder.x_layers.1")


def _attn_inputs(args, kwargs):  # LxmertAttention(hidden_states, context, attention_mask=None, output_attentions=False)
    call = dict(zip(("hidden_states", "context", "attention_mask"), args)) | kwargs
    x, ctx = call["hidden_states"], call["context"]
    return AttnCall(x, None if ctx is x else ctx, call.get("attention_mask"))  # self-attention passes x twice


class LxmertAdapter:
    def matches(self, model):
        return isinstance(model, transformers.LxmertModel)

    def describe(self, model):
        c = model.config
        attn = lambda path, kind, **kw: AttentionSpec(  # noqa: E731  (BERT-style: no output projection inside)
            path, kind, c.num_attention_heads, q="query", k="key", v="value", out=None, inputs=_attn_inputs,
            output=lambda y: (y,), **kw)
        layers = [LayerSpec(f"encoder.layer.{i}", "text", "uni", hidden="hidden_states", output=0,
                            hidden_token_args={"attention_mask": -1}, attentions=[attn("attention.self", "self")])
                  for i in range(c.l_layers)]
        layers += [LayerSpec(f"encoder.r_layers.{i}", "vision", "uni", hidden="hidden_states", output=0,
                             hidden_token_args={"attention_mask": -1}, attentions=[attn("attention.self", "self")])
                   for i in range(c.r_layers)]
        x_attentions = [attn("visual_attention.att", "cross", call=0),  # language queries -> region keys
                        attn("visual_attention.att", "cross", call=1, query_stream="vision"),  # regions -> language
                        attn("lang_self_att.self", "self"),
                        attn("visn_self_att.self", "self", query_stream="vision")]
        layers += [LayerSpec(f"encoder.x_layers.{i}", "text", "co", hidden="lang_feats", output=0,
                             hidden_token_args={"lang_attention_mask": -1}, attentions=x_attentions,
                             updates=[StreamUpdate("vision", "visual_feats", output=1,
                                                   token_args={"visual_attention_mask": -1})])
                   for i in range(c.x_layers)]
        return ModelSpec([StreamSpec("text", padding_input="attention_mask"),
                          StreamSpec("vision", padding_input="visual_attention_mask", summary="mean")], layers,
                         ["input_ids", "visual_feats", "visual_pos", "attention_mask", "visual_attention_mask"])

    def example_inputs(self, model, batch_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        c = model.config
        mask, vmask = shorter_rows(batch_size, TEXT), shorter_rows(batch_size, REGIONS, step=2)
        ids = torch.randint(1, c.vocab_size, (batch_size, TEXT), generator=g).masked_fill(mask == 0, 0)
        return {"input_ids": ids, "visual_feats": torch.randn(batch_size, REGIONS, c.visual_feat_dim, generator=g),
                "visual_pos": torch.rand(batch_size, REGIONS, c.visual_pos_dim, generator=g),
                "attention_mask": mask, "visual_attention_mask": vmask}

    def build(self, size="tiny", seed=0):
        torch.manual_seed(seed)
        config = transformers.LxmertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                           l_layers=2, x_layers=2, r_layers=1, visual_feat_dim=8, visual_pos_dim=4,
                                           max_position_embeddings=64, num_qa_labels=3, num_object_labels=3,
                                           num_attr_labels=3)
        return transformers.LxmertModel(config).eval()


@pytest.fixture(scope="module")
def lxmert():
    get_registry().adapters.register("lxmert_toy", LxmertAdapter(), replace=True)
    model = LxmertAdapter().build()
    return model, trim(model, TrimConfig(token_target={"text": 0.8, "vision": 0.5}, head_target=0.6),
                       adapter="lxmert_toy").eval()


@pytest.fixture
def saved_trimmers(lxmert):
    _, tmodel = lxmert
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    yield
    tmodel.trimmers.load_state_dict(saved)
    tmodel.runtime.forced.clear()


_OUTPUTS = {"text": "language_output", "vision": "vision_output"}


def _run(tmodel, mode, x):
    """Pooled output and each stream's output rows that are real kept tokens (in the mode's own layout),
    with the kept masks and the records of the forward."""
    with torch.no_grad(), tmodel.mode(mode):
        out = tmodel(**x)
        kept = {s: tmodel.kept_mask(s) for s in _OUTPUTS}
        records = list(tmodel.records)
    rows = {s: out[name][kept[s]] for s, name in _OUTPUTS.items()}
    return out["pooled_output"], rows, kept, records


def test_plan_has_both_streams_and_both_roles_of_the_shared_cross_attention(lxmert):
    model, tmodel = lxmert
    plan = str(tmodel.plan)
    assert "vision: summary = mean of its kept tokens (first token always kept), padding from input " \
           "'visual_attention_mask'" in plan
    assert "text: [CLS] at 0 (always kept), padding from input 'attention_mask'" in plan
    assert "encoder.x_layers.0: updates text (co) reads vision; tokens keep 0.80" in plan
    assert "and updates vision in the same call; its tokens keep 0.50" in plan
    assert "gathered with the kept tokens: lang_attention_mask (dim -1), visual_attention_mask (dim -1, as vision)" in plan
    roles = [(a.path, a.call, a.queries, a.keys, a.route) for a in tmodel.plan.layer("encoder.x_layers.0").attentions]
    assert roles == [("visual_attention.att", 0, "text", "vision", "projections"),
                     ("visual_attention.att", 1, "vision", "text", "projections"),
                     ("lang_self_att.self", None, "text", "text", "projections"),
                     ("visn_self_att.self", None, "vision", "vision", "projections")]
    for key in X_LAYERS:
        assert tmodel.final_targets[key] == 0.8 and tmodel.final_targets[f"{key}@vision"] == 0.5
    assert tmodel.final_targets["encoder.r_layers.0"] == 0.5 and tmodel.final_targets["encoder.layer.1"] == 0.8
    # head targets follow each call's query stream: call 0 and lang_self_att are text's, call 1 and visn_self_att vision's
    by_stream = trim(model, TrimConfig(head_target={"text": 0.3, "vision": 0.7}), adapter="lxmert_toy")
    assert [by_stream.final_targets[f"encoder.x_layers.0.{j}"] for j in range(4)] == [0.3, 0.7, 0.3, 0.7]
    x = LxmertAdapter().example_inputs(model, 1)
    _, _, _, records = _run(tmodel, "remove", x)
    assert [r.key for r in records if r.kind == "token"] == [
        "encoder.layer.0", "encoder.layer.1", "encoder.r_layers.0",
        *(k for layer in X_LAYERS for k in (f"{layer}@vision", layer))]


def test_nothing_trimmed_is_the_hf_model(lxmert):
    model, tmodel = lxmert
    for batch, modes in ((1, ("off", "hard", "remove")), (3, ("off", "hard", "packed", "padded"))):
        x = LxmertAdapter().example_inputs(model, batch, seed=batch)
        with torch.no_grad():
            ref = model(**x)
        real = {"text": x["attention_mask"].bool(), "vision": x["visual_attention_mask"].bool()}
        assert batch == 1 or not real["text"].all() and not real["vision"].all()  # padding in both streams
        for mode in modes:
            pooled, rows, kept, records = _run(tmodel, mode, x)
            torch.testing.assert_close(pooled, ref.pooled_output, atol=ATOL, rtol=0, msg=f"{mode} batch {batch}")
            if mode == "off":
                continue
            assert records and all(float(r.keep.min()) == 1.0 for r in records), mode  # padding is not "dropped"
            for s, name in _OUTPUTS.items():
                assert int(kept[s].sum()) == int(real[s].sum()), (mode, s)  # every real token, no padding
                torch.testing.assert_close(rows[s], ref[name][real[s]], atol=ATOL, rtol=0, msg=f"{mode} {s} batch {batch}")
    assert torch.equal(tmodel.runtime.padding["text"], x["attention_mask"])
    assert torch.equal(tmodel.runtime.padding["vision"], x["visual_attention_mask"])


def test_the_trimmers_read_the_mean_of_the_real_regions(lxmert):
    """At the first x-layer the region trimmer's own summary, and the language trimmer's context, are the
    mean of the real regions entering it (padding regions excluded), not region 0."""
    model, tmodel = lxmert
    x = LxmertAdapter().example_inputs(model, 3, seed=4)
    seen = {}
    hooks = [tmodel.trimmers[name].token.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args))
             for name in ("encoder_x_layers_0", "encoder_x_layers_0_vision")]
    try:
        with torch.no_grad(), tmodel.mode("hard"):
            tmodel(**x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        hf = model(**x, output_hidden_states=True)
    regions, lang = hf.vision_hidden_states[0], hf.language_hidden_states[1]  # after r_layers.0 / layer.1
    w = x["visual_attention_mask"].float()
    mean = (regions * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    _, own, context = seen["encoder_x_layers_0_vision"]
    torch.testing.assert_close(own, mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(context, lang[:, 0], atol=ATOL, rtol=0)  # the language [CLS]
    _, own, context = seen["encoder_x_layers_0"]
    torch.testing.assert_close(own, lang[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(context, mean, atol=ATOL, rtol=0)
    assert not torch.allclose(mean, regions.mean(1), atol=1e-3) and not torch.allclose(mean, regions[:, 0], atol=1e-3)


@pytest.mark.usefixtures("saved_trimmers")
def test_masked_removed_and_packed_agree_with_both_streams_trimmed(lxmert):
    model, tmodel = lxmert
    dropped = {"text": 0, "vision": 0, "heads": 0}
    for seed in range(3):
        randomize_trimmers(tmodel, seed)
        one = LxmertAdapter().example_inputs(model, 1, seed=10 + seed)
        hard, hard_rows, hard_kept, hard_records = _run(tmodel, "hard", one)
        removed, rows, kept, records = _run(tmodel, "remove", one)
        torch.testing.assert_close(removed, hard, atol=ATOL, rtol=0, msg=f"pooled, seed {seed}")
        for s in _OUTPUTS:  # the kept tokens' outputs, and the same tokens kept
            assert kept[s].shape[1] == int(hard_kept[s].sum()), s
            torch.testing.assert_close(rows[s], hard_rows[s], atol=ATOL, rtol=0, msg=f"{s}, seed {seed}")
        assert [r.key for r in records] == [r.key for r in hard_records]
        for r, h in zip(records, hard_records):
            assert float(r.keep) == pytest.approx(float(h.keep)), r.key
            if r.kind == "token":
                assert r.index.tolist() == h.mask[0].nonzero().flatten().tolist(), r.key
                assert 0 in r.index.tolist() and r.index.numel() <= r.total, r.key  # [CLS] / first region kept
                if r.key.startswith(X_LAYERS) and r.index.numel() < r.total:
                    dropped["vision" if r.key.endswith("@vision") else "text"] += 1
            elif r.key.startswith(X_LAYERS) and float(r.keep) < 1:
                dropped["heads"] += 1

        batch = LxmertAdapter().example_inputs(model, 3, seed=20 + seed)
        real = {"text": batch["attention_mask"].sum(1).tolist(), "vision": batch["visual_attention_mask"].sum(1).tolist()}
        hard, hard_rows, hard_kept, hard_records = _run(tmodel, "hard", batch)
        for mode in ("packed", "padded"):
            out, rows, kept, records = _run(tmodel, mode, batch)
            torch.testing.assert_close(out, hard, atol=ATOL, rtol=0, msg=f"{mode} pooled, seed {seed}")
            for s in _OUTPUTS:
                assert kept[s].sum(1).tolist() == hard_kept[s].sum(1).tolist(), (mode, s)
                torch.testing.assert_close(rows[s], hard_rows[s], atol=ATOL, rtol=0, msg=f"{mode} {s}, seed {seed}")
            for r, h in zip(records, hard_records, strict=True):
                assert r.key == h.key
                torch.testing.assert_close(r.keep, h.keep, atol=1e-6, rtol=0)
                if r.kind == "token" and mode == "packed":  # kept counts per instance: within its real tokens
                    stream = "vision" if r.key.endswith("@vision") or "r_layers" in r.key else "text"
                    assert all(1 <= c <= n for c, n in zip(r.counts, real[stream])), (r.key, r.counts, real[stream])
    assert all(n > 0 for n in dropped.values()), dropped


@pytest.mark.usefixtures("saved_trimmers")
@pytest.mark.parametrize("stream", ["text", "vision"])
def test_each_role_of_the_shared_cross_attention_sees_its_own_keys(lxmert, stream):
    """Drop every token of one stream but its first at the first x-layer: the call whose keys are that
    stream sees one key, the other call all of the other stream's; masked and removed still agree and
    the output really changed."""
    model, tmodel = lxmert
    x = LxmertAdapter().example_inputs(model, 1, seed=5)
    key = "encoder.x_layers.0" + ("@vision" if stream == "vision" else "")
    length = TEXT if stream == "text" else REGIONS
    tmodel.runtime.forced[key] = torch.full((1, length), -1.0)
    hard, hard_rows, _, _ = _run(tmodel, "hard", x)
    removed, rows, kept, records = _run(tmodel, "remove", x)
    by_key = {r.key: r for r in records}
    other = "encoder.x_layers.0" + ("@vision" if stream == "text" else "")
    assert by_key[key].index.tolist() == [0] and float(by_key[other].keep) == 1.0
    assert kept[stream].shape[1] == 1
    torch.testing.assert_close(removed, hard, atol=ATOL, rtol=0)
    for s in _OUTPUTS:
        torch.testing.assert_close(rows[s], hard_rows[s], atol=ATOL, rtol=0, msg=s)
    with torch.no_grad():
        assert float((removed - model(**x).pooled_output).abs().max()) > 1e-3


def test_trimkit_check_conforms(lxmert):
    report = assert_conforms("lxmert_toy")
    assert "padding in ['text', 'vision']" in report.format()
