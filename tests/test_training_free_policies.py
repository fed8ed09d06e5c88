"""Training-free token policies of the ``trimkit_training_free`` plugin (``fastv``, ``visionzip``):
registered through the entry point like a third party's and listed by ``trimkit plugins``; on a tiny
LLaVA, fastv keeps exactly its budget of image tokens from layer K on, the ones the last token
attended most in layer K - 1 by transformers' own eager attention weights; masked == removed;
visionzip on a timm ViT keeps the tokens [CLS] attended most (timm's own attention probabilities);
bad configurations fail naming the value."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import trimkit
from trimkit import TrimConfig
from trimkit.config import TrimConfigError
from trimkit.plugins import get_registry

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

K = 2  # FastV's layer: the first decoder layer without the dropped image tokens
LAYER = f"model.model.language_model.layers.{K}"
IMAGE_KEEP = 0.5


def _fastv_config(**over):
    cfg = dict(token_policy="fastv", token_layers=[f"seq.uni.{K}"], token_target={"image": IMAGE_KEEP},
               trim_heads=False)
    return TrimConfig(**{**cfg, **over})


@pytest.fixture(scope="module")
def llava():
    adapter = get_registry().adapters.get("llava")
    model = adapter.build()
    return adapter, model, trimkit.trim(model, _fastv_config(), adapter="llava").eval()


def _one(x, b):
    """Instance b alone, without its padding."""
    n = int(x["attention_mask"][b].sum())
    return {k: (v[b:b + 1, :n] if k in ("input_ids", "attention_mask") else v[b:b + 1]) for k, v in x.items()}


def _eager_attentions(model, x):
    """transformers' own attention weights of every decoder layer (eager implementation)."""
    hf = model.model
    cfgs = [hf.config, hf.config.text_config]
    saved = [c._attn_implementation for c in cfgs]
    try:
        for c in cfgs:
            c._attn_implementation = "eager"
        with torch.no_grad():
            out = hf(pixel_values=x["pixel_values"], input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                     output_attentions=True, use_cache=False)
    finally:
        for c, s in zip(cfgs, saved):
            c._attn_implementation = s
    return out.attentions


def test_registered_as_a_third_party_plugin_and_listed(capsys):
    from trimkit import plugins
    from trimkit.cli import main

    reg = get_registry()
    assert {"fastv", "visionzip"} <= set(reg.token_policies.names())
    assert reg.token_policies.source("fastv").startswith("training_free (")
    assert "training_free" in plugins._THIRD_PARTY and "training_free" not in plugins._BUILTINS
    assert main(["plugins", "--json"]) == 0
    rows = {(r["kind"], r["name"]): r["source"] for r in json.loads(capsys.readouterr().out)}
    assert rows[("token_policies", "fastv")].startswith("training_free")
    assert rows[("token_policies", "visionzip")].startswith("training_free")
    # like any third-party plugin, it is not loaded when autoload is off
    env = {**os.environ, "TRIMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-m", "trimkit.cli", "plugins", "--json"], capture_output=True, text=True,
                         env=env, timeout=120)
    if out.returncode != 0 or not out.stdout.strip():
        out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "trimkit"), "plugins", "--json"],
                             capture_output=True, text=True, env=env, timeout=120)
    names = {r["name"] for r in json.loads(out.stdout)}
    assert "cross_modal" in names and "fastv" not in names and "visionzip" not in names
    assert not any(p.requires_grad for p in reg.token_policies.get("fastv")(32, 32, _fastv_config()).parameters())


def test_fastv_keeps_the_most_attended_image_tokens_by_eager_attention(llava):
    adapter, model, tmodel = llava
    x = adapter.example_inputs(model, 3, seed=1)
    starts = x["segment_starts"]
    last = x["attention_mask"].sum(1) - 1
    attn = _eager_attentions(model, x)[K - 1]  # (B, H, N, N): layer K - 1, as FastV reads it
    probe = tmodel._graph.get_submodule("trimkit_layer_" + LAYER.replace(".", "_")).attention_probe
    seen = {}
    read = probe.received

    def spy(query, rows):  # what the policy was given
        seen[query] = read(query, rows)
        return seen[query]

    probe.received = spy
    with torch.no_grad(), tmodel.mode("hard"):
        hard = tmodel(**x)
    assert probe._call is None and probe._got is None  # nothing recorded is kept past the forward
    record = next(r for r in tmodel.records if r.key == f"{LAYER}:image")
    mask = record.mask
    b = torch.arange(3)
    # the probe's one row per instance is transformers' eager attention row of the last token, mean over heads
    reference = attn.mean(1)[b, last]  # (B, N)
    torch.testing.assert_close(seen["last"], reference, atol=1e-6, rtol=1e-5)
    for i in range(3):
        s, e = starts[i, 1:].tolist()
        n_image = e - s
        budget = int(IMAGE_KEEP * n_image + 0.5)
        kept = set(torch.nonzero(mask[i, s:e]).flatten().add(s).tolist())
        assert len(kept) == budget  # exactly the configured number of image tokens
        # the image segment's first token is always kept (its summary); the others by attention received
        others = sorted(range(s + 1, e), key=lambda p: -float(reference[i, p]))
        assert kept == {s} | set(others[:budget - 1])
        assert float(reference[i, others[budget - 2]]) > float(reference[i, others[budget - 1]])  # no tie decides
        text = [p for p in range(int(last[i]) + 1) if not s <= p < e]
        assert bool(mask[i, text].all())  # prompt and question keep every token (target 1.0)
        # from layer K on the dropped tokens are gone: the removed forward runs without them to the end
        with torch.no_grad(), tmodel.mode("remove"):
            alone = tmodel(**_one(x, i))
        index = next(r for r in tmodel.records if r.key == f"{LAYER}:image").index.tolist()
        assert index == sorted(set(range(int(last[i]) + 1)) - (set(range(s, e)) - kept))
        assert alone.shape[1] == len(index)
        torch.testing.assert_close(alone[0], hard[i, index], atol=1e-5, rtol=0)  # masked == removed


def test_fastv_training_mode_takes_the_same_decision(llava):
    adapter, model, tmodel = llava
    x = adapter.example_inputs(model, 2, seed=4)
    torch.manual_seed(0)
    with torch.no_grad():
        with tmodel.mode("hard"):
            tmodel(**x)
            hard = next(r for r in tmodel.records if r.key == f"{LAYER}:image").mask
        with tmodel.mode("sample"):
            tmodel(**x)
            sampled = next(r for r in tmodel.records if r.key == f"{LAYER}:image").mask
    # the gumbel sampler clamps probabilities to float eps (logits about +-16): within 1e-3 of the decision
    assert torch.equal(sampled.round(), hard) and float((sampled - hard).abs().max()) < 1e-3


def test_fastv_masked_equals_removed_at_several_layers():
    """Two fastv layers (1 and 2, budgets 0.7 then 0.4 of the image): the second reads an attention
    whose keys the first already trimmed; masked and removed still agree."""
    adapter = get_registry().adapters.get("llava")
    model = adapter.build(seed=3)
    cfg = TrimConfig(token_policy="fastv", token_target={"image.uni.1": 0.7, "image.uni.2": 0.4, "default": 1.0},
                     trim_heads=False)
    tmodel = trimkit.trim(model, cfg, adapter="llava").eval()
    x = adapter.example_inputs(model, 3, seed=6)
    with torch.no_grad(), tmodel.mode("hard"):
        hard = tmodel(**x)
        masks = {r.key: r.mask for r in tmodel.records if r.key.endswith(":image")}
    first, second = (masks[f"model.model.language_model.layers.{i}:image"] for i in (1, 2))
    assert bool((second <= first).all()) and bool((second < first).any())
    for i in range(3):
        s, e = x["segment_starts"][i, 1:].tolist()
        assert int(second[i, s:e].sum()) == int(0.4 * (e - s) + 0.5)
        with torch.no_grad(), tmodel.mode("remove"):
            alone = tmodel(**_one(x, i))
        index = [r for r in tmodel.records if r.kind == "token"][-1].index.tolist()
        n = int(x["attention_mask"][i].sum())
        assert index == [p for p in range(n) if second[i, p]]
        torch.testing.assert_close(alone[0], hard[i, index], atol=1e-5, rtol=0)


def test_bad_configs_name_the_value(llava):
    adapter, model, tmodel = llava
    with pytest.raises(TrimConfigError, match=r"token_layers\[0\]: 'seq\.uni\.9' selects no layer"):
        trimkit.trim(model, _fastv_config(token_layers=["seq.uni.9"]), adapter="llava")  # K beyond 4 layers
    first = adapter.build(trim_layers=[0, 1])
    with pytest.raises(TrimConfigError, match=r"'fastv'.*layers\.0' is the first layer of stream 'seq'"):
        trimkit.trim(first, _fastv_config(token_layers=["seq.uni.0"]), adapter="llava")
    with pytest.raises(ValueError, match="token_policy: unknown token policy 'fast_v'"):
        TrimConfig(token_policy="fast_v")
    tmodel.inference = "packed"
    try:
        with torch.no_grad(), pytest.raises(NotImplementedError, match="inference = 'remove'"):
            tmodel(**adapter.example_inputs(model, 2, seed=0))
    finally:
        tmodel.inference = "remove"


@pytest.fixture(scope="module")
def vit():
    pytest.importorskip("timm")
    adapter = get_registry().adapters.get("timm")
    model = adapter.build()
    cfg = TrimConfig(token_policy="visionzip", token_layers=["vision.uni.1"], token_target=0.5, trim_heads=False)
    return adapter, model, trimkit.trim(model, cfg, adapter="timm").eval()


def test_visionzip_keeps_the_tokens_cls_attended_most(vit):
    adapter, model, tmodel = vit
    x = adapter.example_inputs(model, 3, seed=2)["x"]
    seen = []
    attn0 = model.blocks[0].attn
    handle = attn0.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))  # timm's softmax(qk^T) (unfused)
    fused = attn0.fused_attn
    attn0.fused_attn = False
    try:
        with torch.no_grad():
            model(x)
    finally:
        attn0.fused_attn = fused
        handle.remove()
    cls_row = seen[0].mean(1)[:, 0]  # (B, N): [CLS]'s attention in block 0, mean over heads
    with torch.no_grad(), tmodel.mode("hard"):
        hard = tmodel(x)
    mask = next(r for r in tmodel.records if r.kind == "token").mask
    n = cls_row.shape[1]
    budget = int(0.5 * n + 0.5)  # [CLS] included
    n_context = int(budget * 10 / 64 + 0.5)
    for b in range(3):
        kept = set(torch.nonzero(mask[b]).flatten().tolist())
        assert len(kept) == budget and 0 in kept
        ranked = sorted(range(1, n), key=lambda p: -float(cls_row[b, p]))
        dominant = set(ranked[:budget - n_context - 1])
        rest = sorted(set(range(1, n)) - dominant)
        step = max(1, len(rest) // n_context)
        context = set(rest[::step][:n_context])
        assert kept == {0} | dominant | context
        with torch.no_grad(), tmodel.mode("remove"):
            alone = tmodel(x[b:b + 1])
        index = next(r for r in tmodel.records if r.kind == "token").index.tolist()
        assert index == sorted(kept)
        torch.testing.assert_close(alone[0], hard[b], atol=1e-5, rtol=0)  # masked == removed (the class logits)


def test_fastv_generation_with_a_kept_token_cache(llava):
    """FastV in the decoder's prefill, then greedy decoding on the cache of kept tokens: the probe reads
    layer K-1's queries and keys from the call itself (the attention module does not run twice, so its
    cache holds each key once), and the removed prefill generates what the masked one does."""
    import trimkit_llava

    adapter, model, tmodel = llava
    x = adapter.example_inputs(model, 2, seed=4)
    args = dict(input_ids=x["input_ids"], pixel_values=x["pixel_values"], attention_mask=x["attention_mask"],
                max_new_tokens=4, eos_token_id=[], return_logits=True)
    removed = trimkit_llava.generate(tmodel, mode="remove", **args)
    hard = trimkit_llava.generate(tmodel, mode="hard", **args)
    assert torch.equal(removed.tokens, hard.tokens)
    torch.testing.assert_close(removed.logits, hard.logits, atol=1e-4, rtol=1e-4)
    full = trimkit_llava.generate(tmodel, mode="off", **args)
    lengths = torch.as_tensor(removed.cache_lengths)
    assert (lengths[:, K:] < torch.as_tensor(full.cache_lengths)[:, K:]).all()  # the image tokens left the cache


@pytest.mark.parametrize("name, options", [
    ("llava", {"vision_config": {"num_hidden_layers": 3}, "vision_trim_layers": [1]}),  # CLIP: AttentionInterface
    ("qwen2_vl", {"vision_trim_layers": [1]}),  # the batched tower: fx intercepts its sdpa call
])
def test_visionzip_in_a_decoder_vlms_vision_tower_masked_equals_removed(name, options):
    """VisionZip in the vision towers of the decoder VLMs, next to FastV in their LMs: the probe reads the
    previous tower block's attention on either kernel route (transformers' AttentionInterface for LLaVA's
    CLIP, the fx-intercepted ``F.scaled_dot_product_attention`` of Qwen2-VL's batched tower), and the masked
    and removed forwards keep the same tokens and compute the same logits."""
    adapter = get_registry().adapters.get(name)
    model = adapter.build(seed=0, **options).eval()
    cfg = TrimConfig(token_policy="visionzip", token_layers=["vision"], token_target=0.5, trim_heads=False)
    tmodel = trimkit.trim(model, cfg).eval()
    x = adapter.example_inputs(model, 2, seed=1)
    with torch.no_grad(), tmodel.mode("hard"):
        hard = tmodel(**x)
        tower = next(r for r in tmodel.records if r.kind == "token" and "vision" in r.key and r.mask is not None)
        masks = tower.mask > 0.5
    for b in range(2):
        n = int(x["attention_mask"][b].sum())
        one = {k: v[b:b + 1] for k, v in x.items()}
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, :n], one["attention_mask"][:, :n]
        real = masks.shape[1]
        if name == "qwen2_vl":
            real = int(x["image_grid_thw"][b].prod())
            one["pixel_values"] = one["pixel_values"][:, :real]
        with torch.no_grad(), tmodel.mode("remove"):
            alone = tmodel(**one)
            index = next(r for r in tmodel.records if r.kind == "token" and "vision" in r.key).index.tolist()
        assert index == torch.nonzero(masks[b, :real]).flatten().tolist()
        assert 0 < len(index) < real  # visionzip dropped tower tokens
        # the LM's rows are its kept tokens (the tower's drops never enter it): the next-token logits agree
        torch.testing.assert_close(alone[0, -1], hard[b, n - 1], atol=1e-4, rtol=0)
