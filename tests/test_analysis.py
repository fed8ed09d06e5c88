"""The measurements behind the analysis figures (``trimkit_train.analysis``; ``trimkit repro fig2/fig5/
fig6``): each against a brute-force definition, on random inputs or a tiny METER.

Feared: a similarity that silently counts padding or the diagonal, attention maps that are not
the ones the model attended with (the recorder must see each call's own mask, scale, causality and
grouped-query heads), and a recorder that changes the model's output or leaves
``F.scaled_dot_product_attention`` patched."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorItems, randomize_trimmers

from trimkit import TrimConfig, trim
from trimkit_train.analysis import (_weights, attention_recorder, head_retention, head_similarity,
                                    similarity_profile, token_similarity, vision_keep_masks)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_similarity_is_the_mean_over_pairs_of_real_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, generator=gen)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    got = token_similarity(x, real)
    for b in range(3):
        idx = real[b].nonzero().flatten().tolist()
        pairs = [F.cosine_similarity(x[b, i], x[b, j], dim=0) for i, j in itertools.combinations(idx, 2)]
        assert float(got[b]) == pytest.approx(float(sum(pairs) / len(pairs)), abs=1e-6)
    same = torch.ones(1, 4, 5)
    assert float(token_similarity(same)) == pytest.approx(1.0)


def test_head_similarity_is_the_mean_over_head_pairs_and_real_rows():
    gen = torch.Generator().manual_seed(1)
    attn = torch.rand(2, 3, 4, 5, generator=gen).softmax(-1)
    rows = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    got = head_similarity(attn, rows)
    nan_row = attn.clone()
    nan_row[1, :, 1] = float("nan")  # a padded row whose keys were all masked
    torch.testing.assert_close(head_similarity(nan_row, rows), got)
    for b in range(2):
        per_row = []
        for k in rows[b].nonzero().flatten().tolist():
            sims = [F.cosine_similarity(attn[b, i, k], attn[b, j, k], dim=0) for i, j in itertools.combinations(range(3), 2)]
            per_row.append(sum(sims) / len(sims))
        assert float(got[b]) == pytest.approx(float(sum(per_row) / len(per_row)), abs=1e-6)


@pytest.mark.parametrize("case", ["additive", "bool", "causal", "causal_longer_keys", "gqa", "scale"])
def test_recorded_weights_are_what_sdpa_attends_with(case):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    nk = 7 if case == "causal_longer_keys" else 5  # SDPA aligns a causal mask top-left
    k = torch.randn(2, 2 if case == "gqa" else 4, nk, 8, generator=gen)
    v = torch.randn(2, k.shape[1], nk, 8, generator=gen)
    kw: dict = {}
    if case == "additive":
        kw["attn_mask"] = torch.randn(2, 1, 5, 5, generator=gen)
    elif case == "bool":
        kw["attn_mask"] = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
        kw["attn_mask"][..., 0] = True  # every row reads something
    elif case.startswith("causal"):
        kw["is_causal"] = True
    elif case == "scale":
        kw["scale"] = 0.3
    w = _weights(q, k, kw.get("attn_mask"), kw.get("is_causal", False), kw.get("scale"))
    vv = v.repeat_interleave(2, dim=1) if case == "gqa" else v
    expect = F.scaled_dot_product_attention(q, k, v, enable_gqa=case == "gqa", **kw)
    torch.testing.assert_close(w @ vv, expect, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def meter():
    from trimkit_meter import build_meter
    from trimkit_meter.spec import meter_example_inputs

    torch.manual_seed(0)
    model = build_meter("tiny").eval()
    return model, meter_example_inputs(model, batch_size=3, seed=1)


def test_recorder_sees_each_modules_own_attention_and_changes_nothing(meter):
    model, x = meter
    original = F.scaled_dot_product_attention
    fast = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)  # what the recorder does: MHA through F.sdpa
        try:
            reference = model(**x)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        attn = model.cross_modal_text_layers[0].attention.self
        path = "cross_modal_text_layers.0.attention.self"
        seen = {}
        h = attn.register_forward_hook(lambda m, a, o: seen.update(args=a))
        with attention_recorder(model, [path, "vit_model.transformer.resblocks.0.attn"]) as rec:
            out = model(**x)
        h.remove()
    assert F.scaled_dot_product_attention is original and torch.backends.mha.get_fastpath_enabled() == fast  # restored
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    (w,) = rec[path]
    hidden, _, bias = seen["args"]
    B, N, D = hidden.shape
    q = attn.query(hidden).view(B, N, attn.num_heads, -1).transpose(1, 2)
    k = attn.key(hidden).view(B, N, attn.num_heads, -1).transpose(1, 2)
    expect = ((q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5 + bias).softmax(-1)
    torch.testing.assert_close(w, expect, atol=1e-5, rtol=0)
    assert len(rec["vit_model.transformer.resblocks.0.attn"]) == 1  # nn.MultiheadAttention reached it too


def test_similarity_profile_leaves_text_padding_out(meter):
    model, x = meter
    from trimkit.plugins import get_registry

    spec = get_registry().adapters.get("meter").describe(model)

    assert not bool(x["attention_mask"].all())  # the example has padding
    prof = similarity_profile(model, spec, TensorItems(x), instances=3, batch_size=3)
    layer = "cross_modal_text_layers.0"
    outs = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, o: outs.update(out=o))
    with torch.no_grad():
        model(**x)
    h.remove()
    expect = token_similarity(outs["out"], x["attention_mask"].bool())
    assert prof["tokens"][layer] == pytest.approx(expect.tolist(), abs=1e-6)
    assert prof["tokens"][layer] != pytest.approx(token_similarity(outs["out"]).tolist(), abs=1e-4)
    assert set(prof["heads"]) == {f"{l.path}.{a.path}" for l in spec.layers for a in l.attentions}
    assert all(len(v) == 3 for v in prof["heads"].values())


def test_head_retention_and_keep_masks_are_the_records(meter):
    model, x = meter
    tm = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="meter").eval()
    randomize_trimmers(tm, 3)

    kept = head_retention(tm, TensorItems(x), instances=3, batch_size=2)  # two batches: 2 + 1 instances
    with torch.no_grad(), tm.mode("hard"):
        tm(**x)
    heads = {r.key: r.mask.float().mean(-1).tolist() for r in tm.records if r.kind == "head"}
    assert kept.keys() == heads.keys()
    for key in heads:
        assert kept[key] == pytest.approx(heads[key], abs=1e-6)
    assert any(v < 1 for vals in kept.values() for v in vals)
    masks = vision_keep_masks(tm, x)
    vision = [r for r in tm.records if r.kind == "token" and r.key in masks]
    assert list(masks) == [l.path for l in tm.spec.layers if l.stream == "vision" and l.path in masks]
    for r in vision:
        assert torch.equal(masks[r.key], r.mask)
    ms = list(masks.values())
    assert all(bool((b <= a).all()) for a, b in zip(ms, ms[1:]))  # cumulative: a dropped token stays dropped


def test_fig5_metrics_by_hand():
    from trimkit_train.repro import _fig5_metrics

    t = torch.tensor
    # 1 [CLS] + 4 patches; question 0 asks about patch 0, question 1 about patch 3
    pairs = [{"patches": [[0], [3]]}]
    kept = [[{"last": t([1, 1, 1, 0, 0]).bool()}, {"last": t([1, 0, 1, 0, 1]).bool()}]]
    m = _fig5_metrics(kept, pairs)
    # q0: the asked patch kept, 2 of 4 kept -> lift 1 / 0.5 = 2; q1: the same -> 2
    assert m["relevance_lift"] == pytest.approx(2.0)
    # kept patches {0, 1} and {1, 3}: IoU 1/3
    assert m["question_sensitivity"] == pytest.approx(2 / 3)
    same = [[{"last": t([1, 0, 0, 0, 0]).bool()}, {"last": t([1, 0, 0, 0, 0]).bool()}]]
    assert _fig5_metrics(same, pairs)["question_sensitivity"] == 0.0  # both keep no patch: the same


def test_question_pairs_ask_about_two_cells_of_one_image():
    from trimkit_train.data.digit_grid import DigitGridDataset
    from trimkit_train.repro import question_pairs

    ds = DigitGridDataset("test", size=40, grid=4, cell=16, digits_per_image=(2, 5))
    pairs = question_pairs(ds, 5)
    assert 0 < len(pairs) <= 5
    for p in pairs:
        d = ds.describe(p["index"])
        assert p["questions"][0] == d["question"] and p["questions"][0] != p["questions"][1]
        assert p["patches"][0] == d["relevant_patches"] and p["patches"][0] != p["patches"][1]
        assert torch.equal(p["items"][0]["pixel_values"], p["items"][1]["pixel_values"])
        assert ds.tokenizer.decode(p["items"][1]["input_ids"].tolist()) == p["questions"][1]
        r, c = divmod(p["patches"][1][0], 4)
        assert d["grid"][r, c] >= 0  # the second question asks about a cell holding a digit
