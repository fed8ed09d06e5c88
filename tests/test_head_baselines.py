"""Static head pruning (Fig. 4b's baselines): Michel et al.'s importance against a per-instance
brute force, the three ways of choosing heads, and a model whose static head policy drops exactly
those heads in every mode (masked training, masked eval, removed).

Feared: importance summed over a batch before the absolute value (what a batch gradient gives),
Grad All ranking raw scores across modules of different scales, and static heads that the
trimmed model does not actually drop (or drops differently at inference than in training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorItems

from trimkit import TrimConfig, trim
from trimkit.plugins import get_registry
from trimkit_train.head_baselines import head_importance, install_static_heads, static_head_masks

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "cross_modal_text_layers.0.crossattention.self"


@pytest.fixture(scope="module")
def meter():
    from trimkit_meter import build_meter
    from trimkit_meter.spec import meter_example_inputs

    torch.manual_seed(0)
    model = build_meter("tiny").eval()
    x = meter_example_inputs(model, batch_size=3, seed=2)
    return model, x, get_registry().adapters.get("meter").describe(model)


def test_importance_is_the_mean_of_per_instance_absolute_taylor_terms(meter):
    model, x, spec = meter
    cross = {layer.path for layer in spec.layers if layer.site == "cross"}
    imp = head_importance(model, spec, TensorItems(x), layers=cross, instances=3, batch_size=2)
    assert set(imp) == {f"{p}.{j}" for p in cross for j in (0, 1)}
    attn = model.get_submodule(MODULE)
    H = attn.num_heads
    terms = []
    for b in range(3):
        one = {k: v[b:b + 1] for k, v in x.items()}
        seen = {}

        def keep(m, a, out):
            out.retain_grad()
            seen["out"] = out

        h = attn.register_forward_hook(keep)
        logits = model(**one)
        h.remove()
        F.cross_entropy(logits, logits.detach().argmax(-1)).backward()
        out, grad = seen["out"], seen["out"].grad
        per_head = (out * grad).view(1, -1, H, out.shape[-1] // H).sum((0, 1, 3))  # A_h^T dL/dA_h
        terms.append(per_head.abs())
        model.zero_grad()
    expect = torch.stack(terms).mean(0).detach()
    torch.testing.assert_close(imp["cross_modal_text_layers.0.1"], expect, atol=1e-6, rtol=1e-4)
    assert float(expect.min()) > 0
    assert all(p.grad is None for p in model.parameters())  # the model's own gradients untouched


def test_importance_refuses_modules_that_project_their_own_output(meter):
    model, x, spec = meter
    with pytest.raises(ValueError, match=r"vit_model\.transformer\.resblocks\.0\.attn applies its output projection"):
        head_importance(model, spec, TensorItems(x), layers={"vit_model.transformer.resblocks.0"})


def test_the_three_ways_of_choosing_heads():
    imp = {"a.0": torch.tensor([4.0, 1.0, 3.0, 2.0]), "b.0": torch.tensor([40.0, 30.0, 20.0, 10.0])}
    layer = static_head_masks(imp, 0.5, "grad_layer")
    assert layer["a.0"].tolist() == [True, False, True, False] and layer["b.0"].tolist() == [True, True, False, False]
    # normalised per module, module a's 4 and 3 outrank module b's 20 (raw scores would keep only b's)
    allm = static_head_masks(imp, 0.5, "grad_all")
    assert allm["a.0"].tolist() == [True, False, True, False] and allm["b.0"].tolist() == [True, True, False, False]
    skew = {"a.0": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b.0": torch.tensor([8.0, 1.0, 1.0, 1.0])}
    kept = static_head_masks(skew, 0.25, "grad_all")
    assert sum(int(v.sum()) for v in kept.values()) == 2 and kept["b.0"][0]  # 2 of 8 heads, b's dominant one
    # a global ranking gives modules unequal counts where a per-module one cannot
    uneven = {"a.0": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b.0": torch.tensor([10.0, 1.0, 1.0, 1.0])}
    g = static_head_masks(uneven, 0.5, "grad_all")
    assert int(g["a.0"].sum()) == 3 and g["b.0"].tolist() == [True, False, False, False]
    assert [int(v.sum()) for v in static_head_masks(uneven, 0.5, "grad_layer").values()] == [2, 2]
    emptied = static_head_masks({"a.0": torch.tensor([1.0, 1.0]), "b.0": torch.tensor([10.0, 0.0])}, 0.25, "grad_all")
    assert int(emptied["a.0"].sum()) == 0  # Grad All may empty a module
    r0 = static_head_masks(imp, 0.5, "random", torch.Generator().manual_seed(0))
    assert all(int(v.sum()) == 2 for v in r0.values())
    draws = {tuple(static_head_masks(imp, 0.5, "random", torch.Generator().manual_seed(s))["a.0"].tolist())
             for s in range(8)}
    assert len(draws) > 1
    assert int(static_head_masks(imp, 0.01, "grad_layer")["a.0"].sum()) == 1  # at least one head per module
    with pytest.raises(ValueError, match="method must be one of"):
        static_head_masks(imp, 0.5, "magnitude")
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        static_head_masks(imp, 0.0, "random")


def test_static_heads_are_dropped_in_training_eval_and_removal(meter):
    model, x, _ = meter
    cfg = TrimConfig(trim_tokens=False, head_layers=["cross"], head_target=0.5, head_policy="static", sampler="sharpen")
    tm = trim(model, cfg, adapter="meter")
    with torch.no_grad():
        full = model(**x)
        with tm.mode("hard"):
            untouched = tm(**x)
    torch.testing.assert_close(untouched, full, atol=1e-5, rtol=0)  # all kept at construction
    keys = [r.key for r in tm.records if r.kind == "head"]
    assert keys and all(k.startswith("cross_modal_") for k in keys)
    gen = torch.Generator().manual_seed(5)
    H = model.cross_modal_text_layers[0].attention.self.num_heads
    masks = {k: torch.randperm(H, generator=gen) < H // 2 for k in keys}
    install_static_heads(tm, masks)
    with torch.no_grad(), tm.mode("hard"):
        hard = tm(**x)
        for r in tm.records:
            if r.kind == "head":
                assert torch.equal(r.mask.bool(), masks[r.key].expand(3, -1))
    assert float((hard - full).abs().max()) > 1e-3  # the heads really are gone
    tm.train()
    with tm.mode("sample"):
        tm(**x)
        for r in tm.records:
            if r.kind == "head":
                assert torch.equal(r.mask, masks[r.key].float().expand(3, -1))  # exactly 0/1 under the sampler's noise
    tm.eval()
    with torch.no_grad():
        for b in range(3):
            with tm.mode("remove"):
                alone = tm(**{k: v[b:b + 1] for k, v in x.items()})
            torch.testing.assert_close(alone[0], hard[b], atol=1e-5, rtol=0)
    keep = {k: v for k, v in tm.trimmers.state_dict().items() if k.endswith(".keep")}
    assert len(keep) == len(keys)  # saved with the trimmers


def test_install_refuses_other_policies_and_unknown_modules(meter):
    model, _, _ = meter
    adaptive = trim(model, TrimConfig(trim_tokens=False, head_layers=["cross"], head_target=0.5), adapter="meter")
    with pytest.raises(TypeError, match="trim with head_policy='static'"):
        install_static_heads(adaptive, {})
    static = trim(model, TrimConfig(trim_tokens=False, head_layers=["cross"], head_policy="static"), adapter="meter")
    H = model.cross_modal_text_layers[0].attention.self.num_heads
    with pytest.raises(KeyError, match="no head trimmer"):
        install_static_heads(static, {"nowhere.0": torch.ones(H, dtype=torch.bool)})
    with pytest.raises(ValueError, match=rf"expected \({H},\) heads"):
        install_static_heads(static, {"cross_modal_text_layers.0.0": torch.ones(H + 1, dtype=torch.bool)})
