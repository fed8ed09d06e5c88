"""Trimming LLaVA's vision tower too (``vision_trim_layers``): tokens that enter the LM's image
segment from another stream (:class:`trimkit.TokensFrom`, :func:`trimkit.restore_tokens`).

The bug feared most: the tower drops a token, and the LM still computes it (the entry ignored), or
the masked model and the physically trimmed one disagree about it. So, on a tiny random model with
a 3-layer tower (LLaVA reads its hidden states after 2 layers, so layers 0 and 1 are trimmable):

* the wrapper that runs the tower's modules one by one is the HF model, and untrimmed it is too;
* with random trimmers, every image token the tower dropped is dropped in the LM (hard: mask 0 at
  its placeholder; remove: not among the LM's kept positions) and the LM's untrimmed first layer
  caches fewer tokens; hard == remove == packed per instance at the kept positions;
* ``trimkit check`` passes with the tower trimmed; the spec refuses a ``tokens_from`` it cannot
  honour, by name; greedy generation from the removed prefill == from the masked prefill.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers

import trimkit
from trimkit import ModelSpec, Segment, StreamSpec, TokensFrom, TrimConfig, restore_tokens
from trimkit.plugins import get_registry

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {"vision": 0.6, "prompt": 0.8, "image": 0.4, "question": 0.8}  # image: of its original tokens
TOWER = {"vision_config": {"num_hidden_layers": 3}}
TOWER_LAYERS = [f"model.model.vision_tower.encoder.layers.{i}" for i in (0, 1)]
NEVER = []


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("llava")


@pytest.fixture(scope="module")
def model(adapter):
    return adapter.build(seed=4, vision_trim_layers=[0, 1], **TOWER).eval()


def _trimmed(model, seed=None):
    tmodel = trimkit.trim(model, TrimConfig(token_target=TARGETS, head_target=0.5), adapter="llava").eval()
    if seed is not None:
        randomize_trimmers(tmodel, seed)
    return tmodel


def _tower_kept(tmodel):
    """Per instance, the tower's kept tokens after its last trimmed layer (mode hard), as a bool mask."""
    rec = [r for r in tmodel.records if r.kind == "token" and r.key == TOWER_LAYERS[-1]]
    assert rec, [r.key for r in tmodel.records]
    return rec[-1].mask > 0.5


def _last_lm_record(tmodel):
    return [r for r in tmodel.records if r.kind == "token" and "language_model" in r.key][-1]


def test_the_layer_by_layer_tower_is_the_hf_model(adapter, model):
    plain = adapter.build(seed=4, **TOWER).eval()  # the same weights; the tower runs as one call
    assert model.vision_layers == 2 and model.vision_trim_layers == [0, 1] and not plain.vision_trim_layers
    x = adapter.example_inputs(model, 3, seed=1)
    real = x["attention_mask"].bool()
    with torch.no_grad():
        reference = plain(**x)
        assert float((model(**x) - reference)[real].abs().max()) == 0
        tmodel = _trimmed(model)  # fresh trimmers keep everything
        with tmodel.mode("hard"):
            torch.testing.assert_close(tmodel(**x)[real], reference[real], atol=1e-5, rtol=0)
        n = int(real[0].sum())
        one = {k: (v[:1, :n] if k in ("input_ids", "attention_mask") else v[:1]) for k, v in x.items()}
        with tmodel.mode("remove"):
            torch.testing.assert_close(tmodel(**one)[0], reference[0, :n], atol=1e-5, rtol=0)
    spec = adapter.describe(model)
    assert [l.path for l in spec.layers if l.stream == "vision"] == TOWER_LAYERS
    image = next(g for g in spec.stream("seq").segments if g.name == "image")
    assert image.tokens_from == TokensFrom("vision", skip=1)  # the tower's [CLS] is cropped
    assert "tokens from stream 'vision' from its token 1, dropped where it dropped them" in str(tmodel.plan)


def test_tower_drops_are_dropped_in_the_lm_in_every_mode(adapter, model):
    tower_dropped = lm_reduced = False
    for seed in range(3):
        tmodel = _trimmed(model, 20 + seed)
        x = adapter.example_inputs(model, 3, seed=30 + seed)
        real = x["attention_mask"].bool()
        starts = x["segment_starts"]
        with torch.no_grad():
            with tmodel.mode("hard"):
                hard = tmodel(**x)
                kept_v = _tower_kept(tmodel)[:, 1:]  # (B, image tokens): the tower's, after its [CLS]
                lm_mask = _last_lm_record(tmodel).mask
            for b in range(3):
                s, e = starts[b, 1:].tolist()
                assert e - s == kept_v.shape[1]
                gone = ~kept_v[b]
                tower_dropped |= bool(gone.any())
                assert not bool(lm_mask[b, s:e][gone].any())  # dropped by the tower: dropped in the LM
            with tmodel.mode("packed"):
                packed = tmodel(**x)
                last = _last_lm_record(tmodel)
                layer = last.key.split(":")[0]
                counts = [sum(c) for c in zip(*(r.counts for r in tmodel.records
                                                if r.kind == "token" and r.key.startswith(layer + ":")))]
            pos, at = last.index.tolist(), 0
            for b, c in enumerate(counts):
                kept = pos[at:at + c]
                at += c
                torch.testing.assert_close(packed[b, :c], hard[b, kept], atol=1e-4, rtol=0)
                n = int(real[b].sum())
                one = {k: (v[b:b + 1, :n] if k in ("input_ids", "attention_mask") else v[b:b + 1]) for k, v in x.items()}
                with tmodel.mode("remove"):
                    alone = tmodel(**one)
                removed_at = _last_lm_record(tmodel).index.tolist()
                assert removed_at == kept
                torch.testing.assert_close(alone[0], hard[b, kept], atol=1e-4, rtol=0)
                s, e = starts[b, 1:].tolist()
                image_kept = {p - s for p in removed_at if s <= p < e}
                assert image_kept <= set(torch.nonzero(kept_v[b]).flatten().tolist())
        # the LM's first layer (not trimmed) already computes only the tower's kept image tokens
        from trimkit_llava import generate

        out = generate(tmodel, x["input_ids"][:1, :int(real[0].sum())], x["pixel_values"][:1], max_new_tokens=1)
        n_gone = int((~kept_v[0]).sum())
        assert out.cache_lengths[0][0] == out.prompt_lengths[0] - n_gone
        lm_reduced |= n_gone > 0
    assert tower_dropped and lm_reduced


def test_removed_generation_equals_masked_generation_with_the_tower_trimmed(adapter, model):
    from trimkit_llava import generate

    tmodel = _trimmed(model, 41)
    x = adapter.example_inputs(model, 2, seed=42)
    args = (x["input_ids"], x["pixel_values"], x["attention_mask"])
    removed = generate(tmodel, *args, max_new_tokens=4, eos_token_id=NEVER, return_logits=True)
    masked = generate(tmodel, *args, max_new_tokens=4, eos_token_id=NEVER, return_logits=True, mode="hard")
    packed = generate(tmodel, *args, max_new_tokens=4, eos_token_id=NEVER, return_logits=True, mode="packed")
    assert removed.cache_lengths == masked.cache_lengths == packed.cache_lengths
    assert all(row[0] < n for row, n in zip(removed.cache_lengths, removed.prompt_lengths))  # the tower dropped
    torch.testing.assert_close(removed.logits, masked.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.logits, masked.logits, atol=1e-4, rtol=0)


def test_trimkit_check_passes_with_the_tower_trimmed():
    from trimkit.check import run_check

    report = run_check("llava", trials=1, build_options={**TOWER, "vision_trim_layers": [0, 1]})
    assert all(r.ok and not r.skipped for r in report.results), report.format()


def test_training_reaches_the_tower_trimmers(adapter):
    model = adapter.build(seed=1, vision_trim_layers=[0, 1], **TOWER)
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="llava").train()
    x = adapter.example_inputs(model, 2, seed=2)
    out = tmodel(**x)
    out[x["attention_mask"].bool()].pow(2).mean().backward()
    for i in (0, 1):
        grads = {n: float(p.grad.abs().sum()) for n, p in tmodel.trimmers.named_parameters()
                 if n.startswith(f"model_model_vision_tower_encoder_layers_{i}.token.") and p.grad is not None}
        assert any(g > 0 for g in grads.values()), grads


def test_tower_layers_llava_never_runs_are_refused(adapter):
    with pytest.raises(ValueError, match=r"vision_trim_layers \[2\] are not run.*choose among 0\.\.1"):
        adapter.build(vision_trim_layers=[0, 2], **TOWER)


def test_restore_tokens_outside_trimkit_is_the_identity():
    x = torch.randn(2, 5, 3)
    assert restore_tokens(x, "vision", skip=1) is x
    graph = torch.fx.symbolic_trace(lambda t: restore_tokens(t * 2, "vision", 1) + 1).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"].count(restore_tokens) == 1


def test_tokens_from_the_spec_cannot_honour_is_refused_by_name(adapter, model):
    spec = adapter.describe(model)
    seq = spec.stream("seq")

    def with_image(tokens_from, vision_protected=2):
        segs = tuple(Segment(g.name, g.length, g.summary, g.padding_input, tokens_from if g.name == "image" else None)
                     for g in seq.segments)
        streams = [StreamSpec(**{**seq.__dict__, "segments": segs}), StreamSpec("vision", protected=vision_protected)]
        return ModelSpec(**{**spec.__dict__, "streams": streams})

    with_image(TokensFrom("vision", skip=1)).validate()
    with pytest.raises(ValueError, match=r"segment 'image': tokens_from names stream 'audio'"):
        with_image(TokensFrom("audio")).validate()
    with pytest.raises(ValueError, match=r"segment 'image': tokens_from names stream 'seq'"):
        with_image(TokensFrom("seq")).validate()
    with pytest.raises(ValueError, match=r"protected=1\).*StreamSpec\('vision', protected=2\)"):
        with_image(TokensFrom("vision", skip=1), vision_protected=1).validate()
    with pytest.raises(ValueError, match="cannot be summarised by its last token"):
        Segment("image", summary="last", tokens_from=TokensFrom("vision"))
    with pytest.raises(TypeError, match="must be a TokensFrom"):
        Segment("image", tokens_from="vision")
    with pytest.raises(ValueError, match="skip must be an int >= 0"):
        TokensFrom("vision", skip=-1)
