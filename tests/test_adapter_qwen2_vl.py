"""The ``qwen2_vl`` adapter (transformers' Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration, prefill) on tiny random models: the wrapper and the untrimmed
trimmed model are the HF model (multimodal RoPE from the model's get_rope_index); kept tokens keep
their original rotary positions; with random trimmers masked == removed == packed, per instance,
with the image at another position and of another size in every instance; trimkit check;
save_pretrained/from_pretrained; what is refused."""

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
VARIANTS = ("qwen2_vl", "qwen2_5_vl")
LAYERS = "model.model.language_model.layers"


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("qwen2_vl")


@pytest.fixture(scope="module", params=VARIANTS)
def qwen(request, adapter):
    model = adapter.build(variant=request.param)
    tmodel = trimkit.trim(model, TrimConfig(token_target=TARGETS, head_target=0.5), adapter="qwen2_vl").eval()
    return model, tmodel


def _variant(model):
    return "qwen2_5_vl" if type(model.model).__name__.startswith("Qwen2_5") else "qwen2_vl"


def _hf(model, x, **kw):
    from trimkit_qwen2_vl import flat_pixel_values

    ids = x["input_ids"]
    return model.model(input_ids=ids, attention_mask=x["attention_mask"], image_grid_thw=x["image_grid_thw"],
                       pixel_values=flat_pixel_values(x["pixel_values"], x["image_grid_thw"]),
                       mm_token_type_ids=(ids == model.config.image_token_id).int(), use_cache=False, **kw)


def _one(x, b, n=None):
    """Instance ``b`` alone (its first ``n`` tokens)."""
    one = {k: v[b:b + 1] for k, v in x.items()}
    if n is not None:
        one = {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
    return one


def _last_token_record(tmodel):
    return [r for r in tmodel.records if r.kind == "token"][-1]


def test_registered_and_selected(adapter):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    v2, v25 = adapter.build(), adapter.build(variant="qwen2_5_vl")
    assert isinstance(v2.model, Qwen2VLForConditionalGeneration)
    assert isinstance(v25.model, Qwen2_5_VLForConditionalGeneration)
    for model in (v2, v25):
        assert select_adapter(model) == "qwen2_vl" and select_adapter(model.model) == "qwen2_vl"
    assert v2.trim_layers == [1, 2]  # the middle half of 4 decoder layers
    assert "trimkit_qwen2_vl" in trimkit.plugins.BUILTIN_MODULES
    tmodel = trimkit.trim(v2, TrimConfig(token_target=TARGETS), adapter="qwen2_vl")
    kernels = [m for m in tmodel._graph.modules() if type(m).__name__ == "KernelAttention"]
    assert [k.route for k in kernels] == ["attention_interface"] * 4
    plan = str(tmodel.plan)
    assert "starts per instance from input 'segment_starts'" in plan and "question (summary = its last real token)" in plan
    assert plan.count("[not trimmable") == 2
    other = adapter.build(trim_layers=[0, -1])
    assert other.trim_layers == [0, 3]
    assert [l.trimmable for l in adapter.describe(other).layers] == [True, False, False, True]


def test_nothing_trimmed_is_the_hf_model_and_trimming_changes_it(adapter, qwen):
    from trimkit_qwen2_vl import flat_pixel_values

    model, tmodel = qwen
    x = adapter.example_inputs(model, 3, seed=1)
    assert x["segment_starts"][:, 1].unique().numel() == 3  # the image starts elsewhere in each instance
    assert (x["segment_starts"][:, 2] - x["segment_starts"][:, 1]).unique().numel() == 2  # 4, 6, 6 image tokens
    # M-RoPE: positions after the image are not the token indices, so a wrong position would show
    positions = model.positions(x["input_ids"], x["image_grid_thw"], x["attention_mask"])
    assert positions.shape == (3, *x["input_ids"].shape)
    assert not torch.equal(positions[0, 0], torch.arange(x["input_ids"].shape[1]))
    real = x["attention_mask"].bool()
    with torch.no_grad():
        reference = _hf(model, x).logits
        assert float((model(**x) - reference)[real].abs().max()) == 0  # the wrapper is the model
        flat = dict(x, pixel_values=flat_pixel_values(x["pixel_values"], x["image_grid_thw"]))  # the processor's layout
        assert float((model(**flat) - reference)[real].abs().max()) == 0
        with tmodel.mode("hard"):
            hard = tmodel(**x)
        for b in range(3):
            n = int(real[b].sum())
            with tmodel.mode("remove"):
                alone = tmodel(**_one(x, b, n))
            assert alone.shape[1] == n
            torch.testing.assert_close(alone[0], reference[b, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(hard[real], reference[real], atol=1e-5, rtol=0)
        saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
        try:
            randomize_trimmers(tmodel, 3)
            with tmodel.mode("hard"):
                trimmed = tmodel(**x)
            assert any(float(r.keep.min()) < 1 for r in tmodel.records if r.kind == "token")
        finally:
            tmodel.trimmers.load_state_dict(saved)
        last = x["attention_mask"].sum(1) - 1
        rows = torch.arange(3)
        assert float((trimmed[rows, last] - reference[rows, last]).abs().max()) > 1e-3  # trimming moves the logits
    hidden = adapter.build(variant=_variant(model), output="hidden")
    with torch.no_grad():
        out = _hf(model, x, output_hidden_states=True)
        torch.testing.assert_close(hidden(**x)[real], out.hidden_states[-1][real], atol=1e-6, rtol=0)


def test_kept_tokens_keep_their_rotary_positions(adapter, qwen):
    """After trimming, the last decoder layer's attention gets the rotary table of the model's own
    M-RoPE positions at each kept token's original index (not of positions 0..kept-1)."""
    model, tmodel = qwen
    x = adapter.example_inputs(model, 1, seed=4)
    lm = model.model.model.language_model
    seen = {}

    def hook(module, args, kwargs):
        seen["pe"] = kwargs["position_embeddings"]

    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    handle = lm.layers[3].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        randomize_trimmers(tmodel, 11)
        with torch.no_grad(), tmodel.mode("remove"):
            tmodel(**x)
        kept = _last_token_record(tmodel).index
    finally:
        handle.remove()
        tmodel.trimmers.load_state_dict(saved)
    n = x["input_ids"].shape[1]
    assert 0 < kept.numel() < n
    with torch.no_grad():
        h = lm.embed_tokens(x["input_ids"])
        cos, sin = lm.rotary_emb(h, model.positions(x["input_ids"], x["image_grid_thw"], x["attention_mask"]))
        naive_cos, _ = lm.rotary_emb(h[:, :kept.numel()], torch.arange(kept.numel())[None])
    assert seen["pe"][0].shape[1] == kept.numel()
    assert torch.equal(seen["pe"][0][0], cos[0, kept]) and torch.equal(seen["pe"][1][0], sin[0, kept])
    assert not torch.allclose(seen["pe"][0][0], naive_cos[0])


def test_masked_removed_and_packed_agree_per_instance(adapter, qwen):
    model, tmodel = qwen
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    dropped, counts_differ = set(), False
    try:
        for seed in range(3):
            randomize_trimmers(tmodel, 40 + seed)
            x = adapter.example_inputs(model, 3, seed=50 + seed)
            assert x["segment_starts"][:, 1].unique().numel() == 3
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
                    layer = last.key.split(":")[0]
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
                    with tmodel.mode("remove"):
                        alone = tmodel(**_one(x, b))
                    removed_at = _last_token_record(tmodel).index.tolist()
                    real_kept = [p for p in removed_at if x["attention_mask"][b, p]]
                    assert real_kept == kept
                    rows = [i for i, p in enumerate(removed_at) if x["attention_mask"][b, p]]
                    torch.testing.assert_close(alone[0, rows], hard[b, kept], atol=1e-4, rtol=0)
    finally:
        tmodel.trimmers.load_state_dict(saved)
    assert "image" in dropped and counts_differ


@pytest.mark.parametrize("variant", VARIANTS)
def test_trimkit_check_passes(variant):
    """``trimkit check`` on the tiny builds: every step passes (packed on mode 'packed'; mode 'padded'
    refuses causal attention and says so)."""
    from trimkit.check import run_check

    report = run_check("qwen2_vl", trials=1, build_options={} if variant == "qwen2_vl" else {"variant": variant})
    assert all(r.ok and not r.skipped for r in report.results), report.format()
    packed = next(r for r in report.results if r.name.startswith("packed == masked"))
    assert "max |packed - masked|" in packed.detail and "mode padded refuses" in packed.detail, report.format()


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_from_pretrained_round_trip(adapter, variant, tmp_path):
    model = adapter.build(variant=variant, seed=2)
    model.model.save_pretrained(tmp_path / "tiny")
    loaded = trimkit.adapter.load_pretrained("qwen2_vl", tmp_path / "tiny", output="logits", trim_layers=[2])
    assert type(loaded).__name__ == "Qwen2VLForTrimming" and loaded.trim_layers == [2] and not loaded.training
    assert type(loaded.model) is type(model.model)
    assert loaded.model.config._attn_implementation == "sdpa"
    x = adapter.example_inputs(model, 2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), model(**x), atol=0, rtol=0)
    tloaded = trimkit.trim(loaded, TrimConfig(token_target=TARGETS))
    assert [r for r in tloaded.final_targets if r.endswith(":image")] == [f"{LAYERS}.2:image"]
    with pytest.raises(TypeError, match="unknown option"):
        adapter.from_pretrained(str(tmp_path / "tiny"), no_such_field=1)
    with pytest.raises(trimkit.adapter.PretrainedNotFoundError):
        adapter.from_pretrained(str(tmp_path / "missing"))


def test_unrecognised_models_are_refused_by_name(adapter, tmp_path):
    from trimkit_qwen2_vl import wrap

    llava = get_registry().adapters.get("llava").build()
    assert not adapter.matches(llava) and not adapter.matches(llava.model) and not adapter.matches(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration, "
                                        "got LlavaForConditionalGeneration"):
        wrap(llava.model)
    model = adapter.build()
    with pytest.raises(TypeError, match="has no lm_head"):
        wrap(model.model.model)
    with pytest.raises(TypeError, match=r"trim trimkit_qwen2_vl.wrap\(model\)"):
        adapter.describe(model.model)
    llava.model.save_pretrained(tmp_path / "llava")
    with pytest.raises(trimkit.adapter.PretrainedLoadError, match="found a model of type 'llava'.*'qwen2_vl' or 'qwen2_5_vl'"):
        adapter.from_pretrained(str(tmp_path / "llava"))
    with pytest.raises(ValueError, match="variant must be one of"):
        adapter.build(variant="qwen3_vl")
    with pytest.raises(NotImplementedError, match="sliding-window"):
        adapter.build(text_config={"use_sliding_window": True, "max_window_layers": 0, "sliding_window": 8})


def test_misuse_is_refused(adapter):
    from trimkit_qwen2_vl import qwen2_vl_segment_starts

    model = adapter.build()
    tmodel = trimkit.trim(model, TrimConfig(token_target=TARGETS), adapter="qwen2_vl").eval()
    x = adapter.example_inputs(model, 2, seed=6)
    n = x["input_ids"].shape[1]
    short = int(x["attention_mask"].sum(1).argmin())
    shift = int((x["attention_mask"][short] == 0).sum())
    assert shift > 0
    left = dict(x)  # the shorter row padded on the left instead
    for key in ("input_ids", "attention_mask"):
        left[key] = x[key].clone()
        left[key][short] = x[key][short].roll(shift)
    left["segment_starts"] = qwen2_vl_segment_starts(left["input_ids"], model.image_token_id)
    for module in (model, tmodel):
        with torch.no_grad(), pytest.raises(ValueError, match=rf"rows \[{short}\] of attention_mask are not right-padded"):
            module(**left)
    with torch.no_grad(), pytest.raises(ValueError, match="1 image grids for 2 rows of pixel_values"):
        model(**dict(x, image_grid_thw=x["image_grid_thw"][:1]))
    video = x["input_ids"].clone()
    video[0, 1] = model.config.video_token_id
    with torch.no_grad(), pytest.raises(NotImplementedError, match="video tokens are not supported"):
        model(**dict(x, input_ids=video))
    with pytest.raises(ValueError, match="qwen2_vl_segment_starts: rows \\[0\\] hold no image token"):
        qwen2_vl_segment_starts(torch.ones(1, n, dtype=torch.long), model.image_token_id)


def test_pixel_value_layouts():
    from trimkit_qwen2_vl import batch_pixel_values, flat_pixel_values

    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])
    flat = torch.randn(12, 5)
    batched = batch_pixel_values(flat, grid)
    assert batched.shape == (2, 8, 5) and float(batched[0, 4:].abs().sum()) == 0
    assert torch.equal(flat_pixel_values(batched, grid), flat) and flat_pixel_values(flat, grid) is flat
    with pytest.raises(ValueError, match="asks for"):
        flat_pixel_values(batched[:, :6], grid)
    with pytest.raises(ValueError, match="covers 12 patches"):
        batch_pixel_values(flat[:10], grid)


def test_training_mode_is_differentiable(adapter):
    model = adapter.build(seed=1, variant="qwen2_5_vl")
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter="qwen2_vl").train()
    x = adapter.example_inputs(model, 2, seed=2)
    out = tmodel(**x)
    assert out.shape == (2, x["input_ids"].shape[1], model.config.text_config.vocab_size)
    out[x["attention_mask"].bool()].pow(2).mean().backward()
    grads = {name for name, p in tmodel.trimmers.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".token.policies.1." in name for name in grads), sorted(grads)  # segment 1: the image's trimmer
    assert any(".heads." in name for name in grads), sorted(grads)


# --- generation: trimkit_llava's, shared (image_grid_thw per instance, M-RoPE deltas in the decode positions)

NEW = 5


def _hf_generate(model, x, b):
    """transformers' greedy generation of instance ``b`` alone: its new tokens and the logits each came from."""
    from trimkit_qwen2_vl import flat_pixel_values

    n = int(x["attention_mask"][b].sum())
    ids, grid = x["input_ids"][b:b + 1, :n], x["image_grid_thw"][b:b + 1]
    with torch.no_grad():
        out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=grid,
                                   pixel_values=flat_pixel_values(x["pixel_values"][b:b + 1], grid),
                                   mm_token_type_ids=(ids == model.config.image_token_id).int(), max_new_tokens=NEW,
                                   min_new_tokens=NEW, eos_token_id=None, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, n:], torch.cat(out.logits)


def _generate(tmodel, x, **kw):
    from trimkit_qwen2_vl.generation import generate

    return generate(tmodel, x["input_ids"], x["pixel_values"], x["image_grid_thw"], x["attention_mask"],
                    max_new_tokens=NEW, eos_token_id=[], return_logits=True, **kw)


def test_everything_kept_generates_what_transformers_generates(adapter, qwen):
    from trimkit_llava.generation import decode_step
    from trimkit_qwen2_vl.generation import prefill

    model, tmodel = qwen
    x = adapter.example_inputs(model, 3, seed=8)
    out = _generate(tmodel, x)
    assert out.tokens.shape == (3, NEW)
    for b in range(3):
        tokens, logits = _hf_generate(model, x, b)
        assert out.tokens[b].tolist() == tokens.tolist()
        torch.testing.assert_close(out.logits[b], logits, atol=1e-5, rtol=0)
    # the decode positions need the M-RoPE deltas: without them the first decode step reads other logits
    logits, kept = prefill(tmodel, x["input_ids"], x["pixel_values"], x["image_grid_thw"], x["attention_mask"])
    assert all(o < 0 for o in kept.offsets)  # the image's positions are compressed: delta = max + 1 - n
    with torch.no_grad():
        kept.offsets = None
        wrong = decode_step(tmodel, kept, logits.argmax(-1), 0)
    assert float((wrong - out.logits[:, 1]).abs().max()) > 1e-4


def test_trimmed_generation_masked_removed_packed_agree(adapter, qwen):
    model, tmodel = qwen
    x = adapter.example_inputs(model, 3, seed=9)
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
    try:
        randomize_trimmers(tmodel, 21)
        removed, hard, packed = (_generate(tmodel, x, mode=m) for m in ("remove", "hard", "packed"))
    finally:
        tmodel.trimmers.load_state_dict(saved)
    torch.testing.assert_close(removed.logits, hard.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.logits, removed.logits, atol=1e-4, rtol=0)
    assert removed.tokens.tolist() == hard.tokens.tolist() == packed.tokens.tolist()
    assert removed.cache_lengths == hard.cache_lengths == packed.cache_lengths
    real = x["attention_mask"].sum(1).tolist()
    for b, lengths in enumerate(removed.cache_lengths):
        assert lengths[0] == real[b] and lengths[-1] < real[b]  # layer 0 caches every token, the trimmed ones fewer
    assert len({tuple(l) for l in removed.cache_lengths}) == 3
    off = _generate(tmodel, x, mode="off")
    assert float((off.logits - removed.logits).abs().max()) > 1e-3


def test_left_padded_batch_generates_transformers_tokens(adapter, qwen):
    """transformers' batched generation pads on the left (its M-RoPE index skips the padding): with
    everything kept, trimkit's generate on that batch gives its own generate()'s tokens."""
    from trimkit_qwen2_vl import flat_pixel_values

    model, tmodel = qwen
    x = adapter.example_inputs(model, 3, seed=8)
    shifts = [int((m == 0).sum()) for m in x["attention_mask"]]
    assert max(shifts) > 0
    ids = torch.stack([r.roll(s) for r, s in zip(x["input_ids"], shifts)])
    mask = torch.stack([r.roll(s) for r, s in zip(x["attention_mask"], shifts)])
    grid = x["image_grid_thw"]
    with torch.no_grad():
        hf = model.model.generate(input_ids=ids, attention_mask=mask, image_grid_thw=grid,
                                  pixel_values=flat_pixel_values(x["pixel_values"], grid),
                                  mm_token_type_ids=(ids == model.config.image_token_id).int(), max_new_tokens=NEW,
                                  min_new_tokens=NEW, eos_token_id=None, do_sample=False)
    ours = _generate(tmodel, dict(x, input_ids=ids, attention_mask=mask))
    assert ours.tokens.tolist() == hf[:, ids.shape[1]:].tolist()
    assert ours.tokens.tolist() == _generate(tmodel, x).tokens.tolist()  # its right-padded twin's


def test_beam_search_is_transformers_beam_search(adapter, qwen):
    """num_beams=3, everything kept, a batch with per-instance M-RoPE deltas (repeated per beam and
    reordered with the cache): transformers' generate(num_beams=3) tokens of each instance alone."""
    from trimkit_qwen2_vl import flat_pixel_values

    model, tmodel = qwen
    x = adapter.example_inputs(model, 3, seed=8)
    from trimkit_qwen2_vl.generation import generate

    ours = generate(tmodel, x["input_ids"], x["pixel_values"], x["image_grid_thw"], x["attention_mask"],
                    max_new_tokens=NEW, eos_token_id=[], num_beams=3)
    greedy = _generate(tmodel, x)
    for b in range(3):
        n = int(x["attention_mask"][b].sum())
        ids, grid = x["input_ids"][b:b + 1, :n], x["image_grid_thw"][b:b + 1]
        with torch.no_grad():
            hf = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=grid,
                                      pixel_values=flat_pixel_values(x["pixel_values"][b:b + 1], grid),
                                      mm_token_type_ids=(ids == model.config.image_token_id).int(),
                                      max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, do_sample=False,
                                      num_beams=3)
        assert ours.tokens[b].tolist() == hf[0, n:].tolist(), b
    assert ours.tokens.tolist() != greedy.tokens.tolist()
