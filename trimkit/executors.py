"""One executor per mode: what a trimmed layer does at a forward, in masked, removed or packed form.

Every executor has the same interface, :meth:`Executor.run`, called by
:meth:`trimkit.layer.TrimmedLayer.forward` with the layer's arguments and the token states of the
streams it reads; it returns the layer's output and the stream's new state. The layer supplies the
mode-independent parts (its description, trimmers, summaries, argument alignment, the rewritten
inner graph); the token and head decisions of each mode are :class:`trimkit.ops.Runtime`'s.

* :class:`MaskedExecutor` (``sample``, ``hard``): masks multiply, nothing is removed.
* :class:`RemoveExecutor` (``remove``, batch 1): every decision first, one host sync, then gather
  (optionally padded to a few sizes, :mod:`trimkit.engine.buckets`, so compiled layers are reused).
* :class:`PackedExecutor` (``packed``, ``padded``): the batch's kept tokens as one row matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils._pytree import tree_map

from .engine import packed as P
from .engine.buckets import bucketed_run
from .engine.packed import PackedCall
from .ops import AttnTrim, TokenState, _rows, group_logits
from .segments import SegmentTokenTrimmer

if TYPE_CHECKING:
    from .layer import TrimmedLayer

__all__ = ["EXECUTORS", "Executor", "MaskedExecutor", "PackedExecutor", "RemoveExecutor", "unpack_outputs"]


class Executor(Protocol):
    """Runs one call of a trimmed layer in one mode."""

    def run(self, layer: "TrimmedLayer", a: dict[str, Any], hidden: torch.Tensor, context: torch.Tensor | None,
            hstate: TokenState | None, cstate: TokenState | None, astates: list[TokenState | None],
            last: bool, last_update: bool = False) -> tuple[Any, TokenState | None]:
        """``a``: the call's arguments by name (updated in place with the trimmed tensors); ``hidden``,
        ``context``: the stream's hidden states and the context's; ``hstate``/``cstate``: their token
        states; ``astates``: each attention's own context state; ``last``: this is the stream's last
        trimmed layer (``last_update``: the other stream's, in a two-stream layer). Returns (output, new
        state), or ((output, context state), new state) for a layer that updates two streams."""


class MaskedExecutor:
    """Modes ``sample`` and ``hard``."""

    def run(self, layer: "TrimmedLayer", a: dict, hidden, context, hstate, cstate, astates, last: bool,
            last_update: bool = False):
        """Modes sample/hard: masks multiply, nothing is removed."""
        rt, spec = layer.runtime, layer.spec
        tokens = layer.trimmers.token
        cls_ctx = layer._cls_context(context, cstate)
        cls_attn = layer._attn_cls(a, cls_ctx, astates)
        self_ctx = head_logits = None
        seq = hidden if spec.batch_first else hidden.transpose(0, 1)
        B, N = seq.shape[:2]
        cls_self = layer._pooled(seq, hstate, spec.stream) if layer.pooled else seq[:, 0]  # at the layer's input
        if layer.last:  # the last real token, at its original position (masks keep the layout)
            lay = layer._layout(B, N, seq.device)
            cls_self = lay.gather(seq)[:, 0]
        if layer.segments:  # the original layout: each segment's summary at its position
            lay = layer._layout(B, N, seq.device)
            member = lay.member(torch.arange(N, device=seq.device))  # (N,), or (B, N) per instance
            cls = layer._segment_means(lay.gather(seq), seq, member, layer._weights(seq, hstate, spec.stream))
            cls_self, self_ctx = cls[:, 0], SegmentTokenTrimmer.contexts(cls)[0]
            if tokens is not None:
                contexts = None
                if layer.uses_context:
                    prot = torch.zeros(B, N, dtype=torch.bool, device=seq.device).scatter_(1, lay.summary.to(seq.device),
                                                                                         True)
                    contexts = layer._contexts(seq, hstate, prot, member)
                logits = tokens.logits(seq, cls, member, contexts)
                hstate, hidden = rt.token_step(layer.key, spec.stream, logits, hidden, hstate, layer.token_dim,
                                               protected=lay.summary, segments=(layer.segment_names, member))
        elif tokens is not None:
            protected = None if layer.protected == 1 else list(range(layer.protected))
            if layer.last:
                protected = layer._protect_last(lay.summary)
            if layer.uses_context:
                prot = (torch.arange(N, device=seq.device) < layer.protected).expand(B, -1).clone()
                if layer.last:
                    prot.scatter_(1, lay.summary[:, :1].to(seq.device), True)
                logits = tokens(seq, cls_self, cls_ctx, layer._contexts(seq, hstate, prot)[0])
            else:
                logits, head_logits = layer._decide(seq, cls_self, cls_ctx, cls_attn, self_ctx, cls_ctx)
            hstate, hidden = rt.token_step(layer.key, spec.stream, logits, hidden, hstate, layer.token_dim,
                                           protected=protected, group=layer.group)
            a[layer.hidden_name] = hidden
        layer._align_side(a, hstate, cstate)
        if layer.tokens_only:
            return a, hstate
        if head_logits is None:
            head_logits = layer._head_logits(cls_self, cls_attn, self_ctx, cls_ctx)
        trims: list[AttnTrim] = []
        for i, (att, logits) in enumerate(zip(spec.attentions, head_logits)):
            key_state = layer._key_state(i, hstate, cstate, astates)
            key_mask = key_state.mask if key_state is not None else None
            trim = rt.head_step(f"{layer.key}.{i}", logits) if logits is not None else AttnTrim()
            trim.key_mask = key_mask
            trim.dropout = rt.attention_dropout
            trims.append(trim)
        out = layer._run(a, trims)
        return ((out, cstate), hstate) if layer.update_output is not None else (out, hstate)


class RemoveExecutor:
    """Mode ``remove`` (batch 1)."""

    def run(self, layer: "TrimmedLayer", a: dict, hidden, context, hstate, cstate, astates, last: bool,
            last_update: bool = False):
        """Mode remove (batch 1): every decision of the layer first, one host sync, then gather."""
        rt, spec = layer.runtime, layer.spec
        tokens = layer.trimmers.token
        if tokens is None and not len(layer.trimmers.heads):
            # a layer without trimmers (TrimConfig.token_layers / head_layers left it out): no summary, no
            # decision, no sync; it runs on the tokens the layers before it kept
            layer._align_side(a, hstate, cstate)
            if layer.tokens_only:
                return a, hstate
            return _run_removed(layer, a, hstate, cstate, astates, [AttnTrim() for _ in spec.attentions])
        cls_ctx = layer._cls_context(context, cstate)
        # [CLS] is always kept: the same before and after trimming; a pooled summary is taken at the input
        cls_self = layer._pooled(hidden if spec.batch_first else hidden.transpose(0, 1), hstate, spec.stream) \
            if layer.pooled else layer._first(hidden)
        logits = self_ctx = protected = segments = head_logits = None
        seq = hidden if spec.batch_first else hidden.transpose(0, 1)
        prev = hstate.index if hstate is not None and hstate.index is not None else None
        length = hstate.length if prev is not None else seq.shape[1]
        pos = prev if prev is not None else torch.arange(seq.shape[1], device=seq.device)  # original positions
        if layer.segments:
            lay = layer._layout(1, length, seq.device)  # batch 1: its bounds on the host
            protected = lay.rows(pos)[0]  # current position of each summary (always kept, so present)
            member = lay.member(pos)
            cls = layer._segment_means(seq.index_select(1, protected), seq, member, layer._weights(seq, hstate, spec.stream))
            cls_self, self_ctx = cls[:, 0], SegmentTokenTrimmer.contexts(cls)[0]
            segments = (layer.segment_names, member, lay.host)
            if tokens is not None:
                contexts = None
                if layer.uses_context:
                    prot = torch.zeros(1, seq.shape[1], dtype=torch.bool, device=seq.device)
                    prot[:, protected.to(seq.device)] = True
                    contexts = layer._contexts(seq, hstate, prot, member,
                                               lay.member(torch.arange(length, device=seq.device)))
                logits = tokens.logits(seq, cls, member, contexts)
        else:
            if layer.last:  # the last real token, wherever the kept tokens put it
                row = layer._layout(1, length, seq.device).rows(pos)
                cls_self = seq.index_select(1, row[0])[:, 0]
            if tokens is not None:
                if layer.last:
                    protected = layer._protect_last(row)[0]
                elif layer.protected != 1:  # always kept, so the stream's first tokens are the protected ones
                    protected = torch.arange(layer.protected, device=seq.device)
                if layer.uses_context:
                    prot = (torch.arange(seq.shape[1], device=seq.device) < layer.protected)[None].clone()
                    if layer.last:
                        prot[:, row[0].to(seq.device)] = True
                    logits = tokens(seq, cls_self, cls_ctx, layer._contexts(seq, hstate, prot)[0])
                else:
                    # the contexts (the layer's, each attention's own) arrive with their dropped tokens removed
                    logits, head_logits = layer._decide(seq, cls_self, cls_ctx, layer._attn_cls(a, cls_ctx, astates),
                                                        self_ctx, cls_ctx)
        if head_logits is None:
            head_logits = layer._head_logits(cls_self, layer._attn_cls(a, cls_ctx, astates), self_ctx, cls_ctx)
        hstate, hidden, trims = rt.remove_step(layer.key, logits, head_logits, hidden, hstate, layer.token_dim,
                                               protected, segments, stream=spec.stream, group=layer.group)
        a[layer.hidden_name] = hidden
        layer._align_side(a, hstate, cstate)
        if layer.tokens_only:
            return a, hstate
        return _run_removed(layer, a, hstate, cstate, astates, [t if t is not None else AttnTrim() for t in trims])


def _run_removed(layer: "TrimmedLayer", a: dict, hstate, cstate, astates, trims: list[AttnTrim]):
    """Mode remove: the layer's own code on its kept tokens (arguments already gathered)."""
    rt = layer.runtime
    if rt.bucketing is not None:  # the layer's own code on tensors padded to their buckets (slack cut after)
        out = bucketed_run(layer, a, hstate, cstate, astates, trims, rt.bucketing)
    else:
        out = layer._run(a, trims)
    return ((out, cstate), hstate) if layer.update_output is not None else (out, hstate)


class PackedExecutor:
    """Modes ``packed`` and ``padded``."""

    def context(self, layer: "TrimmedLayer", context: torch.Tensor | None, cstate: TokenState | None, stream: str,
                cross: bool) -> tuple[torch.Tensor | None, P.Packing | None, torch.Tensor | None]:
        """Modes packed/padded: a context the layer reads -> (its [CLS] for the trimmers, its packing and
        the tensor to hand the layer in place of it, when a cross-attention reads its tokens)."""
        rt, bf = layer.runtime, layer.spec.batch_first
        padded = rt.mode == "padded"
        if context is None:
            return None, None, None
        if context.dim() == 2:
            return context, None, None
        cp = cstate.packing if cstate is not None else None
        last = layer._summary_rule(stream) == "last" if stream else False  # its summary: its last real token
        if cp is not None and not cp.padded:  # packed rows already
            crows = _rows(context, bf, cp.total, "context")
            cpack = cp
            cls_ctx = layer._pooled_rows(crows, cp) if layer.ctx_pooled else crows.index_select(0, cp.starts)
            if last:
                lay = layer._layout(cp.batch, cp.length, crows.device, stream)
                cls_ctx = crows.index_select(0, lay.rows(cp.flat)[:, 0])
        else:
            cb = context if bf else context.transpose(0, 1)
            cls_ctx = cb[:, 0]
            if last:  # the original layout, or the unpacked one (each instance's kept tokens first)
                lay = layer._layout(cb.shape[0], cp.length if cp is not None else cb.shape[1], cb.device, stream)
                at = lay.rows(cp.flat)[:, :1] - cp.starts[:, None] if cp is not None else lay.summary[:, :1]
                cls_ctx = cb.gather(1, at[..., None].expand(-1, -1, cb.shape[-1]))[:, 0]
            elif layer.ctx_pooled:
                if cp is not None:  # unpacked layout (B, max kept, D): each instance's first counts slots
                    slots = torch.arange(cb.shape[1], device=cb.device)[None, :] < (cp.cu[1:] - cp.cu[:-1])[:, None]
                    w = slots.to(cb.dtype)
                else:
                    real, _ = rt.real_tokens(stream, cb.shape[0], cb.shape[1], cb.device)
                    w = real.to(cb.dtype) if real is not None else torch.ones(cb.shape[:2], dtype=cb.dtype,
                                                                               device=cb.device)
                cls_ctx = (cb * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)
            if not cross:
                return cls_ctx, None, None
            if cp is None:
                cpack = rt.context_packing(stream, cb)
                crows = cb.reshape(-1, *cb.shape[2:]).index_select(0, cpack.flat)
            elif padded:  # the padded engine's own layout: as it is
                return cls_ctx, cp, context
            else:
                cpack, crows = cp.as_padded(False), P.repack(cb, cp)
        if padded:
            cpack = cpack.as_padded()
            ctx_in = P.unpack(crows, cpack)
            return cls_ctx, cpack, ctx_in if bf else ctx_in.transpose(0, 1)
        return cls_ctx, cpack, crows.unsqueeze(0) if bf else crows.unsqueeze(1)

    def run(self, layer: "TrimmedLayer", a: dict, hidden, context, hstate, cstate, astates, last: bool,
            last_update: bool = False):
        """Modes packed/padded: the batch's kept tokens of this stream are one row matrix (see
        :mod:`trimkit.engine.packed`). The stream is packed at its first described layer and unpacked
        after its last one (``last``, marked by the rewriter). One host sync per layer at most.

        Mode padded (the baseline packing is measured against) takes the same decisions on rows but
        hands the layer (B, max kept, D) tensors and runs attention with key-padding masks."""
        rt, spec = layer.runtime, layer.spec
        bf = spec.batch_first
        padded = rt.mode == "padded"
        hp = hstate.packing if hstate is not None else None
        if hstate is not None and hp is None:
            raise RuntimeError(f"layer {spec.path!r}: the stream's token state is not packed (mixed modes?)")
        if hp is not None and hp.padded and not padded:
            raise RuntimeError(f"layer {spec.path!r}: its stream was unpacked after an earlier layer")
        tokens = layer.trimmers.token
        if tokens is not None and layer.uses_context:
            raise NotImplementedError(f"layer {spec.path!r}: its token policy reads a TokenContext (a training-free "
                                      f"policy such as fastv or visionzip), which mode {rt.mode!r} does not build yet; "
                                      "use tmodel.inference = 'remove' (batch 1) or 'hard'")
        fetch: list[torch.Tensor] = []
        self_ctx = seg_cls = None
        if hp is None:  # the stream's first described layer: pack it here (padding dropped)
            hb = hidden if bf else hidden.transpose(0, 1)
            B, N = hb.shape[:2]
            real_mask, real = rt.real_tokens(spec.stream, B, N, hb.device)
            if layer.group > 1 and any(n % layer.group for n in real):
                raise ValueError(f"layer {spec.path!r}: stream {spec.stream!r} drops tokens in runs of {layer.group} "
                                 f"(StreamSpec.group), but its instances have {list(real)} real tokens: pad each "
                                 "instance to whole runs")
            cls_self = hb[:, 0]
            if layer.pooled:
                w = real_mask.to(hb.dtype) if real_mask is not None else torch.ones(B, N, dtype=hb.dtype,
                                                                                     device=hb.device)
                cls_self = (hb * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)
            if layer.segments or layer.last:
                lay = layer._layout(B, N, hb.device)
                summary = lay.summary  # (B, K) original positions of the summary tokens
            if layer.last:
                cls_self = lay.gather(hb)[:, 0]
            if layer.segments:
                member = lay.member(torch.arange(N, device=hb.device))  # (N,), or (B, N) per instance
                real_b = real_mask.float() if real_mask is not None else torch.ones(B, N, device=hb.device)
                seg_cls = layer._segment_means(lay.gather(hb), hb, member, real_b.to(hb.dtype))
                rt.segment_real[spec.stream] = lay.per_segment(real_b, member)
        else:
            rows = P.repack(hidden if bf else hidden.transpose(0, 1), hp) if padded else _rows(
                hidden, bf, hp.total, "hidden states")
            cls_self = layer._pooled_rows(rows, hp) if layer.pooled else rows.index_select(0, hp.starts)
            if layer.segments or layer.last:
                lay = layer._layout(hp.batch, hp.length, rows.device)
                summary = lay.rows(hp.flat)  # (B, K) row of each summary token (always kept, so present)
            if layer.last:
                cls_self = rows.index_select(0, summary[:, 0])
            if layer.segments:
                member = lay.member(hp.pos, hp.bidx)
                seg_cls = layer._segment_means(rows[summary], rows, member, pack=hp)  # (B, K, D)
        if seg_cls is not None:
            cls_self, self_ctx = seg_cls[:, 0], SegmentTokenTrimmer.contexts(seg_cls)[0]
        # the contexts (the layer's, each attention's own): [CLS] for the trimmers, rows for cross-attention
        # (and for the updated stream of a two-stream layer, whose rows are queries or keys)
        layer_cross = any((att.kind == "cross" or q != spec.stream) and n is None
                          for att, n, (q, _) in zip(spec.attentions, layer.attn_context_names, layer.roles))
        cls_ctx, cpack, ctx_in = self.context(layer, context, cstate, spec.context_stream or "", layer_cross)
        if ctx_in is not None and layer.context_name is not None:
            a[layer.context_name] = ctx_in
        own: dict[str, tuple] = {}  # argument name -> (cls, packing); each argument packed once
        for att, name, st in zip(spec.attentions, layer.attn_context_names, astates):
            if name is not None and name not in own:
                if name == layer.context_name:
                    own[name] = (cls_ctx, cpack)
                    continue
                c_cls, c_pack, c_in = self.context(layer, a.get(name), st, att.context_stream or spec.context_stream
                                                           or "", True)
                if c_in is not None:
                    a[name] = c_in
                own[name] = (c_cls, c_pack)
        cls_attn = [own[n][0] if n is not None else cls_ctx for n in layer.attn_context_names]
        # decisions
        head_logits = layer._head_logits(cls_self, cls_attn, self_ctx, cls_ctx)
        if hp is None:
            keep = real_mask.clone() if real_mask is not None else torch.ones(B, N, dtype=torch.bool, device=hb.device)
            if tokens is not None:
                if layer.key in rt.forced:
                    logits = rt.forced[layer.key]
                elif layer.segments:
                    logits = tokens.logits(hb, seg_cls, member)
                else:
                    logits = tokens(hb, cls_self, cls_ctx)
                rt.watch(layer.key, logits)
                keep &= group_logits(logits, layer.group, f"token trimmer {layer.key!r}") > 0
            if not layer.segments:
                # [CLS] (and the stream's other protected tokens) always kept, unless they are padding: the
                # packed counts must equal the real tokens kept (an all-padding row is refused earlier)
                keep[:, :layer.protected] = real_mask[:, :layer.protected] if real_mask is not None else True
            if layer.segments or layer.last:  # every summary token is always kept (if it is a real token)
                keep.scatter_(1, summary, real_mask.gather(1, summary) if real_mask is not None
                              else torch.ones_like(summary, dtype=torch.bool))
            counts_dev = keep.sum(1)
            if tokens is not None:
                fetch.append(counts_dev)
        elif tokens is not None:
            forced = rt.forced.get(layer.key)
            if forced is not None:  # forced logits are given over the original tokens (B, N), as in mode hard
                logits = forced.reshape(-1).to(rows.device).index_select(0, hp.flat)
            elif layer.segments:
                logits = tokens.packed_logits(rows, hp, seg_cls, member)
            else:
                logits = P.token_logits(tokens, rows, hp, cls_self, cls_ctx)
            rt.watch(layer.key, logits)
            # runs stay aligned on the rows: every instance keeps whole runs, so its rows start at a multiple
            keep = group_logits(logits, layer.group, f"token trimmer {layer.key!r}") > 0
            keep.index_fill_(0, summary.reshape(-1) if layer.segments else hp.starts, True)  # summaries always kept
            if layer.last:
                keep.index_fill_(0, summary[:, 0], True)
            if layer.protected > 1:
                keep |= hp.pos < layer.protected
            counts_dev = torch.zeros(hp.batch, dtype=torch.long, device=keep.device).index_add_(0, hp.bidx, keep.long())
            fetch.append(counts_dev)
        if tokens is not None and layer.segments:  # kept tokens per instance and segment, in the same sync
            seg_keep = keep if hp is None else None
            if seg_keep is None:
                seg_kept = torch.zeros(hp.batch, len(layer.segments), dtype=torch.long, device=keep.device)
                seg_kept.index_put_((hp.bidx, member), keep.long(), accumulate=True)
            else:
                seg_kept = lay.per_segment(seg_keep.long(), member)
            fetch.append(seg_kept)
        host = P.fetch(fetch)  # the one host synchronisation of this layer (none without a token trimmer)
        if hp is None:
            counts = host[0] if host else list(real)
            rows, pack = P.pack_tokens(hb, keep, counts, counts_dev, real)
        elif tokens is not None and sum(host[0]) < hp.total:
            rows, pack = P.select_rows(rows, hp, keep, host[0], counts_dev)
        else:
            pack = hp
        if tokens is not None and layer.segments:
            K = len(layer.segments)
            per = [host[-1][k::K] for k in range(K)]  # host (B * K,) row-major -> per segment (B,)
            rt.packed_record_segments(layer.key, spec.stream, pack, layer.segment_names,
                                      lay.member(pack.pos, pack.bidx), per)
        elif tokens is not None:
            rt.packed_record_tokens(layer.key, pack)
        if not padded:
            a[layer.hidden_name] = rows.unsqueeze(0) if bf else rows.unsqueeze(1)
        elif pack is not hp:
            pack = pack.as_padded()
            h = P.unpack(rows, pack)
            a[layer.hidden_name] = h if bf else h.transpose(0, 1)
        hstate = TokenState(packing=pack)
        layer._align_side(a, hstate, TokenState(packing=cpack) if cpack is not None else cstate)
        if layer.tokens_only:
            return a, hstate
        trims = []
        packs = {spec.stream: pack, spec.context_stream: cpack}
        for i, (att, logits) in enumerate(zip(spec.attentions, head_logits)):
            name = layer.attn_context_names[i]
            q, k = layer.roles[i]
            kpack = own[name][1] if name is not None else packs.get(k)
            if kpack is None or packs.get(q) is None:
                raise RuntimeError(f"layer {spec.path!r}: attention {att.path!r} ({q} -> {k}) has no packed "
                                   f"{'queries' if packs.get(q) is None else 'keys'}")
            mask = rt.packed_head_mask(f"{layer.key}.{i}", logits) if logits is not None else None
            trims.append(AttnTrim(head_mask=mask, packed=PackedCall(packs[q], kpack, rt.checks)))
        out = layer._run(a, trims)
        if layer.update_output is not None:  # each stream's output unpacked with its own packing after its last layer
            ustate = TokenState(packing=cpack) if cpack is not None else cstate
            if not padded and (last or last_update):
                out = list(out) if isinstance(out, tuple) else out
                if last:
                    out[spec.output] = unpack_outputs(out[spec.output], pack, bf)
                    hstate = TokenState(packing=pack.as_padded())
                if last_update and cpack is not None:
                    out[layer.update_output] = unpack_outputs(out[layer.update_output], cpack, bf)
                    ustate = TokenState(packing=cpack.as_padded())
                out = tuple(out)
            return (out, ustate), hstate
        if last and not padded:  # after the stream's last described layer: (B, max kept, D), [CLS] at 0
            out = unpack_outputs(out, pack, bf)
            hstate = TokenState(packing=pack.as_padded())
        return out, hstate


_PACKED = PackedExecutor()
EXECUTORS: dict[str, Executor] = {"sample": MaskedExecutor(), "hard": MaskedExecutor(), "remove": RemoveExecutor(),
                                  "packed": _PACKED, "padded": _PACKED}
"""mode -> its executor."""


def unpack_outputs(out: Any, pack: P.Packing, batch_first: bool) -> Any:
    """Unpack every output tensor laid out as the layer's rows ((1, R, ...) or (R, 1, ...))."""
    bdim, tdim = (0, 1) if batch_first else (1, 0)

    def one(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[bdim] == 1 and t.shape[tdim] == pack.total:
            padded = P.unpack(t.select(bdim, 0), pack)  # (B, max, ...)
            return padded if batch_first else padded.transpose(0, 1)
        return t

    return tree_map(one, out)
