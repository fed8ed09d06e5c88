"""The ``blip`` adapter on tiny random BLIP models (VQA ranking and ITM): selection, faithfulness to
transformers, exactness with fresh trimmers, mask semantics (masked == removed), MACs."""

from __future__ import annotations

import pytest
import torch

import trimkit
from trimkit import TrimConfig
from trimkit.macs import count_macs
from trimkit.plugins import get_registry, select_adapter

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TASKS = ["vqa", "itm", "vqa_classifier"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("blip")


@pytest.fixture(scope="module")
def models(adapter):
    return {task: adapter.build("tiny", task=task) for task in TASKS}


def _config(**kw) -> TrimConfig:
    return TrimConfig(**kw)  # the answer decoder is declared trimmable=False: never trimmed


def _randomize(tmodel: trimkit.TrimmedModel, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            torch.nn.init.normal_(p, std=scale, generator=gen)


def test_selected_from_the_model(adapter, models):
    from transformers import BlipForQuestionAnswering

    for model in models.values():
        assert select_adapter(model) == "blip"
    raw = BlipForQuestionAnswering(models["vqa"].config)
    assert select_adapter(raw) == "blip"  # recognised, and told to wrap it
    with pytest.raises(TypeError, match="wrap"):
        adapter.describe(raw)
    assert not adapter.matches(torch.nn.Linear(2, 2))
    spec = adapter.describe(models["vqa"])
    assert [s.name for s in spec.streams] == ["vision", "text", "answer"]
    assert {l.stream for l in adapter.describe(models["itm"]).layers} == {"vision", "text"}


def test_vqa_wrapper_is_transformers_decoder_loss(adapter, models):
    """K = 1: -sum(scores) / #answer tokens == BlipForQuestionAnswering's own loss (padding in
    questions and answers; label smoothing off to compare)."""
    from transformers import BlipForQuestionAnswering

    model = models["vqa"]
    blip = BlipForQuestionAnswering(model.config).eval()
    blip.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    blip.text_decoder.label_smoothing = 0.0
    x = adapter.example_inputs(model, batch_size=3, seed=1, num_answers=1)
    x["answer_attention_mask"][1, 2:] = 0
    x["answer_ids"][1, 2:] = model.config.text_config.pad_token_id
    assert (x["attention_mask"] == 0).any()
    labels = x["answer_ids"].masked_fill(x["answer_attention_mask"] == 0, -100)
    with torch.no_grad():
        scores = model(**x)
        loss = blip(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"],
                    decoder_input_ids=x["answer_ids"], decoder_attention_mask=x["answer_attention_mask"],
                    labels=labels).loss
    assert scores.shape == (3, 1)
    torch.testing.assert_close(-scores.sum() / x["answer_attention_mask"][:, 1:].sum(), loss, atol=ATOL, rtol=0)


def test_itm_wrapper_is_transformers_itm_head(adapter, models):
    from transformers import BlipForImageTextRetrieval

    model = models["itm"]
    blip = BlipForImageTextRetrieval(model.config).eval()
    blip.load_state_dict(model.state_dict(), strict=False)
    x = adapter.example_inputs(model, batch_size=3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**x), blip(**x).itm_score, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fresh_trimmers_keep_the_model_exact(adapter, models, task, batch):
    model = models[task]
    tmodel = trimkit.trim(model, _config(token_target=0.5, head_target=0.5)).eval()
    x = adapter.example_inputs(model, batch_size=batch, seed=2, num_answers=3 if batch == 1 else 1)
    with torch.no_grad():
        ref = model(**x)
        out = tmodel(**x)
    assert tmodel.records and all(float(r.keep.min()) == 1.0 for r in tmodel.records)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_other_resolution(adapter, models):
    """A 32px model run at 48px (interpolated positions: 37 image tokens) trims like at its own size."""
    from trimkit_blip import wrap

    model = wrap(_unwrap_itm(models["itm"]), interpolate_pos_encoding=True)
    x = adapter.example_inputs(model, batch_size=1, seed=3)
    x["pixel_values"] = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    tmodel = trimkit.trim(model, _config(), example_inputs=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(tmodel(**x), model(**x), atol=ATOL, rtol=0)
        _randomize(tmodel, seed=3)
        with tmodel.mode("hard"):
            masked = tmodel(**x)
        with tmodel.mode("remove"):
            removed = tmodel(**x)
    assert tmodel.records[0].total == 37 and any(float(r.keep) < 1 for r in tmodel.records if r.kind == "token")
    torch.testing.assert_close(masked, removed, atol=ATOL, rtol=0)


def _unwrap_itm(wrapper):
    from transformers import BlipForImageTextRetrieval

    blip = BlipForImageTextRetrieval(wrapper.config).eval()
    blip.load_state_dict(wrapper.state_dict(), strict=False)
    return blip


def test_vision_trimmers_read_the_question_summary(adapter, models):
    """The image tokens' cross-modal signal is the mean of the question's word embeddings (cheap)."""
    model = models["vqa"]
    tmodel = trimkit.trim(model, _config()).eval()
    seen = []
    first = tmodel.trimmers["vision_model_encoder_layers_0"].token
    assert first.context_dim == model.config.text_config.hidden_size
    handle = first.register_forward_hook(lambda m, args, out: seen.append(args[2]))
    x = adapter.example_inputs(model, batch_size=3, seed=4)
    try:
        with torch.no_grad():
            tmodel(**x)
    finally:
        handle.remove()
    with torch.no_grad():
        emb = model.text_encoder.embeddings(input_ids=x["input_ids"])
    mask = x["attention_mask"][..., None].float()
    torch.testing.assert_close(seen[0].reshape(3, -1), (emb * mask).sum(1) / mask.sum(1), atol=ATOL, rtol=0)
    full = count_macs(tmodel, **x).total
    summary = count_macs(lambda: model.question_summary(model.text_encoder.embeddings(input_ids=x["input_ids"]),
                                                        x["attention_mask"])).total
    assert summary <= 0.02 * full  # lookups and one LayerNorm: no multiply-accumulate at all


@pytest.mark.parametrize("task", TASKS)
def test_masked_equals_removed_at_batch_1(adapter, models, task):
    model = models[task]
    tmodel = trimkit.trim(model, _config()).eval()
    streams = {l.path: l.stream for l in tmodel.spec.layers}
    dropped = {"vision": 0, "text": 0, "head": 0}
    for trial in range(4):
        _randomize(tmodel, seed=10 + trial)
        x = adapter.example_inputs(model, batch_size=1, seed=20 + trial, num_answers=3)
        with torch.no_grad():
            with tmodel.mode("hard"):
                masked = tmodel(**x)
            with tmodel.mode("remove"):
                removed = tmodel(**x)
        torch.testing.assert_close(masked, removed, atol=ATOL, rtol=0)
        for r in tmodel.records:
            if float(r.keep) < 1:
                dropped[streams[r.key] if r.kind == "token" else "head"] += 1
    assert all(dropped.values()), f"nothing dropped somewhere: the comparison would be vacuous ({dropped})"


@pytest.mark.parametrize("task", TASKS)
def test_batch_masks_equal_per_instance_removal(adapter, models, task):
    """Batch 3 with padded questions, masked (K = 1), == each instance alone with tokens removed."""
    model = models[task]
    tmodel = trimkit.trim(model, _config()).eval()
    _randomize(tmodel, seed=5)
    x = adapter.example_inputs(model, batch_size=3, seed=6)
    with torch.no_grad():
        out = tmodel(**x)  # batch 3 in eval: mode hard
        assert any(float(r.keep.min()) < 1 for r in tmodel.records if r.kind == "token")
        for b in range(3):
            with tmodel.mode("remove"):
                one = tmodel(**{k: v[b:b + 1] for k, v in x.items()})
            torch.testing.assert_close(out[b:b + 1], one, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_macs_fall(adapter, models, task):
    model = models[task]
    tmodel = trimkit.trim(model, _config()).eval()
    x = adapter.example_inputs(model, batch_size=1, seed=7, num_answers=3)
    with tmodel.full():
        full = count_macs(tmodel, **x).total
    _randomize(tmodel, seed=8)
    with tmodel.mode("remove"):
        trimmed = count_macs(tmodel, **x).total
    assert any(float(r.keep) < 1 for r in tmodel.records)
    assert trimmed < full
