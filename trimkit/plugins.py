"""The plugin manager: finds plugins through the ``trimkit`` entry-point group and fills the registries.

``get_registry()`` is what the rest of trimkit uses; it is built once per process (call
``reset()`` after registering a plugin by hand, or pass ``plugins=[...]`` to ``get_registry``).
"""

from __future__ import annotations

import importlib.metadata as md
import os
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .registry import TrimkitRegistry

PROJECT = "trimkit"
ENTRY_POINT_GROUP = "trimkit"
DISABLE_AUTOLOAD_ENV = "TRIMKIT_DISABLE_PLUGIN_AUTOLOAD"

hookimpl = pluggy.HookimplMarker(PROJECT)

_REGISTER_HOOKS = (
    "trimkit_register_adapters",
    "trimkit_register_token_policies",
    "trimkit_register_head_policies",
    "trimkit_register_samplers",
    "trimkit_register_objectives",
    "trimkit_register_schedulers",
)


class PluginLoadError(ImportError):
    """A plugin named by an entry point failed to import or to register."""


class _DefaultSelection:
    """Fallback adapter selection: the first registered adapter whose ``matches(model)`` is true."""

    @hookimpl(trylast=True)
    def trimkit_select_adapter(self, model, registry):
        for entry in registry.adapters.entries():
            matches = getattr(entry.obj, "matches", None)
            if matches is not None and matches(model):
                return entry.name
        return None


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def load_entry_point_plugins(pm: pluggy.PluginManager) -> None:
    """Import and register every plugin in the ``trimkit`` entry-point group."""
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        dist_name = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
        try:
            plugin = ep.load()
        except Exception as err:  # any import-time failure: name the culprit
            raise PluginLoadError(
                f"trimkit plugin {ep.name!r} ({ep.value}) from distribution {dist_name} failed to import: "
                f"{type(err).__name__}: {err}. Uninstall or fix it, or set {DISABLE_AUTOLOAD_ENV}=1."
            ) from err
        pm.register(plugin, name=ep.name)
        _DISTRIBUTIONS[ep.name] = dist_name


_DISTRIBUTIONS: dict[str, str] = {}
_PM: pluggy.PluginManager | None = None
_REGISTRY: TrimkitRegistry | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (entry points loaded unless autoload is disabled)."""
    global _PM
    if _PM is None:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(_DefaultSelection(), name="trimkit.default-selection")
        if not _autoload_disabled():
            load_entry_point_plugins(pm)
        _PM = pm
    return _PM


def _fill(pm: pluggy.PluginManager, registry: TrimkitRegistry) -> None:
    for hook_name in _REGISTER_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist = _DISTRIBUTIONS.get(impl.plugin_name)
            registry._set_source(f"{impl.plugin_name} ({dist})" if dist else impl.plugin_name)
            try:
                impl.function(registry=registry)
            except Exception as err:
                raise PluginLoadError(
                    f"trimkit plugin {impl.plugin_name!r} failed in {hook_name}: {type(err).__name__}: {err}"
                ) from err
    registry._set_source("<direct>")


def get_registry(plugins: Iterable[Any] = ()) -> TrimkitRegistry:
    """The filled registry. Extra ``plugins`` are registered with the manager first."""
    global _REGISTRY
    pm = get_plugin_manager()
    extra = [p for p in plugins if not pm.is_registered(p)]
    for p in extra:
        pm.register(p)
    if _REGISTRY is None or extra:
        registry = TrimkitRegistry()
        _fill(pm, registry)
        _REGISTRY = registry
    return _REGISTRY


def select_adapter(model) -> str:
    """Name of the adapter for ``model`` (asks the ``trimkit_select_adapter`` hook)."""
    registry = get_registry()
    name = get_plugin_manager().hook.trimkit_select_adapter(model=model, registry=registry)
    if name is None:
        raise LookupError(
            f"no trimkit adapter recognises a {type(model).__module__}.{type(model).__qualname__}; "
            f"registered adapters: {registry.adapters.names() or 'none'}. Pass adapter=NAME to trim(), "
            "or install/register an adapter for this model (docs/bring-your-own-vlm.md)."
        )
    return name


def reset() -> None:
    """Forget the plugin manager and registry (tests; after registering plugins by hand)."""
    global _PM, _REGISTRY
    _PM = None
    _REGISTRY = None
    _DISTRIBUTIONS.clear()


def describe_plugins() -> list[dict[str, str]]:
    """Every registered item: ``{"kind", "name", "source"}``, for ``trimkit plugins``."""
    registry = get_registry()
    rows = []
    for kind, reg in registry.all().items():
        for entry in reg.entries():
            rows.append({"kind": kind, "name": entry.name, "source": entry.source})
    return rows


