"""Multiply-accumulate (MAC) counting on top of ``torch.utils.flop_counter.FlopCounterMode``.

The SmartTrim paper (like most token-pruning papers) reports "FLOPs" measured with torchprofile,
which are really MACs; ``count_macs`` returns ``FlopCounterMode`` FLOPs // 2 to match.

``FlopCounterMode`` only counts ops that have a formula in its registry. Several fused attention
kernels have none and would silently count zero, so importing this module registers formulas for:

* ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward): what ``F.scaled_dot_product_
  attention`` runs on CPU, with or without a float/bool ``attn_mask``;
* ``aten._scaled_dot_product_fused_attention_overrideable`` (+ backward) and
  ``aten._scaled_dot_product_attention_math_for_mps``: other backends' SDPA kernels;
* ``aten._native_multi_head_attention``: the eval-mode fast path of ``nn.MultiheadAttention``
  (in/out projections + attention), dense or nested-tensor inputs;
* ``aten._transformer_encoder_layer_fwd``: the eval-mode fast path of ``nn.TransformerEncoderLayer``;
* ``aten._flash_attention_forward_no_dropout_inplace`` (CUDA only, untested here).

``torch.nn.attention.varlen.varlen_attn`` (CUDA only) has formulas that torch registers when
``torch.nn.attention.varlen`` is imported; this module imports it so they are always present.
It cannot run on CPU, so it is not tested here. Registration skips ops that already have a formula,
so it is idempotent and defers to formulas a future torch ships. Attention is counted dense:
causal or padding masks do not reduce the count (as in torch's own formulas and torchprofile).
Elementwise ops, norms and softmax are not counted (torchprofile counts norms/mul: <1% on a ViT).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

with contextlib.suppress(ImportError):  # registers torch's varlen_attn formulas (torch >= 2.11)
    import torch.nn.attention.varlen  # noqa: F401

__all__ = ["MacsReport", "count_macs", "format_macs"]

aten = torch.ops.aten


def _attn_flops(q: torch.Size, k: torch.Size, v: torch.Size) -> int:
    """FLOPs of softmax(Q K^T) V for (..., Nq, d) x (..., Nk, d) x (..., Nk, dv); GQA-safe."""
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _seq_lens(t: torch.Tensor) -> list[int]:
    """Sequence length of each batch item of a (B, N, E), (N, E) or nested (B, *N, E) tensor."""
    if t.is_nested:
        return [int(s[0]) for s in t._nested_tensor_size().tolist()]
    return [t.shape[-2]] * math.prod(t.shape[:-2])


def _sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return _attn_flops(query.shape, key.shape, value.shape)


def _sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return 2 * _attn_flops(query.shape, key.shape, value.shape)  # dQ,dK,dV,dP: 4 matmuls, as torch


def _native_mha(query, key, value, embed_dim, num_head, *args, out_val=None, **kwargs) -> int:
    macs = sum(2 * nq * embed_dim**2 + 2 * nk * embed_dim**2 + 2 * nq * nk * embed_dim
               for nq, nk in zip(_seq_lens(query), _seq_lens(key)))  # q,o + k,v proj + QK^T,AV
    return 2 * macs


def _encoder_layer(src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first,
                   eps, norm_w1, norm_b1, norm_w2, norm_b2, ffn_w1, *args, out_val=None, **kwargs) -> int:
    e, f = embed_dim, ffn_w1.shape[0]  # qkv + out proj, QK^T + AV, two FFN linears
    return 2 * sum(4 * n * e * e + 2 * n * n * e + 2 * n * e * f for n in _seq_lens(src))


def _flash_inplace(out, *args, **kwargs) -> int:
    return flop_counter._flash_attention_forward_flop(*args, **kwargs)


def _register(names: tuple[str, ...], formula: Callable[..., int]) -> None:
    """Register ``formula`` (raw-args form) for each existing aten op that has none yet."""
    ops = [getattr(aten, n) for n in names if hasattr(aten, n)]
    ops = [op for op in ops if op not in flop_counter.flop_registry]
    if ops:
        flop_counter.register_flop_formula(ops, get_raw=True)(formula)


_register(("_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_fused_attention_overrideable",
           "_scaled_dot_product_attention_math_for_mps"), _sdpa)
_register(("_scaled_dot_product_flash_attention_for_cpu_backward",
           "_scaled_dot_product_fused_attention_overrideable_backward"), _sdpa_backward)
_register(("_native_multi_head_attention",), _native_mha)
_register(("_transformer_encoder_layer_fwd",), _encoder_layer)
_register(("_flash_attention_forward_no_dropout_inplace",), _flash_inplace)


@dataclass(frozen=True)
class MacsReport:
    """Result of :func:`count_macs`.

    Attributes:
        total: total MACs of the call (``int(report)`` gives the same).
        by_module: MACs per module, keyed by ``FlopCounterMode``'s dotted names (root is the
            class name, e.g. ``"VisionTransformer.blocks.0.attn"``); nested modules overlap.
        by_op: MACs per aten op packet name (e.g. ``"aten.addmm"``).
    """

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)

    def __int__(self) -> int:
        return self.total

    def __str__(self) -> str:
        return f"{format_macs(self.total)}MACs"


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MacsReport:
    """Run ``fn(*args, **kwargs)`` once under ``no_grad`` and count its MACs (= FLOPs // 2).

    ``fn`` may be a module or any callable; every op it dispatches is counted, including fused
    attention kernels (see the module docstring). Data-dependent control flow (token trimming)
    is counted as it actually ran for these inputs. A trimmed model set to compiled or bucketed
    execution (:meth:`trimkit.TrimmedModel.compile`) is counted eager, with its exact kept counts
    (compiled kernels are invisible to the counter, and bucket slack is not the model's cost).
    """
    eager = getattr(fn, "eager", None)
    exact = eager() if callable(eager) and getattr(fn, "bucketing", None) is not None else contextlib.nullcontext()
    with torch.no_grad(), exact, FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    counts = counter.get_flop_counts()
    by_module = {m: sum(ops.values()) // 2 for m, ops in counts.items() if m != "Global"}
    by_op = {str(op): n // 2 for op, n in counts.get("Global", {}).items()}
    return MacsReport(counter.get_total_flops() // 2, by_module, by_op)


def format_macs(n: int | float | MacsReport, digits: int = 1) -> str:
    """Format a MAC count with an SI suffix: ``format_macs(48.3e9) == "48.3 G"``."""
    n = float(getattr(n, "total", n))
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {suffix}"
    return f"{n:.0f} "
