"""Cached weight slices per kept-head set, for removing heads at batch 1 in small attentions.

Mode ``remove`` computes only the kept heads of an attention. With the kept heads in runs of
consecutive heads, each run is its own q/k/v matmul on *views* of the weights, its own attention
call and one accumulating matmul into the output projection (:meth:`TrimAttention._kept_heads`):
no copy, which is what pays at METER-base sizes. In a small attention the time is per-op dispatch,
not arithmetic, and two or three runs cost more than computing every head (measured: D = 64, 4
heads, 17 tokens, 2 runs: 305 us against 182 us dense; benchmarks/RESULTS.md, "Fixed cost per
trimmed layer"). There one gathered copy of the kept rows (and output columns) makes every kept
set a single run, and a kept set recurs across inputs (at most 2^heads of them), so the copy is
made once: 131 us for the same case.

:class:`KeptHeadCache` holds those copies per attention module: only at inference (no autograd:
a cached copy would detach the weights' gradients), only when the copies are small
(:data:`MAX_ELEMENTS`), a bounded number of sets (least recently used dropped), and cleared when any
weight changes (a new ``data_ptr`` or an in-place update bumping the tensor's version counter:
``load_state_dict``, an optimizer step, ``.to()``). Writes through ``.data`` (``p.data.copy_(...)``)
bump no version counter and are not seen: :meth:`trimkit.TrimmedModel.clear_caches` (also run by
``train()``/``eval()`` and when trimmers are loaded) drops the copies.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

__all__ = ["KeptHeadCache", "MAX_ELEMENTS", "MAX_SETS"]

MAX_ELEMENTS = 1 << 19
"""Largest gathered copy (elements of q/k/v rows plus output columns) that is cached: an attention
of width 256 keeping every head (4 * 256 * 256 = 2^18) fits, METER base's (768) does not."""

MAX_SETS = 16
"""Kept-head sets cached per attention (2^4: every set of a 4-head attention)."""


class KeptHeadCache:
    """Gathered weights of kept-head sets of one attention (see the module docstring)."""

    def __init__(self, max_sets: int = MAX_SETS, max_elements: int = MAX_ELEMENTS) -> None:
        self.max_sets, self.max_elements = max_sets, max_elements
        self._sets: OrderedDict[tuple[int, ...], tuple] = OrderedDict()
        self._stamp: tuple | None = None
        self.hits = self.misses = 0

    @staticmethod
    def _stamp_of(tensors: tuple) -> tuple:
        present = [t for t in tensors if t is not None]
        first = present[0]
        try:  # storage and version counter of each (a device or dtype change gives every tensor new storage)
            return (first.device, first.dtype, *[(t.data_ptr(), t._version) for t in present])
        except RuntimeError:  # inference tensors (made under torch.inference_mode) keep no version counter
            return (first.device, first.dtype, *[(t.data_ptr(), t.is_inference()) for t in present])

    def clear(self) -> None:
        """Drop every cached copy (:meth:`trimkit.TrimmedModel.clear_caches`)."""
        self._sets.clear()
        self._stamp = None

    def usable(self, d: int, kept: int, width: int, out_rows: int | None) -> bool:
        """Whether a set of ``kept`` heads of size ``d`` (input width ``width``, output projection of
        ``out_rows`` rows or none) is worth caching now."""
        if torch.is_grad_enabled():
            return False
        n = kept * d
        return 3 * n * width + (n * out_rows if out_rows else 0) <= self.max_elements

    def get(self, heads: tuple[int, ...], d: int, sources: tuple, weights: "Callable[[], tuple]",
            out_weight: torch.Tensor | None) -> tuple:
        """``(wq, bq, wk, bk, wv, bv, wo, rows, wqkv, bqkv, wkv, bkv)`` restricted to ``heads`` (``wo``: the
        output projection's columns, or ``None``; ``rows``: the kept heads' channel indices);
        ``sources``: the parameters the projections are made of (stamped: a change drops every copy);
        ``weights()`` gives the full ``(wq, bq, wk, bk, wv, bv)`` (called on a miss). When the three projections read inputs of
        one width (and all or none have a bias), the copy is one ``[q; k; v]`` matrix: ``wqkv``/``bqkv``
        (one matmul for a self-attention) and ``wkv``/``bkv`` (keys and values of a cross-attention in
        one matmul) are views of it, as are ``wq``...; otherwise those four are ``None``."""
        stamp = self._stamp_of((*sources, out_weight))
        if stamp != self._stamp:
            self._sets.clear()
            self._stamp = stamp
        hit = self._sets.get(heads)
        if hit is not None:
            self._sets.move_to_end(heads)
            self.hits += 1
            return hit
        self.misses += 1
        weights = weights()
        device = weights[0].device
        rows = (torch.arange(d, device=device)[None, :] + torch.tensor(heads, device=device)[:, None] * d).reshape(-1)
        wq, bq, wk, bk, wv, bv = weights
        biases = (bq, bk, bv)
        fusable = (wq.shape[1] == wk.shape[1] == wv.shape[1]
                   and (all(b is None for b in biases) or all(b is not None for b in biases)))
        if fusable:
            n = rows.numel()
            wqkv = torch.cat([w.index_select(0, rows) for w in (wq, wk, wv)])
            bqkv = None if bq is None else torch.cat([b.index_select(0, rows) for b in biases])
            sl = [(0, n), (n, 2 * n), (2 * n, 3 * n)]
            entry = tuple(x for a, b in sl for x in (wqkv[a:b], None if bqkv is None else bqkv[a:b]))
            fused = (wqkv, bqkv, wqkv[n:], None if bqkv is None else bqkv[n:])
        else:
            entry = tuple(None if t is None else t.index_select(0, rows) for t in weights)
            fused = (None, None, None, None)
        entry += (None if out_weight is None else out_weight.index_select(1, rows), rows) + fused
        self._sets[heads] = entry
        if len(self._sets) > self.max_sets:
            self._sets.popitem(last=False)
        return entry
