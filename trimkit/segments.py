"""Streams that hold several modalities in one sequence (:class:`~trimkit.spec.Segment`).

A single-stream model (ViLT, and the image span inside a decoder's sequence) concatenates text and
image tokens, each part with its own [CLS]. trimkit keeps *one* token state for the sequence (so
the model's attention, masks and FFN see one sequence, exactly as it wrote them) and makes the
token decision per segment: at every trimmed layer each segment has its own token trimmer and
target, which scores the tokens from the segment's own summary (its first token) and the other
segments' (the cross-modal signal of the paper, between segments). Every segment's summary is
always kept.

Segment membership and summaries are found from each token's *original* position, in every mode
without a host synchronisation: kept tokens stay in order, so with ``key = instance * N +
original position`` sorted, a segment's summary row is ``searchsorted(key, b * N + start)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .engine import packed as P
from .spec import Segment

__all__ = ["SegmentTokenTrimmer", "segment_bounds"]


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
    def member(pos: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        """Segment index of each token from its original position."""
        inner = torch.tensor(bounds[1:-1], dtype=pos.dtype, device=pos.device)
        return torch.bucketize(pos, inner, right=True)

    @staticmethod
    def summary_rows(keys: torch.Tensor, batch: int, length: int, bounds: list[int]) -> torch.Tensor:
        """(B, K) row of each segment's summary, for rows sorted by ``instance * N + original position``."""
        starts = torch.tensor(bounds[:-1], dtype=keys.dtype, device=keys.device)
        want = torch.arange(batch, dtype=keys.dtype, device=keys.device)[:, None] * length + starts[None, :]
        return torch.searchsorted(keys, want.reshape(-1)).view(batch, -1)

    @staticmethod
    def contexts(cls: torch.Tensor) -> list[torch.Tensor]:
        """(B, K, D) summaries -> per segment, the mean of the others' (B, D)."""
        K = cls.shape[1]
        total = cls.sum(1)
        return [(total - cls[:, k]) / (K - 1) for k in range(K)]

    def logits(self, hidden: torch.Tensor, cls: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """Masked/remove layouts: hidden (B, n, D), cls (B, K, D), member (B, n) or (n,) -> logits (B, n)."""
        ctx = SegmentTokenTrimmer.contexts(cls)
        out = torch.stack([p(hidden, cls[:, k], ctx[k]) for k, p in enumerate(self.policies)], 0)  # (K, B, n)
        m = member.expand(hidden.shape[0], -1) if member.dim() == 1 else member
        return out.gather(0, m[None]).squeeze(0)

    def packed_logits(self, rows: torch.Tensor, pack: P.Packing, cls: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """Packed rows (R, D), cls (B, K, D), member (R,) -> logits (R,)."""
        ctx = self.contexts(cls)
        out = torch.stack([P.token_logits(p, rows, pack, cls[:, k], ctx[k]) for k, p in enumerate(self.policies)], 0)
        return out.gather(0, member[None]).squeeze(0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - called through its methods
        raise RuntimeError("SegmentTokenTrimmer is called through logits()/packed_logits() by the layer runtime")
