"""Trimming Qwen2-VL's vision tower (``vision_trim_layers``): a stream that drops tokens in runs
(:attr:`trimkit.StreamSpec.group`) because the model merges them after its layers (Qwen2-VL's 2x2
patch merger makes one LM token of 4 consecutive patches), feeding a decoder's image segment
(:class:`trimkit.TokensFrom`, one segment token per run).

The bugs feared most: a run is split (the merger then mixes a dropped patch's neighbours into the
wrong LM token, or fails on a length that is not whole runs), the LM still computes an image token
whose patches the tower dropped, or the masked and the physically trimmed model disagree. So, on a
tiny random model whose batch holds images of different sizes (the tower's stream is padded to the
largest one):

* the batched, block-by-block tower is the HF model, and untrimmed it is too (hard, remove);
* with random trimmers, the tower keeps or drops whole runs in every mode (sample included: one
  sample per run), every run it dropped is dropped in the LM (hard: mask 0 at its placeholder;
  remove and packed: not among the kept positions), and hard == packed == remove per instance;
* generation from the removed prefill == from the masked and packed prefill;
* ``trimkit check`` passes; the weights are listed once (the tower's batched blocks borrow them);
  what cannot be honoured is refused by name.

Both variants: Qwen2-VL, and Qwen2.5-VL, whose windowed blocks attend within windows (a mask over
the processor's patch order, which is the tower's reorder-attend-restore); packed mode takes only
key-padding biases, so it refuses Qwen2.5-VL's window masks by name.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers

import trimkit
from trimkit import ModelSpec, StreamSpec, TokensFrom, TrimConfig
from trimkit.ops import group_logits
from trimkit.plugins import get_registry

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {"vision": 0.5, "prompt": 0.8, "image": 0.4, "question": 0.8}  # image: of its original tokens
TOWER_LAYERS = ["vision_blocks.0", "vision_blocks.1"]
RUN = 4  # the tiny tower's 2x2 merge
NEVER = []


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("qwen2_vl")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def model(adapter, variant):
    return adapter.build(seed=4, variant=variant, vision_trim_layers=[0, 1]).eval()


def _packed_refused(variant):
    """Qwen2.5-VL's windowed blocks mask attention across windows: packed mode takes key-padding
    biases only and refuses them by name (masked and remove modes run them)."""
    return variant == "qwen2_5_vl"


def _trimmed(model, seed=None):
    tmodel = trimkit.trim(model, TrimConfig(token_target=TARGETS, head_target=0.5), adapter="qwen2_vl").eval()
    if seed is not None:
        randomize_trimmers(tmodel, seed)
    return tmodel


def _tower_records(tmodel):
    return [r for r in tmodel.records if r.kind == "token" and r.key in TOWER_LAYERS]


def _last_lm_record(tmodel):
    return [r for r in tmodel.records if r.kind == "token" and "language_model" in r.key][-1]


def _one(x, b):
    """Instance ``b`` of a batch alone: its real tokens and its own patches."""
    n = int(x["attention_mask"][b].sum())
    patches = int(x["image_grid_thw"][b].prod())
    return {"pixel_values": x["pixel_values"][b:b + 1, :patches], "input_ids": x["input_ids"][b:b + 1, :n],
            "image_grid_thw": x["image_grid_thw"][b:b + 1], "attention_mask": x["attention_mask"][b:b + 1, :n],
            "segment_starts": x["segment_starts"][b:b + 1]}


def test_the_batched_tower_is_the_hf_model(adapter, model, variant):
    plain = adapter.build(seed=4, variant=variant).eval()  # the same weights; the tower runs as one call
    x = adapter.example_inputs(model, 3, seed=1)
    assert len({tuple(g) for g in x["image_grid_thw"].tolist()}) > 1  # images of different sizes: padding
    real = x["attention_mask"].bool()
    with torch.no_grad():
        reference = plain(**x)
        torch.testing.assert_close(model(**x)[real], reference[real], atol=1e-5, rtol=0)
        tmodel = _trimmed(model)  # fresh trimmers keep everything
        with tmodel.mode("hard"):
            torch.testing.assert_close(tmodel(**x)[real], reference[real], atol=1e-5, rtol=0)
        for b in range(3):
            n = int(real[b].sum())
            with tmodel.mode("remove"):
                torch.testing.assert_close(tmodel(**_one(x, b))[0], reference[b, :n], atol=1e-5, rtol=0)
    # the tower's weights are the model's, listed once
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    spec = adapter.describe(model)
    assert [l.path for l in spec.layers if l.stream == "vision"] == TOWER_LAYERS
    assert spec.stream("vision").group == RUN and spec.stream("vision").protected == RUN
    assert "tokens from stream 'vision' from its token 0, dropped where it dropped them" in str(tmodel.plan)
    assert "tokens kept or dropped in runs of 4" in str(tmodel.plan)
    windowed = [b.attn.windowed for b in model.vision_blocks]
    assert windowed == ([True, False] if variant == "qwen2_5_vl" else [False, False])


def test_window_attention_is_restricted_to_each_window(adapter):
    """Qwen2.5-VL's window blocks: the tower's patch order is kept and attention masked per window, which
    is its reorder-attend-restore. Without the mask the outputs differ (the example images span several
    windows), so the equality above is not vacuous."""
    plain = adapter.build(seed=4, variant="qwen2_5_vl").eval()
    model = adapter.build(seed=4, variant="qwen2_5_vl", vision_trim_layers=[0]).eval()
    x = adapter.example_inputs(model, 3, seed=1)
    real = x["attention_mask"].bool()
    layout = model.vision_layout(x["pixel_values"], x["image_grid_thw"])
    assert int(layout[5].max()) + 1 > 3  # more windows than images
    with torch.no_grad():
        reference = plain(**x)
        torch.testing.assert_close(model(**x)[real], reference[real], atol=1e-5, rtol=0)
        model.vision_blocks[0].attn.windowed = False
        try:
            assert float((model(**x) - reference)[real].abs().max()) > 1e-4
        finally:
            model.vision_blocks[0].attn.windowed = True


def _runs_whole(mask_row, n_real):
    runs = mask_row[:n_real].reshape(-1, RUN)
    return bool((runs == runs[:, :1]).all())


def test_the_tower_drops_whole_runs_and_the_lm_drops_them_too(adapter, model, variant):
    tower_dropped = False
    for seed in range(3):
        tmodel = _trimmed(model, 20 + seed)
        x = adapter.example_inputs(model, 3, seed=30 + seed)
        real = x["attention_mask"].bool()
        starts = x["segment_starts"]
        patches = x["image_grid_thw"].prod(-1).tolist()
        with torch.no_grad():
            with tmodel.mode("hard"):
                hard = tmodel(**x)
                tower = _tower_records(tmodel)[-1].mask  # (B, max patches), after the last tower layer
                lm_mask = _last_lm_record(tmodel).mask
            packed = None
            if _packed_refused(variant):
                with pytest.raises(NotImplementedError, match="only key-padding attention biases"), \
                        tmodel.mode("packed"):
                    tmodel(**x)
            else:
                with tmodel.mode("packed"):
                    packed = tmodel(**x)
                    last = _last_lm_record(tmodel)
                    pos = last.index.tolist()
            at = 0
            for b in range(3):
                n_real = patches[b]
                assert _runs_whole(tower[b], n_real)
                kept_runs = tower[b, :n_real].reshape(-1, RUN)[:, 0] > 0.5  # one per LM image token
                s, e = starts[b, 1:].tolist()
                assert e - s == kept_runs.numel()
                tower_dropped |= bool((~kept_runs).any())
                assert not bool(lm_mask[b, s:e][~kept_runs].any())  # dropped by the tower: dropped in the LM
                with tmodel.mode("remove"):
                    alone = tmodel(**_one(x, b))
                    tower_index = _tower_records(tmodel)[-1].index.tolist()
                    kept = _last_lm_record(tmodel).index.tolist()
                assert tower_index == torch.nonzero(tower[b, :n_real] > 0.5).flatten().tolist()  # whole runs
                assert not ({p - s for p in kept if s <= p < e} - set(torch.nonzero(kept_runs).flatten().tolist()))
                n_tok = int(real[b].sum())
                assert kept == torch.nonzero(lm_mask[b, :n_tok] > 0.5).flatten().tolist()  # hard keeps the same
                torch.testing.assert_close(alone[0], hard[b, kept], atol=1e-4, rtol=0)
                if packed is not None:  # the packed record's index: every instance's kept positions in turn
                    c = len(kept)
                    assert pos[at:at + c] == kept
                    at += c
                    torch.testing.assert_close(packed[b, :c], hard[b, kept], atol=1e-4, rtol=0)
    assert tower_dropped


def test_training_samples_one_mask_per_run_and_reaches_the_tower_trimmers(adapter):
    model = adapter.build(seed=1, vision_trim_layers=[0, 1])
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="qwen2_vl").train()
    randomize_trimmers(tmodel, 5)
    x = adapter.example_inputs(model, 2, seed=2)
    out = tmodel(**x)
    patches = x["image_grid_thw"].prod(-1).tolist()
    for rec in _tower_records(tmodel):
        for b, n in enumerate(patches):
            assert _runs_whole(rec.mask[b].detach(), n)
        m = rec.mask.detach()
        assert bool(((m > 0) & (m < 1)).any())  # sampled (soft) masks, not the hard decisions
    out[x["attention_mask"].bool()].pow(2).mean().backward()
    for i in (0, 1):
        grads = [float(p.grad.abs().sum()) for n, p in tmodel.trimmers.named_parameters()
                 if n.startswith(f"vision_blocks_{i}.token.") and p.grad is not None]
        assert grads and max(grads) > 0


def test_generation_from_removed_masked_and_packed_prefill_agrees(adapter, model, variant):
    from trimkit_qwen2_vl import generate

    tmodel = _trimmed(model, 41)
    x = adapter.example_inputs(model, 2, seed=42)
    args = (x["input_ids"], x["pixel_values"], x["image_grid_thw"], x["attention_mask"])
    removed = generate(tmodel, *args, max_new_tokens=4, eos_token_id=NEVER, return_logits=True)
    masked = generate(tmodel, *args, max_new_tokens=4, eos_token_id=NEVER, return_logits=True, mode="hard")
    assert removed.cache_lengths == masked.cache_lengths
    assert all(row[0] < n for row, n in zip(removed.cache_lengths, removed.prompt_lengths))  # the tower dropped
    torch.testing.assert_close(removed.logits, masked.logits, atol=1e-4, rtol=0)
    if not _packed_refused(variant):
        packed = generate(tmodel, *args, max_new_tokens=4, eos_token_id=NEVER, return_logits=True, mode="packed")
        assert packed.cache_lengths == masked.cache_lengths
        torch.testing.assert_close(packed.logits, masked.logits, atol=1e-4, rtol=0)


def test_trimkit_check_passes_with_the_tower_trimmed():
    from trimkit.check import run_check

    report = run_check("qwen2_vl", trials=1, build_options={"vision_trim_layers": [0, 1]})
    assert all(r.ok and not r.skipped for r in report.results), report.format()
    windowed = run_check("qwen2_vl", trials=1, build_options={"variant": "qwen2_5_vl", "vision_trim_layers": [0, 1]})
    skipped = [r for r in windowed.results if r.skipped]
    assert all(r.ok for r in windowed.results), windowed.format()
    assert len(skipped) == 1 and "only key-padding attention biases" in skipped[0].detail, windowed.format()


def test_what_cannot_be_honoured_is_refused_by_name(adapter, model, variant):
    with pytest.raises(ValueError, match=r"vision_trim_layers \[2\] are not blocks of the vision tower \(0\.\.1\)"):
        adapter.build(vision_trim_layers=[0, 2])
    with pytest.raises(ValueError, match=r"group must be an int >= 1"):
        StreamSpec("v", group=0)
    with pytest.raises(ValueError, match=r"protected=2 must be a multiple of group=4"):
        StreamSpec("v", protected=2, group=4)
    spec = adapter.describe(model)
    seq = spec.stream("seq")
    segs = tuple(type(g)(g.name, g.length, g.summary, g.padding_input, TokensFrom("vision", skip=2)
                         if g.name == "image" else None) for g in seq.segments)
    streams = [StreamSpec(**{**seq.__dict__, "segments": segs}), StreamSpec("vision", protected=8, group=4)]
    with pytest.raises(ValueError, match=r"skip=2 must be a multiple of stream 'vision''s group \(4\)"):
        ModelSpec(**{**spec.__dict__, "streams": streams}).validate()


def test_group_logits_gives_each_run_its_mean_and_refuses_partial_runs():
    logits = torch.tensor([[1.0, -3.0, 2.0, 4.0, -1.0, -1.0]])
    assert group_logits(logits, 1, "t") is logits
    torch.testing.assert_close(group_logits(logits, 2, "t"), torch.tensor([[-1.0, -1.0, 3.0, 3.0, -1.0, -1.0]]))
    with pytest.raises(ValueError, match=r"trimmer 'x': 6 tokens are not whole runs of 4"):
        group_logits(logits, 4, "trimmer 'x'")


def test_runs_and_a_last_token_summary_are_refused_together():
    with pytest.raises(ValueError, match="group=4 with summary='last' would keep the last real token alone"):
        StreamSpec("v", protected=4, group=4, summary="last")
