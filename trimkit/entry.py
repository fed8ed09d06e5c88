"""Tokens that enter a stream from another stream (:class:`~trimkit.spec.TokensFrom`).

A decoder VLM runs its vision tower, projects the tower's tokens and writes them into the
language model's sequence at the image placeholders. When the tower is trimmed, a token it dropped
must start dropped in the LM's image segment too, in every mode, or the masked model (which still
carries the dropped token's state) and the physically trimmed one (which does not have it) would
compute different functions. Two pieces do that:

* :func:`restore_tokens`, called by the model (its wrapper) where the tokens leave their stream:
  in modes ``remove`` and ``packed`` the stream's output holds only its kept tokens, so they are
  put back at their original places (zeros where a token was dropped) and the model's own code
  (``masked_scatter`` into the placeholders) sees the shape it expects. Identity in the masked
  modes and outside trimkit.
* :func:`enter`, run by the receiving stream's first layer: the segment's tokens get the source
  stream's final keep state (mask, kept index or packing), so they are masked out, or removed
  before the layer runs, exactly where the source dropped them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .engine import packed as P
from .ops import TokenState

if TYPE_CHECKING:
    from .layer import TrimmedLayer

__all__ = ["enter", "restore_tokens"]


def restore_tokens(x: torch.Tensor, stream: str, skip: int = 0, *, trimkit_state: TokenState | None = None,
                   trimkit_group: int = 1) -> torch.Tensor:
    """Put a stream's kept tokens back at their original positions, for a model that writes them
    into another sequence (declare that segment with :class:`~trimkit.spec.TokensFrom`).

    ``x``: (B, n, ...) the stream's output after any per-token ops (a projector) and after dropping
    its first ``skip`` positions (a [CLS] crop). Returns (B, N - skip, ...) where N is the stream's
    original length: in modes ``remove`` and ``packed``, each kept token at its position and zeros
    where one was dropped; in the masked modes, and when the model runs outside trimkit, ``x``
    itself. For a stream that drops tokens in runs (:attr:`~trimkit.spec.StreamSpec.group`) merged
    one token per run before this call, ``x`` holds one token per kept run and the result one per
    run, (B, (N - skip) / group, ...). ``trimkit_state`` and ``trimkit_group`` are filled in by
    trimkit's rewrite (the stream's token state where the call happens, its run length); models
    never pass them. The call is recorded as one node when traced.
    """
    if isinstance(x, fx.Proxy):  # traced: one node, whatever name the model imported it under
        return x.tracer.create_proxy("call_function", restore_tokens, (x, stream, skip), {})
    state = trimkit_state
    if state is None or (state.index is None and state.packing is None):
        return x
    g = trimkit_group
    runs = f" in runs of {g} (one token per run)" if g > 1 else ""
    if state.packing is not None:
        return _restore_packed(x, state.packing, stream, skip, g)
    index = state.index.to(x.device)
    index = index[index >= skip] - skip
    if g > 1:  # each kept run is one token of x, at its run's place
        index = index[index % g == 0] // g
    if x.shape[0] != 1 or x.shape[1] != index.numel():
        raise ValueError(f"trimkit.restore_tokens({stream!r}, skip={skip}): got {tuple(x.shape)}, expected (1, "
                         f"{index.numel()}, ...): the stream's kept tokens from position {skip} on{runs} (mode "
                         "remove, batch 1); call it on the stream's output after dropping its first `skip` positions")
    out = x.new_zeros((1, (state.length - skip) // g, *x.shape[2:]))
    return out.index_copy_(1, index, x)


def _restore_packed(x: torch.Tensor, pack: P.Packing, stream: str, skip: int, g: int = 1) -> torch.Tensor:
    """Modes packed/padded, after the stream's last layer: ``x`` (B, (max kept - lead) / g, ...) holds
    each instance's kept tokens (or runs of ``g``, merged) first (``lead`` of them before position
    ``skip``, cropped by the model)."""
    lead = (pack.pos < skip).long()
    n_lead = torch.zeros(pack.batch, dtype=torch.long, device=lead.device).index_add_(0, pack.bidx, lead)
    # every instance keeps its first `skip` tokens (the source's protected prefix), so the cropped
    # rows are exactly `skip` shorter than the longest kept row; any other width is a model that
    # cropped differently (or not at all) and would put every token at its neighbour's place
    if x.shape[0] != pack.batch or x.shape[1] != (pack.max - skip) // g:
        runs = f", one token per run of {g}" if g > 1 else ""
        raise ValueError(f"trimkit.restore_tokens({stream!r}, skip={skip}): got {tuple(x.shape)}, expected ("
                         f"{pack.batch}, {(pack.max - skip) // g}, ...): the stream's unpacked output (each instance's "
                         f"kept tokens first{runs}) after dropping its first {skip} positions")
    keep = pack.pos >= skip
    if g > 1:  # a run's first token stands for the run
        keep = keep & ((pack.pos - skip) % g == 0)
    slot = torch.arange(pack.total, device=lead.device) - pack.cu[:-1].long().index_select(0, pack.bidx)
    slot = slot - n_lead.index_select(0, pack.bidx)
    b, pos, slot = pack.bidx[keep], (pack.pos[keep] - skip) // g, slot[keep] // g
    out = x.new_zeros((pack.batch, (pack.length - skip) // g, *x.shape[2:]))
    out[b.to(x.device), pos.to(x.device)] = x[b.to(x.device), slot.to(x.device)]
    return out


def enter(layer: "TrimmedLayer", hidden: torch.Tensor, sources: list[TokenState | None]) -> tuple[torch.Tensor, TokenState | None]:
    """The first layer of a stream with :class:`~trimkit.spec.TokensFrom` segments: its input
    ``hidden`` (at the stream's original length) and the initial token state in which each such
    segment's tokens are kept where its source stream kept them (``sources``: that stream's state,
    per segment in order). Mode masked: a (B, N) mask; remove: the kept index (and ``hidden``
    gathered to it); packed: the packing (and ``hidden`` as its rows). ``None`` state: nothing dropped."""
    rt, spec = layer.runtime, layer.spec
    if not spec.batch_first:
        raise NotImplementedError(f"layer {spec.path!r}: tokens entering from another stream (TokensFrom) need "
                                  "batch-first hidden states")
    B, N = hidden.shape[:2]
    stream = layer.stream_specs[spec.stream]
    entering = [(k, g.tokens_from) for k, g in enumerate(stream.segments) if g.tokens_from is not None]
    pairs = [(k, src, st) for (k, src), st in zip(entering, sources)]
    pairs = [(k, src, st) for k, src, st in pairs if st is not None and (
        st.mask is not None or st.index is not None or st.packing is not None)]
    if not pairs:
        return hidden, None
    lay = layer._layout(B, N, hidden.device)
    name = stream.name
    seg_names = [g.name for g in stream.segments]

    def run(src) -> int:  # the source's run length: one segment token per run of its tokens
        st = rt.specs.get(src.stream)
        return st.group if st is not None else 1

    def per(src, g: int) -> str:
        return f" in runs of {g} (one segment token per run)" if g > 1 else ""

    if rt.mode == "remove":
        bounds = lay.host if lay.host is not None else P.fetch([lay.bounds[0]])[0]
        parts, at = [], 0
        for k, src, st in pairs:
            start, end = bounds[k], bounds[k + 1]
            if st.index is None:
                continue
            g = run(src)
            if end - start != (st.length - src.skip) // g:
                raise ValueError(f"stream {name!r}: segment {seg_names[k]!r} has {end - start} tokens, but it takes "
                                 f"them from stream {src.stream!r}, which has {st.length - src.skip} from position "
                                 f"{src.skip}{per(src, g)} (Segment.tokens_from)")
            idx = st.index.to(hidden.device)
            idx = idx[idx >= src.skip] - src.skip
            if g > 1:
                idx = idx[idx % g == 0] // g
            parts += [torch.arange(at, start, device=hidden.device), idx + start]
            at = end
        if not parts:
            return hidden, None
        parts.append(torch.arange(at, N, device=hidden.device))
        index = torch.cat(parts)
        return hidden.index_select(1, index), TokenState(index=index, length=N)
    pos = torch.arange(N, device=hidden.device)
    member = lay.member(pos)
    member = member.expand(B, -1) if member.dim() == 1 else member
    keep = torch.ones(B, N, dtype=torch.float32 if rt.mode in ("sample", "hard") else torch.bool, device=hidden.device)
    for k, src, st in pairs:
        if st.packing is not None:
            sp = st.packing
            src_keep = torch.zeros(sp.batch * sp.length, dtype=torch.bool, device=hidden.device)
            src_keep[(sp.bidx.long() * sp.length + sp.pos.long()).to(hidden.device)] = True
            src_keep, ns = src_keep.view(sp.batch, sp.length), sp.length
        elif st.mask is not None:
            src_keep, ns = st.mask.to(hidden.device), st.mask.shape[1]
        else:
            continue
        g = run(src)
        lengths = lay.bounds[:, k + 1] - lay.bounds[:, k]
        src_pad = rt.padding.get(src.stream)  # a padded source: each instance's own real tokens
        n_src = (src_pad.to(lengths.device) != 0).sum(1) if src_pad is not None and src_pad.shape[1] == ns \
            else torch.full_like(lengths, ns)
        want = (n_src - src.skip) // g
        rt.defer(f"stream {name!r}: segment {seg_names[k]!r} must have as many tokens as stream {src.stream!r} has "
                 f"real tokens from position {src.skip}{per(src, g)} (Segment.tokens_from); segment lengths",
                 (lengths != want).any(), lengths)
        j = ((pos[None, :] - lay.bounds[:, k:k + 1]) * g + src.skip).clamp(0, ns - 1)
        keep = torch.where(member == k, src_keep.to(keep.dtype).gather(1, j), keep)
    if rt.mode in ("sample", "hard"):
        return hidden, TokenState(mask=keep.to(hidden.dtype))
    # packed / padded: the stream is packed here, its real tokens that the sources kept
    real_mask, real = rt.real_tokens(name, B, N, hidden.device)
    if real_mask is not None:
        keep &= real_mask
    counts_dev = keep.sum(1)
    counts = P.fetch([counts_dev])[0]
    rows, pack = P.pack_tokens(hidden, keep, counts, counts_dev, real)
    real_b = real_mask.to(hidden.dtype) if real_mask is not None else torch.ones(B, N, dtype=hidden.dtype,
                                                                                  device=hidden.device)
    rt.segment_real[name] = lay.per_segment(real_b, member)  # kept fractions stay over the original counts
    if rt.mode == "padded":
        pack = pack.as_padded()
        return P.unpack(rows, pack), TokenState(packing=pack)
    return rows.unsqueeze(0), TokenState(packing=pack)
