"""Compiled batch-1 inference (:meth:`trimkit.TrimmedModel.compile`): graphs per input signature,
called without guards.

``torch.compile`` checks its guards at every call of a compiled frame: measured ~100-140 us per call
on CPU for a trimmed layer (its arguments, its trims, its parameters), as much as a small layer's
whole compute. Here each distinct *signature* of a call (argument shapes and dtypes, which arguments
and mask fields are given, constant arguments) is exported once with ``torch.export`` (non-strict:
the code runs on fake tensors) and compiled by ``torch._inductor`` (or a given backend), with the
parameters and buffers lifted as inputs; later calls look the signature up in a dict and call the
compiled graph, handing it the module's parameters as they are then (weight updates,
``load_state_dict`` and ``.to()`` are seen). With the kept counts padded to buckets
(:mod:`trimkit.engine.buckets`) a trimmed layer meets a few signatures only.

* :class:`CompiledLayer`: a trimmed layer's own code (its rewritten inner graph and its trims);
* :class:`CompiledModule`: a module of the model outside the described layers (a text encoder run
  whole, a pooler), called from the rewritten root graph.

Code that cannot be exported (data-dependent Python control flow, an unsupported operator) runs
eager, said once in a warning and listed in :attr:`trimkit.engine.buckets.Bucketing.failures`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
import time
import warnings
from dataclasses import fields
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..ops import AttnTrim

__all__ = ["CompiledLayer", "CompiledModule", "compile_graph"]

_TRIM_FIELDS = [f.name for f in fields(AttnTrim)]
_TENSOR = object()  # a tensor's place among a call's flattened arguments
DEFAULT_OPTIONS = {"cpp_wrapper": True}  # inductor's Python wrapper costs ~100 us per call of a small graph on CPU


def _live(body: nn.Module, target: str) -> Callable[[], torch.Tensor]:
    """A getter of ``body``'s parameter or buffer at ``target`` as it is at each call: the owning
    module is found once, the attribute read every time (``load_state_dict(assign=True)`` and
    ``.to()`` replace or move what it holds)."""
    prefix, _, name = target.rpartition(".")
    owner = body.get_submodule(prefix) if prefix else body
    return lambda: getattr(owner, name)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """A failed export prints its partial graph to stderr and logs warnings about it (torch.export);
    trimkit reports the failure itself (one warning naming the layer), so both are held back for the
    export: torch's loggers at CRITICAL, stderr captured (and printed if the export succeeded, so
    nothing else is lost)."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    held = io.StringIO()
    failed = True
    try:
        with contextlib.redirect_stderr(held):
            yield
        failed = False
    finally:
        if not failed and held.getvalue():
            sys.stderr.write(held.getvalue())
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def compile_graph(body: nn.Module, example: list[torch.Tensor], options: dict[str, Any] | None,
                  backend: Callable | None) -> tuple[Callable, list[Callable[[], torch.Tensor] | int], Any]:
    """Export ``body`` (a module whose forward takes tensors only) on ``example`` and compile it.

    Returns (the compiled function, what to hand it: per flat input the index of a call tensor or a
    getter of a parameter / buffer / constant, the output's pytree spec)."""
    from torch.export.graph_signature import InputKind

    with torch.inference_mode(False), torch.no_grad(), _quiet_export():
        example = [t.clone() for t in example]  # not inference tensors: export needs plain ones
        ep = torch.export.export(body, tuple(example), strict=False)
        out_spec = ep.call_spec.out_spec
        feed: list[Callable[[], torch.Tensor] | int] = []
        flat: list[torch.Tensor] = []
        user = 0
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                feed.append(user)
                flat.append(example[user])
                user += 1
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                get = _live(body, spec.target)  # shared weights (a module borrowed twice) resolve by path too
                feed.append(get)
                flat.append(get())
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                c = ep.constants[spec.target]
                feed.append(lambda c=c: c)
                flat.append(c)
            else:
                raise NotImplementedError(f"an exported input of kind {spec.kind.name}")
        if backend is not None:
            fn = backend(ep.graph_module, flat)
        else:
            fn = importlib.import_module("torch._inductor").compile(ep.graph_module, flat,
                                                                     options=DEFAULT_OPTIONS | dict(options or {}))
    return fn, feed, out_spec


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether a forward hook watches one of ``modules`` (or every module): then the code runs eager, so
    that it fires."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _eager_context(tensors: list[torch.Tensor]) -> bool:
    """Calls that run eager whatever was compiled: with gradients, or under autocast."""
    if torch.is_grad_enabled():
        return True
    device = tensors[0].device.type if tensors else "cpu"
    return torch.is_autocast_enabled(device) if device in ("cpu", "cuda") else False


class _Graphs:
    """Compiled graphs by signature, for one piece of code (a layer, a module)."""

    MAX_GRAPHS = 64  # signatures compiled per piece of code; later new ones run eager (inputs not bucketed)

    def __init__(self, path: str, options: dict[str, Any] | None, backend: Callable | None,
                 kind: str = "layer") -> None:
        self.path, self.kind = path, kind
        self.options = dict(options or {})
        self.backend = backend  # (exported graph module, flat example inputs) -> callable; None: torch._inductor
        self.graphs: dict[Any, Any] = {}  # signature -> (fn, feed, out spec), or False: could not compile
        self.compile_seconds = 0.0

    def __deepcopy__(self, memo: dict) -> "_Graphs":
        # compiled graphs read the modules they were exported from: a copy compiles its own on first use
        return _Graphs(self.path, self.options, self.backend, self.kind)

    def _fail(self, failures: dict, what: str, err: Exception) -> None:
        first = str(err).splitlines()[0] if str(err) else ""
        failures[self.path] = f"{type(err).__name__}: {first}"
        warnings.warn(f"trimkit compile: {self.kind} {self.path!r} runs eager (its code could not be {what}: "
                      f"{failures[self.path]})", RuntimeWarning, stacklevel=6)

    def run(self, key: Any, tensors: list[torch.Tensor], make_body: Callable[[], nn.Module], failures: dict) -> Any:
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.MAX_GRAPHS:
                return None
            t0 = time.perf_counter()
            try:
                entry = compile_graph(make_body(), tensors, self.options, self.backend)
            except Exception as err:  # data-dependent Python in the code, an operator inductor lacks...
                entry = False
                self._fail(failures, "exported and compiled", err)
            self.compile_seconds += time.perf_counter() - t0
            self.graphs[key] = entry
        if entry is False:
            return None
        fn, feed, out_spec = entry
        try:
            outs = fn(*[tensors[f] if isinstance(f, int) else f() for f in feed])
        except Exception as err:  # a compiled graph's own checks (strides, counts): eager from now on
            self.graphs[key] = False
            self._fail(failures, "run compiled", err)
            return None
        return tree_unflatten(list(outs), out_spec)


def _layer_signature(kw: dict[str, Any]) -> tuple | None:
    """A layer call's arguments: per argument its shape and dtype (a tuple or list of tensors element by
    element), ``None``, or a hashable constant; ``None`` when an argument is none of these."""
    key = []
    for name, v in kw.items():
        if isinstance(v, torch.Tensor):
            key.append((name, v.shape, v.dtype, v.device))
        elif isinstance(v, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in v):
            key.append((name, type(v), tuple((t.shape, t.dtype, t.device) for t in v)))
        elif v is None or isinstance(v, (bool, int, float, str)):
            key.append((name, type(v), v))
        else:
            return None
    return tuple(key)


def _layer_tensors(kw: dict[str, Any], trims: list[AttnTrim]) -> list[torch.Tensor]:
    out = []
    for v in kw.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(v)
    for t in trims:
        if t.key_mask is not None:
            out.append(t.key_mask)
        if t.head_mask is not None:
            out.append(t.head_mask)
    return out


class CompiledLayer(_Graphs):
    """A trimmed layer's own code (:attr:`trimkit.layer.TrimmedLayer.inner`, with the call's trims)
    compiled per signature (module docstring)."""

    def __init__(self, layer: Any, options: dict[str, Any] | None = None, backend: Callable | None = None) -> None:
        super().__init__(layer.spec.path, options, backend)
        self.inner = layer.inner
        self.layer = layer.layer  # the backbone's module: its train/eval state is the model's
        self.names = layer.inner_inputs

    def __deepcopy__(self, memo: dict) -> "CompiledLayer":
        new = object.__new__(CompiledLayer)
        new.__dict__.update(_Graphs(self.path, self.options, self.backend, self.kind).__dict__)
        new.inner = memo.get(id(self.inner), self.inner)  # the copy's own layer code (copied with its layer)
        new.layer = memo.get(id(self.layer), self.layer)
        new.names = self.names
        return new

    def __call__(self, a: dict[str, Any], trims: list[AttnTrim], failures: dict) -> Any:
        """The layer's output, or ``None`` (run it eager) for a call this does not compile: the layer in
        train mode (dropout), autocast. (A layer a forward hook watches never gets here: its bucketed call
        runs unpadded and eager, :func:`trimkit.engine.buckets.bucketed_run`.)"""
        if self.path in failures or self.layer.training:
            return None
        if any(t.head_runs is not None or t.head_index is not None or t.packed is not None or t.capture is not None
               for t in trims):
            return None  # kept-head slices, packing or an attention probe: eager
        kw = {self.names[k]: v for k, v in a.items() if k in self.names}
        sig = _layer_signature(kw)
        if sig is None:
            return None
        key = (sig, tuple((t.dropout, None if t.key_mask is None else (t.key_mask.shape, t.key_mask.dtype),
                           None if t.head_mask is None else (t.head_mask.shape, t.head_mask.dtype)) for t in trims))
        tensors = _layer_tensors(kw, trims)
        if _eager_context(tensors):
            return None
        return self.run(key, tensors, lambda: self._body(kw, trims), failures)

    def _body(self, kw: dict[str, Any], trims: list[AttnTrim]) -> nn.Module:
        inner = self.inner
        kinds = [(k, type(v), v if not isinstance(v, (torch.Tensor, tuple, list)) else None, len(v)
                  if isinstance(v, (tuple, list)) else 0) for k, v in kw.items()]
        template = [{f: getattr(t, f) for f in _TRIM_FIELDS} for t in trims]

        class LayerBody(nn.Module):  # the call as a function of its tensors only
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *tensors: torch.Tensor) -> Any:
                it = iter(tensors)
                args = {}
                for name, kind, const, n in kinds:
                    if kind is torch.Tensor or issubclass(kind, torch.Tensor):
                        args[name] = next(it)
                    elif kind in (tuple, list):
                        args[name] = kind(next(it) for _ in range(n))
                    else:
                        args[name] = const
                rebuilt = []
                for d in template:
                    d = dict(d)
                    for f in ("key_mask", "head_mask"):
                        if d[f] is not None:
                            d[f] = next(it)
                    rebuilt.append(AttnTrim(**d))
                return self.inner(**args, trimkit_attn=rebuilt)

        return LayerBody()


class CompiledModule(nn.Module):
    """A module of the model outside the described layers, called from the rewritten root graph:
    compiled per signature when the runtime runs compiled (:meth:`trimkit.TrimmedModel.compile`,
    mode remove, no gradient), else the module itself. Holds a reference to the module (registered
    in the model), not a copy."""

    def __init__(self, module: nn.Module, path: str, runtime: Any, options: dict[str, Any] | None = None,
                 backend: Callable | None = None) -> None:
        super().__init__()
        from ..refs import Borrowed

        self._borrowed = Borrowed(module=module)
        self.runtime = runtime
        self.graphs = _Graphs(path, options, backend, kind="module")
        self._watched = list(module.modules())  # a forward hook on any of them: eager, so that it fires

    @property
    def module(self) -> nn.Module:
        return self._borrowed.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rt = self.runtime
        b = rt.bucketing
        module = self.module
        if b is None or not b.compiled or rt.mode != "remove" or self.graphs.path in b.failures or \
                module.training or _hooked(self._watched):
            return module(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        if _eager_context(tensors):
            return module(*args, **kwargs)
        consts = tuple(_TENSOR if isinstance(v, torch.Tensor) else v for v in leaves)
        try:
            key = (spec, consts, tuple((t.shape, t.dtype, t.device) for t in tensors))
            hash(key)
        except TypeError:  # an unhashable constant argument: eager
            return module(*args, **kwargs)

        def body() -> nn.Module:
            class ModuleBody(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.module = module

                def forward(self, *ts: torch.Tensor) -> Any:
                    it = iter(ts)
                    a, k = tree_unflatten([next(it) if c is _TENSOR else c for c in consts], spec)
                    return self.module(*a, **k)

            return ModuleBody()

        out = self.graphs.run(key, tensors, body, b.failures)
        return module(*args, **kwargs) if out is None else out
