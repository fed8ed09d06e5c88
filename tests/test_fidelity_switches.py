"""The fidelity switches of issue 12: each changes what it says, and only that.

* ``RecipeConfig.cost_beta``: Eq. 10's beta over the original token count or over the tokens entering
  the layer (checked against costs computed by hand from the masks);
* ``RecipeConfig.sd_teacher``: the KL term of self-distillation with or without gradient into the full pass;
* ``TrimConfig.attention_dropout``: attention dropout inside trimmed attention (fixed-seed equality with
  the untrimmed model's own dropout when nothing is trimmed);
* ``TrimConfig.sampler``: Eq. 8's Gumbel-sigmoid vs ``sharpen``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from trimkit_meter import build_meter, meter_example_inputs
from trimkit_smarttrim import SmartTrimObjective, cost_loss, gumbel_sigmoid, random_init, self_distillation, sharpened
from trimkit_train.trainer import RecipeConfig

from trimkit import TrimConfig, trim
from trimkit.kernels import attend, module_dropout
from trimkit.ops import AttnTrim
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# validation and plumbing: the fields exist, are checked, and reach the objective
# ------------------------------------------------------------------------------------------------
def test_fields_validated_with_current_defaults():
    r = RecipeConfig()
    assert (r.cost_beta, r.sd_teacher) == ("original", "detached")
    t = TrimConfig()
    assert (t.attention_dropout, t.sampler) == ("kernel_only", "gumbel")
    for bad in ({"cost_beta": "entered"}, {"sd_teacher": "frozen"}):
        with pytest.raises(ValueError):
            RecipeConfig(**bad)
    for bad in ({"attention_dropout": "yes"}, {"sampler": "nope"}):
        with pytest.raises(ValueError):
            TrimConfig(**bad)
    with pytest.raises(ValueError, match="beta"):
        cost_loss([], beta="entered")


def test_recipe_reaches_the_registered_objective():
    factory = get_registry().objectives.get("smarttrim")
    obj = factory(RecipeConfig(cost_beta="entering", sd_teacher="joint"))
    assert (obj.cost_beta, obj.sd_teacher) == ("entering", "joint")
    obj = factory(RecipeConfig())
    assert (obj.cost_beta, obj.sd_teacher) == ("original", "detached")


# ------------------------------------------------------------------------------------------------
# (b) the self-distillation teacher
# ------------------------------------------------------------------------------------------------
def _grads(teacher: str):
    trimmed = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -0.5]], requires_grad=True)
    full = torch.tensor([[0.5, 0.5, 0.0], [1.0, -1.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    self_distillation(trimmed, full, labels, F.cross_entropy, teacher=teacher).backward()
    return trimmed.grad, full.grad, (trimmed, full, labels)


def test_detached_teacher_full_pass_gets_no_gradient_from_the_kl():
    g_trim_d, g_full_d, (trimmed, full, labels) = _grads("detached")
    # the full pass's gradient is exactly its task term's
    task_only = torch.autograd.grad(F.cross_entropy(full, labels), full)[0]
    torch.testing.assert_close(g_full_d, task_only, rtol=0, atol=0)
    g_trim_j, g_full_j, _ = _grads("joint")
    # joint: the KL reaches the full pass too (the default before 2026-12-04)
    assert float((g_full_j - task_only).abs().max()) > 1e-3
    # the trimmed pass's gradient is the same either way
    torch.testing.assert_close(g_trim_d, g_trim_j)


def test_detached_teacher_through_the_objective():
    obj = SmartTrimObjective(lambda_cost=0.0, lambda_sd=1.0, sd_teacher="detached")
    trimmed = torch.randn(4, 5, requires_grad=True)
    full = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    obj(trimmed, labels, [], full_logits=full)["loss"].backward()
    torch.testing.assert_close(full.grad, torch.autograd.grad(F.cross_entropy(full, labels), full)[0])


# ------------------------------------------------------------------------------------------------
# (a) beta of Eq. 10
# ------------------------------------------------------------------------------------------------
def test_beta_over_entering_tokens_by_hand():
    """Vision tokens of METER tiny through its trimmed layers, with forced binary decisions; the cost
    of a uniform target, by hand from the masks, under both definitions of beta."""
    torch.manual_seed(0)
    model = build_meter("tiny")
    tm = trim(model, TrimConfig(token_target=0.5, trim_heads=False))
    x = meter_example_inputs(model, batch_size=2, seed=0)
    tm.train()
    with tm.mode("hard"):
        tm(**x)
    vision = [r for r in tm.records if r.kind == "token" and "image" in r.key]
    assert len(vision) >= 2, [r.key for r in tm.records]
    n = vision[0].mask.shape[1]
    gen = torch.Generator().manual_seed(3)
    # decisions per layer (the [CLS] at 0 is kept by the runtime whatever its logit)
    decisions = [(torch.rand(2, n, generator=gen) < p).float() for p in (0.6, 0.5, 0.7)[: len(vision)]]
    tm.runtime.forced = {r.key: d * 2 - 1 for r, d in zip(vision, decisions)}
    with tm.mode("hard"):
        tm(**x)
    recs = [r for r in tm.records if r.key in tm.runtime.forced]
    assert [r.key for r in recs] == [r.key for r in vision]

    gamma = 0.5
    for r in recs:
        r.target = gamma
    cum, prev = [], torch.ones(2, n)
    betas_orig, betas_enter = [], []
    for d in decisions:
        d = d.clone()
        d[:, 0] = 1.0
        m = prev * d
        betas_orig.append(float((m.sum(1) / n).mean()))
        betas_enter.append(float((m.sum(1) / prev.sum(1)).mean()))
        cum.append(m)
        prev = m
    for r, m in zip(recs, cum):
        torch.testing.assert_close(r.mask, m)  # the masks are the ones computed by hand
    by_hand_orig = sum((b - gamma) ** 2 for b in betas_orig) / len(recs)
    by_hand_enter = sum((b - gamma) ** 2 for b in betas_enter) / len(recs)
    assert cost_loss(recs, "original").item() == pytest.approx(by_hand_orig, rel=1e-6)
    assert cost_loss(recs, "entering").item() == pytest.approx(by_hand_enter, rel=1e-6)
    assert abs(by_hand_orig - by_hand_enter) > 1e-3  # the switch changes the cost
    # the first trimmed layer's two betas agree (nothing dropped before it)
    assert recs[0].entering.tolist() == pytest.approx(recs[0].keep.tolist())


def test_beta_entering_counts_real_tokens_only_and_is_differentiable():
    """Text tokens with padding: the entering fraction's denominator is the real tokens that entered."""
    torch.manual_seed(0)
    model = build_meter("tiny")
    tm = trim(model, TrimConfig(token_target=0.5, trim_heads=False, init_logit=0.1))
    x = meter_example_inputs(model, batch_size=3, seed=1)
    tm.train()
    tm(**x)  # mode sample: soft masks
    text = [r for r in tm.records if r.kind == "token" and "text" in r.key]
    assert len(text) >= 2
    pad = x["attention_mask"].float()
    assert float(pad.min()) == 0.0  # some rows are padded
    first, second = text[0], text[1]
    expected = (second.mask * pad).sum(1) / (first.mask * pad).sum(1)
    torch.testing.assert_close(second.entering, expected)
    # over every position instead, the fraction would differ on the padded rows
    assert float(((second.mask.sum(1) / first.mask.sum(1)) - expected).detach().abs().max()) > 1e-4
    loss = cost_loss(text, "entering")
    assert loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in tm.trimmers.parameters())


def test_beta_entering_refuses_records_without_it():
    from trimkit.ops import Record

    with pytest.raises(ValueError, match="entering"):
        cost_loss([Record("m", "token", 0.5, torch.tensor([0.5]))], "entering")
    # heads need none
    assert cost_loss([Record("h", "head", 0.5, torch.tensor([0.75]))], "entering").item() == pytest.approx(0.0625)


# ------------------------------------------------------------------------------------------------
# (c) attention dropout in trimmed attention
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dropout_meter():
    torch.manual_seed(0)
    model = build_meter("tiny", dropout=0.3)
    return model, meter_example_inputs(model, batch_size=2, seed=0)


def _run(model, x, mode: str, switch: str, seed: int = 1):
    tm = trim(model, TrimConfig(attention_dropout=switch))
    tm.train()
    torch.manual_seed(seed)
    with tm.mode(mode):
        out = tm(**x)
    if mode != "off":
        assert all(float(r.keep.detach().min()) == 1.0 for r in tm.records)  # stable init: nothing trimmed
    return out


def test_module_dropout_read_from_the_module(dropout_meter):
    model, _ = dropout_meter
    attn = model.cross_modal_image_layers[0].attention.self
    assert module_dropout(attn) == pytest.approx(0.3)
    assert module_dropout(torch.nn.MultiheadAttention(8, 2, dropout=0.25)) == pytest.approx(0.25)
    assert module_dropout(torch.nn.Linear(2, 2)) == 0.0


def test_model_dropout_equals_the_untrimmed_model_with_a_fixed_seed(dropout_meter):
    model, x = dropout_meter
    full = _run(model, x, "off", "model")
    same = _run(model, x, "hard", "model")
    torch.testing.assert_close(same, full, rtol=0, atol=1e-6)
    # before the switch (and with "none") METER's recomputed attention applied no dropout: not the same
    for switch in ("kernel_only", "none"):
        assert float((_run(model, x, "hard", switch) - full).detach().abs().max()) > 1e-3, switch


def test_dropout_changes_train_mode_only(dropout_meter):
    model, x = dropout_meter
    with_p = _run(model, x, "hard", "model", seed=5)
    without = _run(model, x, "hard", "none", seed=5)
    assert float((with_p - without).detach().abs().max()) > 1e-3
    tm = trim(model, TrimConfig(attention_dropout="model")).eval()
    with torch.no_grad(), tm.mode("hard"):
        a = tm(**x)
    with torch.no_grad():
        b = model.eval()(**x)
    model.train()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kernel_route_dropout_switch():
    """At the kernel (``attend``): the module's dropout_p is applied as sdpa does unless the trim says 'none'."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    torch.manual_seed(7)
    ref = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    kept = attend(q, k, v, dropout_p=0.5, trim=AttnTrim(dropout="kernel_only"))
    torch.testing.assert_close(kept, ref, rtol=0, atol=0)
    torch.manual_seed(7)
    kept = attend(q, k, v, dropout_p=0.5, trim=AttnTrim(dropout="model"))
    torch.testing.assert_close(kept, ref, rtol=0, atol=0)
    none = attend(q, k, v, dropout_p=0.5, trim=AttnTrim(dropout="none"))
    torch.testing.assert_close(none, F.scaled_dot_product_attention(q, k, v))
    assert float((none - ref).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------------
# (d) Eq. 8's sampler vs sharpen
# ------------------------------------------------------------------------------------------------
def test_sampler_switch_changes_the_masks_at_low_temperature():
    torch.manual_seed(0)
    logits = torch.full((100_000,), 0.5)
    tau = 0.05
    plain = gumbel_sigmoid(logits, tau)
    sharp = sharpened(logits, tau)
    # Eq. 8: P(M > 1/2) = sigmoid(pi) at any temperature; sharpen tends to the inference decision 1[pi > 0]
    assert float((plain > 0.5).float().mean()) == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.01)
    assert float((sharp > 0.5).float().mean()) > 0.99
    tm = trim(build_meter("tiny"), TrimConfig(sampler="sharpen"))
    assert tm.runtime.sampler is sharpened
    assert trim(build_meter("tiny"), TrimConfig()).runtime.sampler is gumbel_sigmoid


# ------------------------------------------------------------------------------------------------
# the "- Stable Initialization" ablation's helper
# ------------------------------------------------------------------------------------------------
def test_random_init_undoes_the_stable_initialisation():
    torch.manual_seed(0)
    model = build_meter("tiny")
    tm = trim(model, TrimConfig(token_target=0.5, head_target=0.5))
    x = meter_example_inputs(model, batch_size=2, seed=0)
    tm.eval()
    with torch.no_grad(), tm.mode("hard"):
        tm(**x)
    assert all(float(r.keep.min()) == 1.0 for r in tm.records)  # stable: everything kept
    assert random_init(tm, torch.Generator().manual_seed(0)) > 0
    with torch.no_grad(), tm.mode("hard"):
        tm(**x)
    assert min(float(r.keep.min()) for r in tm.records) < 1.0  # random decisions at step 0


def test_per_layer_targets_compound_to_the_cumulative_ones():
    """The demo/repro convert calibrated (cumulative) targets for cost_beta='entering': products of the
    per-layer ratios along a stream give back the cumulative ones."""
    from trimkit_train.demo import per_layer_targets, targets_for

    tm = trim(build_meter("tiny"), TrimConfig())
    tokens, _ = targets_for(0.3, tm)
    per = per_layer_targets(tm, tokens)
    assert set(per) == set(tokens)
    prod: dict[str, float] = {}
    for layer in tm.spec.layers:
        if layer.path in tokens:
            prod[layer.stream] = prod.get(layer.stream, 1.0) * per[layer.path]
            assert prod[layer.stream] == pytest.approx(tokens[layer.path])
    assert any(per[k] != pytest.approx(tokens[k]) for k in tokens)  # not the identity
