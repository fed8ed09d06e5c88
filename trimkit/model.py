"""``trim(model, config)``: wrap a model with learned trimmers, PEFT-style.

The returned :class:`TrimmedModel` behaves like the model: ``tmodel(**inputs)`` returns what the
model returns. In training mode masks are sampled (Gumbel-sigmoid by default) and the decisions
are recorded for the cost loss; in eval mode tokens and heads whose logits are <= 0 are removed
(batch 1), and larger batches are masked or, with ``tmodel.inference = "packed"``, packed (the kept
tokens of the batch in one row matrix: :mod:`trimkit.engine.packed`).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .config import TrimConfig, TrimConfigError, resolve_target, selector_keys
from .engine.buckets import Bucketing
from .engine.packed import fetch
from .ops import MODES, Record, Runtime
from .plan import AttentionPlan, LayerPlan, TrimPlan, stream_plan
from .plugins import get_registry, select_adapter
from .refs import Borrowed, borrowed
from .rewrite import LayerTrimmers, rewrite
from .segments import SegmentTokenTrimmer
from .spec import LayerSpec, ModelSpec
from .trace import attribute_links


def _layer_index(spec: ModelSpec) -> dict[str, tuple[str, str, int]]:
    """trimmer key -> (stream, site, index among the stream's layers at that site). The key is the
    layer path, and ``"path@stream"`` for the other stream a two-stream layer updates."""
    counts: dict[tuple[str, str], int] = {}
    out = {}
    for layer in spec.layers:
        for stream, key in [(layer.stream, layer.path)] + [(u.stream, f"{layer.path}@{u.stream}") for u in layer.updates]:
            i = counts.get((stream, layer.site), 0)
            counts[(stream, layer.site)] = i + 1
            out[key] = (stream, layer.site, i)
    return out


def _selected(selectors: list[str] | None, field: str, index: dict[str, tuple[str, str, int]]) -> set[str]:
    if selectors is None:
        return set(index)
    chosen: set[str] = set()
    for j, sel in enumerate(selectors):
        hit = {p for p, (st, si, i) in index.items()
               if sel in (p, p.split("@")[0], st, si, f"{st}.{si}", f"{st}.{si}.{i}")}
        if not hit:
            known = sorted({st for st, _, _ in index.values()} | {f"{st}.{si}" for st, si, _ in index.values()})
            raise TrimConfigError(f"{field}[{j}]: {sel!r} selects no layer; use a layer path, 'stream', "
                                  f"'stream.site' or 'stream.site.index' (streams/sites here: {known}, "
                                  f"{len(index)} layers)")
        chosen |= hit
    return chosen


def _check_target_keys(target: Any, field: str, keys: set[str]) -> None:
    if isinstance(target, dict):
        for k in target:
            if k not in keys:
                raise TrimConfigError(f"{field}[{k!r}]: selects no module of this model; valid selectors include "
                                      f"{sorted(keys)[:20]}")


class MaskedBatchWarning(UserWarning):
    """An eval-mode batch ran masked (no compute saved) under ``inference = "remove"``."""


class TrimmedModel(nn.Module):
    """A model with trimmers inserted (see :func:`trim`). ``.model`` is the original model."""

    _graph = borrowed("graph", "The rewritten root graph (it calls the modules of ``.model``).")

    def __init__(self, model: nn.Module, config: TrimConfig, adapter_name: str, spec: ModelSpec,
                 example_inputs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.adapter_name = adapter_name
        self.spec = spec
        registry = get_registry()
        self.runtime = Runtime(sampler=registry.samplers.get(config.sampler),  # temperature 1.0 until set_temperature
                               attention_dropout=config.attention_dropout)
        self._forced_mode: str | None = None
        self._inference = "remove"
        self._warned_masked = False
        trimmable = {l.path for l in spec.layers if l.trimmable}
        index = {p: v for p, v in _layer_index(spec).items() if p.split("@")[0] in trimmable}
        token_layers = _selected(config.token_layers, "token_layers", index) if config.trim_tokens else set()
        head_layers = _selected(config.head_layers, "head_layers", index) if config.trim_heads else set()
        segmented = {st.name: [g.name for g in st.segments] for st in spec.streams if st.segments}

        def token_keys(st: str, si: str, i: int, segment: str | None = None) -> list[str]:
            """Selector keys of a token trimmer; a segment's are its own, then its stream's."""
            if segment is None:
                return selector_keys(st, si, i)
            return selector_keys(segment, si, i)[:-1] + selector_keys(st, si, i)

        all_keys = {k for p, (st, si, i) in index.items() for k in selector_keys(st, si, i)}
        all_keys |= {k for p, (st, si, i) in index.items() for g in segmented.get(st, ()) for k in token_keys(st, si, i, g)}
        for p, (st, si, i) in index.items():
            layer = spec.layers[[l.path for l in spec.layers].index(p.split("@")[0])]
            for a, (q, _) in zip(layer.attentions, layer.roles()):
                if q == st:
                    all_keys |= set(selector_keys(st, si, i, a.kind))
        _check_target_keys(config.token_target, "token_target", all_keys)
        _check_target_keys(config.head_target, "head_target", all_keys)
        token_factory = registry.token_policies.get(config.token_policy)
        head_factory = registry.head_policies.get(config.head_policy)
        self.final_targets: dict[str, float] = {}

        def make(lspec: LayerSpec, key: str, dim: int | None, ctx_dim: int | None,
                 attn_ctx_dims: list[int | None]) -> LayerTrimmers:
            if key not in index:  # trimmable=False: rewritten so masks reach it, no trimmers
                return LayerTrimmers(None, {})
            st, si, i = index[key]
            if dim is None:
                raise TrimConfigError(f"layer {lspec.path!r}: could not infer the hidden size from example inputs")
            token = None
            segments = segmented.get(st)
            if key in token_layers and segments:  # one policy per segment, reading the other segments
                token = SegmentTokenTrimmer(segments, [token_factory(dim, dim, config) for _ in segments])
                for g in segments:
                    self.final_targets[f"{key}:{g}"] = resolve_target(config.token_target, token_keys(st, si, i, g))
            elif key in token_layers:
                token = token_factory(dim, ctx_dim, config)
                self.final_targets[key] = resolve_target(config.token_target, selector_keys(st, si, i))
            heads = {}
            if key in head_layers:
                for j, (a, (q, k)) in enumerate(zip(lspec.attentions, lspec.roles())):
                    # a self-attention over a segmented stream reads the other segments' summaries too
                    if q == lspec.stream:
                        q_dim, other = dim, attn_ctx_dims[j] if a.kind == "cross" else dim if segments else None
                    else:  # the updated stream's queries in a two-stream layer
                        q_dim, other = ctx_dim, dim if a.kind == "cross" else None
                    heads[str(j)] = head_factory(q_dim, other, a.num_heads, config)
                    # selected like a module of its query stream (the other stream of a two-stream layer too)
                    qst, qsi, qi = (st, si, i) if q == lspec.stream else index.get(f"{key}@{q}", (st, si, i))
                    self.final_targets[f"{key}.{j}"] = resolve_target(config.head_target,
                                                                      selector_keys(qst, qsi, qi, a.kind))
            return LayerTrimmers(token, heads)

        rewritten, trimmers = rewrite(model, spec, example_inputs, self.runtime, make)
        # attention probes of context-reading token policies (trimkit.probe); emptied after every forward
        self._probes = _attach_probes(spec, rewritten.layers, config.token_policy)
        self._borrowed = Borrowed(graph=rewritten.gm)  # calls the model's modules, which are registered under .model
        self._attr_links = attribute_links(rewritten.gm, self.model)  # see _sync_graph_attrs
        self._input_names = rewritten.input_names
        self.trimmers = nn.ModuleDict({_safe(k): v for k, v in trimmers.items()})
        self.runtime.targets = dict(self.final_targets)
        self._signature = inspect.signature(model.forward)
        self._fixed = dict(rewritten.fixed)  # concrete_args, and every input not in input_names at its default
        self._defaults = {n: self._fixed.get(n, p.default) for n, p in self._signature.parameters.items()}
        self._get_attrs = [n.target for n in rewritten.gm.graph.nodes if n.op == "get_attr"]
        self._plan = _make_plan(self, rewritten)

    @property
    def plan(self) -> TrimPlan:
        """What the rewrite decided: streams, trimmed layers in forward order, their trimmers and
        every intercepted attention call with its role and route. ``print(tmodel.plan)``."""
        return self._plan

    # --- running ---------------------------------------------------------------------------
    @property
    def inference(self) -> str:
        """How eval-mode forwards run: ``"remove"`` (default: batch 1 physically trimmed, larger
        batches masked as in mode ``hard``), ``"packed"`` (batch 1 trimmed, larger batches packed:
        the kept tokens of the batch in one row matrix, see :mod:`trimkit.engine.packed`),
        ``"padded"`` (as packed, but layers run on (B, max kept, D): the baseline packing is
        measured against) or ``"hard"`` (always masked)."""
        return self._inference

    @inference.setter
    def inference(self, value: str) -> None:
        if value not in ("remove", "packed", "padded", "hard"):
            raise ValueError(f"TrimmedModel.inference must be 'remove', 'packed', 'padded' or 'hard', got {value!r}")
        self._inference = value

    def _mode(self, batch: int) -> str:
        if self._forced_mode is not None:
            return self._forced_mode
        if self.training:
            return "sample"
        if batch == 1:
            return "remove" if self._inference in ("packed", "padded") else self._inference
        if self._inference == "remove" and not self._warned_masked:
            self._warned_masked = True
            warnings.warn(
                f"trimkit: an eval-mode batch of {batch} runs masked (mode 'hard': same outputs, no compute "
                "saved) because tmodel.inference is 'remove' (batch 1 only); set tmodel.inference = 'packed' to "
                "drop tokens in batches (said once per model)", MaskedBatchWarning, stacklevel=3)
        return self._inference if self._inference in ("packed", "padded") else "hard"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._forced_mode == "off":  # the untrimmed model costs nothing: the original module, called directly
            self.runtime.begin("off")
            return self.model(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        inputs = bound.arguments
        batch = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)), 1)
        rt = self.runtime
        rt.begin(self._mode(batch))
        for s in self.spec.streams:
            if s.padding_input and isinstance(inputs.get(s.padding_input), torch.Tensor):
                rt.padding[s.name] = inputs[s.padding_input]
            if any(g.padding_input for g in s.segments):  # joined into the stream's mask at its first layer
                rt.segment_padding[s.name] = [inputs.get(g.padding_input) if g.padding_input else None
                                              for g in s.segments]
            for g in s.segments:
                if isinstance(g.length, str):
                    name, dim = g.length.split(":")
                    value = inputs.get(name)
                    if not isinstance(value, torch.Tensor):
                        raise ValueError(f"stream {s.name!r}: segment {g.name!r} takes its length from input {name!r}, "
                                         f"which this call does not pass as a tensor")
                    rt.sizes[g.length] = int(value.shape[int(dim)])
        for name, value in self._fixed.items():
            if name in inputs and inputs[name] is not value and (
                    isinstance(inputs[name], torch.Tensor) or isinstance(value, torch.Tensor) or inputs[name] != value):
                why = ("ModelSpec.concrete_args" if name in self.spec.concrete_args else
                       "its default: the adapter's ModelSpec.input_names does not list it")
                raise ValueError(f"input {name!r} was fixed to {value!r} when the model was traced ({why}); "
                                 f"got {type(inputs[name]).__name__}. Trim a model whose description keeps it an input")
        if rt.mode in ("packed", "padded") and rt.padding:  # real tokens per instance, once per forward (one host sync)
            names = list(rt.padding)
            rt.real = dict(zip(names, fetch([(rt.padding[n] != 0).sum(-1) for n in names])))
        self._sync_graph_attrs()
        try:
            out = self._graph(*[inputs[n] if n in inputs else self._defaults[n] for n in self._input_names])
        finally:
            for probe in self._probes:  # what they recorded (hidden states, q/k) is not kept past the forward
                probe.clear()
        rt.check_finite()
        if rt.checks and bool(torch.stack(rt.checks).any()):
            raise NotImplementedError(
                "trimkit packed mode assumes attention biases are padding-only (0 on every real token), but a bias "
                "was non-zero on a kept token; use tmodel.inference = 'remove' (masked batches) for this model")
        return out

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator["TrimmedModel"]:
        """Force a mode for the block: ``off`` (full model), ``sample``, ``hard``, ``remove`` or ``packed``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        prev, self._forced_mode = self._forced_mode, mode
        try:
            yield self
        finally:
            self._forced_mode = prev

    def full(self) -> contextlib.AbstractContextManager:
        """The untrimmed model (every trimmer bypassed): ``with tmodel.full(): tmodel(**x)``."""
        return self.mode("off")

    @property
    def records(self) -> list[Record]:
        """Decisions of every trimmer in the last forward."""
        return self.runtime.records

    def kept_mask(self, stream: str) -> torch.Tensor | None:
        """After a forward: which token positions of ``stream``'s hidden states, laid out as its last
        trimmed layer returned them, are real kept tokens: a ``(B, N)`` bool tensor.

        The layout depends on the mode: ``hard``/``sample`` keep every position (dropped tokens are
        masked), ``remove`` returns only the kept tokens (all ``True``), ``packed`` returns each
        instance's kept tokens first, padded with zeros to the batch's maximum. Hand the states and
        this mask to whatever reads the stream afterwards (e.g. a decoder that generates from the
        kept image tokens). Padding tokens (``StreamSpec.padding_input`` or ``padding_source``) are ``False``. ``None``:
        no layer of the stream ran trimmed in the last forward (mode ``off``), so it is unchanged.
        If the stream's layers are called more than once per forward, the latest call counts.
        """
        known = {s.name for s in self.spec.streams}
        if stream not in known:
            raise KeyError(f"kept_mask: unknown stream {stream!r}; this model's streams: {sorted(known)}")
        rt = self.runtime
        if stream not in rt.streams:
            return None
        state = rt.streams[stream]
        pad = rt.padding.get(stream)
        if state is None or (state.mask is None and state.index is None and state.packing is None):
            return None if pad is None else pad != 0
        if state.packing is not None:
            pack = state.packing
            counts = torch.tensor(pack.counts, device=pack.cu.device)
            return torch.arange(pack.max, device=counts.device)[None, :] < counts[:, None]
        if state.index is not None:
            if pad is not None and pad.shape[-1] == state.length:
                return pad.to(state.index.device).index_select(1, state.index) != 0
            return torch.ones(1, state.index.numel(), dtype=torch.bool, device=state.index.device)
        keep = state.mask > 0
        if pad is not None and pad.shape == keep.shape:
            keep = keep & (pad.to(keep.device) != 0)
        return keep

    def set_targets(self, targets: dict[str, float]) -> None:
        """Current per-module targets (a curriculum scheduler moves them)."""
        self.runtime.targets = dict(targets)

    def set_temperature(self, temperature: float) -> None:
        self.runtime.temperature = float(temperature)

    # --- bucketed and compiled inference (batch 1) ---------------------------------------------
    @property
    def bucketing(self) -> Bucketing | None:
        """How batch-1 removal pads kept counts (:class:`~trimkit.engine.buckets.Bucketing`), or
        ``None`` (exact counts, the default). Set ``tmodel.bucketing = Bucketing(4)`` for eager
        bucketed execution; :meth:`compile` sets a compiled one."""
        return self.runtime.bucketing

    @bucketing.setter
    def bucketing(self, value: Bucketing | None) -> None:
        if value is not None and not isinstance(value, Bucketing):
            raise TypeError(f"TrimmedModel.bucketing must be a trimkit.engine.buckets.Bucketing or None, got "
                            f"{type(value).__name__}")
        if value is not None and value.compiled and not any(l._compiled for l in self._trimmed_layers()):
            raise ValueError("a compiled Bucketing needs compiled layers: use tmodel.compile(buckets=...)")
        self.runtime.bucketing = value

    def _trimmed_layers(self) -> list[Any]:
        from .layer import TrimmedLayer

        return [m for m in self._graph.modules() if isinstance(m, TrimmedLayer) and m.inner is not None]

    def compile(self, buckets: int = 4, options: dict[str, Any] | None = None, backend: Any = None) -> "TrimmedModel":
        """Compile batch-1 inference (mode ``remove``): every trimmed layer's own code (attention, MLP,
        norms) runs as an inductor-compiled graph, on tensors padded to one of ``buckets`` sizes per
        stream (:mod:`trimkit.engine.buckets`: slack rows masked as keys and cut after the layer), so
        each layer compiles once per bucket combination it meets (on first use, a few seconds each
        on CPU) and is reused after. The trimmers, the decision (one host synchronisation per layer)
        and the gathers stay eager; dropped heads are masked rather than sliced out. Training, batches
        (modes sample/hard/packed) and calls with gradients enabled are unaffected. ``options``: for
        ``torch._inductor`` (default ``{"cpp_wrapper": True}``). ``backend``: instead of inductor, a
        callable ``(graph_module, example_inputs) -> callable`` given each exported layer graph (its
        inputs flat: parameters, buffers, constants, then the call's tensors). :meth:`eager` undoes it for a block; KV-cached generation must run under
        it (the shipped generation helpers do). Returns the model."""
        from .engine.compiled import CompiledLayer, CompiledModule
        from .layer import PaddingProbe, StartsProbe, TrimmedLayer

        bucketing = Bucketing(buckets, compiled=True)  # validates buckets
        for layer in self._trimmed_layers():
            layer._compiled = CompiledLayer(layer, options, backend)
        # the modules the root graph calls outside the described layers (a text encoder run whole, a
        # pooler), those with submodules: a lone Linear or LayerNorm gains nothing compiled on its own
        gm, changed = self._graph, False
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = gm.get_submodule(node.target)
            if isinstance(m, CompiledModule):
                path = m.graphs.path
                m = m.module
            elif isinstance(m, (TrimmedLayer, PaddingProbe, StartsProbe)) or not any(True for _ in m.children()) \
                    or type(m).__module__.startswith("trimkit."):
                continue
            else:
                path = str(node.target)
            name = "trimkit_compiled_" + path.replace(".", "_")
            if hasattr(gm, name):
                delattr(gm, name)
            gm.add_submodule(name, CompiledModule(m, path, self.runtime, options, backend))
            node.target, changed = name, True
        if changed:
            gm.recompile()
        self.runtime.bucketing = bucketing
        return self

    @contextlib.contextmanager
    def eager(self) -> Iterator["TrimmedModel"]:
        """Batch-1 removal with exact counts and eager layers for the block (no :attr:`bucketing`):
        what KV-cached generation needs (slack rows would enter the cache)."""
        prev, self.runtime.bucketing = self.runtime.bucketing, None
        try:
            yield self
        finally:
            self.runtime.bucketing = prev

    def clear_caches(self) -> None:
        """Drop the weight copies cached for inference (kept-head weights, :mod:`trimkit.headcache`; the
        trimmers' fused forms, :meth:`trimkit.layer.LayerTrimmers.fused`).
        Weight changes through ``load_state_dict``, an optimizer or ``.to()`` are detected; run this
        after writing weights through ``.data``. Also run by :meth:`train` / :meth:`eval` and when
        trimmers are loaded."""
        from .headcache import KeptHeadCache

        graph = getattr(self.__dict__.get("_borrowed"), "graph", None)
        if graph is None:
            return
        for m in graph.modules():
            cache = getattr(m, "head_cache", None)
            if isinstance(cache, KeptHeadCache):
                cache.clear()
        for t in (self._modules.get("trimmers") or {}).values():
            t.clear_cache()

    def train(self, mode: bool = True) -> "TrimmedModel":
        self.clear_caches()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): keep the graph's tensor references in sync
        out = super()._apply(fn, recurse)
        self._sync_graph_attrs()
        return out

    def _sync_graph_attrs(self) -> None:
        """Point the root graph's attribute reads at the model's current tensors (see
        :func:`trimkit.trace.attribute_links`: fx copies them, and the root graph is not registered,
        so under FSDP it would train a stale unsharded copy while the optimizer updates the shards).
        Run before every forward: an identity check per attribute read."""
        from .trace import sync_attributes

        links = self.__dict__.get("_attr_links")  # found at construction
        if links:
            sync_attributes(links)

    # --- reporting -------------------------------------------------------------------------
    def trimmer_parameters(self) -> int:
        return sum(p.numel() for p in self.trimmers.parameters())

    def backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, include_backbone: bool = False, base_model: str | None = None,
                        base_revision: str | None = None, build_options: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint into ``directory`` (created if needed) and return it, laid out
        like a PEFT adapter (see :mod:`trimkit.checkpoint`): ``trimmers.safetensors``,
        ``backbone.safetensors`` (the model's own weights; only with ``include_backbone``),
        ``README.md`` (a model card with Hub front matter) and ``trim_config.json`` (the config,
        the adapter, the base model, the checkpoint format, the trimkit version and which files
        were saved). Load it with :meth:`from_pretrained`.

        By default only the trimmers are saved: loading then uses the weights of the base model
        the caller passes, so pass ``include_backbone=True`` when those weights are not kept
        elsewhere (a fine-tuned or randomly initialised backbone).

        ``base_model`` / ``base_revision``: the id (e.g. a Hub repo id) and revision of the base
        model, recorded in the config and the card; by default what the model says it is: its
        ``trimkit_base`` attribute (``{"model": id, "revision": rev}``, set by adapters'
        pretrained loaders), else a Hugging Face model's ``config._name_or_path`` /
        ``name_or_path``. ``build_options``: the adapter build options that made the backbone
        (a JSON-able dict, e.g. ``{"size": "tiny", "seed": 0}``), stored as given.

        Atomic (see :mod:`trimkit.checkpoint`): the files are written under temporary names and
        fsynced, then renamed into place, the config last; a failure (e.g. a full disk raising
        :class:`OSError`) leaves the directory's previous checkpoint intact and loadable, never a
        mix. ``include_backbone=False`` removes a ``backbone.safetensors`` an earlier save left
        in the directory. A ``README.md`` trimkit did not write is left as it is (no card is
        written). Other files in the directory are left alone."""
        import json

        from .checkpoint import base_model_of, write_checkpoint

        for name, value in (("base_model", base_model), ("base_revision", base_revision)):
            if value is not None and not (isinstance(value, str) and value):
                raise TypeError(f"save_pretrained({name}=...): must be a non-empty string or None, got "
                                f"{type(value).__name__} {value!r:.80}")
        if build_options is not None:
            if not isinstance(build_options, dict) or not all(isinstance(k, str) for k in build_options):
                raise TypeError(f"save_pretrained(build_options=...): must be a dict with string keys (the adapter "
                                f"build options), got {type(build_options).__name__} {build_options!r:.80}")
            try:
                json.dumps(build_options, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"save_pretrained(build_options=...): not JSON-able ({e}); use str, int, float, "
                                f"bool, None, lists and dicts") from None
        own_model, own_revision = base_model_of(self.model)
        if base_model is None:
            base_model = own_model
            base_revision = base_revision if base_revision is not None else own_revision
        elif base_revision is None and own_model == base_model:
            base_revision = own_revision
        if base_revision is not None and base_model is None:
            raise ValueError(f"save_pretrained(base_revision={base_revision!r}): no base model id to go with it (the "
                             f"model records none): pass base_model too")
        trimmers = _dedupe(self.trimmers.state_dict())
        backbone = _dedupe(self.model.state_dict()) if include_backbone else None
        return write_checkpoint(directory, adapter=self.adapter_name, config=self.config.model_dump(mode="json"),
                                trimmers=trimmers, backbone=backbone, base_model=base_model,
                                base_revision=base_revision, build_options=build_options)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory_or_repo: str | Path, *, revision: str | None = None,
                        strict: bool = True) -> "TrimmedModel":
        """Rebuild a :class:`TrimmedModel` from :meth:`save_pretrained` output onto
        ``base_model`` (an untrimmed model of the kind the checkpoint was saved from), as
        ``PeftModel.from_pretrained(base, dir)`` does: the checkpoint's config and adapter trim
        ``base_model``, then its weights are loaded: the trimmers and, when the checkpoint saved
        one, the backbone (``base_model``'s weights are replaced). A checkpoint saved without a
        backbone (the default) uses **the caller's model weights**, so pass the model whose
        weights the trimmers were trained with. The model keeps its train/eval mode.

        ``directory_or_repo``: a checkpoint directory, or the id of a Hugging Face Hub repo in the
        local HF cache (at ``revision``; nothing is downloaded, see
        :func:`trimkit.checkpoint.resolve_checkpoint`). ``strict``: refuse missing or unexpected
        weight keys (shapes must fit either way).

        When the checkpoint records its base model and ``base_model`` says it is another one (see
        :meth:`save_pretrained`), a :class:`UserWarning` names both; loading goes on.

        Refused with a :class:`~trimkit.checkpoint.CheckpointError` naming the file and field or
        value (see :meth:`load_trimmers`), also when the checkpoint's adapter is not registered
        here or ``base_model`` is one another adapter recognises. On an error ``base_model``'s
        weights are unchanged."""
        from .checkpoint import CheckpointError, base_model_of, read_meta, resolve_checkpoint
        from .registry import UnknownNameError

        if isinstance(base_model, TrimmedModel):
            raise TypeError(f"loading {str(directory_or_repo)!r}: this model is already trimmed (TrimmedModel); pass "
                            f"its .model (the untrimmed model) instead")
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"TrimmedModel.from_pretrained(base_model, {str(directory_or_repo)!r}): base_model must "
                            f"be the untrimmed model (an nn.Module), got {type(base_model).__name__} "
                            f"{base_model!r:.80}; build or load it first")
        directory = resolve_checkpoint(directory_or_repo, revision=revision)
        meta = read_meta(directory)
        registry = get_registry()
        try:
            impl = registry.adapters.get(meta.adapter)
        except UnknownNameError as e:
            known = e.args[0] if e.args else e
            raise CheckpointError(f"{meta.path}: field 'adapter' names {meta.adapter!r}, which is not registered "
                                  f"here ({known}); install or register the plugin that provides it") from None
        matches = getattr(impl, "matches", None)
        if callable(matches) and not matches(base_model):
            try:
                other = select_adapter(base_model)
            except LookupError:
                other = None  # no adapter claims it: trim with the checkpoint's adapter, as the save did
            if other is not None and other != meta.adapter:
                raise CheckpointError(f"{meta.path}: the checkpoint was saved with adapter {meta.adapter!r}, but the "
                                      f"model given ({type(base_model).__qualname__}) is one for adapter {other!r}: "
                                      f"pass a model of the kind the checkpoint was saved from")
        try:
            given, _ = base_model_of(base_model)
        except ValueError:  # a malformed trimkit_base (refused by save_pretrained) does not stop a load
            given = None
        if meta.base_model is not None and given is not None and given != meta.base_model:
            warnings.warn(f"trimkit: {meta.path} was saved from base model {meta.base_model!r} (field "
                          f"'base_model'), but the model given is {given!r}; the trimmers may not fit its weights",
                          UserWarning, stacklevel=2)
        tmodel = trim(base_model, meta.config, adapter=meta.adapter)
        tmodel.load_trimmers(directory, strict=strict)
        return tmodel

    def load_trimmers(self, directory: str | Path, strict: bool = True, *, require_backbone: bool = False) -> None:
        """Load the weights of a :meth:`save_pretrained` checkpoint into this model: the trimmers,
        and the backbone when the checkpoint saved one (else this model's own weights stay).

        Everything is read and checked before anything is loaded, so on an error this model is
        unchanged. Refused with a :class:`~trimkit.checkpoint.CheckpointError` naming the file (a
        :class:`FileNotFoundError` too when a file is missing): a missing or broken
        ``trim_config.json``, a checkpoint of a newer format or of another adapter, a corrupt
        safetensors file, files of two different saves, a backbone the config lists that is
        missing or one it does not list that is there, weights that do not fit the model (with
        ``strict``, missing or unexpected keys too) and, with ``require_backbone``, a
        checkpoint without a backbone (for callers whose model is freshly built, whose weights
        mean nothing)."""
        from .checkpoint import TRIMMERS_FILE, CheckpointError, check_backbone, laid_out_like, read_meta, read_tensors

        meta = read_meta(directory)
        if meta.adapter != self.adapter_name:
            raise CheckpointError(f"{meta.path}: field 'adapter' is {meta.adapter!r}, but this TrimmedModel was "
                                  f"trimmed with adapter {self.adapter_name!r}: load the checkpoint onto a model of "
                                  f"the kind it was saved from (load_trimmed(directory, model))")
        trimmers_path = meta.directory / TRIMMERS_FILE
        loads = [(self.trimmers, read_tensors(trimmers_path, meta), str(trimmers_path))]
        backbone_path = check_backbone(meta, require=require_backbone)
        if backbone_path is not None:
            loads.append((self.model, read_tensors(backbone_path, meta), str(backbone_path)))
        for module, state, source in loads:  # all checked before any is loaded
            _check_fits(module, state, source, strict)
        for module, state, source in loads:
            module.load_state_dict(laid_out_like(module, state), strict=strict)  # (sharded weights: their shards)
        self.clear_caches()


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as safetensors takes it: detached, contiguous, no two tensors sharing storage
    (a tied weight's later names get a copy; loading assigns the values to each name)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().contiguous()
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() > 0 else v  # safetensors refuses shared storage
        if v.numel() > 0:
            seen.add(ptr)
    return out


def _check_fits(module: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool) -> None:
    """Raise a ValueError naming ``source`` unless ``state`` loads into ``module`` (shapes; with
    ``strict``, the same keys)."""
    own = module.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if bad or (strict and (missing or unexpected)):
        raise ValueError(f"{source} does not match the model: shape mismatches {bad[:5]}, missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(bad)}/{len(missing)}/{len(unexpected)} in all); load "
                         f"it onto a model built like the one it was saved from")


def _attach_probes(spec: ModelSpec, layers: dict[str, Any], policy: str) -> list[Any]:
    """Give each layer whose token policy reads a :class:`~trimkit.probe.TokenContext` and the attention
    it offers (``reads_attention``, default ``True``) the attention probe of the layer before it in the same stream (its first self-attention of that stream); returns
    the probes."""
    from .probe import AttentionProbe

    probes = []
    order = [l for l in spec.layers]
    for i, lspec in enumerate(order):
        layer = layers.get(lspec.path)
        if layer is None or not layer.reads_attention:
            continue
        before = [l for l in order[:i] if l.stream == lspec.stream and l.path in layers]
        if not before:
            raise TrimConfigError(
                f"token_policy {policy!r} reads the attention of the layer before the one it trims, but layer "
                f"{lspec.path!r} is the first layer of stream {lspec.stream!r}: select a later layer (token_layers)")
        prev = before[-1]
        hits = [j for j, (a, (q, k)) in enumerate(zip(prev.attentions, prev.roles()))
                if a.kind == "self" and q == k == lspec.stream]
        if not hits:
            raise TrimConfigError(f"token_policy {policy!r} at layer {lspec.path!r}: the layer before it, "
                                  f"{prev.path!r}, has no self-attention over stream {lspec.stream!r} to read")
        inner = layers[prev.path].inner
        if inner is None:
            raise TrimConfigError(f"token_policy {policy!r} at layer {lspec.path!r}: the layer before it, "
                                  f"{prev.path!r}, is described without its attention (tokens only), so its "
                                  f"attention cannot be read")
        layer.attention_probe = AttentionProbe(inner.get_submodule(f"trimkit_attn_{hits[0]}"), prev.path)
        probes.append(layer.attention_probe)
    return probes


def _make_plan(tmodel: "TrimmedModel", rewritten: Any) -> TrimPlan:
    """The printable :class:`~trimkit.plan.TrimPlan` of a rewrite (see ``print(tmodel.plan)``)."""
    spec, targets = tmodel.spec, tmodel.final_targets
    layers = []
    for lspec in spec.layers:
        wrapper = rewritten.layers[lspec.path]
        ctx = lspec.context_stream
        attentions = []
        reads = [ctx] if ctx else []
        for i, (a, (queries, keys)) in enumerate(zip(lspec.attentions, lspec.roles())):
            keys = keys or "?"
            if keys != lspec.stream and keys not in reads:
                reads.append(keys)
            impl = next((m for n, m in wrapper.inner.named_children()
                         if n == f"trimkit_attn_{i}" or n.startswith(f"trimkit_attn_{i}_call")), None)
            route = f"kernel/{impl.route}" if a.via == "kernel" and impl is not None else a.via
            if a.head_slices:  # the kept heads' projections only, at batch 1
                route += " (head slices)"
            attentions.append(AttentionPlan(i, a.path, a.call, a.kind, queries, keys, route,
                                            targets.get(f"{lspec.path}.{i}")))
        args = [f"{k} (dim {d})" for k, d in wrapper.hidden_side.items()]
        args += [f"{k} (dim {d}, as {ctx})" for k, d in wrapper.context_side.items()]
        for u in lspec.updates:  # the other stream's own arguments, gathered by its token step
            args += [f"{k} (dim {d}, as {u.stream})" for k, d in u.token_args.items()]
        segments = [g.name for g in spec.stream(lspec.stream).segments]
        token_target = targets.get(lspec.path)
        if segments and f"{lspec.path}:{segments[0]}" in targets:
            token_target = {g: targets[f"{lspec.path}:{g}"] for g in segments}
        layers.append(LayerPlan(lspec.path, lspec.stream, lspec.site, rewritten.calls.get(lspec.path, 0), tuple(reads),
                                token_target, tuple(str(a) for a in args), tuple(attentions), lspec.trimmable,
                                tuple((u.stream, targets.get(f"{lspec.path}@{u.stream}")) for u in lspec.updates)))
    outside = tuple(f"{t.module}.{t.arg} ({t.stream}, dim {t.dim})" for t in spec.token_args)
    return TrimPlan(tmodel.adapter_name, tmodel.config.token_policy, tmodel.config.head_policy,
                    tuple(stream_plan(s, spec.input_names) for s in spec.streams), tuple(layers), outside)


def _safe(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", key)


def trim(model: nn.Module, config: TrimConfig | None = None, *, adapter: str | None = None,
         example_inputs: dict[str, Any] | None = None) -> TrimmedModel:
    """Insert trimmers into ``model`` (no source edits) and return the :class:`TrimmedModel`.

    The adapter is ``adapter`` or ``config.adapter`` or picked by the plugins from the model. An
    adapter with a ``root`` method (:class:`trimkit.adapter.Adapter`) may put a thin traceable
    wrapper around a model it matches (a transformers task model): the result then trims that
    wrapper, whose forward and outputs are the ones ``tmodel`` has.
    ``example_inputs`` (for shape inference) default to the adapter's random inputs.
    """
    if isinstance(model, TrimmedModel):
        raise TypeError("trim(): this model is already trimmed (TrimmedModel); trim its .model or load_trimmed "
                        "(trimkit.load_trimmed(directory, model) with the untrimmed model) to restore saved trimmers")
    config = config or TrimConfig()
    registry = get_registry()
    name = adapter or config.adapter or select_adapter(model)
    impl = registry.adapters.get(name)
    was_training = model.training  # the caller's model's (a new wrapper around it starts in train mode)
    root = getattr(impl, "root", None)
    if callable(root):  # a thin traceable wrapper for a model the adapter matches but cannot trace as it is
        model = root(model)
    spec = impl.describe(model)
    if example_inputs is None:
        example_inputs = impl.example_inputs(model, batch_size=1, seed=0)
    model.eval()
    tmodel = TrimmedModel(model, config, name, spec, example_inputs)
    tmodel.train(was_training)
    return tmodel


def load_trimmed(directory: str | Path, model: nn.Module) -> TrimmedModel:
    """Rebuild a :class:`TrimmedModel` from :meth:`TrimmedModel.save_pretrained` output onto
    ``model``: ``TrimmedModel.from_pretrained(model, directory)`` (see there).

    A checkpoint saved without a backbone (the default) has none: **the caller's model weights
    are used**, so pass the model whose weights the trimmers were trained with."""
    return TrimmedModel.from_pretrained(model, directory)
