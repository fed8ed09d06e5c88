"""The mask semantics: where tokens and heads are masked (training) or really dropped (inference).

One rewritten graph serves both modes; only these operations change behaviour:

* :meth:`Runtime.token_step` turns a layer's token logits into the stream's new
  :class:`TokenState`. Training: a sampled (or hard) mask, multiplied into the previous one, so a
  dropped token stays dropped. Inference at batch 1: the kept tokens are gathered
  (``hidden.index_select``) and the state remembers their original positions.
* :class:`TrimAttention` recomputes an attention module with its own weights: a masked token is
  neither key nor value (``log(mask)`` added to the scores), a masked head's output is scaled by its
  mask; at inference only the kept heads' projection rows are computed.
* :func:`align` gathers tensors created at a stream's original length (padding masks, states
  that skip layers) to the kept tokens.

The contract (tested with hypothesis): with the same hard masks, the masked forward and the
physically trimmed forward agree on every kept token; with every mask 1 both equal the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .spec import AttentionSpec

MODES = ("off", "sample", "hard", "remove")
"""off: trimmers bypassed (the full model). sample: training masks from the sampler. hard: binary
masks (pi > 0) applied as masks, nothing removed. remove: binary masks, tokens/heads removed
(batch 1)."""


@dataclass
class TokenState:
    """What has been trimmed from one stream so far.

    ``mask`` (B, N) in [0, 1] over the stream's original tokens (modes sample/hard), or ``index``
    (N_kept,) the original positions of the tokens still present (mode remove). Both ``None``:
    nothing trimmed yet.
    """

    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    length: int = 0  # the stream's original token count (mode remove)


@dataclass
class AttnTrim:
    """Per-call instructions for one :class:`TrimAttention`."""

    key_mask: torch.Tensor | None = None  # (B, Nk) float, modes sample/hard
    head_mask: torch.Tensor | None = None  # (B, H) float, modes sample/hard
    head_index: torch.Tensor | None = None  # (H_kept,) long, mode remove


@dataclass
class Record:
    """One trimmer's decision in the last forward (for the cost loss, MACs and visualisation)."""

    key: str
    kind: str  # "token" | "head"
    target: float
    keep: torch.Tensor  # (B,) kept fraction per instance (differentiable in mode sample)
    mask: torch.Tensor | None = None  # (B, N) or (B, H) current mask (modes sample/hard)
    index: torch.Tensor | None = None  # kept original indices (mode remove)
    total: int = 0  # N or H before this layer's trimming (original count)


@dataclass
class Runtime:
    """State shared by every trimmed layer during one forward of a :class:`TrimmedModel`."""

    mode: str = "off"
    sampler: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    temperature: float = 1.0
    padding: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> (B, N) 1 = real
    records: list[Record] = field(default_factory=list)
    forced: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> logits override (tests, profiling)
    targets: dict[str, float] = field(default_factory=dict)  # key -> current (scheduled) target

    def _binary(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits > 0).to(logits.dtype)

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mode == "sample":
            if self.sampler is None:
                raise RuntimeError("trimkit: mode 'sample' needs a sampler")
            return self.sampler(logits, self.temperature)
        return self._binary(logits)

    def token_step(
        self, key: str, stream: str, logits: torch.Tensor, hidden: torch.Tensor, state: TokenState | None, token_dim: int
    ) -> tuple[TokenState, torch.Tensor]:
        """Apply a token trimmer's logits (B, N_cur) to a stream; returns (new state, new hidden)."""
        logits = self.forced.get(key, logits)
        target = self.targets.get(key, 1.0)
        if self.mode == "remove":
            if logits.shape[0] != 1:
                raise RuntimeError("trimkit: physical token removal runs at batch 1 (use the packed engine for batches)")
            keep = logits[0] > 0
            keep[0] = True  # [CLS] is always kept
            local = keep.nonzero().squeeze(1)  # the one host sync of this layer
            prev = state.index if state is not None and state.index is not None else None
            length = state.length if prev is not None else logits.shape[1]
            index = prev[local] if prev is not None else local
            hidden = hidden.index_select(token_dim, local)
            kept = torch.tensor([local.numel() / length], dtype=torch.float32)
            self.records.append(Record(key, "token", target, kept, index=index, total=length))
            return TokenState(index=index, length=length), hidden
        m = self._mask(logits)
        ones = torch.ones_like(m[:, :1])
        m = torch.cat([ones, m[:, 1:]], dim=1)  # [CLS] always kept (no in-place write on a graph tensor)
        prev = state.mask if state is not None and state.mask is not None else None
        mask = m if prev is None else prev * m
        pad = self.padding.get(stream)
        if pad is not None and pad.shape == mask.shape:
            pad = pad.to(mask.dtype)
            keep = (mask * pad).sum(1) / pad.sum(1).clamp_min(1)
        else:
            keep = mask.mean(1)
        self.records.append(Record(key, "token", target, keep, mask=mask, total=mask.shape[1]))
        return TokenState(mask=mask), hidden

    def head_step(self, key: str, logits: torch.Tensor) -> AttnTrim:
        """Apply a head trimmer's logits (B, H)."""
        logits = self.forced.get(key, logits)
        target = self.targets.get(key, 1.0)
        heads = logits.shape[1]
        if self.mode == "remove":
            index = (logits[0] > 0).nonzero().squeeze(1)
            kept = torch.tensor([index.numel() / heads], dtype=torch.float32)
            self.records.append(Record(key, "head", target, kept, index=index, total=heads))
            return AttnTrim(head_index=index)
        m = self._mask(logits)
        self.records.append(Record(key, "head", target, m.mean(1), mask=m, total=heads))
        return AttnTrim(head_mask=m)


def align(tensor: Any, state: TokenState | None, dim: int) -> Any:
    """Gather a tensor made at the stream's original length to the tokens still present."""
    if state is None or state.index is None or not isinstance(tensor, torch.Tensor):
        return tensor
    if tensor.shape[dim] == 1:  # broadcast dimension: nothing to gather
        return tensor
    return tensor.index_select(dim, state.index.to(tensor.device))


def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Nk) keep mask -> additive (B, 1, 1, Nk) bias: log(mask), -inf where the mask is 0."""
    tiny = torch.finfo(mask.dtype).tiny
    bias = torch.where(mask > 0, mask.clamp_min(tiny).log(), torch.full_like(mask, float("-inf")))
    return bias.to(dtype)[:, None, None, :]


class TrimAttention(nn.Module):
    """An attention module recomputed with its own weights, honouring token and head masks.

    It holds a reference to the original module (not a copy): parameters stay shared.
    """

    def __init__(self, module: nn.Module, spec: AttentionSpec) -> None:
        super().__init__()
        self.spec = spec
        object.__setattr__(self, "module", module)  # shared, not re-registered

    def _weights(self) -> tuple[torch.Tensor, ...]:
        m, s = self.module, self.spec
        if s.in_proj is not None or s.qkv is not None:
            if s.qkv is not None:
                fused = m.get_submodule(s.qkv)
                w, b = fused.weight, fused.bias
            else:
                w, b = getattr(m, f"{s.in_proj}_weight"), getattr(m, f"{s.in_proj}_bias", None)
            wq, wk, wv = w.chunk(3, 0)
            bq, bk, bv = b.chunk(3, 0) if b is not None else (None, None, None)
            return wq, bq, wk, bk, wv, bv
        q, k, v = (m.get_submodule(n) for n in (s.q, s.k, s.v))
        return q.weight, q.bias, k.weight, k.bias, v.weight, v.bias

    def forward(self, *args: Any, trimkit_trim: AttnTrim | None = None, **kwargs: Any) -> Any:
        s = self.spec
        call = s.inputs(args, kwargs)
        x, ctx, bias = call.x, call.context, call.bias
        if ctx is None:
            ctx = x
        if not s.batch_first:
            x, ctx = x.transpose(0, 1), ctx.transpose(0, 1)
        wq, bq, wk, bk, wv, bv = self._weights()
        heads = s.num_heads
        d = wq.shape[0] // heads
        trim = trimkit_trim or AttnTrim()
        rows = None
        if trim.head_index is not None:
            rows = (trim.head_index[:, None] * d + torch.arange(d, device=wq.device)).reshape(-1)
            wq, wk, wv = wq[rows], wk[rows], wv[rows]
            bq, bk, bv = (b[rows] if b is not None else None for b in (bq, bk, bv))
            heads = trim.head_index.numel()
        B, Nq, _ = x.shape
        Nk = ctx.shape[1]
        if heads > 0:
            q = F.linear(x, wq, bq).view(B, Nq, heads, d).transpose(1, 2)
            k = F.linear(ctx, wk, bk).view(B, Nk, heads, d).transpose(1, 2)
            v = F.linear(ctx, wv, bv).view(B, Nk, heads, d).transpose(1, 2)
            mask = None if bias is None else bias.to(q.dtype)
            if trim.key_mask is not None:
                kb = key_bias(trim.key_mask, q.dtype)
                mask = kb if mask is None else mask + kb
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scale)
            if trim.head_mask is not None:
                y = y * trim.head_mask.to(y.dtype)[:, :, None, None]
            y = y.transpose(1, 2).reshape(B, Nq, heads * d)
        else:  # every head dropped: the attention contributes nothing
            y = x.new_zeros(B, Nq, 0)
        if s.out is not None:
            out = self.module.get_submodule(s.out)
            w = out.weight if rows is None else out.weight[:, rows]
            y = F.linear(y, w, out.bias)
        elif rows is not None:  # the model applies the output projection: give it every head's slot
            full = y.new_zeros(B, Nq, self._width())
            full[..., rows] = y
            y = full
        if not s.batch_first:
            y = y.transpose(0, 1)
        return s.output(y)

    def _width(self) -> int:
        s = self.spec
        if s.qkv is not None:
            return self.module.get_submodule(s.qkv).weight.shape[0] // 3
        if s.in_proj is not None:
            return getattr(self.module, f"{s.in_proj}_weight").shape[0] // 3
        return self.module.get_submodule(s.q).weight.shape[0]
