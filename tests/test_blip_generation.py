"""BLIP captioning and generation through a trimmed model (tiny random models).

The fear: generation silently reads tokens the trimmers dropped (or drops nothing). So: batched
generation (dropped tokens masked, or packed) must equal each instance generated alone with the
tokens physically removed; the generated tokens must be what the trimmed teacher-forced forward
predicts; untrimmed generation must equal transformers' own ``generate``.
"""

from __future__ import annotations

import pytest
import torch

import trimkit
from conftest import randomize_trimmers
from trimkit import TrimConfig
from trimkit.macs import count_macs
from trimkit.plugins import get_registry

transformers = pytest.importorskip("transformers")

STEPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("blip")


def _trimmed(adapter, task: str, seed: int = 3) -> trimkit.TrimmedModel:
    model = adapter.build("tiny", task=task)
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    randomize_trimmers(tmodel, seed)
    return tmodel


def _fixed_length(**kw):  # no early stop at [SEP], so sequences of a batch line up
    return {"max_new_tokens": STEPS, "min_new_tokens": STEPS, **kw}


def test_caption_wrapper_is_transformers_captioning(adapter):
    from transformers import BlipForConditionalGeneration

    model = adapter.build("tiny", task="caption")
    blip = BlipForConditionalGeneration(model.config).eval()
    blip.load_state_dict(model.state_dict(), strict=False)
    x = adapter.example_inputs(model, batch_size=3, seed=1)
    assert (x["attention_mask"] == 0).any() and (x["input_ids"][:, 0] == model.config.text_config.bos_token_id).all()
    with torch.no_grad():
        ours = model(**x)
        theirs = blip(**x).logits[:, :-1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_caption_masked_equals_removed_and_macs_fall(adapter):
    tmodel = _trimmed(adapter, "caption")
    x = adapter.example_inputs(tmodel.model, batch_size=1, seed=2)
    with torch.no_grad():
        with tmodel.mode("hard"):
            masked = tmodel(**x)
        with tmodel.mode("remove"):
            removed = tmodel(**x)
            trimmed_macs = count_macs(tmodel, **x).total
        assert any(float(r.keep) < 1 for r in tmodel.records if r.kind == "token"), "no image token dropped"
        assert not any(r.key.startswith("text_decoder") for r in tmodel.records), "the caption decoder got trimmers"
        with tmodel.full():
            full_macs = count_macs(tmodel, **x).total
    torch.testing.assert_close(masked, removed, atol=1e-5, rtol=0)
    assert trimmed_macs < full_macs


def test_untrimmed_generation_is_transformers_generate(adapter):
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    from trimkit_blip import generate

    cap = _trimmed(adapter, "caption")
    blip = BlipForConditionalGeneration(cap.model.config).eval()
    blip.load_state_dict(cap.model.state_dict(), strict=False)
    x = adapter.example_inputs(cap.model, batch_size=2, seed=4, text_len=3)
    prompt = x["input_ids"][:, :2]
    sep = torch.full((2, 1), cap.model.config.text_config.sep_token_id)
    with cap.full():
        ours = generate(cap, x["pixel_values"], prompt, **_fixed_length())
    theirs = blip.generate(x["pixel_values"], input_ids=torch.cat([prompt, sep], 1), **_fixed_length())
    assert torch.equal(ours, theirs)

    vqa = _trimmed(adapter, "vqa")
    blip = BlipForQuestionAnswering(vqa.model.config).eval()
    blip.load_state_dict(vqa.model.state_dict(), strict=False)
    x = adapter.example_inputs(vqa.model, batch_size=1, seed=5)
    with vqa.full():
        ours = generate(vqa, x["pixel_values"], x["input_ids"], x["attention_mask"], **_fixed_length())
    theirs = blip.generate(pixel_values=x["pixel_values"], input_ids=x["input_ids"],
                           attention_mask=x["attention_mask"], **_fixed_length())
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_batched_generation_equals_each_instance_with_tokens_removed(adapter, task):
    """Batches run masked (mode hard; packed batches do not support the causal decoder yet)."""
    from trimkit_blip import encoder_states, generate

    tmodel = _trimmed(adapter, task, seed=7)
    x = adapter.example_inputs(tmodel.model, batch_size=3, seed=8)
    stream = "vision" if task == "caption" else "text"
    prompt = x["input_ids"][:, :2] if task == "caption" else x["input_ids"]
    mask = x["attention_mask"][:, :2] if task == "caption" else x["attention_mask"]
    paths = {layer.path: layer.stream for layer in tmodel.spec.layers}
    states, keep = encoder_states(tmodel, x["pixel_values"], prompt, mask)
    assert not bool(keep.all()), "nothing dropped or padded: the comparison would be vacuous"
    scored = _fixed_length(output_scores=True, return_dict_in_generate=True)
    batch = generate(tmodel, x["pixel_values"], prompt, mask, **scored)
    for b in range(3):
        with tmodel.mode("remove"):
            one_states, one_keep = encoder_states(tmodel, x["pixel_values"][b:b + 1], prompt[b:b + 1], mask[b:b + 1])
        # batch 1: the dropped tokens are gone (a kept padding token of a padded question stays, masked)
        last = [r for r in tmodel.records if r.kind == "token" and paths[r.key] == stream][-1]
        assert one_states.shape[1] == last.index.numel() < last.total
        torch.testing.assert_close(one_states[0][one_keep[0]], states[b][keep[b]], atol=1e-5, rtol=0)
        with tmodel.mode("remove"):
            one = generate(tmodel, x["pixel_values"][b:b + 1], prompt[b:b + 1], mask[b:b + 1], **scored)
        assert torch.equal(one.sequences, batch.sequences[b:b + 1]), f"instance {b} ({stream} stream)"
        for step, (s1, sb) in enumerate(zip(one.scores, batch.scores)):  # every step's logits, not just argmax
            torch.testing.assert_close(s1[0], sb[b], atol=1e-4, rtol=0, msg=f"instance {b}, step {step}")


def test_generated_caption_is_what_the_trimmed_forward_predicts(adapter):
    """Greedy tokens == argmax of the trimmed teacher-forced forward on the generated sequence: the
    generation loop reads exactly the image tokens the trimmed graph's decoder reads."""
    from trimkit_blip import generate

    tmodel = _trimmed(adapter, "caption", seed=11)
    x = adapter.example_inputs(tmodel.model, batch_size=1, seed=12)
    prompt = x["input_ids"][:, :2]
    seq = generate(tmodel, x["pixel_values"], prompt, **_fixed_length())
    assert seq.shape[1] == prompt.shape[1] + STEPS
    with torch.no_grad():
        logits = tmodel(pixel_values=x["pixel_values"], input_ids=seq, attention_mask=torch.ones_like(seq))
    assert any(float(r.keep) < 1 for r in tmodel.records if r.kind == "token")
    sep = tmodel.model.config.text_config.sep_token_id
    predicted = logits[0, prompt.shape[1] - 1:].clone()
    predicted[:, sep] = float("-inf")  # min_new_tokens suppressed [SEP] during generation
    assert torch.equal(predicted.argmax(-1), seq[0, prompt.shape[1]:])


def test_generation_errors(adapter):
    from trimkit_blip import generate

    itm = trimkit.trim(adapter.build("tiny", task="itm"), TrimConfig()).eval()
    x = adapter.example_inputs(itm.model, batch_size=1)
    with pytest.raises(TypeError, match="does not generate"):
        generate(itm, x["pixel_values"], x["input_ids"])
    vqa = _trimmed(adapter, "vqa")
    with pytest.raises(ValueError, match="input_ids"):
        generate(vqa, x["pixel_values"])
    vqa.train()
    with pytest.raises(RuntimeError, match="eval"):
        generate(vqa, x["pixel_values"], x["input_ids"])
    with pytest.raises(KeyError, match="streams"):
        vqa.kept_mask("audio")
