"""The graph pass: trace the model once and rewrite its fx graph around the described layers.

1. The model is traced with every described layer (and the adapter's other leaves) kept as one
   call. Each layer call is replaced by a call of :class:`~trimkit.layer.TrimmedLayer` (the
   runtime, :mod:`trimkit.layer`), which also receives the :class:`~trimkit.ops.TokenState` of the
   stream's hidden states and of the context stream's (and of each cross-attention's own context),
   and returns ``(output, new_state)`` (and the other stream's state, for a layer that updates two).
   A hidden state's token state is found through the data flow: it is the state returned by the
   latest layer of that stream among the node's ancestors (so METER's parallel update, where the
   text layer reads the vision states of the *previous* layer, gets the matching state).
2. Each layer is traced with its attention modules kept as calls; each described call is replaced
   by :class:`~trimkit.ops.TrimAttention` (recomputed from its projections) or
   :class:`~trimkit.kernels.KernelAttention` (the module itself, its kernel intercepted), which takes
   an extra ``trimkit_trim`` argument carrying the key mask and the head mask.
3. Token-carrying arguments outside the layers and padding masks made inside the model get their
   own nodes (gather, record).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .entry import restore_tokens
from .layer import LayerTrimmers, PaddingProbe, StartsProbe, TrimmedLayer, _arg_name, _contains_node
from .ops import Runtime, align
from .spec import LayerSpec, ModelSpec
from .trace import TraceError, fixed_args, param_names, plain_codegen, trace

__all__ = ["LayerTrimmers", "Rewritten", "TraceError", "TrimmedLayer", "rewrite"]


def _padding_source(ref: str, what: str = "StreamSpec.padding_source") -> tuple[str, int | None]:
    """``"MODULE"`` or ``"MODULE[i]"`` -> (module path, output index or None)."""
    if ref.endswith("]") and "[" in ref:
        module, index = ref[:-1].split("[", 1)
        if not index.isdigit():
            raise ValueError(f"{what} {ref!r}: the index must be an output number, e.g. 'embeddings[1]'")
        return module, int(index)
    return ref, None


def _starts_sources(model: nn.Module, spec: ModelSpec) -> dict[str, tuple[str, str | None, int | None]]:
    """stream -> ("input", name, None) or ("module", path, output index) of its ``segment_starts``."""
    params = set(inspect.signature(model.forward).parameters)
    out = {}
    for st in spec.streams:
        ref = st.segment_starts
        if ref is None:
            continue
        what = f"StreamSpec({st.name!r}).segment_starts"
        if ref in params:
            if ref not in spec.input_names:
                raise ValueError(f"{what}: input {ref!r} is not in ModelSpec.input_names {list(spec.input_names)}, so "
                                 "the trace fixes it to its default; list it there")
            out[st.name] = ("input", ref, None)
            continue
        module, index = _padding_source(ref, what)
        try:
            model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"{what} {ref!r} is neither a parameter of {type(model).__name__}.forward {sorted(params)} "
                             f"nor a module of the model (give an input name, 'MODULE' or 'MODULE[i]')") from None
        out[st.name] = ("module", module, index)
    return out


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def _move_before(graph: fx.Graph, target: fx.Node, anchor: fx.Node) -> None:
    """Move ``target`` and the ancestors it needs that come after ``anchor`` to just before ``anchor``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    if order[target] < order[anchor]:
        return
    need = [n for n in _ancestors(target) | {target} if order[n] > order[anchor]]
    if anchor in need or any(anchor in _ancestors(n) for n in need):
        raise TraceError(f"cannot compute {target.name!r} before {anchor.name!r}: it depends on that layer")
    for n in sorted(need, key=order.__getitem__):
        anchor.prepend(n)


class Rewritten:
    """Result of :func:`rewrite`: the graph module plus what was built for it."""

    def __init__(self, gm: fx.GraphModule, layers: dict[str, TrimmedLayer], input_names: list[str],
                 calls: dict[str, int]) -> None:
        self.gm = gm
        self.layers = layers
        self.input_names = input_names
        self.calls = calls  # layer path -> calls per forward


def rewrite(
    model: nn.Module,
    spec: ModelSpec,
    example_inputs: dict[str, Any],
    runtime: Runtime,
    make_trimmers: Callable[[LayerSpec, str, int, int | None, list[int | None]], LayerTrimmers],
) -> tuple[Rewritten, dict[str, LayerTrimmers]]:
    """Trace ``model`` and return the rewritten graph module and the trimmers built for it.

    ``make_trimmers(layer_spec, key, dim, context_dim, attention_context_dims)`` builds each layer's
    trimmers (from the config and the plugin registries); ``attention_context_dims`` gives, per
    attention, the width of the context it reads (its own or the layer's). Dims come from shape
    propagation on ``example_inputs``.
    """
    spec.validate()
    by_path = {l.path: l for l in spec.layers}
    for path in by_path:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the adapter describes layer {path!r}, but the model has no such module") from None
    sources = {st.name: _padding_source(st.padding_source) for st in spec.streams if st.padding_source}
    starts = _starts_sources(model, spec)
    runtime.specs = {st.name: st for st in spec.streams}
    leaves = set(by_path) | set(spec.leaf_modules) | {t.module for t in spec.token_args} | {m for m, _ in sources.values()}
    leaves |= {m for kind, m, _ in starts.values() if kind == "module"}
    # inputs not in input_names are fixed to their defaults (a None left symbolic reads as "given")
    fixed = fixed_args(model, set(spec.input_names), dict(spec.concrete_args))
    graph = trace(model, leaves, fixed, spec.autowrap_functions, f"model {type(model).__name__}",
                   "ModelSpec.leaf_modules / autowrap_functions / concrete_args")
    finish = plain_codegen(graph)  # called with its named inputs in order; *args/**kwargs fixed empty
    gm = fx.GraphModule(model, graph)
    finish(gm)
    # placeholders follow the forward's parameters, inputs fixed by concrete_args included
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    input_names = [p.name for p in params]
    if len(input_names) != sum(n.op == "placeholder" and not str(n.target).startswith("*") for n in graph.nodes):
        raise TraceError(f"{type(model).__name__}.forward: cannot match its parameters {input_names} to the trace's inputs")
    args = []
    for p in params:
        if p.name in example_inputs:
            args.append(example_inputs[p.name])
        elif p.name in spec.concrete_args:
            args.append(spec.concrete_args[p.name])
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            raise ValueError(f"example inputs lack {p.name!r} (the model's inputs are {input_names})")
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)

    def dim_of(node: Any) -> int | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        shape = getattr(meta, "shape", None)  # tuples of tensors carry a tuple of metadata instead
        return int(shape[-1]) if shape is not None and len(shape) > 0 else None

    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in by_path:
            calls.setdefault(node.target, []).append(node)
    missing = [p for p in by_path if p not in calls]
    if missing:
        raise TraceError(f"described layers {missing} are never called in the traced forward of {type(model).__name__}")

    dims = {n: dim_of(n) for n in graph.nodes}  # shapes are known on the original nodes only

    wrappers: dict[str, TrimmedLayer] = {}
    trimmers: dict[str, LayerTrimmers] = {}
    state_out: dict[fx.Node, list[tuple[str, fx.Node]]] = {}  # wrapper node -> [(stream, its state node)]
    steps: set[fx.Node] = set()  # token steps of updated streams (two-stream layers): they consume states too

    def state_of(value: Any, stream: str) -> fx.Node | None:
        if not isinstance(value, fx.Node):
            return None
        best = None
        order = {n: i for i, n in enumerate(graph.nodes)}
        for anc in _ancestors(value) | {value}:
            for hit_stream, hit_state in state_out.get(anc, ()):
                if hit_stream == stream and (best is None or order[anc] > order[best[0]]):
                    best = (anc, hit_state)
        return best[1] if best else None

    source_nodes: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in by_path:
            continue
        lspec = by_path[node.target]
        layer = model.get_submodule(node.target)
        names = param_names(layer)
        call_args = dict(zip(names, node.args))
        call_args.update(node.kwargs)
        hidden_name = _arg_name(lspec.hidden, names, lspec.path)
        if hidden_name not in call_args:
            raise TraceError(f"layer {lspec.path!r} is called without its hidden-state argument {hidden_name!r}")
        context_node = None
        if lspec.context is not None:
            context_node = call_args.get(_arg_name(lspec.context, names, lspec.path))
        elif lspec.context_source:
            if lspec.context_source not in source_nodes:
                src = [n for n in graph.nodes if n.op == "call_module" and n.target == lspec.context_source]
                if not src:
                    raise TraceError(f"layer {lspec.path!r}: context_source {lspec.context_source!r} is not called "
                                     "as one module in the traced forward (declare it in ModelSpec.leaf_modules)")
                source_nodes[lspec.context_source] = src[0]
            context_node = source_nodes[lspec.context_source]
            _move_before(graph, context_node, node)
        # cross-attentions with their own context argument (AttentionSpec.context): its node, per attention
        attn_nodes = [call_args.get(_arg_name(a.context, names, lspec.path)) if a.context is not None else None
                      for a in lspec.attentions]
        key = lspec.path
        constants = {n: v for n, v in call_args.items() if not _contains_node(v)}
        if key in wrappers and constants != wrappers[key].constants:
            raise TraceError(f"layer {lspec.path!r} is called with different constant arguments ({wrappers[key].constants} "
                             f"and {constants}); trimkit traces a layer once: pass them as tensors or describe "
                             "one layer per call")
        if key not in wrappers:
            symbolic = {n for n, v in call_args.items() if _contains_node(v)}
            attn_dims = [dims.get(n) if a.context is not None else dims.get(context_node)
                         for a, n in zip(lspec.attentions, attn_nodes)]
            trimmers[key] = make_trimmers(lspec, key, dims.get(call_args[hidden_name]), dims.get(context_node), attn_dims)
            wrapper = TrimmedLayer(key, layer, lspec, symbolic, runtime, trimmers[key], spec.autowrap_functions,
                                   constants, spec.stream(lspec.stream),
                                   context_stream=spec.stream(lspec.context_stream) if lspec.context_stream else None)
            name = "trimkit_layer_" + key.replace(".", "_")
            gm.add_submodule(name, wrapper)
            wrappers[key] = wrapper
        name = "trimkit_layer_" + key.replace(".", "_")
        extra = {
            "trimkit_hidden_state": state_of(call_args[hidden_name], lspec.stream),
            "trimkit_context_state": state_of(context_node, lspec.context_stream) if lspec.context_stream else None,
        }
        call_node_args, call_node_kwargs = node.args, dict(node.kwargs)
        if lspec.updates:  # the other stream's token decision first, as a step of its own; the layer reads its result
            upd = lspec.updates[0]
            step_key = f"{key}@{upd.stream}"
            step_spec = LayerSpec(lspec.path, upd.stream, lspec.site, hidden=upd.hidden, context=lspec.hidden,
                                  context_stream=lspec.stream, hidden_token_args=dict(upd.token_args),
                                  batch_first=lspec.batch_first, trimmable=lspec.trimmable)
            step_name = "trimkit_step_" + step_key.replace(".", "_").replace("@", "_at_")
            if step_key not in wrappers:
                trimmers[step_key] = make_trimmers(step_spec, step_key, dims.get(context_node),
                                                   dims.get(call_args[hidden_name]), [])
                step = TrimmedLayer(step_key, layer, step_spec, set(), runtime, trimmers[step_key], (), None,
                                    spec.stream(upd.stream), tokens_only=True, context_stream=spec.stream(lspec.stream))
                gm.add_submodule(step_name, step)
                wrappers[step_key] = step
            with graph.inserting_before(node):
                pre = graph.call_module(step_name, node.args, {**node.kwargs, "trimkit_hidden_state": extra[
                    "trimkit_context_state"], "trimkit_context_state": extra["trimkit_hidden_state"]})
                pre_args = graph.call_function(operator.getitem, (pre, 0))
                extra["trimkit_context_state"] = graph.call_function(operator.getitem, (pre, 1))
                replaced = {n: graph.call_function(operator.getitem, (pre_args, n))
                            for n in [_arg_name(upd.hidden, names, lspec.path)] + list(wrappers[step_key].hidden_side)
                            if n in call_args}
            steps.add(pre)
            call_node_args = tuple(replaced.get(n, v) for n, v in zip(names, node.args))
            call_node_kwargs = {k: replaced.get(k, v) for k, v in call_node_kwargs.items()}
        entering = [g.tokens_from for g in spec.stream(lspec.stream).segments if g.tokens_from is not None]
        if entering and extra["trimkit_hidden_state"] is None:  # the stream's first layer: its entering tokens
            found = [state_of(call_args[hidden_name], src.stream) for src in entering]
            lost = [src.stream for src, f in zip(entering, found) if f is None]
            if lost:
                raise TraceError(f"layer {lspec.path!r}, the first of stream {lspec.stream!r}: its segments take tokens "
                                 f"from stream(s) {lost} (Segment.tokens_from), but no layer of theirs feeds its "
                                 "hidden states in the traced forward")
            extra["trimkit_entry_states"] = found
        if lspec.context is None and context_node is not None:
            extra["trimkit_context"] = context_node
        if any(n is not None for n in attn_nodes):
            extra["trimkit_attn_states"] = [
                state_of(n, a.context_stream or lspec.context_stream) if n is not None else None
                for a, n in zip(lspec.attentions, attn_nodes)]
        with graph.inserting_before(node):
            new = graph.call_module(name, call_node_args, {**call_node_kwargs, **extra})
            out = graph.call_function(operator.getitem, (new, 0))
            st = graph.call_function(operator.getitem, (new, 1))
            produced = [(lspec.stream, st)]
            if lspec.updates:
                produced.append((lspec.updates[0].stream, graph.call_function(operator.getitem, (new, 2))))
        dims[out] = dims.get(node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        state_out[new] = produced

    # each stream's last layer call (its state feeds no later layer of the stream): mode packed unpacks there
    for new, produced in state_out.items():
        for j, (_, st) in enumerate(produced):
            if not any((u in state_out or u in steps) and u.kwargs.get("trimkit_hidden_state") is st for u in st.users):
                new.kwargs = {**new.kwargs, ("trimkit_last" if j == 0 else "trimkit_last_update"): True}

    # token-carrying arguments of calls outside the layers: gather them like the layers' own
    for targ in spec.token_args:
        consumers = [n for n in graph.nodes if n.op == "call_module" and n.target == targ.module]
        if not consumers:
            raise TraceError(f"ModelSpec.token_args: module {targ.module!r} is not called as one module in the trace")
        names = param_names(model.get_submodule(targ.module))
        name = _arg_name(targ.arg, names, targ.module)
        for node in consumers:
            pos = names.index(name)
            value = node.args[pos] if pos < len(node.args) else node.kwargs.get(name)
            state = state_of(node, targ.stream)
            if not isinstance(value, fx.Node) or state is None:
                continue
            with graph.inserting_before(node):
                aligned = graph.call_function(align, (value, state, targ.dim))
            if pos < len(node.args):
                node.args = node.args[:pos] + (aligned,) + node.args[pos + 1:]
            else:
                node.kwargs = {**node.kwargs, name: aligned}
    # where a stream's kept tokens are put back at their places (trimkit.restore_tokens): its state there
    for node in graph.nodes:
        if node.op == "call_function" and node.target is restore_tokens:
            stream = node.args[1] if len(node.args) > 1 else node.kwargs.get("stream")
            if stream not in runtime.specs:
                raise TraceError(f"trimkit.restore_tokens: unknown stream {stream!r} (declared: {sorted(runtime.specs)})")
            st = state_of(node.args[0], stream)
            if st is None:
                raise TraceError(f"trimkit.restore_tokens({stream!r}): no layer of stream {stream!r} feeds its input "
                                 "in the traced forward")
            node.kwargs = {**node.kwargs, "trimkit_state": st, "trimkit_group": runtime.specs[stream].group}
    # padding masks the model builds itself (StreamSpec.padding_source): recorded where they are made
    for stream, (module, index) in sources.items():
        made = [n for n in graph.nodes if n.op == "call_module" and n.target == module]
        if not made:
            raise TraceError(f"StreamSpec({stream!r}).padding_source: module {module!r} is not called in the trace")
        name = f"trimkit_padding_{stream}"
        gm.add_submodule(name, PaddingProbe(runtime, stream, f"{module}" + ("" if index is None else f"[{index}]")))
        with graph.inserting_after(made[0]):
            value = made[0] if index is None else graph.call_function(operator.getitem, (made[0], index))
        with graph.inserting_after(value):
            graph.call_module(name, (value,))
    # per-instance segment starts (StreamSpec.segment_starts): recorded from the input, or where the model makes them
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for stream, (kind, ref, index) in starts.items():
        where = f"input {ref!r}" if kind == "input" else repr(ref + ("" if index is None else f"[{index}]"))
        name = f"trimkit_segment_starts_{stream}"
        gm.add_submodule(name, StartsProbe(runtime, spec.stream(stream), where))
        if kind == "input":
            value = next(n for n in placeholders if n.target == ref)
            anchor = placeholders[-1]
        else:
            made = [n for n in graph.nodes if n.op == "call_module" and n.target == ref]
            if not made:
                raise TraceError(f"StreamSpec({stream!r}).segment_starts: module {ref!r} is not called in the trace")
            anchor = value = made[0]
            if index is not None:
                with graph.inserting_after(made[0]):
                    anchor = value = graph.call_function(operator.getitem, (made[0], index))
        with graph.inserting_after(anchor):
            graph.call_module(name, (value,))
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    rewritten = Rewritten(gm, {k: w for k, w in wrappers.items() if not w.tokens_only}, input_names,
                          {k: len(v) for k, v in calls.items()})
    rewritten.fixed = {k: v for k, v in fixed.items() if not k.startswith("*")}
    return rewritten, trimmers
