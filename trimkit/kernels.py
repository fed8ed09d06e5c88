"""Attention handled at the kernel: the model's attention module runs itself, and only the call that
computes ``softmax(Q K^T) V`` is intercepted (``AttentionSpec(via="kernel")``).

Whatever the module does to its queries and keys before that call (rotary or ALiBi position
encodings, qk-norm, grouped-query heads, LoRA or quantised projections, hooks) keeps working,
because trimkit never recomputes the module. Two interception routes, picked per module:

* **fx** (``F.scaled_dot_product_attention`` in the module's code, e.g. timm ``Attention``): the
  module is traced once and each ``scaled_dot_product_attention`` call node is replaced by
  :func:`sdpa`, which takes trimkit's per-call :class:`~trimkit.ops.AttnTrim` as an extra argument.
* **attention interface** (transformers modules that call ``ALL_ATTENTION_FUNCTIONS``: Llama,
  Qwen2-VL, CLIP, SigLIP, BridgeTower...): trimkit registers its implementation under the name
  :data:`INTERFACE_NAME` with ``transformers.AttentionInterface.register`` and selects it on the
  module's config for the duration of the call only; the trim travels in the call's ``**kwargs``,
  which those modules forward to the attention function.

What the kernel does with a trim, per mode:

* masked (``sample``/``hard``): dropped keys get ``log(mask)`` added to the scores (-inf when 0);
  each query head's output is scaled by its head mask.
* ``remove`` (batch 1): the dropped tokens are already gone from q/k/v; only the kept query heads
  are attended (their outputs scattered into zeros), since the projections already ran.
* ``packed``: q/k/v arrive as one row matrix ``(1, H, R, d)``; attention runs per instance by
  cumulative lengths (:func:`trimkit.engine.packed.varlen_attention`), heads masked per instance.

Cost: head trimming on this route saves the attention of the dropped heads but not their
projections (the module computed them); declared projections (``via="projections"``) remove those
too, for modules trimkit can recompute exactly.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .engine import packed as P
from .ops import AttnTrim, SlicedHeads, key_bias
from .spec import AttentionSpec
from .trace import TraceError, Tracer, fixed_args, param_names, plain_codegen, traceable_view

__all__ = ["INTERFACE_NAME", "KernelAttention", "HeadSlices", "sdpa", "attend", "module_dropout", "DROPOUT_ATTRIBUTES"]

INTERFACE_NAME = "trimkit"
"""The name trimkit's attention function is registered under in ``transformers.AttentionInterface``."""

_NO_TRIM = AttnTrim()


#: Attributes read, in order, for an attention module's own attention-dropout probability: a float or an
#: ``nn.Dropout`` (timm ``attn_drop``, CLIP/SigLIP ``dropout`` float, HF BERT/BLIP ``dropout`` module,
#: ``nn.MultiheadAttention.dropout``, METER ``dropout``). ``trimkit_attention_dropout`` lets a model say it.
DROPOUT_ATTRIBUTES = ("trimkit_attention_dropout", "attn_drop", "attention_dropout", "attn_dropout", "dropout",
                      "dropout_p", "dropout_prob")


def module_dropout(module: nn.Module) -> float:
    """The attention-dropout probability ``module`` applies to its attention weights in train mode, read
    from the first of :data:`DROPOUT_ATTRIBUTES` it has (0.0 when it has none): what trimmed attention
    applies with ``TrimConfig.attention_dropout = "model"`` where trimkit recomputes the attention
    (``AttentionSpec(via="projections")``); on the kernel route the module passes its own."""
    for name in DROPOUT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, nn.Dropout):
            return float(value.p)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An sdpa-style mask (bool: True = may attend, or additive float) as an additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _causal(nq: int, nk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Causal additive mask (Nq, Nk), top-left aligned exactly as sdpa's ``is_causal`` (which the unmasked
    path uses), so masked and removed calls agree for any Nq, Nk."""
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device).tril(0)
    return torch.zeros(nq, nk, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def _repeat_heads(k: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Grouped-query k/v with fewer heads -> one per query head (each KV head serves H/Hkv queries)."""
    hk = k.shape[dim]
    if hk == heads:
        return k
    if heads % hk:
        raise RuntimeError(f"trimkit: {heads} query heads cannot share {hk} key/value heads")
    return k.repeat_interleave(heads // hk, dim=dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
           trim: AttnTrim | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` under a trim: q (B, H, Nq, d), k/v (B, Hkv, Nk, d) with
    Hkv dividing H (grouped-query attention); returns (B, H, Nq, dv) like
    ``F.scaled_dot_product_attention``. Without a trim this *is* sdpa. ``dropout_p`` is what the module
    passed (its own probability in train mode); a trim with ``dropout="none"``
    (``TrimConfig.attention_dropout``) drops it."""
    trim = trim or _NO_TRIM
    if trim.dropout == "none":
        dropout_p = 0.0
    if trim.packed is not None:
        return _attend_packed(q, k, v, mask, is_causal, scale, trim)
    if trim.sliced is not None:  # the projections computed the kept heads only: every head here is kept
        k, v, mask = _sliced_inputs(q, k, v, mask, trim.sliced)
        trim = AttnTrim(key_mask=trim.key_mask, dropout=trim.dropout)
    heads = q.shape[1]
    if k.shape[1] != heads:
        k, v = _repeat_heads(k, heads, 1), _repeat_heads(v, heads, 1)
    extra = None if trim.key_mask is None else key_bias(trim.key_mask, q.dtype)
    # a module mask per query row (a window or block mask) can leave a query no key once trimkit's mask
    # drops keys too (a window whose tokens were all dropped): that row must give 0, not NaN, whatever the
    # SDPA backend does with a fully masked row, or the NaN spreads through its values to every query later
    dead_rows = extra is not None and mask is not None and mask.dim() >= 2 and mask.shape[-2] > 1
    if extra is not None or (is_causal and mask is not None):
        mask = _additive(mask, q.dtype)
        if is_causal:
            causal = _causal(q.shape[2], k.shape[2], q.dtype, q.device)
            mask = causal if mask is None else mask + causal
            is_causal = False
        if extra is not None:
            mask = extra if mask is None else mask + extra
    runs = trim.head_runs
    if runs is None and trim.head_index is not None:
        runs = [(int(i), int(i) + 1) for i in trim.head_index.tolist()]
    if runs is not None:  # mode remove: attend only the kept query heads
        y = q.new_zeros(*q.shape[:3], v.shape[-1])
        keep = torch.cat([torch.arange(a, e, device=q.device) for a, e in runs]) if runs else None
        if keep is not None:
            sel_mask = mask
            if mask is not None and mask.dim() == 4 and mask.shape[1] == heads:
                sel_mask = mask.index_select(1, keep)
            part = F.scaled_dot_product_attention(
                q.index_select(1, keep), k.index_select(1, keep), v.index_select(1, keep), attn_mask=sel_mask,
                dropout_p=dropout_p, is_causal=is_causal, scale=scale)
            if dead_rows:  # as on the dense path: a query left no key gives 0
                part = part.masked_fill(torch.isneginf(sel_mask).all(-1, keepdim=True), 0.0)
            y[:, keep] = part
        return y
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                       scale=scale)
    if dead_rows:
        y = y.masked_fill(torch.isneginf(mask).all(-1, keepdim=True), 0.0)
    if trim.head_mask is not None:
        y = y * trim.head_mask.to(y.dtype)[:, :, None, None]
    return y


def _sliced_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   sl: SlicedHeads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys/values (and a per-head mask) of a head-sliced call, one per kept query head; checks that the
    module shaped its sliced projections into the kept heads (a module that reshapes by head *count*
    would have split them into heads of the wrong size)."""
    kept = sl.heads.numel()
    if q.shape[1] != kept or q.shape[-1] != sl.head_dim or k.shape[1] != sl.kv_heads or v.shape[1] != sl.kv_heads:
        raise RuntimeError(
            f"trimkit: attention {sl.path!r} with AttentionSpec.head_slices: its kernel got q {tuple(q.shape)} and k "
            f"{tuple(k.shape)} but its sliced projections make {kept} query heads and {sl.kv_heads} key/value heads of "
            f"size {sl.head_dim}: the module does not shape its projections by head size (view(..., -1, head_dim)); "
            "set head_slices=False for it")
    if sl.kv_index is not None:
        k, v = k.index_select(1, sl.kv_index), v.index_select(1, sl.kv_index)
    if mask is not None and mask.dim() == 4 and mask.shape[1] == sl.total and sl.total > 1:
        mask = mask.index_select(1, sl.heads)
    return k, v, mask


def _attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool, scale: float | None, trim: AttnTrim) -> torch.Tensor:
    """Mode packed: (1, H, R, d) rows of a batch; attention per instance by cumulative lengths."""
    pc = trim.packed
    if is_causal and (pc.q.padded or mask is not None):
        raise NotImplementedError("trimkit packed mode: causal attention is supported on packed rows without an "
                                  "attention mask only (not in mode 'padded', not with a mask as well); use "
                                  "tmodel.inference = 'packed' without a mask, or 'remove'")
    if pc.q.padded:  # the padded baseline: (B, max kept) layout with key-padding masks
        mask = _additive(mask, q.dtype)
        flag = P.key_bias_flag(mask, pc.k)
        if flag is not None:
            pc.checks.append(flag)
        pad = P.key_padding_bias(pc.k, q.dtype)
        return attend(q, k, v, pad if mask is None else pad + mask, scale=scale,
                      trim=AttnTrim(head_mask=trim.head_mask))
    if q.shape[0] != 1 or q.shape[2] != pc.q.total or k.shape[2] != pc.k.total:
        raise RuntimeError(f"trimkit packed mode: attention got q {tuple(q.shape)} and k {tuple(k.shape)}, expected "
                           f"packed rows (1, H, {pc.q.total}, d) and (1, Hkv, {pc.k.total}, d): the model changed the "
                           "token layout between layers")
    flag = P.key_bias_flag(_additive(mask, q.dtype), pc.k)
    if flag is not None:
        pc.checks.append(flag)
    heads = q.shape[1]
    qr = q[0].transpose(0, 1)  # (R, H, d)
    kr = _repeat_heads(k[0], heads, 0).transpose(0, 1)
    vr = _repeat_heads(v[0], heads, 0).transpose(0, 1)
    # causal per instance over its kept rows, in their (original) order and aligned as sdpa's is_causal,
    # as the removed model attends at batch 1
    y = P.varlen_attention(qr, kr, vr, pc.q, pc.k, scale, causal=is_causal)
    if trim.head_mask is not None:
        y = y * trim.head_mask.to(y.dtype).index_select(0, pc.q.bidx)[:, :, None]
    return y.transpose(0, 1).unsqueeze(0)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
         *, trimkit_trim: AttnTrim | None = None) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` inside a traced attention module (fx route)."""
    if trimkit_trim is not None and trimkit_trim.capture is not None:  # an attention probe reads q/k here
        trimkit_trim.capture(query, key, attn_mask, scale, is_causal, trimkit_trim)
    return attend(query, key, value, attn_mask, dropout_p, is_causal, scale, trimkit_trim)


def interface_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, trimkit_trim: AttnTrim | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """trimkit's ``transformers.AttentionInterface`` implementation: sdpa semantics (GQA, causal
    when the module is causal and no mask is given, dropout as passed) plus the trim. Returns
    ``(B, Nq, H, d)`` and no weights, as transformers' ``sdpa_attention_forward`` does."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"trimkit attention: {type(module).__name__} passes softcap/position_bias, "
                                  "which trimkit's kernel does not implement")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False)) and attention_mask is None and query.shape[2] > 1
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    if trimkit_trim is not None and trimkit_trim.capture is not None:  # an attention probe reads q/k here
        trimkit_trim.capture(query, key, attention_mask, scaling, is_causal, trimkit_trim)
    y = attend(query, key, value, attention_mask, dropout if module.training else 0.0, is_causal, scaling,
               trimkit_trim)
    return y.transpose(1, 2).contiguous(), None


_REGISTERED = False


def _register_interface() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(INTERFACE_NAME, interface_attention)
        _REGISTERED = True


def _uses_attention_interface(module: nn.Module) -> bool:
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "_attn_implementation"):
        return False
    forward = inspect.unwrap(type(module).forward)  # through every decorator (transformers stacks them)
    names = getattr(getattr(forward, "__code__", None), "co_names", ())
    return "ALL_ATTENTION_FUNCTIONS" in names or "get_interface" in names


#: Keyword arguments through which a module receives a KV cache (transformers' names): a call given one
#: is not head-sliced, since the cache must keep every key/value head for the steps after it.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")

_MAX_SLICE_SETS = 64


class _Linear(nn.Module):
    """A projection restricted to some rows (outputs) or columns (inputs) of its weights for one call:
    what :class:`HeadSlices` puts in place of a declared projection while the module runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: tuple = ()  # (weight, bias): a tuple, so a parameter's bias is not registered here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.weights)


def _pick(t: torch.Tensor | None, sel: slice | torch.Tensor, dim: int) -> torch.Tensor | None:
    if t is None:
        return None
    if isinstance(sel, slice):
        return t[sel] if dim == 0 else t[:, sel]
    return t.index_select(dim, sel)


class HeadSlices:
    """A kernel-route attention's declared projections, sliced to the kept heads for a call
    (``AttentionSpec.head_slices``, mode ``remove``).

    Built once per module: the ``q``/``k``/``v``/``out`` children must be ``nn.Linear`` of matching
    shapes (``num_heads`` query heads, key/value heads dividing them). At a call, each projection is
    replaced in the running module by its kept rows (``out``: its kept columns) and put back after;
    a call falls back to the full projections (``None`` from :meth:`enter`) when a projection is no
    longer a plain ``nn.Linear`` or has hooks, or the module has forward pre-hooks (one may hand it a
    KV cache, which must keep every head: what ``trimkit_llava``'s generation does). Row selections are cached per kept-head set; a single
    run of consecutive heads is a view of the weights, several are gathered (``index_select``)."""

    def __init__(self, module: nn.Module, spec: AttentionSpec, path: str) -> None:
        self.path = path
        self.names = (spec.q, spec.k, spec.v, spec.out)
        found = []
        for role, name in zip(("q", "k", "v", "out"), self.names):
            try:
                found.append(module.get_submodule(name))
            except AttributeError:
                raise ValueError(f"attention {path!r} (AttentionSpec.head_slices): its {role} projection {name!r} "
                                 f"does not exist; name it with AttentionSpec({role}=...)") from None
        q, k, v, o = found
        for role, m in zip(("q", "k", "v", "out"), found):
            if not isinstance(m, nn.Linear):
                raise ValueError(f"attention {path!r} (AttentionSpec.head_slices): its {role} projection "
                                 f"{m.__class__.__name__} is not an nn.Linear")
        heads = spec.num_heads
        if q.out_features % heads:
            raise ValueError(f"attention {path!r}: q projection of {q.out_features} outputs cannot make {heads} heads")
        self.total, self.head_dim = heads, q.out_features // heads
        if k.out_features != v.out_features or k.out_features % self.head_dim:
            raise ValueError(f"attention {path!r}: k/v projections of {k.out_features}/{v.out_features} outputs do not "
                             f"make heads of size {self.head_dim}")
        self.kv_total = k.out_features // self.head_dim
        if heads % self.kv_total or o.in_features != q.out_features:
            raise ValueError(f"attention {path!r}: {heads} query heads cannot share {self.kv_total} key/value heads, "
                             f"or the out projection takes {o.in_features} inputs, not {q.out_features}")
        self.group = heads // self.kv_total
        self._stand_ins = (_Linear(), _Linear(), _Linear(), _Linear())
        self._sets: dict[tuple, tuple] = {}

    def _selection(self, runs: list[tuple[int, int]], device: torch.device) -> tuple:
        # index tensors made under inference_mode cannot be saved for a backward later: cached apart
        key = (tuple(runs), torch.is_inference_mode_enabled())
        hit = self._sets.get(key)
        if hit is not None and hit[0].device == device:
            return hit
        d, g = self.head_dim, self.group
        kept = [h for a, e in runs for h in range(a, e)]
        kv = sorted({h // g for h in kept})
        if len(runs) == 1:
            a, e = runs[0]
            q_sel: slice | torch.Tensor = slice(a * d, e * d)
            kv_sel: slice | torch.Tensor = slice(kv[0] * d, (kv[-1] + 1) * d)
        else:
            q_sel = torch.tensor([h * d + i for h in kept for i in range(d)], dtype=torch.long, device=device)
            kv_sel = q_sel if g == 1 else torch.tensor([h * d + i for h in kv for i in range(d)], dtype=torch.long,
                                                       device=device)
        kv_index = None
        if g > 1:
            at = {h: j for j, h in enumerate(kv)}
            kv_index = torch.tensor([at[h // g] for h in kept], dtype=torch.long, device=device)
        heads = torch.tensor(kept, dtype=torch.long, device=device)
        hit = (heads, q_sel, kv_sel, kv_index, len(kv))
        if len(self._sets) >= _MAX_SLICE_SETS:
            self._sets.pop(next(iter(self._sets)))
        self._sets[key] = hit
        return hit

    def enter(self, run: nn.Module, runs: list[tuple[int, int]]) -> tuple[SlicedHeads, list] | None:
        """Put the kept heads' projections in place in ``run`` (the module, or its traced graph); returns
        the kernel's check and what :meth:`leave` restores, or ``None`` to run the full projections (also
        when no head is kept: a module cannot shape zero features by head size)."""
        # a forward pre-hook may hand the module a KV cache (which must keep every head); post-hooks see its
        # full-width output and need nothing
        if not runs or run._forward_pre_hooks:
            return None
        found = self.projections(run)
        if found is None or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                or m._backward_pre_hooks for m in found):
            return None
        heads, q_sel, kv_sel, kv_index, n_kv = self._selection(runs, found[0].weight.device)
        # every slice taken before anything is swapped: a failure leaves the module as it was
        weights = [(_pick(m.weight, sel, 0), _pick(m.bias, sel, 0)) for m, sel in zip(found[:3], (q_sel, kv_sel, kv_sel))]
        weights.append((_pick(found[3].weight, q_sel, 1), found[3].bias))
        restore = []
        for name, m, stand_in, w in zip(self.names, found, self._stand_ins, weights):
            stand_in.weights = w
            parent, _, leaf = name.rpartition(".")
            owner = run.get_submodule(parent) if parent else run
            restore.append((owner, leaf, m))
            owner._modules[leaf] = stand_in
        return SlicedHeads(self.path, heads, self.total, self.head_dim, n_kv, kv_index), restore

    def projections(self, run: nn.Module) -> list[nn.Linear] | None:
        """The declared projections as ``run`` calls them now, or ``None`` when one is missing or is no
        longer a plain ``nn.Linear`` (replaced by LoRA or a quantised linear after trimming)."""
        try:
            found = [run.get_submodule(n) for n in self.names]
        except AttributeError:
            return None
        return found if all(type(m) is nn.Linear for m in found) else None

    def leave(self, restore: list) -> None:
        for owner, leaf, m in restore:
            owner._modules[leaf] = m
        for stand_in in self._stand_ins:  # hold no weights between calls
            stand_in.weights = ()


class KernelAttention(nn.Module):
    """An attention module run as it is, with its ``softmax(QK^T)V`` call under trimkit's control.

    ``concrete``: the module's arguments that are constants at its call site, ``symbolic``: those
    that are graph values; the fx trace fixes every other argument to its default. Holds the module by reference through its traced graph (fx route) or directly.
    """

    def __init__(self, module: nn.Module, path: str, concrete: dict[str, Any], symbolic: set[str],
                 autowrap: Sequence[Callable] = (), spec: AttentionSpec | None = None) -> None:
        super().__init__()
        self.path = path
        self.slices = HeadSlices(module, spec, path) if spec is not None and spec.head_slices else None
        self.names = param_names(module)
        if _uses_attention_interface(module):
            _register_interface()
            self.route = "attention_interface"
            self.run = module
            return
        self.route = "fx"
        self.run = self._trace(module, path, concrete, symbolic, autowrap)
        # the traced forward's inputs: arguments that were constants at the call site are fixed in it
        self.inputs = {n.target for n in self.run.graph.nodes if n.op == "placeholder"} - {"trimkit_trim"}
        if self.slices is not None:
            called = {str(n.target) for n in self.run.graph.nodes if n.op == "call_module"}
            missing = [n for n in self.slices.names if n not in called]
            if missing:
                raise ValueError(f"attention {path!r} (AttentionSpec.head_slices): its traced forward does not call "
                                 f"the projections {missing} as modules (it reads their weights, or they are not its "
                                 "projections); name the nn.Linear children it calls, or set head_slices=False")

    @staticmethod
    def _trace(module: nn.Module, path: str, concrete: dict[str, Any], symbolic: set[str],
               autowrap: Sequence[Callable]) -> fx.GraphModule:
        try:
            graph = Tracer(autowrap_functions=autowrap, root=module).trace(traceable_view(module),
                                              concrete_args=fixed_args(module, symbolic, concrete) or None)
        except Exception as err:
            raise TraceError(
                f"trimkit: cannot trace attention module {path!r} ({type(module).__name__}) to find its "
                f"scaled_dot_product_attention call: {type(err).__name__}: {err}. Describe it with "
                "AttentionSpec(via='projections') and its projection names instead") from err
        hits = [n for n in graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
        if not hits:
            raise TraceError(
                f"trimkit: attention module {path!r} ({type(module).__name__}) never calls "
                "F.scaled_dot_product_attention (it computes softmax(QK^T)V with explicit matmuls, or its fused "
                "path is off): describe it with AttentionSpec(via='projections') instead")
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(placeholders[-1]):
            trim = graph.placeholder("trimkit_trim", default_value=None)
        for node in hits:
            node.target = sdpa
            node.kwargs = {**node.kwargs, "trimkit_trim": trim}
        finish = plain_codegen(graph)
        gm = fx.GraphModule(module, graph)
        finish(gm)
        gm.recompile()
        return gm

    def forward(self, *args: Any, trimkit_trim: AttnTrim | None = None, **kwargs: Any) -> Any:
        if (self.slices is not None and trimkit_trim is not None and trimkit_trim.head_runs is not None
                and trimkit_trim.capture is None and not self._given_cache(args, kwargs)):
            entered = self.slices.enter(self.run, trimkit_trim.head_runs)
            if entered is not None:
                sliced, restore = entered
                trim = AttnTrim(key_mask=trimkit_trim.key_mask, sliced=sliced, dropout=trimkit_trim.dropout)
                try:
                    return self._call(args, trim, kwargs)
                except RuntimeError as err:
                    # only the plain errors a wrong shape gives (not NotImplementedError, out of memory...)
                    if type(err) is not RuntimeError or "head_slices" in str(err):
                        raise
                    raise RuntimeError(f"trimkit: attention {self.path!r} failed with its projections sliced to the "
                                       f"kept heads (AttentionSpec.head_slices): {err}. The module must shape them "
                                       "by head size (view(..., -1, head_dim)); set head_slices=False for it") from err
                finally:
                    self.slices.leave(restore)
        return self._call(args, trimkit_trim, kwargs)

    def _given_cache(self, args: tuple, kwargs: dict) -> bool:
        """Whether this call hands the module a KV cache (by keyword, or positionally by its parameter name)."""
        call = dict(zip(self.names, args)) | kwargs
        return any(call.get(n) is not None for n in CACHE_ARGUMENTS)

    def _call(self, args: tuple, trimkit_trim: AttnTrim | None, kwargs: dict) -> Any:
        if self.route == "fx":
            call = dict(zip(self.names, args)) | kwargs
            return self.run(**{k: v for k, v in call.items() if k in self.inputs}, trimkit_trim=trimkit_trim)
        cfg = self.run.config
        prev = cfg._attn_implementation
        cfg._attn_implementation = INTERFACE_NAME  # this call only: the rest of the model is untouched
        try:
            return self.run(*args, trimkit_trim=trimkit_trim or _NO_TRIM, **kwargs)
        finally:
            cfg._attn_implementation = prev
