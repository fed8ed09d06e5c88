"""The ``vilt`` adapter (transformers ViLT, single stream) on tiny random models: the wrapper is
the model, per-modality targets, both [CLS] kept, and padded patches (a mask ViLT builds itself)
handled in packed batches."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers

import trimkit
from trimkit import TrimConfig
from trimkit.plugins import get_registry, select_adapter

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("vilt")


def _hf_logits(wrapped, x):
    out = wrapped.model(**x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("task", ["vqa", "retrieval", "model"])
def test_the_wrapper_is_the_model(adapter, task):
    model = adapter.build("tiny", task=task)
    x = adapter.example_inputs(model, batch_size=3, seed=1)
    with torch.no_grad():
        torch.manual_seed(0)  # ViLT shuffles its patches (torch.multinomial) in every forward
        ref = _hf_logits(model, x)
        torch.manual_seed(0)
        got = model(**x)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_processor_style_inputs_with_token_type_ids(adapter):
    """ViltProcessor returns token_type_ids too: the trimmed model takes them like the model."""
    model = adapter.build("tiny")
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5)).eval()
    x = adapter.example_inputs(model, batch_size=1, seed=3)
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    with torch.no_grad():
        torch.manual_seed(0)
        ref = model(**x)
        torch.manual_seed(0)
        torch.testing.assert_close(tmodel(**x), ref, atol=1e-5, rtol=0)


def test_unwrapped_models_are_selected_and_trimmed_through_their_wrapper(adapter):
    from transformers import ViltConfig, ViltForQuestionAnswering

    from trimkit_vilt import TINY
    from trimkit_vilt.modeling import ViltForTrimming

    raw = ViltForQuestionAnswering(ViltConfig(**TINY)).eval()
    assert select_adapter(raw) == "vilt"
    with pytest.raises(TypeError, match=r"trimkit_vilt\.wrap\(model\)"):  # describing it as it is: refused by name
        adapter.describe(raw)
    assert isinstance(trimkit.trim(raw, TrimConfig()).model, ViltForTrimming)  # trim() wraps it (adapter.root)
    with pytest.raises(TypeError, match=r"trimkit_vilt\.wrap: expected ViltModel.*got Linear"):
        trimkit.trim(torch.nn.Linear(2, 2), TrimConfig(), adapter="vilt")
    assert select_adapter(adapter.build("tiny")) == "vilt"


def test_per_modality_targets_and_both_cls_kept(adapter):
    model = adapter.build("tiny")
    tmodel = trimkit.trim(model, TrimConfig(token_target={"text": 0.9, "vision": 0.3})).eval()
    layer = "model.vilt.encoder.layer.0"
    assert tmodel.final_targets[f"{layer}:text"] == 0.9 and tmodel.final_targets[f"{layer}:vision"] == 0.3
    randomize_trimmers(tmodel, 3)
    x = adapter.example_inputs(model, batch_size=1, seed=2)
    text_len = x["input_ids"].shape[1]
    with torch.no_grad(), tmodel.mode("remove"):
        tmodel(**x)
    last = [r for r in tmodel.records if r.kind == "token"][-1]
    assert {0, text_len} <= set(last.index.tolist())  # the text [CLS] and the image [CLS]
    assert any(float(r.keep) < 1 for r in tmodel.records if r.key.endswith(":vision"))


def test_padded_patches_are_padding_in_packed_batches(adapter):
    """Images of different sizes: ViLT pads the patch grid and marks the padded patches in the mask
    its embeddings return; trimkit takes padding from there, so packed batches drop them and agree
    with masked ones."""
    model = adapter.build("tiny")
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.6, head_target=0.7)).eval()
    randomize_trimmers(tmodel, 5)
    x = adapter.example_inputs(model, batch_size=3, seed=4)
    x["pixel_mask"][1, :, 16:] = 0  # instance 1: the right half is padding
    x["pixel_mask"][2, 16:, :] = 0  # instance 2: the bottom half
    with torch.no_grad():
        torch.manual_seed(0)
        with tmodel.mode("hard"):
            hard = tmodel(**x)
            hard_keep = {r.key: r.keep for r in tmodel.records}
        padding = tmodel.runtime.padding["joint"]
        torch.manual_seed(0)
        with tmodel.mode("packed"):
            packed = tmodel(**x)
    text_len = x["input_ids"].shape[1]
    assert int((padding[1, text_len:] == 0).sum()) == 8 and int((padding[0, text_len:] == 0).sum()) == 0
    torch.testing.assert_close(packed, hard, atol=1e-5, rtol=0)
    for r in tmodel.records:
        torch.testing.assert_close(r.keep, hard_keep[r.key], atol=1e-6, rtol=0)
