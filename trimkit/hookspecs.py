"""The hooks a trimkit plugin can implement (pluggy, project name ``trimkit``).

A plugin is any module or object with functions marked ``@trimkit.hookimpl``; distributions make
theirs known through the ``trimkit`` entry-point group (``[project.entry-points.trimkit]``). The
built-in adapters and method parts register exactly this way. What each hook registers must satisfy
the protocol named in its docstring (:mod:`trimkit.protocols`); registries refuse misfits with a
:class:`trimkit.registry.RegistrationError`.

A hook function whose name is none of the ones below (a misspelling such as
``trimkit_register_adapter``) is an error (:class:`trimkit.plugins.PluginHookError`), found when
the plugin is loaded.

Loading (:mod:`trimkit.plugins`): a third-party plugin that fails to import, implements an unknown
hook or raises in a hook is skipped with a warning, none of its registrations kept, and listed by
``trimkit plugins``; the rest load. The built-ins (entry points of the shipped packages
``trimkit_smarttrim``, ``trimkit_meter``, ``trimkit_timm``, ``trimkit_open_clip``, ``trimkit_blip``,
``trimkit_bridgetower``, ``trimkit_vilt``, ``trimkit_llava``, ``trimkit_qwen2_vl``, and ``trimkit_train.tasks``) always load, and a failure in one of them raises.
Environment:

``TRIMKIT_DISABLE_PLUGIN_AUTOLOAD=1``
    load no *third-party* entry point (built-ins still load); register plugins by hand with
    ``trimkit.plugins.get_registry(plugins=[obj])``.
``TRIMKIT_EXCLUDE_PLUGINS=name1,name2``
    skip these entry points by name (built-ins included, e.g. ``blip``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .registry import TrimkitRegistry

hookspec = pluggy.HookspecMarker("trimkit")


@hookspec
def trimkit_register_adapters(registry: TrimkitRegistry) -> None:
    """Register backbone adapters: ``registry.adapters.register("name", adapter_obj)``.

    ``adapter_obj`` is an instance of a :class:`trimkit.protocols.Adapter`
    (:class:`trimkit.adapter.Adapter`): it recognises models (``matches``), describes them
    (``describe`` -> :class:`trimkit.spec.ModelSpec`), makes inputs (``example_inputs``) and, for
    ``trimkit check``, builds small ones (``build``).
    """


@hookspec
def trimkit_register_token_policies(registry: TrimkitRegistry) -> None:
    """Register token-scoring policies: ``registry.token_policies.register("name", factory)``.

    ``factory`` is a :class:`trimkit.protocols.TokenPolicyFactory`: ``factory(dim, context_dim, config)``
    returns a :class:`trimkit.protocols.TokenPolicy`, an ``nn.Module`` whose forward
    ``(hidden, cls_self, cls_context)`` returns per-token logits (B, N); ``cls_context`` is ``None``
    when the layer has no other stream. A token's score may depend only on that token and the [CLS]
    vectors (so dropping tokens before scoring cannot change other tokens' scores), unless the policy
    declares ``uses_context = True`` and reads the :class:`trimkit.probe.TokenContext` it is then
    given as a fourth argument (training-free budgets by attention, e.g. ``fastv``).
    """


@hookspec
def trimkit_register_head_policies(registry: TrimkitRegistry) -> None:
    """Register head-scoring policies: ``registry.head_policies.register("name", factory)``.

    ``factory`` is a :class:`trimkit.protocols.HeadPolicyFactory`:
    ``factory(dim, context_dim, num_heads, config)`` returns a :class:`trimkit.protocols.HeadPolicy`,
    an ``nn.Module`` whose forward ``(cls_self, cls_context)`` returns per-head logits
    (B, num_heads); ``context_dim`` and ``cls_context`` are ``None`` for self-attention (paper Eq. 7).
    """


@hookspec
def trimkit_register_samplers(registry: TrimkitRegistry) -> None:
    """Register mask samplers used in training: ``registry.samplers.register("name", fn)``.

    ``fn`` is a :class:`trimkit.protocols.Sampler`: ``fn(logits, temperature) -> mask`` in [0, 1],
    differentiable w.r.t. ``logits``.
    """


@hookspec
def trimkit_register_objectives(registry: TrimkitRegistry) -> None:
    """Register training objectives: ``registry.objectives.register("name", factory)``.

    ``factory`` is a :class:`trimkit.protocols.ObjectiveFactory`: ``factory(config, task=None)`` (the
    run's training recipe and :class:`trimkit.protocols.Task`) returns a :class:`trimkit.protocols.Objective`,
    ``objective(logits, labels, records, full_logits=None) -> dict[str, Tensor]`` holding ``"loss"``
    (optional attribute ``needs_full_pass``: also run the untrimmed model for ``full_logits``).
    """


@hookspec
def trimkit_register_schedulers(registry: TrimkitRegistry) -> None:
    """Register target/temperature schedulers: ``registry.schedulers.register("name", factory)``.

    ``factory`` is a :class:`trimkit.protocols.SchedulerFactory`: ``factory(config)`` (the run's
    training recipe) returns a :class:`trimkit.protocols.Scheduler` with
    ``targets(step, total, final) -> dict[str, float]`` and ``temperature_at(step, total) -> float``.
    """


@hookspec
def trimkit_register_tasks(registry: TrimkitRegistry) -> None:
    """Register tasks (losses and metrics): ``registry.tasks.register("name", task_obj)``.

    ``task_obj`` is an instance of a :class:`trimkit.protocols.Task`: ``name`` and ``main_metric``
    strings, ``loss(logits, labels) -> Tensor`` (the task loss), ``distill(logits, full_logits,
    labels) -> Tensor`` (the self-distillation discrepancy between the trimmed and the untrimmed
    model's outputs, 0 when they are equal) and ``metric() -> Metric`` (a fresh accumulator with
    ``update(logits, batch)`` and ``compute() -> dict[str, float]``). A dataset names its task with a
    ``task`` attribute; the built-ins (``classification``, ``vqa``, ``nlvr2``, ``snli_ve``,
    ``captioning``, ``retrieval``) come from ``trimkit_train.tasks``.
    """


@hookspec(firstresult=True)
def trimkit_select_adapter(model: nn.Module, registry: TrimkitRegistry) -> str | None:
    """Return the name of the adapter that handles ``model``, or ``None`` if this plugin does not know.

    The first non-``None`` answer wins. The default implementation asks every registered
    adapter's ``matches(model)``.
    """
