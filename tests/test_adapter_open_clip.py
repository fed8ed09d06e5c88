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


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


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


# --- text-guided mode: TextGuidedCLIP scores image-text pairs, the text is the vision trimmers' context ---

TEXT_GUIDED = [pytest.param({}, id="clip"), pytest.param({"custom_text": True}, id="custom_text"),
               pytest.param({"init_logit_bias": -1.5}, id="logit_bias")]


def _text_guided(adapter, options: dict, layers: int = 2) -> nn.Module:
    return adapter.build("tiny", part="text_guided", vision={"layers": layers}, **options)


def _randomize_weights(tmodel: trimkit.TrimmedModel, seed: int) -> None:
    """Random trimmer weights, zero biases: per-token decisions (neither all kept nor all dropped)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tmodel.trimmers.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else torch.randn(p.shape, generator=gen))


def _token_masks(tmodel: trimkit.TrimmedModel) -> dict[str, torch.Tensor]:
    """Mode hard: each token trimmer's (B, N) mask in the last forward."""
    return {r.key: r.mask > 0 for r in tmodel.records if r.kind == "token"}


@pytest.mark.parametrize("options", TEXT_GUIDED)
def test_text_guided_wrapper_shares_the_model(adapter, options):
    from open_clip.model import convert_to_custom_text_state_dict

    from trimkit_open_clip import TextGuidedCLIP

    wrapper = _text_guided(adapter, options)
    assert isinstance(wrapper, TextGuidedCLIP) and select_adapter(wrapper) == "open_clip"
    assert set(adapter.example_inputs(wrapper, batch_size=2)) == {"image", "text"}
    model = adapter.build("tiny", part="clip", vision={"layers": 2}, **options)  # same seed: same weights
    wrapper = TextGuidedCLIP(model)
    own = {id(p) for p in model.parameters()}
    assert {id(p) for p in wrapper.parameters()} == own  # shared, not copied
    assert wrapper.visual is model.visual and wrapper.logit_scale is model.logit_scale
    # keys: the CustomTextCLIP layout (a CLIP's text tower under ``text.``)
    assert list(wrapper.state_dict()) != [] and set(wrapper.state_dict()) == set(
        convert_to_custom_text_state_dict(model.state_dict()))
    with pytest.raises(TypeError, match="CLIP"):
        TextGuidedCLIP(model.visual)


@pytest.mark.parametrize("options", TEXT_GUIDED)
def test_text_guided_equals_get_logits_diagonal(adapter, options):
    model = adapter.build("tiny", part="clip", **options)
    from trimkit_open_clip import TextGuidedCLIP

    wrapper = TextGuidedCLIP(model)
    tmodel = _trim(wrapper, token_policy="cross_modal")
    spec_layers = tmodel.spec.layers
    assert spec_layers and all(l.context_source == "text" and l.context_stream == "text" for l in spec_layers)
    assert all(v.token.context_dim == 32 for v in tmodel.trimmers.values())  # embed_dim: the text vector
    calls = []
    wrapper.text.register_forward_hook(lambda *_: calls.append(1))
    for batch in (1, 3):  # batch 1 runs mode "remove", batch 3 mode "hard"
        x = adapter.example_inputs(wrapper, batch_size=batch, seed=batch)
        with torch.no_grad():
            expected = model.get_logits(x["image"], x["text"])[0].diagonal()
            torch.testing.assert_close(wrapper(**x), expected, atol=ATOL, rtol=0)
            calls.clear()
            got = tmodel(**x)
            assert len(calls) == 1  # the text tower runs once per forward, as one (untrimmed) module
            records = tmodel.records
            with tmodel.full():
                full = tmodel(**x)
        assert got.shape == (batch,)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(full, expected, atol=ATOL, rtol=0)
        assert records and all(float(r.keep.min()) == 1.0 for r in records)
        assert all(r.key.startswith("visual.") for r in records)  # the text tower is not trimmed


@pytest.mark.parametrize("options", TEXT_GUIDED)
@pytest.mark.parametrize("policy,seed", [("cross_modal", 0), ("cross_modal", 1), ("local", 2)])
def test_text_guided_hard_masks_equal_removal(adapter, options, policy, seed):
    wrapper = _text_guided(adapter, options, layers=3)
    tmodel = _trim(wrapper, token_policy=policy)
    _randomize_weights(tmodel, seed)
    x = adapter.example_inputs(wrapper, batch_size=3, seed=seed)
    with torch.no_grad():
        with tmodel.mode("hard"):
            batch_hard = tmodel(**x)
            batch_keep = {r.key: r.keep for r in tmodel.records}
        with tmodel.mode("packed"):
            torch.testing.assert_close(tmodel(**x), batch_hard, atol=ATOL, rtol=0)
        dropped = 0
        for i in range(3):
            xi = {k: v[i:i + 1] for k, v in x.items()}
            with tmodel.mode("hard"):
                hard = tmodel(**xi)
                hard_keep = {r.key: float(r.keep[0]) for r in tmodel.records}
            with tmodel.mode("remove"):
                removed = tmodel(**xi)
                removed_keep = {r.key: float(r.keep[0]) for r in tmodel.records}
            _close(removed, hard)  # masked == removed at batch 1
            _close(removed, batch_hard[i:i + 1])  # batch masks == per-instance removal
            assert removed_keep == pytest.approx(hard_keep)
            assert removed_keep == pytest.approx({k: float(v[i]) for k, v in batch_keep.items()})
            dropped += sum(r.kind == "token" and float(r.keep[0]) < 1.0 for r in tmodel.records)
            assert any(r.kind == "token" and float(r.keep[0]) > 1 / 17 for r in tmodel.records), "every token dropped"
        assert dropped > 0, f"nothing was trimmed: {batch_keep}"
        assert not torch.allclose(batch_hard, wrapper(**x), atol=ATOL)


@pytest.mark.parametrize("options", TEXT_GUIDED[:2])
@pytest.mark.parametrize("seed", [0, 1])
def test_text_guided_decisions_depend_on_the_text(adapter, options, seed):
    """One image, two texts: the cross-modal token trimmers keep different tokens; the local ones do not."""
    wrapper = _text_guided(adapter, options)
    x = adapter.example_inputs(wrapper, batch_size=2, seed=seed)
    image = x["image"][:1].expand(2, -1, -1, -1)
    assert not torch.equal(x["text"][0], x["text"][1])
    masks = {}
    for policy in ("cross_modal", "local"):
        tmodel = _trim(wrapper, token_policy=policy)
        _randomize_weights(tmodel, seed)
        seen = []  # what the first token trimmer receives as its context
        first = next(v.token for v in tmodel.trimmers.values())
        first.register_forward_hook(lambda mod, args, out: seen.append(args[2]))
        with torch.no_grad(), tmodel.mode("hard"):
            tmodel(image=image, text=x["text"])
            text_features = wrapper.text(x["text"])
        torch.testing.assert_close(seen[0], text_features, atol=0, rtol=0)  # the pair's (B, E) text embedding
        masks[policy] = _token_masks(tmodel)
        assert any(not bool(m.all()) for m in masks[policy].values()), f"{policy}: nothing was dropped"
    assert any(not torch.equal(m[0], m[1]) for m in masks["cross_modal"].values())
    assert all(torch.equal(m[0], m[1]) for m in masks["local"].values())
