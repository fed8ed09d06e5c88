"""The contracts of what plugins register, written as :class:`typing.Protocol` classes.

Each ``trimkit_register_*`` hook (see :mod:`trimkit.hookspecs`) fills one registry; what goes in
it must be callable exactly as the core calls it:

===================  =====================================  ==========================================
registry             registered object                      called by
===================  =====================================  ==========================================
``adapters``         :class:`Adapter` (an instance)         :func:`trimkit.trim`, ``trimkit check``...
``token_policies``   :class:`TokenPolicyFactory`            ``factory(dim, context_dim, config)``
``head_policies``    :class:`HeadPolicyFactory`             ``factory(dim, context_dim, num_heads, config)``
``samplers``         :class:`Sampler`                       ``sampler(logits, temperature)``
``objectives``       :class:`ObjectiveFactory`              ``factory(recipe[, task])`` -> :class:`Objective`
``schedulers``       :class:`SchedulerFactory`              ``factory(recipe)`` -> :class:`Scheduler`
``tasks``            :class:`Task` (an instance)            the trainer: ``task.loss(logits, labels)``...
===================  =====================================  ==========================================

For policies ``config`` is the model's :class:`trimkit.TrimConfig`; objectives and schedulers get the
run's training recipe (``trimkit_train.RecipeConfig``). All calls are positional.

Registration checks what can be checked without calling anything (:func:`validator_for`): the
object is callable and accepts that many positional arguments (by :func:`inspect.signature`;
objects without a readable signature pass), an adapter has ``matches``, ``describe``,
``example_inputs`` and ``build``, and a task has a ``name``, a ``main_metric`` and callable ``loss``,
``distill`` and ``metric``. What a factory *returns* is only checked when it is used.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from .adapter import Adapter

if TYPE_CHECKING:
    from .config import TrimConfig
    from .ops import Record

__all__ = [
    "Adapter", "TokenPolicy", "TokenPolicyFactory", "HeadPolicy", "HeadPolicyFactory", "Sampler", "Objective",
    "ObjectiveFactory", "Scheduler", "SchedulerFactory", "Task", "Metric", "Validator", "validator_for",
]


@runtime_checkable
class TokenPolicy(Protocol):
    """A token trimmer (in practice an ``nn.Module``): per-token keep logits ``(B, N)``.

    ``hidden`` is the layer's input ``(B, N, dim)``, ``cls_self`` its [CLS] vector ``(B, dim)``,
    ``cls_context`` the other stream's [CLS] ``(B, context_dim)`` or ``None`` when the layer has no
    other stream. A token's score may depend only on that token and the [CLS] vectors (dropping
    tokens before scoring must not change the other tokens' scores).

    Optional, for training-free policies that keep a budget ranked by attention (FastV, VisionZip):
    a policy with the attribute ``uses_context = True`` (read with ``getattr``) is called with a fourth
    positional argument, a :class:`trimkit.probe.TokenContext`: the tokens it decides on (``present``),
    those always kept (``protected``), its keep ratio (``target``) and the segment's original token
    count (``total``), :meth:`~trimkit.probe.TokenContext.top` (a budget of the best-scored tokens),
    and ``received("first" | "last")``, the previous layer's attention weights from
    the stream's first or last real token (:class:`trimkit.probe.AttentionProbe`; the layer before must
    have a self-attention of the stream; a policy that ranks by its own scores and never calls
    ``received`` sets ``reads_attention = False`` and may then trim a stream's first layer). Such a policy may rank the present tokens against each
    other: the context describes the same tokens in the masked and the removed forward, so masked ==
    removed still holds. Built in modes ``sample``, ``hard`` and ``remove``; mode ``packed`` refuses
    such policies (``NotImplementedError``).

    Optional, for speed at inference: a method ``fuse(heads)`` taking the layer's head policies (a dict
    by attention index, as strings) and returning a callable ``(hidden, cls_self, cls_context,
    head_inputs) -> (token_logits, {index: head_logits})``, or ``None`` when it cannot fuse them;
    ``head_inputs`` maps each attention index to the ``(cls_self, cls_context)`` its head policy would be
    called with, and the callable may return ``None`` for inputs it does not cover (the policies then
    run). It must give the policies' logits (up to float rounding) from the weights as they were at the
    call to ``fuse``; trimkit rebuilds it when a weight changes and uses it only without autograd and
    without forward hooks on the policies (:meth:`trimkit.layer.LayerTrimmers.fused`; SmartTrim's
    :class:`trimkit_smarttrim.policies.FusedTrimmers` is the example). A layer's trimmers cost their
    operators, not their arithmetic, at small sizes (benchmarks/RESULTS.md, "Fixed cost per trimmed layer").
    """

    def __call__(self, hidden: torch.Tensor, cls_self: torch.Tensor,
                 cls_context: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class TokenPolicyFactory(Protocol):
    """``factory(dim, context_dim, config) -> TokenPolicy``; ``context_dim`` is ``None`` without a context
    stream. Usually the policy's class."""

    def __call__(self, dim: int, context_dim: int | None, config: TrimConfig) -> TokenPolicy: ...


@runtime_checkable
class HeadPolicy(Protocol):
    """A head trimmer: per-head keep logits ``(B, num_heads)`` from ``cls_self`` ``(B, dim)`` and, for
    cross-attention, ``cls_context`` ``(B, context_dim)`` (``None`` for self-attention; paper Eq. 7)."""

    def __call__(self, cls_self: torch.Tensor, cls_context: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class HeadPolicyFactory(Protocol):
    """``factory(dim, context_dim, num_heads, config) -> HeadPolicy``; ``context_dim`` is ``None`` for
    self-attention."""

    def __call__(self, dim: int, context_dim: int | None, num_heads: int, config: TrimConfig) -> HeadPolicy: ...


@runtime_checkable
class Sampler(Protocol):
    """Training masks: ``sampler(logits, temperature) -> mask`` of ``logits``' shape, values in [0, 1],
    differentiable with respect to ``logits`` (inference thresholds ``logits > 0`` instead)."""

    def __call__(self, logits: torch.Tensor, temperature: float) -> torch.Tensor: ...


@runtime_checkable
class Objective(Protocol):
    """The training loss: ``objective(logits, labels, records, full_logits=None) -> dict[str, Tensor]``.

    ``records`` are the step's :class:`trimkit.ops.Record` (kept fraction and current target of each
    trimmed module); the dict must hold ``"loss"`` (what is back-propagated), every other entry is
    logged. Optional attribute ``needs_full_pass: bool`` (default ``False``, read with ``getattr``):
    when true the trainer also runs the untrimmed model and passes its logits as ``full_logits``.
    """

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, records: Sequence[Record],
                 full_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class ObjectiveFactory(Protocol):
    """``factory(config, task=None) -> Objective``, called once per training run with the run's
    training recipe (``trimkit_train.RecipeConfig``: ``lambda_cost``, ``lambda_sd``...) and the
    run's :class:`Task`, whose ``loss`` and ``distill`` the objective wraps. A factory that takes
    only ``config`` is called without the task (an objective for one fixed task)."""

    def __call__(self, config: Any, task: "Task | None" = None) -> Objective: ...


@runtime_checkable
class Scheduler(Protocol):
    """Targets and temperature over training (called before every step; ``final`` maps each trimmed
    module's key to its configured keep ratio)."""

    def targets(self, step: int, total: int, final: dict[str, float]) -> dict[str, float]: ...

    def temperature_at(self, step: int, total: int) -> float: ...


@runtime_checkable
class SchedulerFactory(Protocol):
    """``factory(config) -> Scheduler``, called once per training run with the run's training recipe
    (``trimkit_train.RecipeConfig``: ``curriculum_fraction``, ``temperature``, ``final_temperature``)."""

    def __call__(self, config: Any) -> Scheduler: ...


@runtime_checkable
class Metric(Protocol):
    """An evaluation accumulator (a fresh one per evaluation, from :meth:`Task.metric`).

    ``update(logits, batch)`` takes one batch's model output and the batch dict it came from (the
    batch contract of ``docs/datasets.md``: ``labels`` and whatever else the task's datasets put in
    it); ``compute()`` returns every metric over all batches seen, as plain floats, the task's
    ``main_metric`` among them.
    """

    def update(self, logits: torch.Tensor, batch: dict[str, Any]) -> None: ...

    def compute(self) -> dict[str, float]: ...


@runtime_checkable
class Task(Protocol):
    """A task's loss, self-distillation term and metrics (registered as an instance).

    * ``name``: the registered name (datasets name their task with a ``task`` attribute);
    * ``loss(logits, labels) -> Tensor``: the task loss (a scalar), e.g. cross-entropy over classes;
    * ``distill(logits, full_logits, labels) -> Tensor``: the self-distillation discrepancy (a
      scalar, paper Eq. 11 without its task term) between the trimmed model's ``logits`` and the
      untrimmed model's ``full_logits`` on the same batch; exactly 0 when they are equal;
    * ``metric() -> Metric``: a fresh accumulator (an implementation may take optional arguments,
      e.g. the evaluation dataset, but must work without them);
    * ``main_metric``: the key of :meth:`Metric.compute` that ranks runs (e.g. ``"accuracy"``);
    * optional ``metric_on_train_steps: bool`` (default ``True``, read with ``getattr``): whether the
      trainer also logs the metrics of every training batch.

    Optional evaluation hooks (read with ``getattr`` by ``trimkit_train.evaluate``, hence by the
    trainer's evaluations and ``trimkit eval``), for protocols that are not one forward per batch:

    * ``evaluate_dataset(model, dataset, *, batch_size, instances, device, progress) -> dict | None``:
      evaluates the whole split itself (e.g. retrieval: contrastive similarities of every pair,
      then matching-head reranking of the top k). The dict holds the metrics (``main_metric``
      among them) and optionally ``n`` (examples evaluated) and ``keep`` (``{trimmer key: mean kept
      fraction}``); ``None``: the usual batch loop runs;
    * ``evaluator(model, dataset) -> Callable[[batch], output] | None``: called once per evaluation;
      when it returns a callable, each batch's output is ``evaluator(batch)`` instead of
      ``model(**inputs)`` and goes to ``metric.update(output, batch)``; the callable may add entries
      to the batch for the metric (``batch["generated"]``: generated captions or answers; its output
      may then be ``None``). Its optional ``macs_dataset`` attribute is the dataset MACs are counted
      on (items the forward takes, e.g. with decoder inputs the dataset lacks).

    ``model`` is what is evaluated: a ``TrimmedModel`` (its trimmed forward) or a plain model. The
    built-in tasks implement these by asking the underlying model for its optional
    ``task_evaluator`` / ``evaluate_task`` methods (``trimkit_train.tasks.core``; BLIP's wrappers
    have them: answer ranking or generation, caption generation, ITC + ITM retrieval).
    """

    name: str
    main_metric: str

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def distill(self, logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def metric(self) -> Metric: ...


Validator = Callable[[Any], "str | None"]
"""Checks an object about to be registered: ``None`` if acceptable, else what is wrong with it."""


def _call_problem(fn: Any, args: Sequence[str], what: str, kwargs: Sequence[str] = ()) -> str | None:
    """Why ``fn(*args, **kwargs)`` cannot be called (``args`` positional, ``kwargs`` by keyword), or
    ``None`` (also when ``fn`` has no readable signature)."""
    call = f"{what}({', '.join([*args, *(f'{k}=...' for k in kwargs)])})"
    if not callable(fn):
        return f"{what} is not callable (got a {type(fn).__name__})"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and the like: nothing to check
        return None
    try:
        sig.bind(*args, **{k: None for k in kwargs})
    except TypeError as err:
        return f"{what} cannot be called as {call}: its signature is {sig} ({err})"
    return None


def _callable_validator(protocol: type, params: Sequence[str], returns: str) -> Validator:
    expected = f"{protocol.__module__}.{protocol.__qualname__}, a callable f({', '.join(params)}) -> {returns}"

    def check(obj: Any) -> str | None:
        problem = _call_problem(obj, params, "f")
        return None if problem is None else f"expected {expected}; {problem}"

    return check


# method -> (positional, keyword) arguments the core passes
_ADAPTER_METHODS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "matches": (("model",), ()),
    "describe": (("model",), ()),
    "example_inputs": (("model",), ("batch_size", "seed")),
    "build": ((), ("size", "seed")),
}


def _check_adapter(obj: Any) -> str | None:
    expected = "an instance of a trimkit.adapter.Adapter (methods " + ", ".join(_ADAPTER_METHODS) + ")"
    if isinstance(obj, type):
        return f"expected {expected}; got the class {obj.__qualname__} itself: register an instance"
    missing = [m for m in _ADAPTER_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        return f"expected {expected}; got a {type(obj).__qualname__} without {', '.join(missing)}"
    for method, (args, kwargs) in _ADAPTER_METHODS.items():
        problem = _call_problem(getattr(obj, method), args, method, kwargs)
        if problem is not None:
            return f"expected {expected}; {problem}"
    return None


# method -> positional arguments the trainer passes
_TASK_METHODS: dict[str, tuple[str, ...]] = {
    "loss": ("logits", "labels"),
    "distill": ("logits", "full_logits", "labels"),
    "metric": (),
}


def _check_task(obj: Any) -> str | None:
    expected = ("an instance of a trimkit.protocols.Task (attributes name, main_metric; methods "
                + ", ".join(f"{m}({', '.join(a)})" for m, a in _TASK_METHODS.items()) + ")")
    if isinstance(obj, type):
        return f"expected {expected}; got the class {obj.__qualname__} itself: register an instance"
    for attr in ("name", "main_metric"):
        value = getattr(obj, attr, None)
        if not isinstance(value, str) or not value:
            return f"expected {expected}; its {attr!r} is {value!r}, not a non-empty string"
    missing = [m for m in _TASK_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        return f"expected {expected}; got a {type(obj).__qualname__} without {', '.join(missing)}"
    for method, args in _TASK_METHODS.items():
        problem = _call_problem(getattr(obj, method), args, method)
        if problem is not None:
            return f"expected {expected}; {problem}"
    return None


_VALIDATORS: dict[str, Validator] = {
    "adapters": _check_adapter,
    "token_policies": _callable_validator(TokenPolicyFactory, ("dim", "context_dim", "config"), "TokenPolicy"),
    "head_policies": _callable_validator(HeadPolicyFactory, ("dim", "context_dim", "num_heads", "config"),
                                         "HeadPolicy"),
    "samplers": _callable_validator(Sampler, ("logits", "temperature"), "mask"),
    "objectives": _callable_validator(ObjectiveFactory, ("config",), "Objective"),
    "schedulers": _callable_validator(SchedulerFactory, ("config",), "Scheduler"),
    "tasks": _check_task,
}


def validator_for(registry_name: str) -> Validator:
    """The registration check of one :class:`trimkit.registry.TrimkitRegistry` field (``"adapters"``...)."""
    return _VALIDATORS[registry_name]
