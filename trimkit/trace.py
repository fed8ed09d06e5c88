"""torch.fx tracing as trimkit needs it: leaves, autowrapped functions, decorated forwards,
``*args``/``**kwargs`` signatures and a plain keyword signature for the generated code.

Every trace failure is a :class:`TraceError` that names the module that failed and the
description field that can fix it (docs/bring-your-own-vlm.md, "When tracing fails").
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Callable, Sequence

import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["TraceError", "Tracer", "trace", "traceable_view", "fixed_args", "plain_codegen", "param_names"]


class TraceError(RuntimeError):
    """Tracing failed; the message names the module and the description field that can fix it."""


class Tracer(fx.Tracer):
    """fx tracer with trimkit's leaf rule and autowrap that also reaches decorated forwards.

    Childless modules (Linear, LayerNorm, Dropout, DropPath...) stay calls, so their train/eval
    behaviour is decided when they run, not frozen at trace time. ``autowrap_functions`` are
    patched in the namespaces of the modules that *define the traced classes* too: transformers
    wraps forwards in decorators whose globals are not the model file's, so fx's own lookup (the
    traced function's globals) misses e.g. ``create_causal_mask`` imported by ``modeling_llama``.
    """

    def __init__(self, leaves: set[str] = frozenset(), autowrap_functions: Sequence[Callable] = (),
                 root: nn.Module | None = None) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaves = set(leaves)
        if autowrap_functions and root is not None:
            # fx patches, in each of these modules' namespaces, the names bound to an autowrapped function
            homes = {sys.modules.get(type(m).__module__) for m in root.modules()} - {None}
            # (fx's private list of module namespaces to patch; present since torch 2.0)
            self._autowrap_search = list(getattr(self, "_autowrap_search", [])) + sorted(homes, key=lambda m: m.__name__)

    def path_of_module(self, mod: nn.Module) -> str:
        """fx's lookup, and for a module the traced code reaches through a :class:`trimkit.refs.Borrowed`
        attribute (an adapter's view module that runs modules the backbone owns), its path through that
        attribute: the generated module copies it from there, and nothing is registered twice."""
        try:
            return super().path_of_module(mod)
        except NameError:
            path = self._borrowed_paths().get(id(mod))
            if path is None:
                raise
            return path

    def _borrowed_paths(self) -> dict[int, str]:
        from .refs import Borrowed

        cache = self.__dict__.get("_trimkit_borrowed_paths")
        if cache is None:
            cache = {}
            for prefix, owner in self.root.named_modules():
                refs = getattr(owner, "_borrowed", None)
                if not isinstance(refs, Borrowed):
                    continue
                for name, ref in vars(refs).items():
                    # only a reference the owner exposes under the same name resolves as a path
                    if not isinstance(ref, nn.Module) or getattr(owner, name, None) is not ref:
                        continue
                    base = f"{prefix}.{name}" if prefix else name
                    for sub, m in ref.named_modules():
                        cache.setdefault(id(m), f"{base}.{sub}" if sub else base)
            self.__dict__["_trimkit_borrowed_paths"] = cache
        return cache

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname) or next(m.children(), None) is None

    def create_arg(self, a: Any) -> Any:
        # A dataclass instance the model holds (transformers 5 configs are dataclasses) is passed by
        # reference, as a get_attr of where it lives: fx would rebuild it from its fields and lose what
        # is not a field (config._attn_implementation: HF mask functions then return no mask at all).
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            path = self._attribute_path(a)
            if path is not None:
                return self.create_node("get_attr", path, (), {})
        return super().create_arg(a)

    def _attribute_path(self, obj: Any) -> str | None:
        cache = self.__dict__.setdefault("_trimkit_attr_paths", {})
        if id(obj) not in cache:
            cache[id(obj)] = None
            for prefix, module in self.root.named_modules():
                for name, value in vars(module).items():
                    if value is obj and not name.startswith("_"):
                        cache[id(obj)] = f"{prefix}.{name}" if prefix else name
                        break
                if cache[id(obj)] is not None:
                    break
        return cache[id(obj)]


def traceable_view(module: nn.Module) -> nn.Module:
    """``module`` itself, or a view of it whose class has the undecorated forward.

    A decorated forward (transformers wraps forwards as ``f(*args, **kwargs)``) hides the parameters
    from fx. The view shares the module's ``__dict__`` (children, parameters, buffers); the module
    and its class are not touched.
    """
    forward = type(module).forward
    plain = inspect.unwrap(forward)
    if plain is forward:
        return module
    view_cls = type(f"{type(module).__name__}TraceView", (type(module),), {})
    view_cls.forward = plain  # after creation: __init_subclass__ may re-wrap it
    view = object.__new__(view_cls)
    view.__dict__ = module.__dict__
    return view


def param_names(module: nn.Module) -> list[str]:
    """The named (not ``*args``/``**kwargs``) parameters of the module's undecorated forward."""
    params = inspect.signature(module.forward).parameters.values()  # follows __wrapped__
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def fixed_args(module: nn.Module, symbolic: set[str] | None, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """fx ``concrete_args`` for tracing ``module``: ``given`` values, every parameter not in
    ``symbolic`` fixed to its default (``symbolic=None``: keep all symbolic), ``*args``/``**kwargs``
    fixed empty (fx cannot generate code for them: the SyntaxError of a ``**kwargs`` forward)."""
    params = inspect.signature(module.forward).parameters
    fixed = {n: v for n, v in (given or {}).items() if n in params}
    for p in params.values():
        if p.kind == p.VAR_KEYWORD:
            fixed[f"**{p.name}"] = {}
        elif p.kind == p.VAR_POSITIONAL:
            fixed[f"*{p.name}"] = ()
        elif symbolic is not None and p.name not in symbolic and p.name not in fixed \
                and p.default is not inspect.Parameter.empty:
            fixed[p.name] = p.default
    return fixed


def trace(root: nn.Module, leaves: set[str], concrete_args: dict[str, Any], autowrap: Sequence[Callable],
          what: str, hook: str) -> fx.Graph:
    """Trace ``root`` (its traceable view); a failure names the innermost module being traced."""
    tracer = Tracer(leaves, autowrap, root)
    try:
        return tracer.trace(traceable_view(root), concrete_args=concrete_args or None)
    except Exception as err:
        where = ""
        stack = getattr(tracer, "module_stack", None)
        if stack:
            where = f" inside module {list(stack.keys())[-1]!r}"
        origin = _origin(err)
        raise TraceError(
            f"torch.fx could not trace {what}{where}{origin}: {type(err).__name__}: {err}. "
            f"Fix it through {hook}: make the offending module a leaf, autowrap the function that "
            "branches on tensor values, or fix an input with concrete_args (docs/bring-your-own-vlm.md, "
            "'When tracing fails')."
        ) from err


def _origin(err: BaseException) -> str:
    """`` (at FILE:LINE in FUNCTION)``: the innermost frame of the failure outside torch and trimkit,
    i.e. the model code that branched on a traced value or called what could not be traced."""
    found = ""
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        path = code.co_filename.replace("\\", "/")
        if "/torch/" not in path and "/trimkit/" not in path:
            parts = path.split("/")
            found = f" (at {'/'.join(parts[-2:])}:{tb.tb_lineno} in {code.co_name})"
        tb = tb.tb_next
    return found


class Unflatten(nn.Module):
    """Rebuilds a traced module's structured output from fx's flat output list."""

    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, flat: list) -> Any:
        return pytree.tree_unflatten(flat, self.spec)


def attribute_links(gm: fx.GraphModule, root: nn.Module) -> list[tuple[nn.Module, nn.Module, str]]:
    """``(holder, owner, name)`` for each tensor ``gm`` (traced from ``root``) reads by attribute
    (``get_attr``: e.g. a [CLS] or position embedding) from a holder module of its own, where
    ``owner`` is the module of ``root`` the tensor belongs to. fx copies such tensors into holders
    it creates, so the graph keeps reading the old tensor object once the model's module gets a new
    one (``.to()``, ``load_state_dict(assign=True)``, FSDP swapping sharded and gathered parameters
    around every step): :func:`sync_attributes` points the holders at the owners' current tensors.
    Constants of the graph's own (not attributes of ``root``) are left out."""
    links = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, attr = str(node.target).rpartition(".")
        try:
            owner = root.get_submodule(owner_path) if owner_path else root
            holder = gm.get_submodule(owner_path) if owner_path else gm
            getattr(owner, attr)
        except AttributeError:
            continue
        if holder is not owner:
            links.append((holder, owner, attr))
    return links


def sync_attributes(links: Sequence[tuple[nn.Module, nn.Module, str]]) -> None:
    """Point each holder's attribute at its owner's current tensor (an identity check per link)."""
    for holder, owner, attr in links:
        value = getattr(owner, attr)
        if getattr(holder, attr) is not value:
            setattr(holder, attr, value)


def plain_codegen(graph: fx.Graph) -> Callable[[fx.GraphModule], None]:
    """Give a graph traced with ``concrete_args`` a plain keyword signature.

    fx otherwise generates pytree flattening code whose signature cannot hold the fixed inputs next
    to extra placeholders. Returns a function to call on the graph module built from ``graph``, which
    rebuilds the structured output explicitly (a no-op when nothing needed changing).
    """
    info = getattr(graph._codegen, "pytree_info", None)
    if info is None:
        return lambda gm: None
    graph._codegen = fx.graph.CodeGen()
    spec = info.out_spec

    def finish(gm: fx.GraphModule) -> None:
        if spec is None:
            return
        gm.add_submodule("trimkit_unflatten", Unflatten(spec))
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        with gm.graph.inserting_before(out):
            value = gm.graph.call_module("trimkit_unflatten", (out.args[0],))
        out.args = (value,)

    return finish
