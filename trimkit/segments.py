"""Streams that hold several modalities in one sequence (:class:`~trimkit.spec.Segment`).

A single-stream model (ViLT, and a decoder's [prompt][image][question] sequence) concatenates text
and image tokens, each part with its own summary. trimkit keeps *one* token state for the sequence
(so the model's attention, masks and FFN see one sequence, exactly as it wrote them) and makes the
token decision per segment: at every trimmed layer each segment has its own token trimmer and
target, which scores the tokens from the segment's own summary (its first token, the mean of its
kept tokens, or its last real token) and the other segments' (the cross-modal signal of the paper,
between segments). Every segment's summary token is always kept.

Where the segments are is a :class:`SegmentLayout`, made once per forward at the stream's first
layer: the (B, K + 1) bounds of each instance (the same row for every instance when the lengths are
shared, :attr:`Segment.length`; per instance from a tensor, :attr:`StreamSpec.segment_starts`) and
the (B, K) original position of each segment's summary token. Segment membership and summaries are
found from each token's *original* position, in every mode without a host synchronisation: a
token's segment is the number of its instance's inner bounds at or before its position, and kept
tokens stay in order, so with ``key = instance * N + original position`` sorted, a summary's row is
``searchsorted(key, b * N + position)``. (Mode ``remove`` runs at batch 1 and syncs per layer
anyway: it takes the bounds to the host once.)

A stream without segments whose summary is its last real token (``StreamSpec(summary="last")``) has
a layout too: one segment, the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .engine import packed as P
from .spec import Segment, StreamSpec

__all__ = ["SegmentLayout", "SegmentTokenTrimmer", "segment_bounds", "segment_layout"]


def segment_bounds(segments: Sequence[Segment], sizes: dict[str, int], length: int, stream: str) -> list[int]:
    """Original start of each segment plus the end: ``[0, s1, ..., N]`` (host ints)."""
    bounds = [0]
    for g in segments:
        if g.length is None:
            n = length - bounds[-1]
        elif isinstance(g.length, int):
            n = g.length
        else:
            if g.length not in sizes:
                raise RuntimeError(f"stream {stream!r}: segment {g.name!r} takes its length from {g.length!r}, "
                                   "which is not an input of this forward")
            n = sizes[g.length]
        bounds.append(bounds[-1] + n)
    if bounds[-1] != length or any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise RuntimeError(f"stream {stream!r}: segments {[g.name for g in segments]} span {bounds} but the "
                           f"sequence has {length} tokens (a segment must be non-empty and the lengths add up)")
    return bounds


@dataclass(eq=False)
class SegmentLayout:
    """Where a stream's segments and summary tokens are in one forward, at original positions.

    bounds: (B, K + 1) long, each instance's segment starts and then N. summary: (B, K) long, the
    original position of each segment's summary token (always kept). host: the bounds as host ints
    ``[0, s1, ..., N]`` when every instance has the same, else ``None``. length: N.
    """

    bounds: torch.Tensor
    summary: torch.Tensor
    host: list[int] | None
    length: int

    @property
    def batch(self) -> int:
        return self.bounds.shape[0]

    def member(self, pos: torch.Tensor, bidx: torch.Tensor | None = None) -> torch.Tensor:
        """Segment index of tokens from their original positions: ``pos`` (n,) -> (n,) when the bounds
        are shared, else (B, n); packed rows ``pos`` (R,) with their instances ``bidx`` (R,) -> (R,)."""
        if self.host is not None:
            inner = torch.tensor(self.host[1:-1], dtype=pos.dtype, device=pos.device)
            return torch.bucketize(pos, inner, right=True)
        inner = self.bounds[:, 1:-1].to(device=pos.device, dtype=pos.dtype)
        if bidx is not None:
            return (pos[:, None] >= inner.index_select(0, bidx)).sum(-1)
        return (pos[None, :, None] >= inner[:, None, :]).sum(-1)

    def gather(self, seq: torch.Tensor) -> torch.Tensor:
        """The summary tokens of a (B, N, D) tensor in the original layout -> (B, K, D)."""
        index = self.summary.to(seq.device)
        return seq.gather(1, index[..., None].expand(-1, -1, seq.shape[-1]))

    def rows(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, K) row of each summary token, for rows sorted by ``instance * N + original position``
        (packed rows' ``Packing.flat``; at batch 1 the kept tokens' original positions)."""
        want = torch.arange(self.batch, dtype=keys.dtype, device=keys.device)[:, None] * self.length
        want = want + self.summary.to(device=keys.device, dtype=keys.dtype)
        return torch.searchsorted(keys, want.reshape(-1)).view(self.batch, -1)

    def per_segment(self, values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """(B, N) values of the original tokens -> (B, K) their sum per segment."""
        K = self.summary.shape[1]
        m = member.expand(values.shape[0], -1) if member.dim() == 1 else member
        return values.new_zeros(values.shape[0], K).scatter_add_(1, m, values)


def segment_layout(stream: StreamSpec, runtime: Any, batch: int, length: int, device: torch.device) -> SegmentLayout:
    """A stream's :class:`SegmentLayout` for this forward (``runtime``: the :class:`~trimkit.ops.Runtime`
    holding its padding and, with ``segment_starts``, the recorded starts).

    Per-instance starts are checked without a host synchronisation: a device flag the runtime
    reports after the forward (mode ``remove`` takes the bounds to the host and checks at once);
    until then they are clamped into the sequence, so nothing indexes out of range."""
    name = stream.name
    segments = list(stream.segments)
    names = [g.name for g in segments]
    rules = [g.summary for g in segments] or [stream.summary]
    K = len(rules)
    bad = starts = None
    if stream.segment_starts is not None:
        ref = stream.segment_starts
        starts = runtime.segment_starts.get(name)
        if starts is None:
            raise RuntimeError(f"stream {name!r}: its segment starts (StreamSpec.segment_starts {ref!r}) were not "
                               "recorded before the stream's first layer in this forward (a module source must be "
                               "called before the layers)")
        if tuple(starts.shape) != (batch, K):
            raise ValueError(f"stream {name!r}: segment_starts {ref!r} has shape {tuple(starts.shape)}, expected "
                             f"({batch}, {K}): one start per segment {names} for each of the {batch} instances")
        starts = starts.to(device=device, dtype=torch.long)
        bounds = torch.cat([starts, torch.full((batch, 1), length, dtype=torch.long, device=device)], 1)
        bad = (starts[:, 0] != 0).any() | (bounds[:, 1:] <= bounds[:, :-1]).any()
        bounds = bounds.clamp(0, length)  # in range until the check reports
        host = None
    else:
        host = segment_bounds(segments, runtime.sizes, length, name) if segments else [0, length]
        bounds = torch.tensor(host, dtype=torch.long, device=device).expand(batch, -1)
    layout = SegmentLayout(bounds, bounds[:, :-1].clone(), host, length)
    if bad is not None:
        msg = (f"stream {name!r}: segment_starts {stream.segment_starts!r} must give each instance's segments "
               f"{names} as starts that begin at 0, increase strictly and stay below the sequence's {length} "
               "tokens (every segment non-empty, the last one running to the end)")
        if runtime.mode == "remove":  # batch 1, which syncs per layer anyway: the bounds on the host, checked now
            flag, row = P.fetch([bad, bounds[0]])
            if flag[0]:
                raise ValueError(f"{msg}; got {starts.tolist()}")
            layout.host = row
        else:
            runtime.defer(msg, bad, starts)
    if "last" in rules:  # each such segment's last real token (padding excluded), per instance
        pos = torch.arange(length, device=device)
        pad = runtime.padding.get(name)
        real = (pad.to(device) != 0) if isinstance(pad, torch.Tensor) and tuple(pad.shape) == (batch, length) \
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        member = layout.member(pos)
        member = member.expand(batch, -1) if member.dim() == 1 else member
        score = torch.where(real, pos.expand(batch, -1), torch.full_like(member, -1))
        found = torch.full((batch, K), -1, dtype=torch.long, device=device).scatter_reduce_(1, member, score, "amax")
        found = torch.where(found >= 0, found, layout.summary)  # a segment of padding only: its first position
        is_last = torch.tensor([r == "last" for r in rules], device=device)
        layout.summary = torch.where(is_last, found, layout.summary)
    layout.summary = layout.summary.clamp(0, length - 1)
    return layout


class SegmentTokenTrimmer(nn.Module):
    """The token trimmers of one layer of a segmented stream: one policy per segment.

    Each policy is called as a stream's would be, ``policy(hidden, cls_self, cls_context)``, with
    its segment's summary as ``cls_self`` and the mean of the other segments' summaries as
    ``cls_context``; each token takes the logit of its own segment's policy.
    """

    def __init__(self, names: Sequence[str], policies: Sequence[nn.Module]) -> None:
        super().__init__()
        self.names = list(names)
        self.policies = nn.ModuleList(policies)

    @staticmethod
    def contexts(cls: torch.Tensor) -> list[torch.Tensor]:
        """(B, K, D) summaries -> per segment, the mean of the others' (B, D)."""
        K = cls.shape[1]
        total = cls.sum(1)
        return [(total - cls[:, k]) / (K - 1) for k in range(K)]

    def logits(self, hidden: torch.Tensor, cls: torch.Tensor, member: torch.Tensor,
               contexts: Sequence[Any] | None = None) -> torch.Tensor:
        """Masked/remove layouts: hidden (B, n, D), cls (B, K, D), member (B, n) or (n,) -> logits (B, n).
        ``contexts``: per segment the :class:`~trimkit.probe.TokenContext` a policy with ``uses_context``
        gets as its fourth argument."""
        ctx = SegmentTokenTrimmer.contexts(cls)
        out = torch.stack([p(hidden, cls[:, k], ctx[k], contexts[k])
                           if contexts is not None and getattr(p, "uses_context", False) else p(hidden, cls[:, k], ctx[k])
                           for k, p in enumerate(self.policies)], 0)  # (K, B, n)
        m = member.expand(hidden.shape[0], -1) if member.dim() == 1 else member
        return out.gather(0, m[None]).squeeze(0)

    def packed_logits(self, rows: torch.Tensor, pack: P.Packing, cls: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """Packed rows (R, D), cls (B, K, D), member (R,) -> logits (R,)."""
        ctx = self.contexts(cls)
        out = torch.stack([P.token_logits(p, rows, pack, cls[:, k], ctx[k]) for k, p in enumerate(self.policies)], 0)
        return out.gather(0, member[None]).squeeze(0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - called through its methods
        raise RuntimeError("SegmentTokenTrimmer is called through logits()/packed_logits() by the layer runtime")
