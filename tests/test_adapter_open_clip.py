"""The ``open_clip`` adapter on tiny random CLIPs: the image tower and the whole model.

Selection, exactness with fresh trimmers, hard masks == removal, MACs, zero-shot use, refusals.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import trimkit
from trimkit import TrimConfig
from trimkit.macs import count_macs
from trimkit.plugins import get_registry, select_adapter

open_clip = pytest.importorskip("open_clip")

ATOL = 1e-5
PARTS = ["visual", "clip"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: threads only add contention (keeps the file fast on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("open_clip")


def _trim(model: nn.Module, **config) -> trimkit.TrimmedModel:
    return trimkit.trim(model, TrimConfig(**config)).eval()


def _randomize(tmodel: trimkit.TrimmedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def _close(got, expected) -> None:
    got, expected = tree_leaves(got), tree_leaves(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def _image_features(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("part", PARTS)
def test_selected_from_the_model(adapter, part):
    model = adapter.build("tiny", part=part)
    assert select_adapter(model) == "open_clip"
    assert set(adapter.example_inputs(model, batch_size=2)) == ({"x"} if part == "visual" else {"image", "text"})
    assert model.visual.transformer.batch_first if part == "clip" else model.transformer.batch_first
    assert not adapter.matches(nn.Linear(2, 2))


@pytest.mark.parametrize("part", PARTS)
def test_fresh_trimmers_keep_the_model_exact(adapter, part):
    model = adapter.build("tiny", part=part)
    tmodel = _trim(model)
    for batch in (1, 2):  # batch 1 runs mode "remove", batch 2 mode "hard"
        x = adapter.example_inputs(model, batch_size=batch, seed=batch)
        with torch.no_grad():
            _close(tmodel(**x), model(**x))
        assert tmodel.records and all(float(r.keep.min()) == 1.0 for r in tmodel.records)


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("policy,seed", [("cross_modal", 0), ("cross_modal", 1), ("local", 2)])
def test_hard_masks_equal_removal(adapter, part, policy, seed):
    model = adapter.build("tiny", part=part, vision={"layers": 3})
    tmodel = _trim(model, token_policy=policy)
    _randomize(tmodel, seed)
    x = adapter.example_inputs(model, batch_size=1, seed=seed)
    with torch.no_grad():
        with tmodel.mode("hard"):
            hard = tmodel(**x)
            hard_keep = {r.key: float(r.keep[0]) for r in tmodel.records}
        with tmodel.mode("remove"):
            removed = tmodel(**x)
            removed_keep = {r.key: float(r.keep[0]) for r in tmodel.records}
        original = model(**x)
    _close(removed, hard)
    assert removed_keep == pytest.approx(hard_keep)
    kinds = {r.kind for r in tmodel.records if float(r.keep[0]) < 1.0}
    assert kinds == {"token", "head"}, f"nothing was trimmed: {removed_keep}"
    assert not torch.allclose(_image_features(removed), _image_features(original), atol=ATOL)


@pytest.mark.parametrize("part", PARTS)
def test_macs_fall_when_tokens_are_removed(adapter, part):
    model = adapter.build("tiny", part=part, vision={"layers": 3})
    tmodel = _trim(model)
    _randomize(tmodel, 0)
    x = adapter.example_inputs(model)
    with tmodel.full():
        full = count_macs(tmodel, **x).total
    with tmodel.mode("remove"):
        trimmed = count_macs(tmodel, **x).total
        assert any(r.kind == "token" and float(r.keep[0]) < 1 for r in tmodel.records)
    assert full == count_macs(model, **x).total > 0
    assert trimmed < 0.9 * full


def test_zero_shot_one_image_many_prompts(adapter):
    """Whole CLIP: one image (batch 1, so tokens are removed) against several class prompts."""
    model = adapter.build("tiny", part="clip")
    tmodel = _trim(model)
    _randomize(tmodel, 3)
    image = adapter.example_inputs(model, batch_size=1, seed=5)["image"]
    text = adapter.example_inputs(model, batch_size=4, seed=6)["text"]
    with torch.no_grad():
        image_f, text_f, scale = tmodel(image=image, text=text)
        assert tmodel.runtime.mode == "remove"
        ref_image, ref_text, _ = model(image=image, text=text)
        with tmodel.mode("hard"):
            hard_image, _, _ = tmodel(image=image, text=text)
    torch.testing.assert_close(text_f, ref_text, atol=ATOL, rtol=0)  # the text tower is untouched
    torch.testing.assert_close(image_f, hard_image, atol=ATOL, rtol=0)
    assert (scale * image_f @ text_f.T).shape == (1, 4)


def test_trimmed_tower_pairs_with_cached_text_features(adapter):
    """Recommended zero-shot form: trim ``model.visual``, encode prompts once with the untouched model."""
    model = adapter.build("tiny", part="clip")
    tvisual = _trim(model.visual)
    image = adapter.example_inputs(model, batch_size=1)["image"]
    with torch.no_grad():
        text_f = model.encode_text(adapter.example_inputs(model, batch_size=3)["text"], normalize=True)
        image_f = torch.nn.functional.normalize(tvisual(image), dim=-1)
        expected = model.encode_image(image, normalize=True)
    torch.testing.assert_close(image_f @ text_f.T, expected @ text_f.T, atol=ATOL, rtol=0)


def test_training_mode_samples_masks_with_gradients(adapter):
    model = adapter.build("tiny")
    tmodel = _trim(model).train()
    out = tmodel(**adapter.example_inputs(model, batch_size=2))
    assert tmodel.runtime.mode == "sample" and len(tmodel.records) == 4
    out.sum().backward()
    grads = [p.grad for p in tmodel.trimmers.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("vision,needle", [
    ({"pool_type": "avg"}, "pool_type"),
    ({"output_tokens": True}, "output_tokens"),
    ({"attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 4}, "attentional_pool"),
    ({"qk_norm": True}, "custom"),
])
def test_unsupported_options_are_refused_by_name(adapter, vision, needle):
    model = adapter.build("tiny", vision=vision)
    with pytest.raises(ValueError, match=needle):
        trimkit.trim(model, TrimConfig())
