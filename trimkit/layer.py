"""The runtime of one trimmed layer: what happens at every forward (the graph pass that builds
these is :mod:`trimkit.rewrite`).

Where a token is dropped, per mode (one executor each, :mod:`trimkit.executors`):

* masked (``sample``/``hard``): :class:`~trimkit.executors.MaskedExecutor` takes the layer's token logits and
  :meth:`trimkit.ops.Runtime.token_step` multiplies the new mask into the stream's; attention
  (:class:`~trimkit.ops.TrimAttention` or :func:`trimkit.kernels.attend`) adds ``log(mask)`` to
  the scores, so a masked token is neither key nor value.
* ``remove`` (batch 1): :class:`~trimkit.executors.RemoveExecutor` and :meth:`trimkit.ops.Runtime.remove_step`
  (one host sync) gather the kept tokens; the layer runs on fewer tokens.
* ``packed``/``padded`` (batches): :class:`~trimkit.executors.PackedExecutor` selects the kept rows of the
  batch's row matrix (:mod:`trimkit.engine.packed`); attention runs per instance.

Tensors made at a stream's original length (masks, rotary tables) follow with
:func:`trimkit.ops.align`. Streams holding several modalities decide per segment
(:mod:`trimkit.segments`).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .engine import packed as P
from .entry import enter
from .kernels import KernelAttention
from .executors import EXECUTORS
from .ops import AttnTrim, Runtime, TokenState, TrimAttention, align
from .probe import AttentionProbe, TokenContext
from .refs import Borrowed, borrowed
from .segments import SegmentLayout, segment_bounds, segment_layout
from .spec import AttentionSpec, LayerSpec, StreamSpec
from .trace import TraceError, attribute_links, fixed_args, param_names, plain_codegen, sync_attributes, trace

__all__ = ["LayerTrimmers", "PaddingProbe", "StartsProbe", "TrimmedLayer"]


def _arg_name(ref: int | str, names: list[str], layer: str) -> str:
    if isinstance(ref, str):
        if ref not in names:
            raise ValueError(f"layer {layer!r}: argument {ref!r} is not a parameter of its forward {names}")
        return ref
    if ref >= len(names):
        raise ValueError(f"layer {layer!r}: argument index {ref} out of range for forward{tuple(names)}")
    return names[ref]


def _contains_node(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = True
        return v

    fx.node.map_arg(value, visit)
    return found


def _call_arguments(node: fx.Node, module: nn.Module) -> tuple[dict[str, Any], set[str]]:
    """A module call node's arguments by parameter name: (the constant ones, the names of the
    ones that carry graph values)."""
    call = dict(zip(param_names(module), node.args)) | dict(node.kwargs)
    symbolic = {k for k, v in call.items() if _contains_node(v)}
    return {k: v for k, v in call.items() if k not in symbolic}, symbolic


class TrimmedLayer(nn.Module):
    """One described layer, trimmed. Holds references (not copies) to the layer and its trimmers."""

    layer = borrowed("layer", "The backbone's layer (registered in the backbone).")
    trimmers = borrowed("trimmers", "This layer's :class:`LayerTrimmers` (registered in ``TrimmedModel.trimmers``).")

    def __init__(self, key: str, layer: nn.Module, spec: LayerSpec, symbolic: set[str], runtime: Runtime,
                 trimmers: nn.Module, autowrap: Sequence[Callable], constants: dict[str, Any] | None = None,
                 stream: StreamSpec | None = None, tokens_only: bool = False,
                 context_stream: StreamSpec | None = None) -> None:
        super().__init__()
        self.tokens_only = tokens_only  # a token decision only (the updated stream of a two-stream layer)
        self.constants = dict(constants or {})  # arguments fixed at the call site (the trace depends on them)
        self.roles = spec.roles()  # per attention: (query stream, key stream)
        self.update_output = spec.updates[0].output if spec.updates else None
        self.segments = list(stream.segments) if stream is not None else []
        self.protected = stream.protected if stream is not None else 1  # leading tokens never dropped
        self.group = stream.group if stream is not None else 1  # tokens kept or dropped in runs of this many
        self.pooled = stream is not None and stream.summary == "mean"  # summary: mean of kept tokens, not token 0
        # summary: the last real token (per instance, always kept), found from the stream's layout
        self.last = bool(stream is not None and not stream.segments and stream.summary == "last")
        self.stream_specs = {st.name: st for st in (stream, context_stream) if st is not None}
        self.ctx_pooled = bool(context_stream is not None and context_stream.summary == "mean")
        self.segment_names = [g.name for g in self.segments]
        self.pooled_segments = [k for k, g in enumerate(self.segments) if g.summary == "mean"]
        self.key = key
        self.spec = spec
        self._borrowed = Borrowed(layer=layer, trimmers=trimmers)  # owned by the backbone and TrimmedModel.trimmers
        self.runtime = runtime
        self.names = param_names(layer)
        self.hidden_name = _arg_name(spec.hidden, self.names, spec.path)
        self.context_name = _arg_name(spec.context, self.names, spec.path) if spec.context is not None else None
        # per attention: the argument holding its own context (AttentionSpec.context), None: the layer's
        self.attn_context_names = [_arg_name(a.context, self.names, spec.path) if a.context is not None else None
                                   for a in spec.attentions]
        self.hidden_side = {_arg_name(k, self.names, spec.path): d for k, d in spec.hidden_token_args.items()}
        self.context_side = {_arg_name(k, self.names, spec.path): d for k, d in spec.context_token_args.items()}
        # every argument at the other stream's tokens: the context's, and those of the stream a two-stream layer
        # updates (its own token step gathers them)
        self.other_side = dict(self.context_side) | {_arg_name(k, self.names, spec.path): d for u in spec.updates
                                                     for k, d in u.token_args.items()}
        # the inner graph compiled per bucket signature (TrimmedModel.compile; trimkit.engine.buckets.CompiledLayer)
        self._compiled: Any = None
        self.token_dim = 1 if spec.batch_first else 0
        # token policies that read a TokenContext (training-free ones: budgets, the previous layer's attention)
        token = trimmers.token if trimmers is not None else None
        policies = list(token.policies) if hasattr(token, "policies") else [token] if token is not None else []
        self.uses_context = any(getattr(p, "uses_context", False) for p in policies)
        # ... and of those, the ones that read the previous layer's attention (TokenContext.received)
        self.reads_attention = any(getattr(p, "uses_context", False) and getattr(p, "reads_attention", True)
                                   for p in policies)
        self.attention_probe: AttentionProbe | None = None  # set by trim() for such policies (trimkit.probe)
        self.inner = None if tokens_only else self._trace_inner(layer, symbolic, autowrap, constants or {})
        # the layer's own attribute reads (fx copies them), found once here: a forward only syncs them (and
        # builds nothing torch.compile would have to break its graph for)
        self._attr_links = attribute_links(self.inner, layer) if self.inner is not None else []
        # the modules the layer's code calls, found once: a forward hook on one keeps bucketed calls unpadded
        self._inner_modules = list(self.inner.modules()) if self.inner is not None else []

    def _trace_inner(self, layer: nn.Module, symbolic: set[str], autowrap: Sequence[Callable],
                     constants: dict[str, Any]) -> fx.GraphModule:
        """Trace the layer with its attention modules as calls and replace the call each
        :class:`AttentionSpec` describes (its ``call``-th call of its module, or every call) by trimkit's
        attention (projections recomputed, or the module itself with its kernel intercepted), which
        takes that call's :class:`~trimkit.ops.AttnTrim` from the list in the ``trimkit_attn`` input."""
        spec = self.spec
        for a in spec.attentions:
            try:
                layer.get_submodule(a.path)
            except AttributeError:
                raise ValueError(f"layer {spec.path!r}: attention module {a.path!r} does not exist") from None
        graph = trace(layer, {a.path for a in spec.attentions}, fixed_args(layer, symbolic, constants), autowrap,
                      f"layer {spec.path!r}", "LayerSpec.attentions (attention paths) or ModelSpec.autowrap_functions")
        finish = plain_codegen(graph)
        gm = fx.GraphModule(layer, graph)
        finish(gm)
        placeholders = [n for n in graph.nodes if n.op == "placeholder" and not str(n.target).startswith("*")]
        with graph.inserting_after(placeholders[-1]):
            trims = graph.placeholder("trimkit_attn", default_value=None)
        seen: dict[str, int] = {}  # module path -> calls so far
        found: set[int] = set()
        for node in list(graph.nodes):
            if node.op != "call_module" or node.target not in {a.path for a in spec.attentions}:
                continue
            nth = seen.get(node.target, 0)
            seen[node.target] = nth + 1
            hits = [i for i, a in enumerate(spec.attentions) if a.path == node.target and a.call in (None, nth)]
            if not hits:
                continue  # a call of the module no spec describes: it runs untouched
            i = hits[0]
            kernel = spec.attentions[i].via == "kernel"
            # the kernel route traces the module per call (its constant arguments may differ per call)
            name = f"trimkit_attn_{i}" + (f"_call{nth}" if kernel and nth else "")
            if not hasattr(gm, name):
                gm.add_submodule(name, self._attention(layer.get_submodule(node.target), spec.attentions[i], node,
                                                       autowrap))
            with graph.inserting_before(node):
                trim = graph.call_function(operator.getitem, (trims, i))
                # a new node, not a retargeted one: the old node's name may be a Python keyword or
                # ``self`` (an attention child named ``self`` directly under the layer)
                new = graph.call_module(name, node.args, {**node.kwargs, "trimkit_trim": trim})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            found.add(i)
        missing = [f"{a.path}" + ("" if a.call is None else f" (call {a.call})")
                   for i, a in enumerate(spec.attentions) if i not in found]
        if missing:
            raise TraceError(f"layer {spec.path!r}: attention calls {missing} do not occur in its traced forward "
                             f"(calls seen: {seen or 'none'})")
        gm.recompile()
        # parameter name -> the placeholder it became (fx renames some, e.g. an argument fixed at the call site)
        named = [n for n in graph.nodes if n.op == "placeholder" and not str(n.target).startswith("*")
                 and n.target != "trimkit_attn"]
        if len(named) != len(self.names):
            raise TraceError(f"layer {spec.path!r}: cannot match its parameters {self.names} to the trace's inputs "
                             f"{[n.target for n in named]}")
        self.inner_inputs = {p: n.target for p, n in zip(self.names, named)}
        return gm

    def _attention(self, module: nn.Module, a: AttentionSpec, node: fx.Node, autowrap: Sequence[Callable]) -> nn.Module:
        if a.via == "kernel":
            return KernelAttention(module, f"{self.spec.path}.{a.path}", *_call_arguments(node, module), autowrap, a)
        return TrimAttention(module, a)

    def forward(self, *args: Any, trimkit_hidden_state: TokenState | None = None, trimkit_context_state: TokenState | None = None,
                trimkit_context: torch.Tensor | None = None, trimkit_attn_states: list[TokenState | None] | None = None,
                trimkit_last: bool = False, trimkit_last_update: bool = False,
                trimkit_entry_states: list[TokenState | None] | None = None, **kwargs: Any) -> tuple:
        rt = self.runtime
        if rt.mode == "off":
            if self.tokens_only:
                return self._arguments(args, kwargs), trimkit_hidden_state
            out = self.layer(*args, **kwargs)
            return (out, trimkit_hidden_state) if self.update_output is None else (out, trimkit_hidden_state,
                                                                                   trimkit_context_state)
        links = self._attr_links  # the layer's own attribute reads (fx copies) follow its current tensors
        if links:
            sync_attributes(links)
        a = self._arguments(args, kwargs)
        hidden = a[self.hidden_name]
        context = a[self.context_name] if self.context_name is not None else trimkit_context
        astates = list(trimkit_attn_states) if trimkit_attn_states is not None else [None] * len(self.spec.attentions)
        if self.segments and trimkit_hidden_state is None and self.spec.stream in rt.segment_padding:
            self._join_segment_padding(hidden)
        if trimkit_entry_states is not None and trimkit_hidden_state is None:
            # segments whose tokens are another stream's (TokensFrom): they start as that stream left them
            hidden, trimkit_hidden_state = enter(self, hidden, trimkit_entry_states)
            a[self.hidden_name] = hidden
        out, state = EXECUTORS[rt.mode].run(self, a, hidden, context, trimkit_hidden_state, trimkit_context_state,
                                            astates, trimkit_last, trimkit_last_update)
        rt.streams[self.spec.stream] = state  # what TrimmedModel.kept_mask reports
        if self.update_output is not None:
            out, ustate = out
            rt.streams[self.spec.context_stream] = ustate
            return out, state, ustate
        return out, state

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by parameter name (the rewritten graph always calls with the traced
        signature, so no per-call ``inspect`` binding)."""
        if len(args) > len(self.names):
            raise TypeError(f"layer {self.spec.path!r} got {len(args)} positional arguments; its forward takes "
                            f"{self.names}")
        a = dict(zip(self.names, args))
        a.update(kwargs)
        return a

    def _first(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] if self.spec.batch_first else t[0]

    def _cls_context(self, context: torch.Tensor | None, cstate: TokenState | None = None,
                     stream: str | None = None) -> torch.Tensor | None:
        # a context source may give hidden states (its summary is used) or one vector per instance
        if context is None or context.dim() == 2:
            return context
        stream = stream or self.spec.context_stream
        if stream is not None and self._summary_rule(stream) == "last":
            return self._last_of(context if self.spec.batch_first else context.transpose(0, 1), cstate, stream)
        if self.ctx_pooled:
            return self._pooled(context if self.spec.batch_first else context.transpose(0, 1), cstate,
                                self.spec.context_stream)
        return self._first(context)

    def _summary_rule(self, stream: str) -> str:
        """What a stream's summary is ("first", "mean", "last"); a segmented stream's is its first token."""
        st = self.runtime.specs.get(stream) or self.stream_specs.get(stream)
        return "first" if st is None or st.segments else st.summary

    def _layout(self, batch: int, length: int, device: torch.device, stream: str | None = None) -> SegmentLayout:
        """The stream's :class:`~trimkit.segments.SegmentLayout` in this forward (made once, at its first use)."""
        rt, name = self.runtime, stream or self.spec.stream
        lay = rt.layouts.get(name)
        if lay is None or lay.batch != batch or lay.length != length:
            st = rt.specs.get(name) or self.stream_specs[name]
            lay = rt.layouts[name] = segment_layout(st, rt, batch, length, device)
        return lay

    def _last_of(self, seq: torch.Tensor, state: TokenState | None, stream: str) -> torch.Tensor:
        """Masked/remove layouts: a ``summary="last"`` stream's last real token (B, N, D) -> (B, D)."""
        B, n = seq.shape[:2]
        removed = state is not None and state.index is not None
        lay = self._layout(B, state.length if removed else n, seq.device, stream)
        row = lay.rows(state.index.to(seq.device)) if removed else lay.summary
        return seq.gather(1, row[:, :1, None].to(seq.device).expand(-1, -1, seq.shape[-1]))[:, 0]

    def _protect_last(self, rows: torch.Tensor) -> torch.Tensor:
        """The always-kept tokens of a ``summary="last"`` stream: its protected leading tokens and, per
        instance, the row of its last real token ``rows`` (B, 1) -> (B, protected + 1)."""
        lead = torch.arange(self.protected, dtype=rows.dtype, device=rows.device).expand(rows.shape[0], -1)
        return torch.cat([lead, rows], 1)

    def _pooled(self, seq: torch.Tensor, state: TokenState | None, stream: str | None) -> torch.Tensor:
        """Masked/remove layouts: the mean of a stream's kept real tokens (B, N, D) -> (B, D)."""
        w = self._weights(seq, state, stream)
        return (seq * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)

    def _weights(self, seq: torch.Tensor, state: TokenState | None, stream: str | None) -> torch.Tensor:
        """Masked/remove layouts: (B, N) weight of each token present: its mask times its padding flag."""
        B, N = seq.shape[:2]
        w = torch.ones(B, N, dtype=seq.dtype, device=seq.device)
        pad = self.runtime.padding.get(stream) if stream else None
        if state is not None and state.mask is not None:
            w = w * state.mask.to(seq.dtype)
        if pad is not None:
            if state is not None and state.index is not None and pad.shape[-1] == state.length:
                pad = pad.index_select(1, state.index.to(pad.device))
            if pad.shape == (B, N):
                w = w * pad.to(device=seq.device, dtype=seq.dtype)
        return w

    def _segment_means(self, cls: torch.Tensor, values: torch.Tensor, member: torch.Tensor,
                       weights: torch.Tensor | None = None, pack: P.Packing | None = None) -> torch.Tensor:
        """Replace the summary of each ``Segment(summary="mean")`` in ``cls`` (B, K, D) by the mean of
        that segment's kept real tokens: ``values`` (B, N, D) with ``weights`` (B, N), or packed rows
        (R, D) with their ``pack``."""
        if not self.pooled_segments:
            return cls
        cls = cls.clone()
        for k in self.pooled_segments:
            if pack is None:
                wk = weights * (member == k).to(weights.dtype)
                cls[:, k] = (values * wk[..., None]).sum(1) / wk.sum(1, keepdim=True).clamp_min(1e-6)
            else:
                wk = (member == k).to(values.dtype)
                total = values.new_zeros(pack.batch, values.shape[-1]).index_add_(0, pack.bidx, values * wk[:, None])
                count = values.new_zeros(pack.batch).index_add_(0, pack.bidx, wk)
                cls[:, k] = total / count.clamp_min(1e-6)[:, None]
        return cls

    @staticmethod
    def _pooled_rows(rows: torch.Tensor, pack: P.Packing) -> torch.Tensor:
        """Packed rows (R, D) -> the mean of each instance's rows (B, D)."""
        total = rows.new_zeros(pack.batch, *rows.shape[1:]).index_add_(0, pack.bidx, rows)
        counts = (pack.cu[1:] - pack.cu[:-1]).to(rows.dtype).clamp_min(1)
        return total / counts.view(-1, *([1] * (rows.dim() - 1)))

    def _attn_cls(self, a: dict[str, Any], cls_ctx: torch.Tensor | None,
                  astates: list[TokenState | None] | None = None) -> list[torch.Tensor | None]:
        """Per attention, the [CLS] its head trimmer reads: its own context's, else the layer context's."""
        states = astates or [None] * len(self.attn_context_names)
        out = []
        for name, st, att in zip(self.attn_context_names, states, self.spec.attentions):
            if name is None:
                out.append(cls_ctx)
                continue
            stream = att.context_stream or self.spec.context_stream
            # the state locates a last-token summary among the kept tokens (a mean reads the padding only)
            last = stream is not None and self._summary_rule(stream) == "last"
            out.append(self._cls_context(a.get(name), st if last else None, stream))
        return out

    def _head_inputs(self, cls_self: torch.Tensor, cls_ctxs: list[torch.Tensor | None],
                     self_ctx: torch.Tensor | None = None,
                     ctx_cls: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per attention with a head trimmer (by index, as a string): what its trimmer reads, (its query
        stream's [CLS], for a cross-attention its keys' [CLS]). ``self_ctx``: what a self-attention's
        trimmer reads besides (the other segments' summaries, in a segmented stream). ``ctx_cls``: the
        layer context's [CLS], the queries' summary for the other stream of a two-stream layer."""
        heads, spec = self.trimmers.heads, self.spec
        out = {}
        for i, (att, (q, k)) in enumerate(zip(spec.attentions, self.roles)):
            if str(i) not in heads:
                continue
            if q == spec.stream:
                cls_q, other = cls_self, cls_ctxs[i] if att.kind == "cross" else self_ctx
            else:  # the updated stream's queries (a two-stream layer): its [CLS] is the layer's context [CLS]
                cls_q = ctx_cls
                own = self.attn_context_names[i] is not None
                other = (cls_ctxs[i] if own else cls_self) if att.kind == "cross" else None
            out[str(i)] = (cls_q, other)
        return out

    def _head_logits(self, cls_self: torch.Tensor, cls_ctxs: list[torch.Tensor | None],
                     self_ctx: torch.Tensor | None = None, ctx_cls: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Per attention, its head trimmer's logits (None without one), from :meth:`_head_inputs`."""
        inputs = self._head_inputs(cls_self, cls_ctxs, self_ctx, ctx_cls)
        heads = self.trimmers.heads
        return [heads[str(i)](*inputs[str(i)]) if str(i) in inputs else None for i in range(len(self.spec.attentions))]

    def _decide(self, seq: torch.Tensor, cls_self: torch.Tensor, cls_ctx: torch.Tensor | None,
                cls_ctxs: list[torch.Tensor | None], self_ctx: torch.Tensor | None = None,
                ctx_cls: torch.Tensor | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """The layer's token logits (B, N) (None without a token trimmer) and per attention its head
        logits: the policies' fused inference form when they offer one and no gradient is needed
        (:meth:`LayerTrimmers.fused`), else each policy called."""
        inputs = self._head_inputs(cls_self, cls_ctxs, self_ctx, ctx_cls)
        tokens = self.trimmers.token
        fused = self.trimmers.fused() if self.runtime.fuse_trimmers and tokens is not None else None
        out = fused(seq, cls_self, cls_ctx, inputs) if fused is not None else None
        if out is None:
            heads = self.trimmers.heads
            logits = tokens(seq, cls_self, cls_ctx) if tokens is not None else None
            head = {k: heads[k](*v) for k, v in inputs.items()}
        else:
            logits, head = out
        return logits, [head.get(str(i)) for i in range(len(self.spec.attentions))]

    def _key_state(self, i: int, hstate: TokenState | None, cstate: TokenState | None,
                   astates: list[TokenState | None]) -> TokenState | None:
        """The token state of attention ``i``'s keys/values."""
        if self.attn_context_names[i] is not None:
            return astates[i]
        return hstate if self.roles[i][1] == self.spec.stream else cstate

    def _join_segment_padding(self, hidden: torch.Tensor) -> None:
        """The stream's (B, N) padding mask from its segments' own masks (Segment.padding_input)."""
        rt, stream = self.runtime, self.spec.stream
        masks = rt.segment_padding.pop(stream)
        seq = hidden if self.spec.batch_first else hidden.transpose(0, 1)
        B, N = seq.shape[:2]
        bounds = self._bounds(N)
        parts = []
        for g, m, s, e in zip(self.segments, masks, bounds, bounds[1:]):
            if m is None:
                parts.append(torch.ones(B, e - s, dtype=torch.long, device=seq.device))
                continue
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != (B, e - s):
                raise ValueError(f"stream {stream!r}: Segment({g.name!r}).padding_input {g.padding_input!r} has shape "
                                 f"{tuple(getattr(m, 'shape', ()))}, but the segment holds {e - s} tokens per instance "
                                 f"(batch {B}): it must be the segment's (B, {e - s}) mask")
            parts.append(m.to(device=seq.device, dtype=torch.long))
        rt.padding[stream] = torch.cat(parts, 1)
        if rt.mode in ("packed", "padded"):  # real tokens per instance (one host sync, at the stream's first layer)
            rt.real[stream] = P.fetch([rt.padding[stream].sum(-1)])[0]

    def _contexts(self, seq: torch.Tensor, state: TokenState | None, protected: torch.Tensor,
                  member: torch.Tensor | None = None, member_orig: torch.Tensor | None = None) -> list[TokenContext]:
        """Masked/remove layouts: the :class:`~trimkit.probe.TokenContext` of each token policy of this
        layer (one per segment, or one), for ``seq`` (B, n, D). ``protected`` (B, n) bool: the tokens the
        core always keeps; ``member``: each token's segment ((n,) or (B, n)) and ``member_orig`` the same
        at the stream's original positions (mode remove)."""
        rt, stream = self.runtime, self.spec.stream
        B, n = seq.shape[:2]
        dev = seq.device
        removed = state is not None and state.index is not None
        length = state.length if removed else n
        pad = rt.padding.get(stream)
        real0 = (pad.to(dev) != 0) if isinstance(pad, torch.Tensor) and tuple(pad.shape) == (B, length) \
            else torch.ones(B, length, dtype=torch.bool, device=dev)
        real = real0.index_select(1, state.index.to(dev)) if removed else real0
        # dropped by an earlier layer: mask 0 (hard) or below 0.5 (a sampled soft mask is never exactly 0; its
        # decision is the hard one, as inference takes it)
        present = real if removed or state is None or state.mask is None else real & (state.mask.to(dev) > 0.5)
        rows = torch.arange(n, device=dev)
        # the last token still present (remove mode holds only those): the same row in every mode
        last = torch.where(present, rows, torch.full_like(rows, -1)).amax(1).clamp_min(0)
        names = self.segment_names or [None]
        cur = (member if member is not None else torch.zeros(n, dtype=torch.long, device=dev)).to(dev)
        orig = (member_orig if member_orig is not None else cur if not removed
                else torch.zeros(length, dtype=torch.long, device=dev)).to(dev)
        cur, orig = cur.expand(B, -1), orig.expand(B, -1)
        out = []
        for k, name in enumerate(names):
            key = self.key if name is None else f"{self.key}:{name}"
            mine = cur == k
            out.append(TokenContext(key, float(rt.targets.get(key, 1.0)), present & mine, protected & present & mine,
                                    (real0 & (orig == k)).sum(1), last, self.attention_probe))
        return out

    def _bounds(self, length: int) -> list[int]:
        return segment_bounds(self.segments, self.runtime.sizes, length, self.spec.stream)

    def _align_side(self, a: dict[str, Any], hstate: TokenState | None, cstate: TokenState | None) -> None:
        for name, dim in self.hidden_side.items():
            if name in a:
                a[name] = align(a[name], hstate, dim)
        for name, dim in self.context_side.items():
            if name in a:
                a[name] = align(a[name], cstate, dim)

    def _run(self, a: dict[str, Any], trims: list[AttnTrim]) -> Any:
        """The layer's own code (its rewritten inner graph) on the call's arguments."""
        names = self.inner_inputs
        try:
            return self.inner(**{names[k]: v for k, v in a.items() if k in names}, trimkit_attn=trims)
        except RuntimeError as err:
            msg = str(err)
            if type(err) is not RuntimeError or "trimkit" in msg or ("size" not in msg and "shape" not in msg):
                raise  # only torch's own shape errors get the hint
            raise RuntimeError(
                f"layer {self.spec.path!r} failed after trimming ({self.runtime.mode} mode): {err}. A size mismatch here "
                "usually means a tensor with a token dimension the description does not declare (LayerSpec."
                "hidden_token_args / context_token_args / StreamUpdate.token_args), or an attention module called "
                "more than once in different roles but described once (give each call an AttentionSpec with its "
                "call index and query_stream); print(tmodel.plan) shows what trimkit assumed") from err

class PaddingProbe(nn.Module):
    """Records a stream's padding mask (B, N), 1 = real token, where the model makes it."""

    def __init__(self, runtime: Runtime, stream: str, where: str) -> None:
        super().__init__()
        self.runtime, self.stream, self.where = runtime, stream, where

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise RuntimeError(f"StreamSpec({self.stream!r}).padding_source {self.where!r} gave "
                               f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}, expected a (B, N) mask "
                               "with 1 for real tokens")
        rt.padding[self.stream] = mask
        if rt.mode in ("packed", "padded"):  # real tokens per instance, one host sync where the mask is made
            rt.real[self.stream] = P.fetch([(mask != 0).sum(-1)])[0]
        return mask


class StartsProbe(nn.Module):
    """Records a segmented stream's per-instance segment starts (B, K) where the model has them
    (``StreamSpec.segment_starts``: a forward input, or a module's output)."""

    def __init__(self, runtime: Runtime, stream: StreamSpec, where: str) -> None:
        super().__init__()
        self.runtime, self.stream, self.where = runtime, stream.name, where
        self.names = [g.name for g in stream.segments]

    def forward(self, starts: Any) -> Any:
        K = len(self.names)
        what = f"stream {self.stream!r}: StreamSpec.segment_starts {self.where}"
        if starts is None:
            raise ValueError(f"{what} was not given (None): pass the (B, {K}) start of each segment {self.names} "
                             "per instance")
        if (not isinstance(starts, torch.Tensor) or starts.dim() != 2 or starts.shape[1] != K
                or starts.dtype == torch.bool or starts.is_floating_point() or starts.is_complex()):
            got = (f"{starts.dtype} {tuple(starts.shape)}" if isinstance(starts, torch.Tensor)
                   else type(starts).__name__)
            raise ValueError(f"{what} gave {got}, expected a (B, {K}) integer tensor: the original start of each "
                             f"segment {self.names} in each instance (column 0 is 0)")
        self.runtime.segment_starts[self.stream] = starts
        return starts


class LayerTrimmers(nn.Module):
    """The trimmers of one layer: an optional token trimmer and head trimmers by attention index."""

    def __init__(self, token: nn.Module | None, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.token = token
        self.heads = nn.ModuleDict(heads)
        self._fused: tuple[tuple, Any] | None = None  # (weights stamp, the fused form), see fused()
        self._fused_params: list[nn.Parameter] | None = None  # found on first use (fused())
        self._policy_modules: list[nn.Module] | None = None  # found on first use (_hooked())

    def fused(self) -> Callable | None:
        """The fused inference form of this layer's trimmers, or None (then each policy is called).

        A token policy may offer one: a method ``fuse(heads)`` taking this layer's head policies (a
        dict by attention index) and returning a callable ``(hidden, cls_self, cls_context,
        head_inputs) -> (token_logits, head_logits by index)`` (or None from the call, for inputs it
        does not cover) that computes the same logits with fewer operators, from the weights as they
        are (see :class:`trimkit_smarttrim.policies.FusedTrimmers`). It is used only when no gradient
        is needed (it holds derived copies of the weights) and no forward hook watches a policy (the
        policies run then, so that it fires), and rebuilt when a weight changes: an
        in-place update (optimizer step, ``load_state_dict``) bumps a version counter, ``.to()`` moves
        the storage; :meth:`trimkit.TrimmedModel.clear_caches` drops it after writes through
        ``.data`` or a replaced parameter."""
        if torch.is_grad_enabled():
            return None
        fuse = getattr(self.token, "fuse", None)
        if fuse is None or self._hooked():
            return None
        params = self._fused_params
        if params is None:
            params = self._fused_params = list(self.parameters())
        first = params[0] if params else None
        try:
            stamp = (first.data_ptr() if first is not None else 0, first.dtype if first is not None else None,
                     [p._version for p in params])
        except RuntimeError:  # inference tensors (made under torch.inference_mode) keep no version counter
            stamp = tuple(p.data_ptr() for p in params)
        cached = self._fused
        if cached is not None and cached[0] == stamp:
            return cached[1]
        form = fuse({k: v for k, v in self.heads.items()})
        self._fused = (stamp, form)
        return form

    def _hooked(self) -> bool:
        """Whether a forward hook watches a policy (then the policies run, so that it fires)."""
        from torch.nn.modules import module as M

        if M._global_forward_hooks or M._global_forward_pre_hooks:
            return True
        mods = self._policy_modules
        if mods is None:
            mods = self._policy_modules = [m for p in (self.token, *self.heads.values()) if p is not None
                                                       for m in p.modules()]
        return any(m._forward_hooks or m._forward_pre_hooks for m in mods)

    def clear_cache(self) -> None:
        """Drop the fused form (rebuilt at the next inference forward)."""
        self._fused = None
        self._fused_params = self._policy_modules = None
