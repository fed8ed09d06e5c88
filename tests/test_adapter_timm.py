"""The ``timm`` adapter on tiny random timm ViTs: selection, exactness, mask semantics, MACs, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trimkit
from trimkit import TrimConfig
from trimkit.macs import count_macs
from trimkit.plugins import get_registry, select_adapter

timm = pytest.importorskip("timm")

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def adapter():
    return get_registry().adapters.get("timm")


def _trim(model: nn.Module, **config) -> trimkit.TrimmedModel:
    return trimkit.trim(model, TrimConfig(**config)).eval()


def _randomize(tmodel: trimkit.TrimmedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def test_selected_from_the_model(adapter):
    model = adapter.build("tiny")
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert select_adapter(model) == "timm"
    assert not adapter.matches(nn.Linear(2, 2))
    assert set(adapter.example_inputs(model, batch_size=3)) == {"x"}


KERNEL_OPTIONS = [{"qk_norm": True}, {"scale_attn_norm": True}]  # run at the kernel (via="kernel")


@pytest.mark.parametrize("options", [{}, {"reg_tokens": 2, "init_values": 0.1}, {"no_embed_class": True, "pre_norm": True},
                                     *KERNEL_OPTIONS])
def test_fresh_trimmers_keep_the_model_exact(adapter, options):
    model = adapter.build("tiny", **options)
    params = dict(model.named_parameters())
    tmodel = _trim(model)
    assert dict(model.named_parameters()).keys() == params.keys()  # describing adds no parameter
    assert tmodel.backbone_parameters() == sum(p.numel() for p in params.values())
    for batch in (1, 2):  # batch 1 runs mode "remove", batch 2 mode "hard"
        x = adapter.example_inputs(model, batch_size=batch, seed=batch)
        with torch.no_grad():
            expected, got = model(**x), tmodel(**x)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert tmodel.records and all(float(r.keep.min()) == 1.0 for r in tmodel.records)


@pytest.mark.parametrize("policy,seed,options", [("cross_modal", 0, {}), ("cross_modal", 1, {}), ("local", 2, {}),
                                                 ("cross_modal", 3, KERNEL_OPTIONS[0]),
                                                 ("local", 4, KERNEL_OPTIONS[1])])
def test_hard_masks_equal_removal(adapter, policy, seed, options):
    model = adapter.build("tiny", depth=3, **options)
    tmodel = _trim(model, token_policy=policy)
    _randomize(tmodel, seed)
    x = adapter.example_inputs(model, batch_size=1, seed=seed)
    with torch.no_grad():
        with tmodel.mode("hard"):
            hard = tmodel(**x)
            hard_keep = {r.key: float(r.keep[0]) for r in tmodel.records}
        with tmodel.mode("remove"):
            removed = tmodel(**x)
            removed_keep = {r.key: float(r.keep[0]) for r in tmodel.records}
    torch.testing.assert_close(removed, hard, atol=ATOL, rtol=0)
    assert removed_keep == pytest.approx(hard_keep)
    kinds = {r.kind for r in tmodel.records if float(r.keep[0]) < 1.0}
    assert kinds == {"token", "head"}, f"nothing was trimmed: {removed_keep}"
    with torch.no_grad():
        assert not torch.allclose(removed, model(**x), atol=ATOL)  # trimming really changed the computation


def test_macs_fall_when_tokens_are_removed(adapter):
    model = adapter.build("tiny", depth=3)
    tmodel = _trim(model)
    _randomize(tmodel, 0)
    x = adapter.example_inputs(model)
    with tmodel.full():
        full = count_macs(tmodel, **x).total
    with tmodel.mode("remove"):
        trimmed = count_macs(tmodel, **x).total
        assert any(r.kind == "token" and float(r.keep[0]) < 1 for r in tmodel.records)
    assert full == count_macs(model, **x).total > 0
    assert trimmed < 0.9 * full


def test_training_mode_samples_masks_with_gradients(adapter):
    model = adapter.build("tiny")
    tmodel = _trim(model).train()
    out = tmodel(**adapter.example_inputs(model, batch_size=2))
    assert tmodel.runtime.mode == "sample" and len(tmodel.records) == 4
    out.sum().backward()
    grads = [p.grad for p in tmodel.trimmers.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("options,needle", [
    ({"class_token": False, "global_pool": "avg"}, "class_token"),
    ({"global_pool": "avg"}, "global_pool"),
    ({"global_pool": "map"}, "global_pool"),
    ({"dynamic_img_size": True}, "dynamic_img_size"),
])
def test_unsupported_options_are_refused_by_name(adapter, options, needle):
    model = adapter.build("tiny", **options)
    with pytest.raises(ValueError, match=needle):
        trimkit.trim(model, TrimConfig())


def test_register_tokens_are_never_dropped(adapter):
    model = adapter.build("tiny", depth=3, reg_tokens=2)
    tmodel = _trim(model, token_target=0.3)
    assert tmodel.spec.streams[0].protected == 3
    assert "vision: [CLS] at 0 (summary; the first 3 tokens always kept), no padding" in str(tmodel.plan)
    _randomize(tmodel, 1)
    with torch.no_grad():
        x = adapter.example_inputs(model, batch_size=1, seed=1)
        with tmodel.mode("hard"):
            hard = tmodel(**x)
            masks = [r.mask[0, :3] for r in tmodel.records if r.kind == "token"]
        with tmodel.mode("remove"):
            removed = tmodel(**x)
            index = [r.index for r in tmodel.records if r.kind == "token"][-1]
        batch = adapter.example_inputs(model, batch_size=3, seed=2)
        with tmodel.mode("hard"):
            hard_batch = tmodel(**batch)
        with tmodel.mode("packed"):
            packed = tmodel(**batch)
            pos = [r.index for r in tmodel.records if r.kind == "token"][-1]
    assert all(bool((m == 1).all()) for m in masks) and index[:3].tolist() == [0, 1, 2] and index.numel() < 20
    assert int((pos < 3).sum()) == 9  # every instance kept its [CLS] and both registers
    torch.testing.assert_close(removed, hard, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed, hard_batch, atol=ATOL, rtol=0)


def test_qk_norm_runs_at_the_kernel_and_packs(adapter):
    """qk-norm changes q and k after the projection: recomputing attention from qkv would be wrong,
    so the adapter describes it at the kernel; packed batches agree with masked ones."""
    model = adapter.build("tiny", depth=3, qk_norm=True)
    tmodel = _trim(model)
    kernels = [m for m in tmodel._graph.modules() if type(m).__name__ == "KernelAttention"]
    assert len(kernels) == 3 and {k.route for k in kernels} == {"fx"}
    _randomize(tmodel, 5)
    x = adapter.example_inputs(model, batch_size=4, seed=5)
    with torch.no_grad():
        with tmodel.mode("hard"):
            hard = tmodel(**x)
        with tmodel.mode("packed"):
            packed = tmodel(**x)
    assert any(r.counts and len(set(r.counts)) > 1 for r in tmodel.records)  # per-instance counts differ
    torch.testing.assert_close(packed, hard, atol=ATOL, rtol=0)


def test_unfused_qk_norm_is_refused(adapter):
    model = adapter.build("tiny", qk_norm=True)
    for block in model.blocks:
        block.attn.fused_attn = False
    with pytest.raises(ValueError, match="fused_attn"):
        trimkit.trim(model, TrimConfig())


def test_distillation_token_is_refused(adapter):
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    assert select_adapter(model) == "timm"
    with pytest.raises(ValueError, match="distillation"):
        trimkit.trim(model, TrimConfig())
