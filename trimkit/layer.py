"""The runtime of one trimmed layer: what happens at every forward (the graph pass that builds
these is :mod:`trimkit.rewrite`).

Where a token is dropped, per mode (one place each):

* masked (``sample``/``hard``): :meth:`TrimmedLayer._masked` takes the layer's token logits and
  :meth:`trimkit.ops.Runtime.token_step` multiplies the new mask into the stream's; attention
  (:class:`~trimkit.ops.TrimAttention` or :func:`trimkit.kernels.attend`) adds ``log(mask)`` to
  the scores, so a masked token is neither key nor value.
* ``remove`` (batch 1): :meth:`TrimmedLayer._remove` and :meth:`trimkit.ops.Runtime.remove_step`
  (one host sync) gather the kept tokens; the layer runs on fewer tokens.
* ``packed``/``padded`` (batches): :meth:`TrimmedLayer._packed` selects the kept rows of the
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
from torch.utils._pytree import tree_map

from .engine import packed as P
from .engine.packed import PackedCall
from .kernels import KernelAttention
from .ops import AttnTrim, Runtime, TokenState, TrimAttention, _rows, align
from .segments import SegmentTokenTrimmer, segment_bounds
from .spec import AttentionSpec, LayerSpec, StreamSpec
from .trace import TraceError, fixed_args, param_names, plain_codegen, trace

__all__ = ["LayerTrimmers", "PaddingProbe", "TrimmedLayer"]


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

    def __init__(self, key: str, layer: nn.Module, spec: LayerSpec, symbolic: set[str], runtime: Runtime,
                 trimmers: nn.Module, autowrap: Sequence[Callable], constants: dict[str, Any] | None = None,
                 stream: StreamSpec | None = None, tokens_only: bool = False,
                 context_stream: StreamSpec | None = None) -> None:
        super().__init__()
        self.tokens_only = tokens_only  # a token decision only (the updated stream of a two-stream layer)
        self.roles = spec.roles()  # per attention: (query stream, key stream)
        self.update_output = spec.updates[0].output if spec.updates else None
        self.segments = list(stream.segments) if stream is not None else []
        self.protected = stream.protected if stream is not None else 1  # leading tokens never dropped
        self.pooled = stream is not None and stream.summary == "mean"  # summary: mean of kept tokens, not token 0
        self.ctx_pooled = bool(context_stream is not None and context_stream.summary == "mean")
        self.segment_names = [g.name for g in self.segments]
        self.pooled_segments = [k for k, g in enumerate(self.segments) if g.summary == "mean"]
        self.key = key
        self.spec = spec
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "trimmers", trimmers)
        object.__setattr__(self, "runtime", runtime)
        self.names = param_names(layer)
        self.hidden_name = _arg_name(spec.hidden, self.names, spec.path)
        self.context_name = _arg_name(spec.context, self.names, spec.path) if spec.context is not None else None
        # per attention: the argument holding its own context (AttentionSpec.context), None: the layer's
        self.attn_context_names = [_arg_name(a.context, self.names, spec.path) if a.context is not None else None
                                   for a in spec.attentions]
        self.hidden_side = {_arg_name(k, self.names, spec.path): d for k, d in spec.hidden_token_args.items()}
        self.context_side = {_arg_name(k, self.names, spec.path): d for k, d in spec.context_token_args.items()}
        self.token_dim = 1 if spec.batch_first else 0
        self.inner = None if tokens_only else self._trace_inner(layer, symbolic, autowrap, constants or {})

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
            return KernelAttention(module, f"{self.spec.path}.{a.path}", *_call_arguments(node, module), autowrap)
        return TrimAttention(module, a)

    def forward(self, *args: Any, trimkit_hidden_state: TokenState | None = None, trimkit_context_state: TokenState | None = None,
                trimkit_context: torch.Tensor | None = None, trimkit_attn_states: list[TokenState | None] | None = None,
                trimkit_last: bool = False, trimkit_last_update: bool = False, **kwargs: Any) -> tuple:
        rt = self.runtime
        if rt.mode == "off":
            if self.tokens_only:
                return self._arguments(args, kwargs), trimkit_hidden_state
            out = self.layer(*args, **kwargs)
            return (out, trimkit_hidden_state) if self.update_output is None else (out, trimkit_hidden_state,
                                                                                   trimkit_context_state)
        a = self._arguments(args, kwargs)
        hidden = a[self.hidden_name]
        context = a[self.context_name] if self.context_name is not None else trimkit_context
        astates = list(trimkit_attn_states) if trimkit_attn_states is not None else [None] * len(self.spec.attentions)
        self._last_update = trimkit_last_update
        if self.segments and trimkit_hidden_state is None and self.spec.stream in rt.segment_padding:
            self._join_segment_padding(hidden)
        if rt.mode in ("packed", "padded"):
            out, state = self._packed(a, hidden, context, trimkit_hidden_state, trimkit_context_state, trimkit_last,
                                      astates)
        elif rt.mode == "remove":
            out, state = self._remove(a, hidden, context, trimkit_hidden_state, trimkit_context_state)
        else:
            out, state = self._masked(a, hidden, context, trimkit_hidden_state, trimkit_context_state, astates)
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

    def _cls_context(self, context: torch.Tensor | None, cstate: TokenState | None = None) -> torch.Tensor | None:
        # a context source may give hidden states (its summary is used) or one vector per instance
        if context is None or context.dim() == 2:
            return context
        if self.ctx_pooled:
            return self._pooled(context if self.spec.batch_first else context.transpose(0, 1), cstate,
                                self.spec.context_stream)
        return self._first(context)

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

    def _attn_cls(self, a: dict[str, Any], cls_ctx: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per attention, the [CLS] its head trimmer reads: its own context's, else the layer context's."""
        return [self._cls_context(a.get(name)) if name is not None else cls_ctx for name in self.attn_context_names]

    def _head_logits(self, cls_self: torch.Tensor, cls_ctxs: list[torch.Tensor | None],
                     self_ctx: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Per attention, its head trimmer's logits, from its query stream's [CLS] and, for a
        cross-attention, its keys' [CLS]. ``self_ctx``: what a self-attention's trimmer reads besides
        (the other segments' summaries, in a segmented stream)."""
        heads, spec = self.trimmers.heads, self.spec
        out = []
        for i, (att, (q, k)) in enumerate(zip(spec.attentions, self.roles)):
            if str(i) not in heads:
                out.append(None)
                continue
            if q == spec.stream:
                cls_q, other = cls_self, cls_ctxs[i] if att.kind == "cross" else self_ctx
            else:  # the updated stream's queries (a two-stream layer): its [CLS] is the layer's context [CLS]
                cls_q = self._ctx_cls
                own = self.attn_context_names[i] is not None
                other = (cls_ctxs[i] if own else cls_self) if att.kind == "cross" else None
            out.append(heads[str(i)](cls_q, other))
        return out

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

    def _masked(self, a, hidden, context, hstate, cstate, astates):
        """Modes sample/hard: masks multiply, nothing is removed."""
        rt, spec = self.runtime, self.spec
        tokens = self.trimmers.token
        cls_ctx = self._cls_context(context, cstate)
        cls_attn = self._attn_cls(a, cls_ctx)
        self_ctx = None
        seq = hidden if spec.batch_first else hidden.transpose(0, 1)
        cls_self = self._pooled(seq, hstate, spec.stream) if self.pooled else seq[:, 0]  # at the layer's input
        if self.segments:  # the original layout: each segment's summary at its start
            seq = hidden if spec.batch_first else hidden.transpose(0, 1)
            bounds = self._bounds(seq.shape[1])
            member = SegmentTokenTrimmer.member(torch.arange(seq.shape[1], device=seq.device), bounds)
            cls = self._segment_means(seq[:, bounds[:-1]], seq, member, self._weights(seq, hstate, spec.stream))
            cls_self, self_ctx = cls[:, 0], SegmentTokenTrimmer.contexts(cls)[0]
            if tokens is not None:
                logits = tokens.logits(seq, cls, member)
                hstate, hidden = rt.token_step(self.key, spec.stream, logits, hidden, hstate, self.token_dim,
                                               protected=bounds[:-1], segments=(self.segment_names, member))
        elif tokens is not None:
            seq = hidden if spec.batch_first else hidden.transpose(0, 1)
            logits = tokens(seq, cls_self, cls_ctx)
            hstate, hidden = rt.token_step(self.key, spec.stream, logits, hidden, hstate, self.token_dim,
                                           protected=None if self.protected == 1 else list(range(self.protected)))
            a[self.hidden_name] = hidden
        self._align_side(a, hstate, cstate)
        if self.tokens_only:
            return a, hstate
        self._ctx_cls = cls_ctx
        trims: list[AttnTrim] = []
        for i, (att, logits) in enumerate(zip(spec.attentions, self._head_logits(cls_self, cls_attn, self_ctx))):
            key_state = self._key_state(i, hstate, cstate, astates)
            key_mask = key_state.mask if key_state is not None else None
            trim = rt.head_step(f"{self.key}.{i}", logits) if logits is not None else AttnTrim()
            trim.key_mask = key_mask
            trims.append(trim)
        out = self._run(a, trims)
        return ((out, cstate), hstate) if self.update_output is not None else (out, hstate)

    def _remove(self, a, hidden, context, hstate, cstate):
        """Mode remove (batch 1): every decision of the layer first, one host sync, then gather."""
        rt, spec = self.runtime, self.spec
        tokens = self.trimmers.token
        cls_ctx = self._cls_context(context, cstate)
        # [CLS] is always kept: the same before and after trimming; a pooled summary is taken at the input
        cls_self = self._pooled(hidden if spec.batch_first else hidden.transpose(0, 1), hstate, spec.stream) \
            if self.pooled else self._first(hidden)
        logits = self_ctx = protected = segments = None
        seq = hidden if spec.batch_first else hidden.transpose(0, 1)
        if self.segments:
            prev = hstate.index if hstate is not None and hstate.index is not None else None
            length = hstate.length if prev is not None else seq.shape[1]
            pos = prev if prev is not None else torch.arange(seq.shape[1], device=seq.device)
            bounds = self._bounds(length)
            protected = SegmentTokenTrimmer.summary_rows(pos, 1, length, bounds)[0]  # current position of each summary
            member = SegmentTokenTrimmer.member(pos, bounds)
            cls = self._segment_means(seq.index_select(1, protected), seq, member, self._weights(seq, hstate, spec.stream))
            cls_self, self_ctx = cls[:, 0], SegmentTokenTrimmer.contexts(cls)[0]
            segments = (self.segment_names, member, bounds)
            if tokens is not None:
                logits = tokens.logits(seq, cls, member)
        elif tokens is not None:
            logits = tokens(seq, cls_self, cls_ctx)
            if self.protected != 1:  # always kept, so the stream's first tokens are the protected ones
                protected = torch.arange(self.protected, device=seq.device)
        # the contexts (the layer's, each attention's own) arrive with their dropped tokens already removed
        self._ctx_cls = cls_ctx
        head_logits = self._head_logits(cls_self, self._attn_cls(a, cls_ctx), self_ctx)
        hstate, hidden, trims = rt.remove_step(self.key, logits, head_logits, hidden, hstate, self.token_dim,
                                               protected, segments)
        a[self.hidden_name] = hidden
        self._align_side(a, hstate, cstate)
        if self.tokens_only:
            return a, hstate
        out = self._run(a, [t if t is not None else AttnTrim() for t in trims])
        return ((out, cstate), hstate) if self.update_output is not None else (out, hstate)

    def _packed_context(self, context: torch.Tensor | None, cstate: TokenState | None, stream: str, cross: bool
                        ) -> tuple[torch.Tensor | None, P.Packing | None, torch.Tensor | None]:
        """Modes packed/padded: a context the layer reads -> (its [CLS] for the trimmers, its packing and
        the tensor to hand the layer in place of it, when a cross-attention reads its tokens)."""
        rt, bf = self.runtime, self.spec.batch_first
        padded = rt.mode == "padded"
        if context is None:
            return None, None, None
        if context.dim() == 2:
            return context, None, None
        cp = cstate.packing if cstate is not None else None
        if cp is not None and not cp.padded:  # packed rows already
            crows = _rows(context, bf, cp.total, "context")
            cpack = cp
            cls_ctx = self._pooled_rows(crows, cp) if self.ctx_pooled else crows.index_select(0, cp.starts)
        else:
            cb = context if bf else context.transpose(0, 1)
            cls_ctx = cb[:, 0]
            if self.ctx_pooled:
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

    def _packed(self, a, hidden, context, hstate, cstate, last, astates):
        """Modes packed/padded: the batch's kept tokens of this stream are one row matrix (see
        :mod:`trimkit.engine.packed`). The stream is packed at its first described layer and unpacked
        after its last one (``last``, marked by the rewriter). One host sync per layer at most.

        Mode padded (the baseline packing is measured against) takes the same decisions on rows but
        hands the layer (B, max kept, D) tensors and runs attention with key-padding masks."""
        rt, spec = self.runtime, self.spec
        bf = spec.batch_first
        padded = rt.mode == "padded"
        hp = hstate.packing if hstate is not None else None
        if hstate is not None and hp is None:
            raise RuntimeError(f"layer {spec.path!r}: the stream's token state is not packed (mixed modes?)")
        if hp is not None and hp.padded and not padded:
            raise RuntimeError(f"layer {spec.path!r}: its stream was unpacked after an earlier layer")
        tokens = self.trimmers.token
        fetch: list[torch.Tensor] = []
        self_ctx = seg_cls = None
        if hp is None:  # the stream's first described layer: pack it here (padding dropped)
            hb = hidden if bf else hidden.transpose(0, 1)
            B, N = hb.shape[:2]
            real_mask, real = rt.real_tokens(spec.stream, B, N, hb.device)
            cls_self = hb[:, 0]
            if self.pooled:
                w = real_mask.to(hb.dtype) if real_mask is not None else torch.ones(B, N, dtype=hb.dtype,
                                                                                     device=hb.device)
                cls_self = (hb * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)
            if self.segments:
                bounds = self._bounds(N)
                member = SegmentTokenTrimmer.member(torch.arange(N, device=hb.device), bounds)
                real_b = real_mask.float() if real_mask is not None else torch.ones(B, N, device=hb.device)
                seg_cls = self._segment_means(hb[:, bounds[:-1]], hb, member, real_b.to(hb.dtype))
                rt.segment_real[spec.stream] = torch.stack([real_b[:, s:e].sum(1) for s, e in zip(bounds, bounds[1:])], 1)
        else:
            rows = P.repack(hidden if bf else hidden.transpose(0, 1), hp) if padded else _rows(
                hidden, bf, hp.total, "hidden states")
            cls_self = self._pooled_rows(rows, hp) if self.pooled else rows.index_select(0, hp.starts)
            if self.segments:
                bounds = self._bounds(hp.length)
                summary = SegmentTokenTrimmer.summary_rows(hp.bidx * hp.length + hp.pos, hp.batch, hp.length, bounds)
                member = SegmentTokenTrimmer.member(hp.pos, bounds)
                seg_cls = self._segment_means(rows[summary], rows, member, pack=hp)  # (B, K, D)
        if seg_cls is not None:
            cls_self, self_ctx = seg_cls[:, 0], SegmentTokenTrimmer.contexts(seg_cls)[0]
        # the contexts (the layer's, each attention's own): [CLS] for the trimmers, rows for cross-attention
        # (and for the updated stream of a two-stream layer, whose rows are queries or keys)
        layer_cross = any((att.kind == "cross" or q != spec.stream) and n is None
                          for att, n, (q, _) in zip(spec.attentions, self.attn_context_names, self.roles))
        cls_ctx, cpack, ctx_in = self._packed_context(context, cstate, spec.context_stream or "", layer_cross)
        if ctx_in is not None and self.context_name is not None:
            a[self.context_name] = ctx_in
        own: dict[str, tuple] = {}  # argument name -> (cls, packing); each argument packed once
        for att, name, st in zip(spec.attentions, self.attn_context_names, astates):
            if name is not None and name not in own:
                if name == self.context_name:
                    own[name] = (cls_ctx, cpack)
                    continue
                c_cls, c_pack, c_in = self._packed_context(a.get(name), st, att.context_stream or spec.context_stream
                                                           or "", True)
                if c_in is not None:
                    a[name] = c_in
                own[name] = (c_cls, c_pack)
        cls_attn = [own[n][0] if n is not None else cls_ctx for n in self.attn_context_names]
        # decisions
        self._ctx_cls = cls_ctx
        head_logits = self._head_logits(cls_self, cls_attn, self_ctx)
        if hp is None:
            keep = real_mask.clone() if real_mask is not None else torch.ones(B, N, dtype=torch.bool, device=hb.device)
            if tokens is not None:
                if self.key in rt.forced:
                    logits = rt.forced[self.key]
                elif self.segments:
                    logits = tokens.logits(hb, seg_cls, member)
                else:
                    logits = tokens(hb, cls_self, cls_ctx)
                rt.watch(self.key, logits)
                keep &= logits > 0
            if self.segments:
                keep[:, bounds[:-1]] = True  # every segment's summary is always kept
            else:
                keep[:, :self.protected] = True  # [CLS] (and the stream's other protected tokens) always kept
            counts_dev = keep.sum(1)
            if tokens is not None:
                fetch.append(counts_dev)
        elif tokens is not None:
            forced = rt.forced.get(self.key)
            if forced is not None:  # forced logits are given over the original tokens (B, N), as in mode hard
                logits = forced.reshape(-1).to(rows.device).index_select(0, hp.flat)
            elif self.segments:
                logits = tokens.packed_logits(rows, hp, seg_cls, member)
            else:
                logits = P.token_logits(tokens, rows, hp, cls_self, cls_ctx)
            rt.watch(self.key, logits)
            keep = logits > 0
            keep.index_fill_(0, summary.reshape(-1) if self.segments else hp.starts, True)  # summaries always kept
            if self.protected > 1:
                keep |= hp.pos < self.protected
            counts_dev = torch.zeros(hp.batch, dtype=torch.long, device=keep.device).index_add_(0, hp.bidx, keep.long())
            fetch.append(counts_dev)
        if tokens is not None and self.segments:  # kept tokens per instance and segment, in the same sync
            seg_keep = keep if hp is None else None
            if seg_keep is None:
                seg_kept = torch.zeros(hp.batch, len(self.segments), dtype=torch.long, device=keep.device)
                seg_kept.index_put_((hp.bidx, member), keep.long(), accumulate=True)
            else:
                seg_kept = torch.stack([seg_keep[:, s:e].sum(1) for s, e in zip(bounds, bounds[1:])], 1)
            fetch.append(seg_kept)
        host = P.fetch(fetch)  # the one host synchronisation of this layer (none without a token trimmer)
        if hp is None:
            counts = host[0] if host else list(real)
            rows, pack = P.pack_tokens(hb, keep, counts, counts_dev, real)
        elif tokens is not None and sum(host[0]) < hp.total:
            rows, pack = P.select_rows(rows, hp, keep, host[0], counts_dev)
        else:
            pack = hp
        if tokens is not None and self.segments:
            K = len(self.segments)
            per = [host[-1][k::K] for k in range(K)]  # host (B * K,) row-major -> per segment (B,)
            rt.packed_record_segments(self.key, spec.stream, pack, self.segment_names,
                                      SegmentTokenTrimmer.member(pack.pos, bounds), per)
        elif tokens is not None:
            rt.packed_record_tokens(self.key, pack)
        if not padded:
            a[self.hidden_name] = rows.unsqueeze(0) if bf else rows.unsqueeze(1)
        elif pack is not hp:
            pack = pack.as_padded()
            h = P.unpack(rows, pack)
            a[self.hidden_name] = h if bf else h.transpose(0, 1)
        hstate = TokenState(packing=pack)
        self._align_side(a, hstate, TokenState(packing=cpack) if cpack is not None else cstate)
        if self.tokens_only:
            return a, hstate
        trims = []
        packs = {spec.stream: pack, spec.context_stream: cpack}
        for i, (att, logits) in enumerate(zip(spec.attentions, head_logits)):
            name = self.attn_context_names[i]
            q, k = self.roles[i]
            kpack = own[name][1] if name is not None else packs.get(k)
            if kpack is None or packs.get(q) is None:
                raise RuntimeError(f"layer {spec.path!r}: attention {att.path!r} ({q} -> {k}) has no packed "
                                   f"{'queries' if packs.get(q) is None else 'keys'}")
            mask = rt.packed_head_mask(f"{self.key}.{i}", logits) if logits is not None else None
            trims.append(AttnTrim(head_mask=mask, packed=PackedCall(packs[q], kpack, rt.checks)))
        out = self._run(a, trims)
        if self.update_output is not None:  # each stream's output unpacked with its own packing after its last layer
            ustate = TokenState(packing=cpack) if cpack is not None else cstate
            if not padded and (last or self._last_update):
                out = list(out) if isinstance(out, tuple) else out
                if last:
                    out[spec.output] = _unpack_outputs(out[spec.output], pack, bf)
                    hstate = TokenState(packing=pack.as_padded())
                if self._last_update and cpack is not None:
                    out[self.update_output] = _unpack_outputs(out[self.update_output], cpack, bf)
                    ustate = TokenState(packing=cpack.as_padded())
                out = tuple(out)
            return (out, ustate), hstate
        if last and not padded:  # after the stream's last described layer: (B, max kept, D), [CLS] at 0
            out = _unpack_outputs(out, pack, bf)
            hstate = TokenState(packing=pack.as_padded())
        return out, hstate


def _unpack_outputs(out: Any, pack: P.Packing, batch_first: bool) -> Any:
    """Unpack every output tensor laid out as the layer's rows ((1, R, ...) or (R, 1, ...))."""
    bdim, tdim = (0, 1) if batch_first else (1, 0)

    def one(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[bdim] == 1 and t.shape[tdim] == pack.total:
            padded = P.unpack(t.select(bdim, 0), pack)  # (B, max, ...)
            return padded if batch_first else padded.transpose(0, 1)
        return t

    return tree_map(one, out)



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


class LayerTrimmers(nn.Module):
    """The trimmers of one layer: an optional token trimmer and head trimmers by attention index."""

    def __init__(self, token: nn.Module | None, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.token = token
        self.heads = nn.ModuleDict(heads)
