"""FTKD, the static depth baseline of the paper's Table 1: a smaller model made of layers taken from the
backbone, fine-tuned with knowledge distillation from the backbone (Jiao et al. 2020, TinyBERT).

* :func:`select_layers`: a copy of any model with some of its layer stacks (``nn.ModuleList`` s,
  by module path) cut down to chosen layers, their weights copied from the model.
* :func:`uniform_layers`: TinyBERT's uniform layer mapping (student layer ``i`` <- teacher layer
  ``(i + 1) * n / k - 1``: every ``n/k``-th layer, the last one included).
* :func:`choose_depths`: the kept layer counts whose MACs (counted, batch 1) are nearest a target
  reduction.
* :class:`FTKDObjective`: task loss + the task's distillation discrepancy between student and
  teacher logits (TinyBERT's prediction-layer loss) + the mean squared error between each student
  layer's output and the teacher layer it was copied from (TinyBERT's hidden-state loss) + with
  ``attentions`` (:func:`attention_pairs`) TinyBERT's attention-map loss: the MSE of the
  unnormalised attention scores of each matched attention call, recomputed from the module's
  declared projections (the models attend through fused SDPA kernels, which never form the
  matrix). The teacher is run by the :class:`~trimkit_train.trainer.Trainer` (``teacher=``)
  without gradients.
* :func:`layer_groups`: a described model's stacks, grouped as FTKD cuts them.

The TRIPS-style baseline is a token policy
(``trimkit_smarttrim.TripsTokenPolicy``, ``token_policy: trips``) and is trained by the Trainer as
any trimmed model.

The model's forward must iterate over the stacks (``for layer in self.layers``), as transformers',
timm's and trimkit's adapters' models do; a model that indexes a stack by a configured count
(``range(config.num_layers)``) cannot be cut this way.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["FTKDObjective", "attention_pairs", "attention_scores", "choose_depths", "layer_groups", "layer_pairs",
           "select_layers", "uniform_layers"]


def uniform_layers(n: int, k: int) -> list[int]:
    """TinyBERT's uniform mapping: ``k`` of ``n`` layers, every ``n/k``-th, the last one included
    (``uniform_layers(4, 2) == [1, 3]``; ``k == n`` keeps all)."""
    if not 1 <= k <= n:
        raise ValueError(f"uniform_layers: keep between 1 and {n} layers, got {k}")
    return [int(math.floor((i + 1) * n / k)) - 1 for i in range(k)]


def _stack(model: nn.Module, path: str) -> nn.ModuleList:
    try:
        stack = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"select_layers: {type(model).__name__} has no module {path!r}") from None
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"select_layers: {path!r} is a {type(stack).__name__}, not an nn.ModuleList of layers")
    return stack


def select_layers(model: nn.Module, layers: dict[str, Sequence[int]]) -> nn.Module:
    """A deep copy of ``model`` whose stack at each path of ``layers`` (an ``nn.ModuleList``) holds only
    the layers at the given indices (ascending, distinct), with their weights; the model is unchanged."""
    for path, idx in layers.items():
        n = len(_stack(model, path))
        idx = list(idx)
        if not idx:
            raise ValueError(f"select_layers: {path!r}: keep at least one layer")
        if any(not 0 <= i < n for i in idx) or idx != sorted(set(idx)):
            raise ValueError(f"select_layers: {path!r} has {n} layers; indices must be ascending, distinct and "
                             f"in 0..{n - 1}, got {idx}")
    student = copy.deepcopy(model)
    for path, idx in layers.items():
        parent_path, _, name = path.rpartition(".")
        parent = student.get_submodule(parent_path) if parent_path else student
        stack = getattr(parent, name)
        setattr(parent, name, nn.ModuleList(stack[i] for i in idx))
    return student


def layer_groups(model: nn.Module, spec: Any) -> tuple[tuple[str, ...], ...]:
    """FTKD's stacks of a described model: every ``nn.ModuleList`` holding described layers (a
    ``LayerSpec`` path ``STACK.INDEX``), grouped so that stacks of one site with as many layers are
    cut alike (a co-attention model's two streams), in the order the description lists them. Stacks
    the description does not trim (``trimmable=False``, e.g. a caption decoder) are left whole."""
    stacks: dict[str, str] = {}  # stack path -> site
    for layer in spec.layers:
        parent, _, index = layer.path.rpartition(".")
        if not index.isdigit() or not parent or not getattr(layer, "trimmable", True):
            continue
        try:
            stack = model.get_submodule(parent)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList):
            stacks.setdefault(parent, layer.site)
    groups: dict[tuple[str, int], list[str]] = {}
    for path, site in stacks.items():
        groups.setdefault((site, len(model.get_submodule(path))), []).append(path)
    if not groups:
        raise ValueError(f"layer_groups: no described layer of {type(model).__name__} sits in an nn.ModuleList "
                         "(FTKD copies layers out of such stacks)")
    return tuple(tuple(g) for g in groups.values())


def layer_pairs(layers: dict[str, Sequence[int]]) -> list[tuple[str, str]]:
    """``(student module path, teacher module path)`` of every kept layer: student ``path.j`` is
    teacher ``path.layers[path][j]``."""
    return [(f"{path}.{j}", f"{path}.{i}") for path, idx in layers.items() for j, i in enumerate(idx)]


def choose_depths(model: nn.Module, groups: Sequence[Sequence[str]], ratio: float,
                  macs: Callable[[nn.Module], float]) -> dict[str, Any]:
    """The layer counts per group of stacks (stacks of one group keep the same layers, e.g. a
    co-attention model's two streams) whose student MACs, ``macs(student)``, are nearest
    ``macs(model) / ratio`` (in log scale), layers picked by :func:`uniform_layers`. Returns
    ``{"layers": {path: indices}, "macs_ratio": measured, "counts": [...]}``."""
    sizes = []
    for group in groups:
        ns = {len(_stack(model, p)) for p in group}
        if len(ns) != 1:
            raise ValueError(f"choose_depths: the stacks of one group must have as many layers, got {group} with {ns}")
        sizes.append(ns.pop())
    full = macs(model)
    best: dict[str, Any] | None = None
    for counts in itertools.product(*(range(1, n + 1) for n in sizes)):
        layers = {p: uniform_layers(n, k) for group, n, k in zip(groups, sizes, counts) for p in group}
        got = full / macs(select_layers(model, layers))
        if best is None or abs(math.log(got / ratio)) < abs(math.log(best["macs_ratio"] / ratio)):
            best = {"layers": layers, "macs_ratio": got, "counts": list(counts)}
    assert best is not None
    return best


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"FTKDObjective: a matched layer returned {type(out).__name__}, not a tensor (or a tuple "
                        "starting with one)")
    return out


def attention_pairs(spec: Any, layers: dict[str, Sequence[int]]) -> list[tuple[str, str, Any]]:
    """``(student module path, teacher module path, AttentionSpec)`` of every described attention of
    every kept layer (:func:`layer_pairs`), for TinyBERT's attention-map loss; attentions on the kernel
    route (``via="kernel"``: no declared projections to recompute the scores from) are left out."""
    by_path = {layer.path: layer for layer in spec.layers}
    out = []
    for student, teacher in layer_pairs(layers):
        layer = by_path.get(teacher)
        for a in layer.attentions if layer is not None else ():
            if a.via == "projections":
                out.append((f"{student}.{a.path}", f"{teacher}.{a.path}", a))
    return out


def attention_scores(module: nn.Module, spec: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """TinyBERT's fitting target for one attention call: the unnormalised scores ``q k^T * scale`` per
    head (B, H, Nq, Nk), from the module's declared projections (``spec``: its AttentionSpec) and the
    call's inputs; and the (broadcastable) mask of the keys the call may attend (its additive bias above
    -1e4), where the scores are compared."""
    from trimkit.ops import TrimAttention

    q, k, bias = TrimAttention(module, spec).heads_qk(args, kwargs)
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    scores = q @ k.transpose(-2, -1) * scale
    valid = torch.ones((1, 1, 1, k.shape[2]), dtype=torch.bool, device=q.device)
    if bias is not None:
        valid = bias > -1e4
    return scores, valid


class FTKDObjective:
    """``task(student) + alpha_pred * distill(student, teacher) + alpha_hidden * mean_l MSE(h_l, h'_l)
    + alpha_attn * mean_a MSE(A_a, A'_a)``.

    ``pairs`` are ``(student module path, teacher module path)`` whose outputs (their first tensor)
    are matched. Forward hooks record them: a student forward with gradients starts a new record (a
    pre-hook on the student clears the last one), the student's layers record only with gradients
    enabled (evaluation forwards record nothing), the teacher's always (it runs without gradients,
    after the student, in the Trainer's step); a module called several times per forward (e.g. one
    tower for two images) is matched call by call. The objective reads the record, then clears it.
    ``task`` is a :class:`trimkit.protocols.Task` (its ``loss`` and ``distill``). ``attentions``
    (:func:`attention_pairs`): TinyBERT's attention-map loss, the unnormalised scores of each
    matched attention call (:func:`attention_scores`) compared on the keys the call attends, recorded
    the same way by forward pre-hooks. Logged terms: ``task``, ``kd`` (prediction layer), ``hidden``
    and, with attentions, ``attn``."""

    needs_full_pass = False  # the teacher is another model, run by the Trainer (teacher=)

    def __init__(self, task: Any, student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]],
                 alpha_pred: float = 1.0, alpha_hidden: float = 1.0,
                 attentions: Sequence[tuple[str, str, Any]] = (), alpha_attn: float = 1.0) -> None:
        for name, v in (("alpha_pred", alpha_pred), ("alpha_hidden", alpha_hidden), ("alpha_attn", alpha_attn)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"FTKDObjective: {name} must be finite and >= 0, got {v}")
        self.task, self.alpha_pred, self.alpha_hidden = task, float(alpha_pred), float(alpha_hidden)
        self.alpha_attn = float(alpha_attn)
        self.pairs = list(pairs)
        self.attentions = list(attentions)
        self._out: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.handles = [student.register_forward_pre_hook(self._start)]
        for side, model in (("student", student), ("teacher", teacher)):
            for j, pair in enumerate(self.pairs):
                path = pair[0] if side == "student" else pair[1]
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"FTKDObjective: the {side} has no module {path!r}") from None
                self.handles.append(module.register_forward_hook(self._hook(side, j)))
            for j, (s_path, t_path, spec) in enumerate(self.attentions):
                path = s_path if side == "student" else t_path
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"FTKDObjective: the {side} has no attention module {path!r}") from None
                self.handles.append(module.register_forward_pre_hook(self._attn_hook(side, j, spec),
                                                                     with_kwargs=True))

    def _attn_hook(self, side: str, j: int, spec: Any) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if side == "student" and not torch.is_grad_enabled():
                return
            self._out.setdefault(("attn_" + side, j), []).append(attention_scores(module, spec, args, kwargs))
        return record

    def _start(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self._out.clear()

    def _hook(self, side: str, j: int) -> Callable:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            if side == "student" and not torch.is_grad_enabled():
                return  # an evaluation forward (or a checkpointed layer's recomputation)
            self._out.setdefault((side, j), []).append(_first_tensor(out))
        return record

    def remove(self) -> None:
        """Take the hooks off both models."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, records: Sequence = (),
                 full_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if full_logits is None:
            raise ValueError("FTKDObjective needs the teacher's logits: pass teacher= to the Trainer")
        task = self.task.loss(logits, labels)
        kd = self.task.distill(logits, full_logits.detach(), labels)
        hidden = logits.new_zeros(())
        try:
            if self.pairs:
                terms = []
                for j, pair in enumerate(self.pairs):
                    s, t = self._out.get(("student", j), []), self._out.get(("teacher", j), [])
                    if not s or not t:
                        raise RuntimeError(f"FTKDObjective: layer pair {pair} did not run in this step's forwards "
                                           f"(student calls {len(s)}, teacher calls {len(t)})")
                    if len(s) != len(t):
                        raise RuntimeError(f"FTKDObjective: layer pair {pair} ran {len(s)} times in the student and "
                                           f"{len(t)} in the teacher")
                    if logits.requires_grad and not all(x.requires_grad for x in s):
                        raise RuntimeError(f"FTKDObjective: the student's output of {pair[0]!r} carries no gradient "
                                           "(reentrant activation checkpointing?): its hidden-state loss would train "
                                           "nothing")
                    terms += [torch.nn.functional.mse_loss(a.float(), b.detach().float()) for a, b in zip(s, t)]
                hidden = torch.stack(terms).mean()
            attn = self._attention_loss(logits) if self.attentions else None
        finally:
            self._out.clear()
        loss = task + self.alpha_pred * kd + self.alpha_hidden * hidden
        out = {"loss": loss, "task": task, "kd": kd, "hidden": hidden}
        if attn is not None:
            out["loss"] = loss + self.alpha_attn * attn
            out["attn"] = attn
        return out

    def _attention_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over the matched attention calls of the MSE between the student's and the teacher's scores,
        on the keys each call attends (the teacher's mask: both models see the same inputs)."""
        terms = []
        for j, (s_path, t_path, _) in enumerate(self.attentions):
            s, t = self._out.get(("attn_student", j), []), self._out.get(("attn_teacher", j), [])
            if not s or not t or len(s) != len(t):
                raise RuntimeError(f"FTKDObjective: attention pair {(s_path, t_path)} ran {len(s)} times in the "
                                   f"student and {len(t)} in the teacher in this step")
            for (a, _), (b, valid) in zip(s, t):
                if a.shape != b.shape:
                    raise RuntimeError(f"FTKDObjective: attention {s_path!r} gives scores {tuple(a.shape)}, the "
                                       f"teacher's {t_path!r} {tuple(b.shape)}")
                w = valid.expand_as(b).float()
                terms.append(((a.float() - b.detach().float()) ** 2 * w).sum() / w.sum().clamp_min(1.0))
        return torch.stack(terms).mean() if terms else logits.new_zeros(())
