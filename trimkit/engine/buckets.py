"""Bucketed batch-1 removal: kept counts rounded up to a few sizes, so compiled layer bodies are reused.

In mode ``remove`` every trimmed layer runs on exactly the tokens its stream kept, so the layer's
shapes change with every input: a compiled (``torch.compile``) or graph-captured layer would be
rebuilt for nearly every forward. With :class:`Bucketing` the tensors handed to a layer's own code
(the hidden states, the context it attends to, every declared token argument) are padded up to a
*bucket*: the stream's kept count ``n`` rounded up to a multiple of ``ceil(N / buckets)`` (``N`` its
original length, never more than ``N``). The ``K - n`` slack rows repeat the last kept row (real,
finite values, whatever the tensor is: hidden states, a rotary table, a padding bias) and are masked
as keys in every attention call (:attr:`trimkit.ops.AttnTrim.key_mask`, as mode ``hard`` masks a
dropped token), so the kept rows compute what mode ``remove`` computes; the slack rows are cut from
the layer's outputs before anything else reads them. So the streams' states, the trimmers, the
records and everything after the layer are exactly those of mode ``remove``; only the layer's own
code sees the padded shapes, of which each stream has at most ``buckets`` per layer.

Compiled (:meth:`trimkit.TrimmedModel.compile`), every trimmed layer's own code runs as a graph
compiled per bucket signature (:class:`trimkit.engine.compiled.CompiledLayer`); dropped heads are
then masked, not sliced out (a kept-head set is data: slicing would make a signature of it). The
trimmers, the decision (one host synchronisation per layer) and the gathers stay eager.

Not for a KV cache: the slack rows' keys and values would enter the cache. The shipped generation
helpers run their prefill without bucketing (:meth:`trimkit.TrimmedModel.eager`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_map

from ..ops import AttnTrim, TokenState
from .compiled import _hooked

if TYPE_CHECKING:
    from ..layer import TrimmedLayer

__all__ = ["Bucketing", "bucket_size", "bucketed_run", "pad_tokens"]


@dataclass
class Bucketing:
    """How batch-1 removal pads kept counts (:mod:`trimkit.engine.buckets`).

    buckets: sizes per stream and layer. compiled: each trimmed layer's own code runs compiled
    (:class:`CompiledLayer`). calls / padded / compiled_calls: layer calls seen, those that had slack
    rows, those that ran compiled; failures: layer or module -> why it runs eager (for tests and
    benchmarks)."""

    buckets: int = 4
    compiled: bool = False
    calls: int = 0
    padded: int = 0
    compiled_calls: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    _index: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or self.buckets < 1:
            raise ValueError(f"buckets must be a positive integer (sizes per stream and layer), got {self.buckets!r}")

    def size(self, n: int, length: int) -> int:
        """The bucket of ``n`` kept tokens out of ``length``."""
        return bucket_size(n, length, self.buckets)

    def pad_index(self, n: int, size: int, device: torch.device) -> torch.Tensor:
        """(size,) rows 0..n-1, then ``size - n`` times row n - 1."""
        key = (n, size, device)
        idx = self._index.get(key)
        if idx is None:
            idx = torch.arange(size, device=device).clamp_max_(n - 1)
            self._index[key] = idx
        return idx

    def key_mask(self, n: int, size: int, device: torch.device) -> torch.Tensor:
        """(1, size) float: 1 on the n kept keys, 0 on the slack."""
        key = (n, size, device)
        m = self._masks.get(key)
        if m is None:
            m = (torch.arange(size, device=device) < n).float()[None]
            self._masks[key] = m
        return m

    def head_mask(self, runs: list[tuple[int, int]] | None, heads: int, device: torch.device) -> torch.Tensor:
        """(1, heads) float: 1 on the kept heads (every head when ``runs`` is None)."""
        key = ("heads", tuple(runs) if runs is not None else None, heads, device)
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(1, heads, device=device) if runs is not None else torch.ones(1, heads, device=device)
            for a, e in runs or ():
                m[:, a:e] = 1.0
            self._masks[key] = m
        return m


def bucket_size(n: int, length: int, buckets: int) -> int:
    """``n`` rounded up to a multiple of ``ceil(length / buckets)``, at most ``length``."""
    if n >= length or n <= 0:
        return n
    step = -(-length // buckets)
    return min(length, -(-n // step) * step)


def pad_tokens(t: Any, dim: int, n: int, size: int, index: torch.Tensor) -> Any:
    """``t`` with its token dimension ``dim`` padded from ``n`` to ``size`` rows by ``index`` (tuples
    and lists element by element); tensors whose dimension is not ``n`` (broadcast) are unchanged."""
    if isinstance(t, (tuple, list)):
        return type(t)(pad_tokens(x, dim, n, size, index) for x in t)
    if size == n or not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    d = dim % t.dim()
    if t.shape[d] != n:
        return t
    return t.index_select(d, index if index.device == t.device else index.to(t.device))


def _cut(out: Any, n: int, size: int, tdim: int) -> Any:
    """Every output tensor laid out as the padded stream ((1, size, ...) or (size, 1, ...)) cut to ``n`` rows."""
    if size == n:
        return out
    bdim = 1 - tdim

    def one(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[bdim] == 1 and t.shape[tdim] == size:
            return t.narrow(tdim, 0, n)
        return t

    return tree_map(one, out)


def _length(t: torch.Tensor, state: TokenState | None, tdim: int) -> tuple[int, int]:
    n = t.shape[tdim]
    return n, state.length if state is not None and state.index is not None else n


def bucketed_run(layer: "TrimmedLayer", a: dict[str, Any], hstate: TokenState | None, cstate: TokenState | None,
                 astates: list[TokenState | None], trims: list[AttnTrim], b: Bucketing) -> Any:
    """Run a layer's own code (mode remove, batch 1) on its tensors padded to their buckets; returns
    its output with the slack rows cut (see the module docstring)."""
    spec, tdim = layer.spec, layer.token_dim
    b.calls += 1
    if _hooked(layer._inner_modules):
        # a forward hook watches the layer's code (an attention probe recording this layer's attention for the
        # next layer's policy, FastV or VisionZip, which scores the exact kept tokens; a user's hook): the
        # call runs as mode remove runs it, unpadded and eager
        return layer._run(a, trims)
    hidden = a[layer.hidden_name]
    nh, lh = _length(hidden, hstate, tdim)
    kh = b.size(nh, lh)
    sides: dict[str | None, tuple[int, int]] = {spec.stream: (nh, kh)}  # stream -> (kept, bucket)
    padded = kh > nh
    if padded:
        idx = b.pad_index(nh, kh, hidden.device)
        a[layer.hidden_name] = pad_tokens(hidden, tdim, nh, kh, idx)
        for name, dim in layer.hidden_side.items():
            if name in a:
                a[name] = pad_tokens(a[name], dim, nh, kh, idx)
    # the other stream: the layer's context argument, or the stream a two-stream layer updates
    other = layer.context_name
    ctx = a.get(other) if other is not None else None
    sides_args: dict[str, tuple[int, int]] = {}
    if isinstance(ctx, torch.Tensor) and ctx.dim() >= 3:
        nc, lc = _length(ctx, cstate, tdim)
        kc = b.size(nc, lc)
        sides[spec.context_stream] = sides_args[other] = (nc, kc)
        if kc > nc:
            padded = True
            idx = b.pad_index(nc, kc, ctx.device)
            a[other] = pad_tokens(ctx, tdim, nc, kc, idx)
            for name, dim in layer.other_side.items():
                if name in a:
                    a[name] = pad_tokens(a[name], dim, nc, kc, idx)
    own: dict[str, tuple[int, int]] = {}  # attentions with their own context argument
    if other in sides_args:  # an attention naming the layer's context as its own: padded above already
        own[other] = sides_args[other]
    for name, st in zip(layer.attn_context_names, astates):
        t = a.get(name) if name is not None else None
        if name in own or not isinstance(t, torch.Tensor) or t.dim() < 3:
            continue
        n, length = _length(t, st, tdim)
        k = b.size(n, length)
        own[name] = (n, k)
        if k > n:
            padded = True
            a[name] = pad_tokens(t, tdim, n, k, b.pad_index(n, k, t.device))
    b.padded += padded
    out_trims = []
    heads = layer.trimmers.heads if layer.trimmers is not None else {}
    for i, (trim, att, name, (_, kstream)) in enumerate(zip(trims, spec.attentions, layer.attn_context_names,
                                                            layer.roles)):
        n, k = own.get(name) if name is not None and name in own else sides.get(kstream, (0, 0))
        key_mask = b.key_mask(n, k, hidden.device) if k and (k > n or b.compiled) else trim.key_mask
        head_mask, runs = trim.head_mask, trim.head_runs
        if b.compiled and str(i) in heads:  # a kept-head set is data: masked, so the shapes stay the bucket's
            head_mask, runs = b.head_mask(runs, att.num_heads, hidden.device), None
        out_trims.append(replace(trim, key_mask=key_mask, head_mask=head_mask, head_runs=runs, head_index=None)
                         if key_mask is not trim.key_mask or runs is not trim.head_runs else trim)
    out = None
    if b.compiled and layer._compiled is not None and not torch.is_grad_enabled():
        out = layer._compiled(a, out_trims, b.failures)
        b.compiled_calls += out is not None
    if out is None:
        out = layer._run(a, out_trims)
    nh, kh = sides[spec.stream]
    if layer.update_output is None:
        return _cut(out, nh, kh, tdim)
    out = list(out)
    out[spec.output] = _cut(out[spec.output], nh, kh, tdim)
    if spec.context_stream in sides:
        nc, kc = sides[spec.context_stream]
        out[layer.update_output] = _cut(out[layer.update_output], nc, kc, tdim)
    return tuple(out)
