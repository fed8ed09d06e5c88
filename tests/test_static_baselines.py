"""The static baselines of the paper's Table 1 (issue 12): FTKD (``trimkit_train.static_baselines``: a
shallower copy of the backbone's layers distilled from it) and TRIPS-style (token policy ``trips``:
a fixed share of tokens per layer by a learned text-guided score).

What would be wrong and is checked: a student that is not the teacher with those layers left out;
a teacher that trains; distillation terms that do not reach the student; a TRIPS keep count that
varies per instance or misses its share; TRIPS decisions that differ between masked and removed
forwards or between the decision and the logits' sign; a score that the task loss cannot train."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trimkit
from trimkit import TrimConfig

pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_thread")

from trimkit_meter import build_meter, meter_example_inputs  # noqa: E402

from trimkit_train.static_baselines import (FTKDObjective, choose_depths, layer_pairs, select_layers,  # noqa: E402
                                            uniform_layers)

VIT = "vit_model.transformer.resblocks"
CROSS = ("cross_modal_image_layers", "cross_modal_text_layers")


@pytest.fixture(scope="module")
def meter():
    torch.manual_seed(0)
    model = build_meter("tiny", vision_layers=4, cross_layers=2).eval()
    return model, meter_example_inputs(model, batch_size=3, seed=1)


def test_uniform_layers_is_tinybert_mapping():
    assert uniform_layers(4, 2) == [1, 3]
    assert uniform_layers(4, 4) == [0, 1, 2, 3]
    assert uniform_layers(12, 3) == [3, 7, 11]
    assert uniform_layers(2, 1) == [1]
    with pytest.raises(ValueError, match="between 1 and 4"):
        uniform_layers(4, 5)


def test_student_is_the_teacher_without_the_left_out_layers(meter):
    model, x = meter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {VIT: [1, 3], **{p: [1] for p in CROSS}}
    student = select_layers(model, layers)
    assert len(student.get_submodule(VIT)) == 2 and len(student.cross_modal_image_layers) == 1
    assert len(model.get_submodule(VIT)) == 4  # the model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # reference: the teacher with the left-out ViT blocks made identities and only co-attention layer 1
    ref = copy.deepcopy(model)
    for i in (0, 2):
        ref.get_submodule(VIT)[i] = nn.Identity()
    for p in CROSS:
        setattr(ref, p, nn.ModuleList([getattr(ref, p)[1]]))
    with torch.no_grad():
        assert torch.equal(student(**x), ref(**x))
        assert not torch.allclose(student(**x), model(**x))  # leaving layers out changes the function
    # the student's layers are copies: training it leaves the teacher's weights alone
    assert student.get_submodule(VIT)[0].attn.in_proj_weight is not model.get_submodule(VIT)[1].attn.in_proj_weight
    assert torch.equal(student.get_submodule(VIT)[0].attn.in_proj_weight, model.get_submodule(VIT)[1].attn.in_proj_weight)
    assert layer_pairs(layers) == [(f"{VIT}.0", f"{VIT}.1"), (f"{VIT}.1", f"{VIT}.3"),
                                   ("cross_modal_image_layers.0", "cross_modal_image_layers.1"),
                                   ("cross_modal_text_layers.0", "cross_modal_text_layers.1")]


def test_select_layers_errors_name_the_stack(meter):
    model, _ = meter
    with pytest.raises(ValueError, match="no module 'vit_model.nope'"):
        select_layers(model, {"vit_model.nope": [0]})
    with pytest.raises(ValueError, match="'vit_model.ln_post' is a LayerNorm"):
        select_layers(model, {"vit_model.ln_post": [0]})
    with pytest.raises(ValueError, match="has 4 layers"):
        select_layers(model, {VIT: [3, 1]})
    with pytest.raises(ValueError, match="has 4 layers"):
        select_layers(model, {VIT: [4]})
    with pytest.raises(ValueError, match="at least one"):
        select_layers(model, {VIT: []})


def test_choose_depths_takes_the_nearest_reduction(meter):
    model, _ = meter
    # a cost that counts layers: 4 ViT + 2 x 2 co-attention = 8
    def cost(m):
        return float(len(m.get_submodule(VIT)) + sum(len(getattr(m, p)) for p in CROSS))

    got = choose_depths(model, [[VIT], list(CROSS)], 2.0, cost)
    assert got["macs_ratio"] == pytest.approx(2.0)
    assert sum(len(v) for v in got["layers"].values()) == 4
    got3 = choose_depths(model, [[VIT], list(CROSS)], 8 / 3, cost)  # 3 layers: 1 ViT + 1 co-attention layer
    assert got3["counts"] == [1, 1] and got3["layers"][VIT] == [3] and got3["layers"][CROSS[0]] == [1]
    with pytest.raises(ValueError, match="as many layers"):
        choose_depths(model, [[VIT, CROSS[0]]], 2.0, cost)


class _Task:
    """The classification task's loss and distillation discrepancy."""

    def loss(self, logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels)

    def distill(self, student, teacher, labels):
        return torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                          reduction="batchmean")


def test_ftkd_objective_matches_each_kept_layer_and_trains_only_the_student(meter):
    model, x = meter
    layers = {VIT: [1, 3], **{p: [1] for p in CROSS}}
    teacher = copy.deepcopy(model).requires_grad_(False)
    student = select_layers(model, layers).eval()  # eval: no dropout, so every forward below is the same function
    obj = FTKDObjective(_Task(), student, teacher, layer_pairs(layers), alpha_pred=1.0, alpha_hidden=1.0)
    labels = torch.tensor([0, 1, 2])
    # the hidden term is the mean over pairs of MSE(student layer j, teacher layer it came from)
    outs = {}
    hooks = [m.get_submodule(p).register_forward_hook(lambda mod, a, o, k=(side, p): outs.__setitem__(k, o))
             for side, m, ps in (("s", student, [a for a, _ in layer_pairs(layers)]),
                                 ("t", teacher, [b for _, b in layer_pairs(layers)])) for p in ps]
    student(**x), teacher(**x)
    for h in hooks:
        h.remove()
    first = (lambda o: o[0] if isinstance(o, tuple) else o)
    expect = torch.stack([torch.nn.functional.mse_loss(first(outs[("s", a)]), first(outs[("t", b)]))
                          for a, b in layer_pairs(layers)]).mean()
    s_logits = student(**x)  # the objective reads the latest forwards of both models
    with torch.no_grad():
        t_logits = teacher(**x)
    terms = obj(s_logits, labels, [], full_logits=t_logits)
    assert terms["hidden"].item() == pytest.approx(expect.item(), rel=1e-5) and terms["hidden"] > 0
    assert terms["kd"] > 0
    assert terms["loss"].item() == pytest.approx((terms["task"] + terms["kd"] + terms["hidden"]).item(), rel=1e-6)
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    vit_grad = student.get_submodule(VIT)[0].attn.in_proj_weight.grad
    assert vit_grad is not None and vit_grad.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher's logits"):
        obj(s_logits, labels, [])
    obj.remove()
    with pytest.raises(ValueError, match="alpha_hidden"):
        FTKDObjective(_Task(), student, teacher, [], alpha_hidden=float("nan"))
    with pytest.raises(ValueError, match="the teacher has no module"):
        FTKDObjective(_Task(), student, teacher, [(f"{VIT}.0", f"{VIT}.9")])


def test_identical_student_has_zero_distillation_terms(meter):
    model, x = meter
    layers = {VIT: [0, 1, 2, 3]}
    teacher = copy.deepcopy(model)
    student = select_layers(model, layers)
    obj = FTKDObjective(_Task(), student, teacher, layer_pairs(layers))
    s = student(**x)  # with gradients: a training forward (one without records nothing)
    with torch.no_grad():
        t = teacher(**x)
    terms = obj(s, torch.tensor([0, 1, 2]), [], full_logits=t)
    # (with and without autograd the attention kernels differ in the last bits)
    assert terms["hidden"].item() < 1e-10 and abs(terms["kd"].item()) < 1e-6
    # an evaluation forward of the student records nothing: the objective says so instead of using stale outputs
    with torch.no_grad():
        student(**x), teacher(**x)
    with pytest.raises(RuntimeError, match=r"did not run in this step's forwards \(student calls 0, teacher calls 1\)"):
        obj(s, torch.tensor([0, 1, 2]), [], full_logits=t)
    obj.remove()


# --- TRIPS-style token policy ---------------------------------------------------------------------------
SHARE = 0.5


def _trips(model, **over):
    cfg = dict(token_policy="trips", token_layers=["vision.uni"], token_target={"vision.uni": SHARE}, trim_heads=False)
    return trimkit.trim(model, TrimConfig(**{**cfg, **over}), adapter="meter")


def test_trips_keeps_a_fixed_share_per_layer_chosen_by_its_score(meter):
    from trimkit_smarttrim import TripsTokenPolicy

    model, x = meter
    torch.manual_seed(3)
    # a share per ViT block, of the original tokens; block 2's is block 1's, so block 2 drops nothing
    shares = {0: 0.75, 1: 0.5, 2: 0.5, 3: 0.25}
    tm = _trips(copy.deepcopy(model), token_target={f"vision.uni.{i}": s for i, s in shares.items()}).eval()
    policies = [m for m in tm.trimmers.modules() if isinstance(m, TripsTokenPolicy)]
    calls = []
    hooks = [p.register_forward_hook(lambda mod, a, out: calls.append((mod, a, out))) for p in policies]
    with torch.no_grad():
        tm(**x)
    for h in hooks:
        h.remove()
    recs = [r for r in tm.records if r.kind == "token"]
    assert len(recs) == len(policies) == 4 == len(calls)  # every ViT block, nothing else
    n = recs[0].mask.shape[1]
    prev = torch.ones(3, n, dtype=torch.bool)
    for i, (r, (pol, (hidden, cls_self, cls_ctx, *_), lg)) in enumerate(zip(recs, calls)):
        kept = r.mask.bool()
        # the same count for every instance (of the original tokens): fixed, not adaptive
        assert kept.sum(1).tolist() == [int(shares[i] * n + 0.5)] * 3, r.key
        assert kept[:, 0].all() and not (kept & ~prev).any()  # the [CLS] kept; a dropped token stays dropped
        # the score, computed here from the policy's weights: <W_q [cls_self; cls_text], W_k h> / sqrt(D')
        q = pol.query(torch.cat([cls_self, cls_ctx], -1))
        score = torch.einsum("bnd,bd->bn", pol.key(hidden), q)
        for b in range(3):
            free = prev[b].clone()
            free[0] = False
            k, d = kept[b] & free, ~kept[b] & free
            if d.any():  # the kept free tokens are the best-scored ones, and the logit's sign is the decision
                assert score[b][k].min() > score[b][d].max(), r.key
                assert (lg[b][k] > 0).all() and (lg[b][d] < 0).all(), r.key
            else:  # nothing to drop here (block 2): every logit decided, so a sampled mask equals the decision
                assert i == 2 and (lg[b][k] == 100).all(), r.key
        prev = kept


def test_trips_removed_equals_masked_and_the_logit_sign_is_the_decision(meter):
    model, x = meter
    torch.manual_seed(4)
    tm = _trips(copy.deepcopy(model)).eval()
    with torch.no_grad():
        hard = tm(**x)
        masks = {r.key: r.mask.bool() for r in tm.records if r.kind == "token"}
        tm.inference = "remove"
        for b in range(3):
            one = {k: v[b:b + 1] for k, v in x.items() if v is not None}
            n = int(one["attention_mask"].sum())
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, :n], one["attention_mask"][:, :n]
            out = tm(**one)
            torch.testing.assert_close(out, hard[b:b + 1], atol=1e-4, rtol=1e-4)
            for r in tm.records:
                if r.kind == "token":
                    assert sorted(r.index.tolist()) == masks[r.key][b].nonzero().flatten().tolist(), r.key


def test_trips_score_is_trained_by_the_task_loss(meter):
    model, x = meter
    torch.manual_seed(5)
    tm = _trips(copy.deepcopy(model), sampler="sharpen").train()
    tm.set_temperature(1.0)
    out = tm(**x)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    grads = [p.grad for n, p in tm.named_parameters() if "query" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_ftkd_attention_map_loss_compares_each_kept_attention_call(meter):
    """TinyBERT's attention-map term: per matched attention call, the MSE of the unnormalised scores
    q k^T / sqrt(d) (recomputed from the declared projections) on the keys the call attends; zero for an
    identical student, positive once the student's query weights move, and it trains the student."""
    from trimkit.plugins import get_registry
    from trimkit_train.static_baselines import attention_pairs, attention_scores

    model, x = meter
    spec = get_registry().adapters.get("meter").describe(model)
    assert [(s, t) for s, t, _ in attention_pairs(spec, {CROSS[0]: [1], CROSS[1]: [1]})] == [
        (f"{CROSS[0]}.0.attention.self", f"{CROSS[0]}.1.attention.self"),
        (f"{CROSS[0]}.0.crossattention.self", f"{CROSS[0]}.1.crossattention.self"),
        (f"{CROSS[1]}.0.attention.self", f"{CROSS[1]}.1.attention.self"),
        (f"{CROSS[1]}.0.crossattention.self", f"{CROSS[1]}.1.crossattention.self")]
    layers = {CROSS[0]: [0, 1], CROSS[1]: [0, 1]}  # every layer kept: the student computes the teacher's scores
    pairs = attention_pairs(spec, layers)
    assert len(pairs) == 8
    teacher = copy.deepcopy(model).requires_grad_(False)
    student = select_layers(model, layers).eval()
    obj = FTKDObjective(_Task(), student, teacher, layer_pairs(layers), attentions=pairs)
    labels = torch.tensor([0, 1, 2])

    def terms():
        s = student(**x)
        with torch.no_grad():
            t = teacher(**x)
        return obj(s, labels, [], full_logits=t)

    same = terms()
    assert same["attn"].item() < 1e-10  # the student is the teacher: the same scores
    # the reference value of one call, computed independently: scores from the module's own q/k Linears
    captured = {}
    module = student.get_submodule(pairs[0][0])
    handle = module.register_forward_pre_hook(lambda m, a, k: captured.setdefault("call", (a, k)), with_kwargs=True)
    with torch.no_grad():
        w = student.get_submodule(pairs[0][0]).query.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))  # random init scores are ~1e-4
    student(**x)
    handle.remove()
    got, valid = attention_scores(module, pairs[0][2], *captured["call"])
    hidden = captured["call"][0][0] if captured["call"][0] else captured["call"][1]["hidden_states"]
    h = pairs[0][2].num_heads
    q = module.query(hidden).view(*hidden.shape[:2], h, -1).transpose(1, 2)
    k = module.key(hidden).view(*hidden.shape[:2], h, -1).transpose(1, 2)
    torch.testing.assert_close(got, q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, atol=1e-5, rtol=0)
    moved = terms()
    assert moved["attn"] > 1e-6
    assert moved["loss"].item() == pytest.approx((moved["task"] + moved["kd"] + moved["hidden"]
                                                  + moved["attn"]).item(), rel=1e-6)
    moved["loss"].backward()
    assert student.get_submodule(pairs[0][0]).query.weight.grad.abs().sum() > 0
    obj.remove()
    with pytest.raises(ValueError, match="alpha_attn"):
        FTKDObjective(_Task(), student, teacher, [], attentions=pairs, alpha_attn=-1.0)
