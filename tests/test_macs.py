"""MAC counting: hand-computed small cases, every attention kernel, and real ViT scales."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter

from trimkit import macs
from trimkit.macs import MacsReport, count_macs, format_macs

B, H, D = 2, 4, 8


def _attn_macs(b, h, nq, nk, d, dv=None):
    return b * h * nq * nk * d + b * h * nq * nk * (dv or d)  # QK^T + AV


def _matmul_attention(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (s if mask is None else s + mask).softmax(-1) @ v


def test_linear():
    lin = nn.Linear(16, 24)
    report = count_macs(lin, torch.randn(B, 10, 16))
    assert isinstance(report, MacsReport) and int(report) == report.total == B * 10 * 16 * 24
    assert count_macs(nn.Linear(16, 24, bias=False), torch.randn(B, 10, 16)).total == B * 10 * 16 * 24


def test_breakdown_by_module_and_op():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 6)))
    report = count_macs(net, torch.randn(3, 4))
    assert report.total == 3 * (4 * 5 + 5 * 6)
    assert report.by_module["Sequential"] == report.total
    assert report.by_module["Sequential.0"] == 3 * 4 * 5
    assert report.by_module["Sequential.2.0"] == 3 * 5 * 6
    assert report.by_op == {"aten.addmm": report.total}


@pytest.mark.parametrize("nq,nk", [(10, 10), (10, 7), (3, 17)])
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_sdpa_matches_matmul_attention(nq, nk, mask):
    q, k, v = torch.randn(B, H, nq, D), torch.randn(B, H, nk, D), torch.randn(B, H, nk, D)
    m = {None: None, "float": torch.randn(nq, nk), "bool": torch.rand(nq, nk) > 0.3}[mask]
    expected = _attn_macs(B, H, nq, nk, D)
    sdpa = count_macs(F.scaled_dot_product_attention, q, k, v, attn_mask=m)
    assert sdpa.total == expected, sdpa.by_op
    fmask = m if mask != "bool" else torch.zeros(nq, nk).masked_fill(~m, -torch.inf)
    assert count_macs(_matmul_attention, q, k, v, fmask).total == expected


def test_sdpa_other_shapes():
    q, k, v = torch.randn(B, 10, D), torch.randn(B, 7, D), torch.randn(B, 7, 2 * D)  # 3-D, dv != d
    assert count_macs(F.scaled_dot_product_attention, q, k, v).total == _attn_macs(B, 1, 10, 7, D, 2 * D)
    q, k = torch.randn(B, H, 10, D), torch.randn(B, H, 10, D)
    assert count_macs(F.scaled_dot_product_attention, q, k, k, is_causal=True).total == _attn_macs(
        B, H, 10, 10, D)  # counted dense, like torch's own formulas
    kv = torch.randn(B, 2, 10, D)  # GQA: 4 query heads share 2 kv heads
    assert count_macs(F.scaled_dot_product_attention, q, kv, kv, enable_gqa=True).total == _attn_macs(
        B, H, 10, 10, D)


def _mha_macs(b, nq, nk, e):
    return b * (2 * nq * e * e + 2 * nk * e * e) + _attn_macs(b, 1, nq, nk, e)


@pytest.mark.parametrize("nk", [10, 7])
def test_multihead_attention_fast_and_slow_path(nk):
    e = H * D
    mha = nn.MultiheadAttention(e, H, batch_first=True).eval()
    x, kv = torch.randn(B, 10, e), torch.randn(B, nk, e)
    y = x if nk == 10 else kv
    eval_report = count_macs(mha, x, y, y, need_weights=False)
    assert eval_report.total == _mha_macs(B, 10, nk, e), eval_report.by_op
    if nk == 10:  # self-attention in eval + no_grad takes the fused CPU kernel
        assert "aten._native_multi_head_attention" in eval_report.by_op
    mha.train()  # slow path: in_proj matmuls + SDPA
    assert count_macs(mha, x, y, y, need_weights=False).total == eval_report.total


def test_transformer_encoder_fast_path_dense_and_nested():
    e, f = H * D, 48
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(e, H, f, dropout=0.0, batch_first=True), 2)
    x = torch.randn(B, 10, e)

    def layer(n):
        return 4 * n * e * e + 2 * n * n * e + 2 * n * e * f

    enc.eval()
    dense = count_macs(enc, x)
    assert "aten._transformer_encoder_layer_fwd" in dense.by_op
    assert dense.total == 2 * B * layer(10)
    enc.train()
    assert count_macs(enc, x).total == dense.total
    enc.eval()
    pad = torch.zeros(B, 10, dtype=torch.bool)
    pad[1, 6:] = True  # nested-tensor fast path: the second sequence has only 6 tokens
    with warnings.catch_warnings():  # "nested tensors are in prototype stage"
        warnings.simplefilter("ignore")
        nested = count_macs(enc, x, src_key_padding_mask=pad)
    assert nested.total == 2 * (layer(10) + layer(6))


def test_registration_is_idempotent():
    before = dict(flop_counter.flop_registry)
    macs._register(("_scaled_dot_product_flash_attention_for_cpu", "_native_multi_head_attention"),
                   macs._sdpa)  # already registered: skipped, no "duplicate registrations" error
    assert flop_counter.flop_registry == before
    code = "import importlib, trimkit.macs as m; importlib.reload(m); importlib.reload(m)"
    subprocess.run([sys.executable, "-c", code], check=True)  # re-import in a clean process


def test_varlen_formula_registered():
    # varlen_attn is CUDA-only: only check that its formula is in the registry (torch registers it
    # when torch.nn.attention.varlen is imported, which trimkit.macs does).
    pytest.importorskip("torch.nn.attention.varlen")
    assert torch.ops.torch_attn._varlen_attn in flop_counter.flop_registry


def test_format_macs():
    assert format_macs(48.3e9) == "48.3 G"
    assert format_macs(17_561_000_000, digits=2) == "17.56 G"
    assert format_macs(1.5e12) == "1.5 T"
    assert format_macs(2500) == "2.5 K"
    assert format_macs(12) == "12 "
    assert format_macs(MacsReport(3_000_000)) == "3.0 M"
    assert str(MacsReport(3_000_000)) == "3.0 MMACs"


def _vit_macs(grid, e=768, depth=12, mlp=3072, cls=1, head=0):
    n, p = grid * grid + cls, grid * grid
    patch = p * e * 3 * 16 * 16
    block = 4 * n * e * e + 2 * n * n * e + 2 * n * e * mlp
    return patch + depth * block + head


def test_timm_vit_b16_224():
    from trimkit._compat import ensure_torchvision

    ensure_torchvision()
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    report = count_macs(model, torch.randn(1, 3, 224, 224))
    assert report.total == _vit_macs(14, head=768 * 1000)
    assert format_macs(report) == "17.6 G"  # published figure: 17.6 GMACs


def test_open_clip_vit_b16_288():
    from trimkit._compat import ensure_torchvision

    ensure_torchvision()
    open_clip = pytest.importorskip("open_clip")
    visual = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=288).visual.eval()
    report = count_macs(visual, torch.randn(1, 3, 288, 288))
    assert report.total == _vit_macs(18, head=768 * 512)
    assert format_macs(report) == "29.7 G"
