"""BLIP NLVR2 (two images into one text encoder, paper Appendix B) through trimkit, on tiny random models.

The fear: with two images, one vision tower called twice and text layers holding one
cross-attention per image, a cross-attention reads the other image's kept tokens (or mask), or
nothing is dropped and every comparison is vacuous. So: fresh trimmers leave the model exact;
masked (hard) == removed (batch 1) == packed, with image tokens of *both* images and text tokens
dropped, and the two images keeping different tokens; the removed forward equals a reference
assembled by hand from the untrimmed modules (each image's kept tokens gathered before each
vision layer, each cross-attention fed its own image); each cross-attention's key mask is its own
image's; MACs fall.
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

ATOL = 1e-5
VISION = "vision_model.encoder.layers"
TEXT = "text_encoder.encoder.layer"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("blip")


@pytest.fixture(scope="module")
def model(adapter):
    """The tiny NLVR2 model, its text side re-initialised with std 0.2 instead of BERT's 0.02: with
    0.02 the cross-attentions are so weak that replacing image 2 by image 1 moves the logits by
    ~7e-6, below the tolerance, and every comparison here would be blind to the images."""
    from trimkit_blip.modeling import _bert_init

    model = adapter.build("tiny", task="nlvr2")
    torch.manual_seed(0)
    _bert_init(model.text_encoder, 0.2)
    _bert_init(model.cls_head, 0.2)
    x = adapter.example_inputs(model, batch_size=1, seed=0)
    with torch.no_grad():
        a = model(**x)
        b = model(**{**x, "pixel_values_2": x["pixel_values"]})
    assert (a - b).abs().max() > 1e-2, "the model barely reads image 2"
    return model


def _token_records(tmodel: trimkit.TrimmedModel) -> dict[str, list]:
    """The last forward's token records by stream part: image 1 (each vision layer's first call),
    image 2 (its second call) and text."""
    out: dict[str, list] = {"image1": [], "image2": [], "text": []}
    seen: set[str] = set()
    for r in tmodel.records:
        if r.kind != "token":
            continue
        if r.key.startswith(VISION):
            out["image2" if r.key in seen else "image1"].append(r)
            seen.add(r.key)
        else:
            out["text"].append(r)
    return out


def test_nlvr2_model(adapter, model):
    """Shape, spec (two vision calls share trimmers; self1 reads its own context) and, started from a
    BLIP ITM model with no merge layers, one image twice == transformers' BLIP text encoder."""
    from transformers import BlipForImageTextRetrieval

    from trimkit_blip import BlipNLVRForTrimming

    assert adapter.matches(model)
    x = adapter.example_inputs(model, batch_size=3, seed=1)
    assert (x["attention_mask"] == 0).any() and x["pixel_values_2"].shape == x["pixel_values"].shape
    with torch.no_grad():
        assert model(**x).shape == (3, 2)
    assert model.text_encoder.encoder.layer[0].crossattention.output.merge_layer is None  # averaged
    assert model.text_encoder.encoder.layer[1].crossattention.output.merge_layer is not None  # merged
    spec = adapter.describe(model)
    text = [l for l in spec.layers if l.stream == "text"]
    assert [(a.path, a.context) for a in text[0].attentions] == [
        ("attention.self", None), ("crossattention.self0", None), ("crossattention.self1", "encoder_hidden_states_2")]
    assert text[0].context == "encoder_hidden_states"

    blip = BlipForImageTextRetrieval(model.config).eval()
    n = model.config.text_config.num_hidden_layers
    nlvr = BlipNLVRForTrimming.from_blip(blip, merge_from=n).eval()
    seen = []
    handle = nlvr.cls_head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            nlvr(x["pixel_values"], x["pixel_values"], x["input_ids"], x["attention_mask"])
            image = blip.vision_model(pixel_values=x["pixel_values"]).last_hidden_state
            ref = blip.text_encoder(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                                    encoder_hidden_states=image, use_cache=False).last_hidden_state[:, 0]
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_fresh_trimmers_keep_the_model_exact(adapter, model, batch):
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5, head_target=0.5)).eval()
    x = adapter.example_inputs(model, batch_size=batch, seed=2)
    with torch.no_grad():
        ref = model(**x)
        out = tmodel(**x)
        assert tmodel.records and all(float(r.keep.min()) == 1.0 for r in tmodel.records)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        tmodel.inference = "packed"
        torch.testing.assert_close(tmodel(**x), ref, atol=ATOL, rtol=0)
    parts = _token_records(tmodel)
    assert len(parts["image1"]) == len(parts["image2"]) == 2 and len(parts["text"]) == 2


def test_masked_equals_removed_at_batch_1(adapter, model):
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    dropped = {"image1": 0, "image2": 0, "text": 0, "head": 0}
    differ = 0
    for trial in range(4):
        randomize_trimmers(tmodel, seed=10 + trial)
        x = adapter.example_inputs(model, batch_size=1, seed=20 + trial)
        with torch.no_grad():
            with tmodel.mode("hard"):
                masked = tmodel(**x)
            with tmodel.mode("remove"):
                removed = tmodel(**x)
        torch.testing.assert_close(masked, removed, atol=ATOL, rtol=0)
        parts = _token_records(tmodel)
        for name, records in parts.items():
            dropped[name] += any(float(r.keep) < 1 for r in records)
        dropped["head"] += any(float(r.keep) < 1 for r in tmodel.records if r.kind == "head")
        differ += not torch.equal(parts["image1"][-1].index, parts["image2"][-1].index)
    assert all(dropped.values()), f"nothing dropped somewhere: the comparison would be vacuous ({dropped})"
    assert differ, "both images always kept the same tokens: a mixed-up mask would go unnoticed"


def test_batch_masks_and_packed_equal_per_instance_removal(adapter, model):
    """Batch 3, padded statements: masked (mode hard) and packed == each instance with tokens removed."""
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    randomize_trimmers(tmodel, seed=5)
    x = adapter.example_inputs(model, batch_size=3, seed=6)
    with torch.no_grad():
        masked = tmodel(**x)  # batch 3 in eval: mode hard
        parts = _token_records(tmodel)
        for name, records in parts.items():
            assert any(float(r.keep.min()) < 1 for r in records), f"no {name} token dropped"
        assert not torch.equal(parts["image1"][-1].mask, parts["image2"][-1].mask)
        tmodel.inference = "packed"
        packed = tmodel(**x)
        for b in range(3):
            with tmodel.mode("remove"):
                one = tmodel(**{k: v[b:b + 1] for k, v in x.items()})
            torch.testing.assert_close(masked[b:b + 1], one, atol=ATOL, rtol=0)
            torch.testing.assert_close(packed[b:b + 1], one, atol=ATOL, rtol=0)


def _capture_cross_attention(tmodel: trimkit.TrimmedModel, layer: int) -> tuple[list, list]:
    """Pre-hooks on the trimmed text layer's TrimAttention of self0 (index 1) and self1 (index 2)."""
    wrapper = tmodel._graph.get_submodule(f"trimkit_layer_{TEXT.replace('.', '_')}_{layer}")
    seen: tuple[list, list] = ([], [])
    handles = [wrapper.inner.get_submodule(f"trimkit_attn_{i}").register_forward_pre_hook(
        lambda m, args, kwargs, box=box: box.append(kwargs["trimkit_trim"]), with_kwargs=True)
        for i, box in ((1, seen[0]), (2, seen[1]))]
    return seen, handles


def test_each_cross_attention_reads_its_own_image(adapter, model):
    """Every text layer's cross-attention to image k gets image k's kept tokens: its key mask (mode
    hard) or its packing (mode packed), never the other image's."""
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    randomize_trimmers(tmodel, seed=5)
    x = adapter.example_inputs(model, batch_size=3, seed=6)
    for layer in range(model.config.text_config.num_hidden_layers):
        seen, handles = _capture_cross_attention(tmodel, layer)
        try:
            with torch.no_grad():
                tmodel(**x)
                parts = _token_records(tmodel)
                tmodel.inference = "packed"
                tmodel(**x)
                packed = _token_records(tmodel)
                tmodel.inference = "remove"
        finally:
            for h in handles:
                h.remove()
        m1, m2 = parts["image1"][-1].mask, parts["image2"][-1].mask
        assert not torch.equal(m1, m2)
        torch.testing.assert_close(seen[0][0].key_mask, m1)
        torch.testing.assert_close(seen[1][0].key_mask, m2)
        assert seen[0][1].packed.k.counts == packed["image1"][-1].counts != packed["image2"][-1].counts
        assert seen[1][1].packed.k.counts == packed["image2"][-1].counts


def _reference(model, x: dict, kept: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """The NLVR2 forward assembled by hand from the untrimmed modules (batch 1): before vision layer
    l, image k's tokens are gathered to ``kept[k][l]`` (original positions); each text layer's
    cross-attentions get their own image's kept tokens. Text tokens and heads are not trimmed."""
    from trimkit_blip.modeling import padding_bias

    images = []
    for pixels, positions in ((x["pixel_values"], kept["image1"]), (x["pixel_values_2"], kept["image2"])):
        h = model.vision_model.embeddings(pixels)
        pos = torch.arange(h.shape[1])
        for layer, keep in zip(model.vision_model.encoder.layers, positions):
            h = h[:, torch.searchsorted(pos, keep)]
            pos = keep
            h = layer(h)
        images.append(model.vision_model.post_layernorm(h))
    hidden = model.text_encoder.embeddings(input_ids=x["input_ids"])
    bias = padding_bias(x["attention_mask"], hidden.dtype)
    for layer in model.text_encoder.encoder.layer:
        hidden = layer(hidden, bias, images[0], images[1])
    return model.cls_head(hidden[:, 0])


def test_removed_equals_hand_assembled_reference(adapter, model):
    """Only image tokens trimmed: the trimmed forward (removed and masked) == the hand-assembled
    reference with each image's own kept tokens, and != the reference with the images' kept tokens
    swapped (what a cross-attention reading the other image's mask would compute)."""
    tmodel = trimkit.trim(model, TrimConfig(token_layers=["vision"], trim_heads=False)).eval()
    checked = 0
    for trial in range(4):
        randomize_trimmers(tmodel, seed=30 + trial)
        x = adapter.example_inputs(model, batch_size=1, seed=40 + trial)
        with torch.no_grad():
            with tmodel.mode("remove"):
                removed = tmodel(**x)
            parts = _token_records(tmodel)
            kept = {k: [r.index for r in parts[k]] for k in ("image1", "image2")}
            if torch.equal(kept["image1"][-1], kept["image2"][-1]):
                continue
            with tmodel.mode("hard"):
                masked = tmodel(**x)
            ref = _reference(model, x, kept)
            swapped = _reference(model, x, {"image1": kept["image2"], "image2": kept["image1"]})
        assert kept["image1"][-1].numel() < 17 and kept["image2"][-1].numel() < 17
        torch.testing.assert_close(removed, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(masked, ref, atol=ATOL, rtol=0)
        assert (swapped - ref).abs().max() > 1e-3
        checked += 1
    assert checked >= 2, "the images kept the same tokens in almost every trial: the test would be vacuous"


def test_training_mode_reaches_every_trimmer(adapter, model):
    """Mode sample: the loss reaches the vision token trimmers and self1's head trimmer."""
    tmodel = trimkit.trim(model, TrimConfig())
    x = adapter.example_inputs(model, batch_size=2, seed=9)
    tmodel.train()
    try:
        out = tmodel(**x)
        cost = sum(r.keep.mean() for r in tmodel.records)
        (out.square().sum() + cost).backward()
    finally:
        tmodel.eval()
        model.eval()
    vision = tmodel.trimmers[f"{VISION.replace('.', '_')}_0"]
    text = tmodel.trimmers[f"{TEXT.replace('.', '_')}_0"]
    for module in (vision.token, text.heads["2"]):
        grads = [p.grad for p in module.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_macs_fall(adapter, model):
    tmodel = trimkit.trim(model, TrimConfig()).eval()
    x = adapter.example_inputs(model, batch_size=1, seed=7)
    with tmodel.full():
        full = count_macs(tmodel, **x).total
    randomize_trimmers(tmodel, seed=8)
    with tmodel.mode("remove"):
        trimmed = count_macs(tmodel, **x).total
    parts = _token_records(tmodel)
    assert all(any(float(r.keep) < 1 for r in records) for records in parts.values())
    assert trimmed < full


def test_attention_context_validation():
    """The core's per-attention context (AttentionSpec.context): declared only where it makes sense."""
    from trimkit.spec import AttentionSpec, LayerSpec, ModelSpec, StreamSpec

    with pytest.raises(ValueError, match="self-attention takes no context"):
        AttentionSpec("attn", "self", context="other")
    streams = [StreamSpec("text"), StreamSpec("vision")]

    def spec(*attentions, **layer):
        return ModelSpec(streams, [LayerSpec("layer", "text", attentions=attentions, **layer)], ["x"])

    with pytest.raises(ValueError, match="needs the layer's `context`"):
        spec(AttentionSpec("cross", "cross")).validate()
    with pytest.raises(ValueError, match="without a context_stream"):
        spec(AttentionSpec("cross", "cross", context="image")).validate()
    with pytest.raises(ValueError, match="unknown context_stream"):
        spec(AttentionSpec("cross", "cross", context="image", context_stream="audio")).validate()
    spec(AttentionSpec("cross", "cross", context="image", context_stream="vision")).validate()
    spec(AttentionSpec("c0", "cross"), AttentionSpec("c1", "cross", context="image_2"), context="image",
         context_stream="vision").validate()
