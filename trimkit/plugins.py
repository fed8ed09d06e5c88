"""The plugin manager: finds plugins through the ``trimkit`` entry-point group and fills the registries.

``get_registry()`` is what the rest of trimkit uses; it is built once per process and rebuilt when
plugins are added (``get_registry(plugins=[...])``, or ``get_plugin_manager().register(obj)``
followed by ``get_registry()``); ``reset()`` forgets everything (tests).

Isolation: a *third-party* plugin (an entry point outside the shipped packages, see
:data:`BUILTIN_MODULES`) that fails to import, implements a hook trimkit does not define, or raises
in a ``trimkit_register_*`` hook is skipped: a :class:`PluginWarning` names it, :func:`failures`
(and ``trimkit plugins``) lists it, and none of its registrations are kept (the registries are
restored to what they were before its hooks ran). Every other plugin still registers.

A *built-in* plugin, or one registered by hand, that fails raises (:class:`PluginLoadError`): that is
a bug in trimkit or in the caller's own code, not something to skip silently.

Environment: ``TRIMKIT_DISABLE_PLUGIN_AUTOLOAD=1`` loads no third-party entry point (the built-ins
still load); ``TRIMKIT_EXCLUDE_PLUGINS=name1,name2`` skips the named entry points, built-ins included.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import pluggy

from . import hookspecs
from .registry import TrimkitRegistry

if TYPE_CHECKING:
    from torch import nn

PROJECT = "trimkit"
ENTRY_POINT_GROUP = "trimkit"
DISABLE_AUTOLOAD_ENV = "TRIMKIT_DISABLE_PLUGIN_AUTOLOAD"
EXCLUDE_ENV = "TRIMKIT_EXCLUDE_PLUGINS"

BUILTIN_MODULES = frozenset({
    "trimkit_smarttrim", "trimkit_meter", "trimkit_timm", "trimkit_open_clip", "trimkit_blip", "trimkit_bridgetower",
    "trimkit_vilt", "trimkit_llava", "trimkit_qwen2_vl",
    "trimkit_train",  # its tasks plugin (trimkit_train.tasks: losses and metrics; no training extras needed)
})
"""Top-level modules of the shipped plugins: an entry point whose value is in one of them is a built-in."""

hookimpl = pluggy.HookimplMarker(PROJECT)

_REGISTER_HOOKS = (
    "trimkit_register_adapters",
    "trimkit_register_token_policies",
    "trimkit_register_head_policies",
    "trimkit_register_samplers",
    "trimkit_register_objectives",
    "trimkit_register_schedulers",
    "trimkit_register_tasks",
)


class PluginLoadError(ImportError):
    """A plugin named by an entry point failed to import or to register."""


class PluginHookError(PluginLoadError):
    """A plugin implements a hook that no hookspec defines (a misspelling), or implements one wrongly."""


class PluginWarning(UserWarning):
    """A third-party plugin was skipped (see :func:`failures`)."""


@dataclass(frozen=True)
class PluginFailure:
    """A third-party plugin that was skipped: entry-point ``name`` and ``value``, ``distribution``
    ("name version"), ``stage`` (``"import"``, ``"hooks"`` or the register hook that raised) and a
    one-line ``error``."""

    name: str
    value: str
    distribution: str
    stage: str
    error: str


class _DefaultSelection:
    """Fallback adapter selection: the first registered adapter whose ``matches(model)`` is true."""

    @hookimpl(trylast=True)
    def trimkit_select_adapter(self, model: nn.Module, registry: TrimkitRegistry) -> str | None:
        for entry in registry.adapters.entries():
            matches = getattr(entry.obj, "matches", None)
            if matches is not None and matches(model):
                return entry.name
        return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _autoload_disabled() -> bool:
    return _env_flag(DISABLE_AUTOLOAD_ENV)


def excluded_names() -> frozenset[str]:
    """Entry-point names listed in ``TRIMKIT_EXCLUDE_PLUGINS`` (comma separated)."""
    return frozenset(n.strip() for n in os.environ.get(EXCLUDE_ENV, "").split(",") if n.strip())


def is_builtin(value: str) -> bool:
    """Whether an entry point's value (``"pkg.mod:attr"``) lies in one of :data:`BUILTIN_MODULES`."""
    return value.split(":", 1)[0].strip().split(".", 1)[0] in BUILTIN_MODULES


def _entry_points() -> list[md.EntryPoint]:
    """The ``trimkit`` entry points of the installed distributions (one place for tests to replace)."""
    return list(md.entry_points(group=ENTRY_POINT_GROUP))


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 1000 characters)."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return line if len(line) <= 1000 else line[:997] + "..."


def _valid_hooks(pm: pluggy.PluginManager) -> list[str]:
    return sorted(n for n, hc in vars(pm.hook).items() if not n.startswith("_") and hc.has_spec())


def check_hooks(pm: pluggy.PluginManager) -> None:
    """``pm.check_pending()``, its error turned into a :class:`PluginHookError` that names the plugin,
    its unknown hooks (with the closest valid names) and every valid hook. The offending plugin is
    unregistered first, so the manager stays usable (and a fixed version can be registered)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        plugin = err.plugin
        name = pm.get_name(plugin) or repr(plugin)
        valid = _valid_hooks(pm)
        unknown = sorted(hc.name for hc in pm.get_hookcallers(plugin) or []
                         if not hc.has_spec() and any(i.plugin is plugin and not i.optionalhook
                                                      for i in hc.get_hookimpls()))
        guesses = []
        for u in unknown:
            close = difflib.get_close_matches(u, valid, n=1)
            guesses.append(f"{u!r} (did you mean {close[0]!r}?)" if close else repr(u))
        pm.unregister(plugin)
        raise PluginHookError(
            f"trimkit plugin {name!r} implements unknown hook(s) {', '.join(guesses) or '?'}: no trimkit "
            f"hookspec has that name. Valid hooks: {', '.join(valid)}."
        ) from err


def _register(pm: pluggy.PluginManager, plugin: Any, name: str | None = None) -> None:
    """``pm.register`` then :func:`check_hooks` (which unregisters the plugin again if it fails)."""
    try:
        registered = pm.register(plugin, name=name)
    except pluggy.PluginValidationError as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise PluginHookError(f"trimkit plugin {name or pm.get_canonical_name(plugin)!r}: {detail}") from err
    if registered is not None:  # None: the name is blocked
        check_hooks(pm)


def _skip(failure: PluginFailure) -> None:
    _FAILURES.append(failure)
    warnings.warn(
        f"trimkit: skipped plugin {failure.name!r} ({failure.value}) from {failure.distribution}: "
        f"{failure.stage} failed: {failure.error}. Fix or uninstall it, or exclude it with "
        f"{EXCLUDE_ENV}={failure.name}.",
        PluginWarning, stacklevel=3,
    )


def load_entry_point_plugins(pm: pluggy.PluginManager, *, third_party: bool = True,
                             exclude: Iterable[str] = ()) -> None:
    """Import and register the plugins of the ``trimkit`` entry-point group.

    Built-ins always (a failure raises :class:`PluginLoadError`), third-party ones if ``third_party``
    (a failure is recorded in :func:`failures` with a :class:`PluginWarning`); names in ``exclude``
    are skipped.
    """
    skip = set(exclude)
    for ep in _entry_points():
        if ep.name in skip:
            _EXCLUDED.add(ep.name)
            continue
        builtin = is_builtin(ep.value)
        if not (builtin or third_party) or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        dist_name = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
        stage = "import"
        try:
            plugin = ep.load()
            stage = "hooks"
            _register(pm, plugin, ep.name)
        except Exception as err:  # an import-time failure or a hook no spec defines: name the culprit
            if builtin:
                raise PluginLoadError(
                    f"built-in trimkit plugin {ep.name!r} ({ep.value}) from distribution {dist_name} failed "
                    f"({stage}): {type(err).__name__}: {err}. This is a trimkit bug; exclude it with "
                    f"{EXCLUDE_ENV}={ep.name} to work without it."
                ) from err
            _skip(PluginFailure(ep.name, ep.value, dist_name, stage, _one_line(err)))
            continue
        _DISTRIBUTIONS[ep.name] = dist_name
        _ENTRY_VALUES[ep.name] = ep.value
        (_BUILTINS if builtin else _THIRD_PARTY).add(ep.name)


_DISTRIBUTIONS: dict[str, str] = {}
_ENTRY_VALUES: dict[str, str] = {}
_BUILTINS: set[str] = set()
_THIRD_PARTY: set[str] = set()
_FAILURES: list[PluginFailure] = []
_EXCLUDED: set[str] = set()
_PM: pluggy.PluginManager | None = None
_REGISTRY: TrimkitRegistry | None = None
_FILLED_FROM: tuple[int, ...] = ()  # ids of the plugins _REGISTRY was filled from


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: built-in entry points always loaded, third-party ones unless
    autoload is disabled, minus the excluded names."""
    global _PM
    if _PM is None:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(_DefaultSelection(), name="trimkit.default-selection")
        load_entry_point_plugins(pm, third_party=not _autoload_disabled(), exclude=excluded_names())
        _PM = pm
    return _PM


def _fill(pm: pluggy.PluginManager, registry: TrimkitRegistry) -> None:
    """Run every plugin's register hooks, plugin by plugin; a plugin that raises leaves nothing behind.

    Built-ins go first, then third-party entry points, then plugins registered by hand: a third
    party that reuses a built-in's name fails itself (or, with ``replace=True``, overrides it), it
    cannot make the built-in fail.
    """
    def order(item: tuple[str, Any]) -> int:
        return 0 if item[0] in _BUILTINS else 1 if item[0] in _THIRD_PARTY else 2

    for name, plugin in sorted(pm.list_name_plugin(), key=order):  # stable: entry-point order within a group
        if plugin is None:  # blocked name
            continue
        impls = [(hook_name, impl) for hook_name in _REGISTER_HOOKS
                 for impl in getattr(pm.hook, hook_name).get_hookimpls() if impl.plugin is plugin]
        if not impls:
            continue
        dist = _DISTRIBUTIONS.get(name)
        registry._set_source(f"{name} ({dist})" if dist else name)
        saved = registry._snapshot()
        hook_name = ""
        try:
            for hook_name, impl in impls:
                impl.function(registry=registry)
        except Exception as err:
            registry._restore(saved)
            if name in _THIRD_PARTY:
                pm.unregister(plugin)  # not asked again, e.g. by a later get_registry(plugins=[...])
                _skip(PluginFailure(name, _ENTRY_VALUES.get(name, "?"), dist or "an unknown distribution",
                                    hook_name, _one_line(err)))
                continue
            registry._set_source("<direct>")
            if name not in _DISTRIBUTIONS:  # registered by hand: let a fixed version be registered again
                pm.unregister(plugin)
            raise PluginLoadError(
                f"trimkit plugin {name!r} failed in {hook_name}: {type(err).__name__}: {err}"
            ) from err
    registry._set_source("<direct>")


def _plugin_ids(pm: pluggy.PluginManager) -> tuple[int, ...]:
    return tuple(id(p) for _, p in pm.list_name_plugin() if p is not None)


def get_registry(plugins: Iterable[Any] = ()) -> TrimkitRegistry:
    """The filled registry. Extra ``plugins`` are registered with the manager first (a misspelt hook
    raises :class:`PluginHookError`); the registry is rebuilt whenever the manager's plugins changed."""
    global _REGISTRY, _FILLED_FROM
    pm = get_plugin_manager()
    for p in plugins:
        if not pm.is_registered(p):
            _register(pm, p)
    check_hooks(pm)  # plugins registered on the manager directly
    if _REGISTRY is None or _plugin_ids(pm) != _FILLED_FROM:
        registry = TrimkitRegistry()
        _fill(pm, registry)
        _REGISTRY = registry
        _FILLED_FROM = _plugin_ids(pm)  # after _fill: it unregisters the plugins that failed
    return _REGISTRY


def select_adapter(model: nn.Module) -> str:
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
    """Forget the plugin manager, the registry and the recorded failures (tests)."""
    global _PM, _REGISTRY, _FILLED_FROM
    _PM = None
    _REGISTRY = None
    _FILLED_FROM = ()
    _DISTRIBUTIONS.clear()
    _ENTRY_VALUES.clear()
    _BUILTINS.clear()
    _THIRD_PARTY.clear()
    _FAILURES.clear()
    _EXCLUDED.clear()


def describe_plugins() -> list[dict[str, str]]:
    """Every registered item: ``{"kind", "name", "source"}``, for ``trimkit plugins``."""
    registry = get_registry()
    rows = []
    for kind, reg in registry.all().items():
        for entry in reg.entries():
            rows.append({"kind": kind, "name": entry.name, "source": entry.source})
    return rows


def failures() -> list[PluginFailure]:
    """The third-party plugins skipped so far (import errors, unknown hooks, hooks that raised)."""
    get_registry()
    return list(_FAILURES)


def describe_failures() -> list[dict[str, str]]:
    """:func:`failures` as ``{"name", "source", "error"}`` rows, for ``trimkit plugins``
    (``source``: entry-point value and distribution; ``error``: the stage that failed and the error)."""
    return [{"name": f.name, "source": f"{f.value} ({f.distribution})", "error": f"{f.stage}: {f.error}"}
            for f in failures()]


def excluded() -> list[str]:
    """Entry points skipped because ``TRIMKIT_EXCLUDE_PLUGINS`` names them."""
    get_plugin_manager()
    return sorted(_EXCLUDED)
