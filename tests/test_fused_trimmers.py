"""A layer's trimmers in their fused inference form (trimkit_smarttrim.policies.FusedTrimmers,
trimkit.layer.LayerTrimmers.fused): the same logits as calling each policy, actually used at
inference, never used where a gradient is needed, and rebuilt when a weight changes."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from conftest import randomize_trimmers
from trimkit import TrimConfig, trim
from trimkit.layer import LayerTrimmers
from trimkit_meter import build_meter, meter_example_inputs
from trimkit_smarttrim.policies import (CrossModalHeadPolicy, CrossModalTokenPolicy, FusedTrimmers, LocalTokenPolicy,
                                        random_init)

pytestmark = pytest.mark.usefixtures("one_thread")

D, DC = 48, 40


def _layer(token_cls=CrossModalTokenPolicy, context_dim: int | None = DC, seed: int = 0) -> LayerTrimmers:
    cfg = TrimConfig()
    torch.manual_seed(seed)
    heads = {"0": CrossModalHeadPolicy(D, None, 4, cfg), "2": CrossModalHeadPolicy(D, DC, 6, cfg)}
    lt = LayerTrimmers(token_cls(D, context_dim, cfg), heads)
    random_init(lt, torch.Generator().manual_seed(seed))  # the stable init's zero weights would hide errors
    with torch.no_grad():
        for p in lt.parameters():  # biases too: nothing left at zero
            p.add_(0.3 * torch.randn_like(p))
    return lt


def _unfused(lt: LayerTrimmers, h, cls_self, cls_ctx, inputs):
    return lt.token(h, cls_self, cls_ctx), {k: lt.heads[k](*v) for k, v in inputs.items()}


@pytest.mark.parametrize("token_cls", [CrossModalTokenPolicy, LocalTokenPolicy])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_logits_equal_the_policies(token_cls, batch):
    lt = _layer(token_cls)
    h, cls_self, cls_ctx = torch.randn(batch, 11, D), torch.randn(batch, D), torch.randn(batch, DC)
    inputs = {"0": (cls_self, None), "2": (cls_self, cls_ctx)}
    with torch.no_grad():
        form = lt.fused()
        assert isinstance(form, FusedTrimmers)
        tokens, heads = form(h, cls_self, cls_ctx, inputs)
        ref_tokens, ref_heads = _unfused(lt, h, cls_self, cls_ctx, inputs)
    assert ref_tokens.abs().mean() > 0.1 and all(v.abs().mean() > 0.1 for v in ref_heads.values())  # not trivial
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    assert heads.keys() == ref_heads.keys()
    for k in heads:
        torch.testing.assert_close(heads[k], ref_heads[k], rtol=1e-5, atol=1e-5)


def test_fused_inputs_from_other_tensors_and_a_missing_context():
    """A head reading a context that is not the layer's (its own per-attention context) and a
    cross-modal token policy given no context (it reads zeros) are fused right too."""
    lt = _layer()
    h, cls_self, own = torch.randn(2, 7, D), torch.randn(2, D), torch.randn(2, DC)
    inputs = {"0": (cls_self, None), "2": (cls_self, own)}
    with torch.no_grad():
        tokens, heads = lt.fused()(h, cls_self, None, inputs)
        ref_tokens, ref_heads = _unfused(lt, h, cls_self, None, inputs)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads["2"], ref_heads["2"], rtol=1e-5, atol=1e-5)
    # inputs that do not fit (a cross-attention's head policy without its context): None, the caller runs the policies
    with torch.no_grad():
        assert lt.fused()(h, cls_self, None, {"0": (cls_self, None), "2": (cls_self, None)}) is None


def test_not_used_with_grad_and_rebuilt_when_weights_change():
    lt = _layer()
    assert lt.fused() is None  # autograd on: the policies run (their gradients reach the weights)
    h, cls_self, cls_ctx = torch.randn(1, 5, D), torch.randn(1, D), torch.randn(1, DC)
    inputs = {"0": (cls_self, None), "2": (cls_self, cls_ctx)}
    with torch.no_grad():
        first = lt.fused()
        assert lt.fused() is first  # cached while the weights stay
    opt = torch.optim.SGD(lt.parameters(), lr=0.5)
    loss = lt.token(h, cls_self, cls_ctx).sum() + sum(lt.heads[k](*v).sum() for k, v in inputs.items())
    loss.backward()
    opt.step()  # in place: version counters move
    with torch.no_grad():
        second = lt.fused()
        assert second is not first
        tokens, heads = second(h, cls_self, cls_ctx, inputs)
        ref_tokens, ref_heads = _unfused(lt, h, cls_self, cls_ctx, inputs)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads["0"], ref_heads["0"], rtol=1e-5, atol=1e-5)
    lt.double()  # .to(): new storage and dtype
    with torch.no_grad():
        third = lt.fused()
        assert third is not second and third.A.dtype == torch.float64
        tokens, _ = third(h.double(), cls_self.double(), cls_ctx.double(),
                          {"0": (cls_self.double(), None), "2": (cls_self.double(), cls_ctx.double())})
    assert tokens.dtype == torch.float64
    lt.clear_cache()
    assert lt._fused is None


def test_policies_without_a_fused_form_run_as_they_are():
    """A head policy that is not the cross-modal one (a third party's): no fused form, the policies run."""

    class MyHeads(nn.Module):
        def forward(self, cls_self, cls_context):
            return cls_self[:, :3]

    lt = LayerTrimmers(CrossModalTokenPolicy(D, DC, TrimConfig()), {"0": MyHeads()})
    with torch.no_grad():
        assert lt.fused() is None


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_meter("tiny").eval()
    tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5)).eval()
    randomize_trimmers(tmodel, seed)
    return model, tmodel


def test_the_trimmed_model_uses_the_fused_form_and_takes_the_same_decisions():
    """The bug feared most: the fused form silently unused, or deciding otherwise than the policies.
    Mode remove and mode hard, fused against unfused: the same kept tokens and heads, the same output."""
    model, tmodel = _model()
    calls = []
    real_call = FusedTrimmers.__call__

    def counting(self, *a, **k):
        out = real_call(self, *a, **k)
        calls.append(out is not None)
        return out

    for seed in range(3):
        x = meter_example_inputs(model, batch_size=1, seed=seed)
        results = {}
        for mode in ("remove", "hard"):
            for fuse in (True, False):
                tmodel.runtime.fuse_trimmers = fuse
                with torch.no_grad(), mock.patch.object(FusedTrimmers, "__call__", counting), tmodel.mode(mode):
                    calls.clear()
                    out = tmodel(**x)
                if fuse:
                    assert calls and all(calls), "the fused form was not used"
                else:
                    assert not calls
                kept = {r.key: r.keep.tolist() for r in tmodel.records}
                results[mode, fuse] = out, kept
        tmodel.runtime.fuse_trimmers = True
        ref_out, ref_kept = results["hard", False]
        kept_values = [v for vs in ref_kept.values() for v in vs]
        assert min(kept_values) < 1.0  # something was trimmed
        for key, (out, kept) in results.items():
            assert kept == ref_kept, key
            torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


def test_training_forward_runs_the_policies():
    """Mode sample with autograd: the policies themselves (gradients reach the trimmers' weights)."""
    model, tmodel = _model()
    tmodel.train()
    x = meter_example_inputs(model, batch_size=2, seed=0)
    with mock.patch.object(FusedTrimmers, "__call__", side_effect=AssertionError("fused form used in training")):
        out = tmodel(**x)
    out.float().sum().backward()
    grads = [p.grad for p in tmodel.trimmers.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_a_forward_hook_on_a_policy_sees_it_called():
    """A hook on a policy (calibration reads the policies' outputs so, and so may a user) fires: the
    policies run instead of the fused form while it is registered."""
    lt = _layer()
    seen = []
    h, cls_self, cls_ctx = torch.randn(1, 5, D), torch.randn(1, D), torch.randn(1, DC)
    with torch.no_grad():
        assert lt.fused() is not None
        handle = lt.heads["2"].register_forward_hook(lambda mod, args, out: seen.append(out))
        assert lt.fused() is None
        handle.remove()
        assert lt.fused() is not None
