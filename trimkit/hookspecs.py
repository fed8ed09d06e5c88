"""The hooks a trimkit plugin can implement (pluggy, project name ``trimkit``).

A plugin is any module or object with functions marked ``@trimkit.hookimpl``; distributions make
theirs known through the ``trimkit`` entry-point group (``[project.entry-points.trimkit]``). The
built-in adapters and method parts register exactly this way. Set ``TRIMKIT_DISABLE_PLUGIN_AUTOLOAD=1``
to load none of them automatically (then register plugins by hand with
``trimkit.plugins.get_plugin_manager().register(obj)``).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("trimkit")


@hookspec
def trimkit_register_adapters(registry) -> None:
    """Register backbone adapters: ``registry.adapters.register("name", adapter_obj)``.

    An adapter implements :class:`trimkit.adapter.Adapter`: it recognises models, describes them
    (:class:`trimkit.spec.ModelSpec`) and, for ``trimkit check``, builds small ones.
    """


@hookspec
def trimkit_register_token_policies(registry) -> None:
    """Register token-scoring policies: ``registry.token_policies.register("name", factory)``.

    ``factory(dim, context_dim, config) -> nn.Module`` whose forward ``(hidden, cls_self, cls_context)``
    returns per-token logits (B, N); ``cls_context`` is ``None`` when the layer has no other stream.
    A token's score may depend only on that token and the [CLS] vectors (so dropping tokens
    before scoring cannot change other tokens' scores).
    """


@hookspec
def trimkit_register_head_policies(registry) -> None:
    """Register head-scoring policies: ``registry.head_policies.register("name", factory)``.

    ``factory(dim, context_dim, num_heads, config) -> nn.Module`` whose forward
    ``(cls_self, cls_context)`` returns per-head logits (B, num_heads); ``context_dim`` and
    ``cls_context`` are ``None`` for self-attention (paper Eq. 7).
    """


@hookspec
def trimkit_register_samplers(registry) -> None:
    """Register mask samplers used in training: ``registry.samplers.register("name", fn)``.

    ``fn(logits, temperature) -> mask`` in [0, 1], differentiable w.r.t. ``logits``.
    """


@hookspec
def trimkit_register_objectives(registry) -> None:
    """Register training objectives: ``registry.objectives.register("name", factory)``.

    ``factory(config) -> callable(outputs) -> dict[str, Tensor]`` (see :mod:`trimkit.training`).
    """


@hookspec
def trimkit_register_schedulers(registry) -> None:
    """Register target/temperature schedulers: ``registry.schedulers.register("name", factory)``."""


@hookspec(firstresult=True)
def trimkit_select_adapter(model, registry):
    """Return the name of the adapter that handles ``model``, or ``None`` if this plugin does not know.

    The first non-``None`` answer wins. The default implementation asks every registered
    adapter's ``matches(model)``.
    """
