"""The ``bridgetower`` adapter on a tiny random ``BridgeTowerModel``: selection, exactness, link towers,
mask semantics (masked == removed), MACs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import trimkit
from trimkit import TrimConfig
from trimkit.macs import count_macs
from trimkit.model import TrimmedModel
from trimkit.plugins import get_registry, select_adapter

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("bridgetower")


@pytest.fixture(scope="module")
def model(adapter):
    return adapter.build("tiny", token_outputs=True)


def _randomize(tmodel: trimkit.TrimmedModel, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            torch.nn.init.normal_(p, std=scale, generator=gen)


def _stream_of(tmodel: trimkit.TrimmedModel) -> dict[str, str]:
    return {layer.path: layer.stream for layer in tmodel.spec.layers}


def _final_kept(tmodel: trimkit.TrimmedModel) -> dict[str, torch.Tensor]:
    """Original positions of the tokens each stream still has after its last trimmer (mode remove)."""
    streams = _stream_of(tmodel)
    return {streams[r.key]: r.index for r in tmodel.records if r.kind == "token"}


def test_selected_from_the_model(adapter, model):
    from transformers import BridgeTowerModel

    assert select_adapter(model) == "bridgetower"
    assert select_adapter(model.bridgetower) == "bridgetower"  # recognised, and told to wrap it
    with pytest.raises(TypeError, match="wrap"):
        adapter.describe(model.bridgetower)
    assert not adapter.matches(torch.nn.Linear(2, 2))
    assert isinstance(model.bridgetower, BridgeTowerModel)


def test_wrapper_is_the_transformers_model(adapter, model):
    x = adapter.example_inputs(model, batch_size=3, seed=1)
    assert (x["attention_mask"] == 0).any()  # padding is exercised
    with torch.no_grad():
        ours = model(**x)
        ref = model.bridgetower(**x)
    for a, b in zip(ours, (ref.text_features, ref.image_features, ref.pooler_output)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_fresh_trimmers_keep_the_model_exact(adapter, model, batch):
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5, head_target=0.5)).eval()
    x = adapter.example_inputs(model, batch_size=batch, seed=2)
    with torch.no_grad():
        ref = model(**x)
        out = tmodel(**x)
    assert tmodel.records and all(float(r.keep.min()) == 1.0 for r in tmodel.records)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_link_towers_declared_and_needed(adapter, model):
    """Removal works only because the link towers' uni-modal inputs are declared token arguments."""
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    assert {t.module for t in tmodel.spec.token_args} == {
        f"bridgetower.cross_modal_{k}_link_tower.{i}" for k in ("text", "image") for i in range(2)}
    _randomize(tmodel, seed=0)
    x = adapter.example_inputs(model, batch_size=1, seed=3)
    with torch.no_grad(), tmodel.mode("remove"):
        tmodel(**x)
    assert any(r.kind == "token" and float(r.keep) < 1 for r in tmodel.records)

    spec = dataclasses.replace(tmodel.spec, token_args=())  # forget the link towers
    blind = TrimmedModel(model, TrimConfig(), "bridgetower", spec, x).eval()
    blind.trimmers.load_state_dict(tmodel.trimmers.state_dict())
    with torch.no_grad(), blind.mode("remove"), pytest.raises(RuntimeError, match="size of tensor"):
        blind(**x)


def test_masked_equals_removed_at_batch_1(adapter, model):
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    streams = _stream_of(tmodel)
    dropped = {"vision": 0, "text": 0, "head": 0}
    for trial in range(4):
        _randomize(tmodel, seed=10 + trial)
        x = adapter.example_inputs(model, batch_size=1, seed=20 + trial)
        with torch.no_grad():
            with tmodel.mode("hard"):
                text_h, image_h, pooled_h = tmodel(**x)
            with tmodel.mode("remove"):
                text_r, image_r, pooled_r = tmodel(**x)
        kept = _final_kept(tmodel)
        torch.testing.assert_close(text_h[:, kept["text"]], text_r, atol=ATOL, rtol=0)
        torch.testing.assert_close(image_h[:, kept["vision"]], image_r, atol=ATOL, rtol=0)
        torch.testing.assert_close(pooled_h, pooled_r, atol=ATOL, rtol=0)
        for r in tmodel.records:
            if float(r.keep) < 1:  # dropped before a link tower counts (not the last cross layer)
                last = r.key.endswith(f"layers.{len(model.bridgetower.cross_modal_text_layers) - 1}")
                if r.kind == "token" and not last:
                    dropped[streams[r.key]] += 1
                elif r.kind == "head":
                    dropped["head"] += 1
    assert all(dropped.values()), f"nothing dropped somewhere: the comparison would be vacuous ({dropped})"


def test_batch_masks_equal_per_instance_removal(adapter, model):
    """Batch 3 with text padding, masked, == each instance alone with its tokens removed."""
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    _randomize(tmodel, seed=5)
    x = adapter.example_inputs(model, batch_size=3, seed=6)
    with torch.no_grad():
        _, _, pooled = tmodel(**x)  # batch 3 in eval: mode hard
        assert any(float(r.keep.min()) < 1 for r in tmodel.records if r.kind == "token")
        for b in range(3):
            one = {k: v[b:b + 1] for k, v in x.items()}
            with tmodel.mode("remove"):
                _, _, pooled_b = tmodel(**one)
            torch.testing.assert_close(pooled[b:b + 1], pooled_b, atol=ATOL, rtol=0)


def test_macs_fall(adapter):
    model = adapter.build("tiny")  # pooled output only
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    x = adapter.example_inputs(model, batch_size=1, seed=7)
    with tmodel.full():
        full = count_macs(tmodel, **x).total
    _randomize(tmodel, seed=8)
    with tmodel.mode("remove"):
        trimmed = count_macs(tmodel, **x).total
    assert any(float(r.keep) < 1 for r in tmodel.records)
    assert trimmed < full
