"""The ``llava`` adapter (transformers' LlavaForConditionalGeneration, prefill) on a tiny random
model: the wrapper and the untrimmed trimmed model are the HF model; with random trimmers masked ==
removed == packed, per instance, with the image at another position in every instance; image
tokens are dropped while each question's last token stays; save_pretrained/from_pretrained."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers

import trimkit
from trimkit import TrimConfig
from trimkit.plugins import get_registry, select_adapter

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {"prompt": 0.7, "image": 0.4, "question": 0.7}


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("llava")


@pytest.fixture(scope="module")
def llava(adapter):
    model = adapter.build()
    tmodel = trimkit.trim(model, TrimConfig(token_target=TARGETS, head_target=0.5), adapter="llava").eval()
    return model, tmodel


def _hf_logits(model, x):
    return model.model(pixel_values=x["pixel_values"], input_ids=x["input_ids"],
                       attention_mask=x["attention_mask"], use_cache=False).logits


def _last_token_record(tmodel):
    return [r for r in tmodel.records if r.kind == "token"][-1]


def test_registered_and_selected(adapter, llava):
    model, tmodel = llava
    assert select_adapter(model) == "llava" and select_adapter(model.model) == "llava"
    assert model.trim_layers == [1, 2]  # the middle half of 4 decoder layers
    kernels = [m for m in tmodel._graph.modules() if type(m).__name__ == "KernelAttention"]
    assert [k.route for k in kernels] == ["attention_interface"] * 4
    plan = str(tmodel.plan)
    assert "starts per instance from input 'segment_starts'" in plan and "question (summary = its last real token)" in plan
    assert plan.count("[not trimmable") == 2
    other = adapter.build(trim_layers=[0, -1])
    assert other.trim_layers == [0, 3]
    assert [l.trimmable for l in adapter.describe(other).layers] == [True, False, False, True]


def test_nothing_trimmed_is_the_hf_model(adapter, llava):
    model, tmodel = llava
    x = adapter.example_inputs(model, 3, seed=1)
    assert x["segment_starts"][:, 1].unique().numel() == 3  # the image starts elsewhere in each instance
    real = x["attention_mask"].bool()
    with torch.no_grad():
        reference = _hf_logits(model, x)
        assert float((model(**x) - reference)[real].abs().max()) == 0  # the wrapper is the model
        with tmodel.mode("hard"):
            hard = tmodel(**x)
        for b in range(3):
            one = {k: v[b:b + 1] for k, v in x.items()}
            n = int(real[b].sum())
            one = {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
            with tmodel.mode("remove"):
                alone = tmodel(**one)
            torch.testing.assert_close(alone[0], reference[b, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(hard[real], reference[real], atol=1e-5, rtol=0)
    hidden = adapter.build(output="hidden")
    with torch.no_grad():
        out = model.model(pixel_values=x["pixel_values"], input_ids=x["input_ids"],
                          attention_mask=x["attention_mask"], output_hidden_states=True, use_cache=False)
        torch.testing.assert_close(hidden(**x)[real], out.hidden_states[-1][real], atol=1e-6, rtol=0)


def test_masked_removed_and_packed_agree_per_instance(adapter, llava):
    model, tmodel = llava
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped, counts_differ = set(), False
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, 40 + seed)
            x = adapter.example_inputs(model, 3, seed=50 + seed)
            last_real = (x["attention_mask"].sum(1) - 1).tolist()
            with torch.no_grad():
                with tmodel.mode("hard"):
                    hard = tmodel(**x)
                    mask = _last_token_record(tmodel).mask
                    dropped |= {r.key.split(":")[1] for r in tmodel.records
                                if r.kind == "token" and float(r.keep.min()) < 1}
                assert bool(mask[torch.arange(3), last_real].all())  # every question's last token is kept
                with tmodel.mode("packed"):
                    packed = tmodel(**x)
                    last = _last_token_record(tmodel)
                    layer = last.key.split(":")[0]  # a segment's record counts its segment; the index is the stream's
                    counts = [sum(c) for c in zip(*(r.counts for r in tmodel.records
                                                    if r.kind == "token" and r.key.startswith(layer + ":")))]
                pos = last.index.tolist()
                assert sum(counts) == len(pos)
                counts_differ |= len(set(counts)) > 1
                start = 0
                for b, n in enumerate(counts):
                    kept = pos[start:start + n]
                    start += n
                    assert kept[-1] == last_real[b]  # the packed row of an instance ends with its next-token logits
                    torch.testing.assert_close(packed[b, :n], hard[b, kept], atol=1e-4, rtol=0)
                    one = {k: v[b:b + 1] for k, v in x.items()}
                    with tmodel.mode("remove"):
                        alone = tmodel(**one)
                    removed_at = _last_token_record(tmodel).index.tolist()
                    real_kept = [p for p in removed_at if x["attention_mask"][b, p]]
                    assert real_kept == kept
                    rows = [i for i, p in enumerate(removed_at) if x["attention_mask"][b, p]]
                    torch.testing.assert_close(alone[0, rows], hard[b, kept], atol=1e-4, rtol=0)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert "image" in dropped and counts_differ


def test_image_tokens_are_dropped_at_their_target(adapter, llava):
    model, tmodel = llava
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    try:
        randomize_trimmers(tmodel, 7)
        x = adapter.example_inputs(model, 1, seed=3)
        with torch.no_grad():
            tmodel(**x)  # batch 1: removed
        image = [r for r in tmodel.records if r.kind == "token" and r.key.endswith(":image")]
        assert [r.key for r in image] == [f"model.model.language_model.layers.{i}:image" for i in (1, 2)]
        assert min(float(r.keep) for r in image) < 1
        start, end = x["segment_starts"][0, 1:].tolist()
        kept = _last_token_record(tmodel).index.tolist()
        assert 0 < sum(start <= p < end for p in kept) < end - start
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert tmodel.final_targets["model.model.language_model.layers.1:image"] == TARGETS["image"]


def test_segment_starts_helper():
    from trimkit_llava import llava_segment_starts

    ids = torch.tensor([[1, 5, 3, 3, 6, 0], [1, 3, 3, 7, 8, 9]])
    assert llava_segment_starts(ids, 3).tolist() == [[0, 2, 4], [0, 1, 3]]
    with pytest.raises(ValueError, match="no image token"):
        llava_segment_starts(torch.tensor([[1, 5, 6]]), 3)
    with pytest.raises(ValueError, match="contiguous"):
        llava_segment_starts(torch.tensor([[1, 3, 5, 3]]), 3)


def test_save_pretrained_from_pretrained_round_trip(adapter, llava, tmp_path):
    model, _ = llava
    model.model.save_pretrained(tmp_path / "tiny")
    loaded = trimkit.adapter.load_pretrained("llava", tmp_path / "tiny", output="logits", trim_layers=[2])
    assert type(loaded).__name__ == "LlavaForTrimming" and loaded.trim_layers == [2] and not loaded.training
    assert loaded.model.config._attn_implementation == "sdpa"
    x = adapter.example_inputs(model, 2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), model(**x), atol=0, rtol=0)
    with pytest.raises(TypeError, match="unknown option"):
        adapter.from_pretrained(str(tmp_path / "tiny"), no_such_field=1)
    with pytest.raises(trimkit.adapter.PretrainedNotFoundError):
        adapter.from_pretrained(str(tmp_path / "missing"))


def test_trimkit_check_passes_and_says_padded_refuses_causal_attention():
    """``trimkit check`` on the tiny build: every step passes; the packed step checks mode 'packed'
    and says that mode 'padded' refuses causal attention (it cannot pad causal rows)."""
    from trimkit.check import run_check

    report = run_check("llava", trials=1)
    assert all(r.ok and not r.skipped for r in report.results), report.format()
    packed = next(r for r in report.results if r.name.startswith("packed == masked"))
    assert "max |packed - masked|" in packed.detail and "mode padded refuses" in packed.detail, report.format()


def test_training_mode_is_differentiable(adapter):
    model = adapter.build(seed=1)
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="llava").train()
    x = adapter.example_inputs(model, 2, seed=2)
    out = tmodel(**x)
    assert out.shape == (2, x["input_ids"].shape[1], model.config.text_config.vocab_size)
    out[x["attention_mask"].bool()].pow(2).mean().backward()
    grads = {name for name, p in tmodel.trimmers.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".token.policies.1." in name for name in grads), sorted(grads)  # segment 1: the image's trimmer
    assert any(".heads." in name for name in grads), sorted(grads)
