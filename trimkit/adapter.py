"""The adapter interface: what a backbone package provides to trimkit.

An adapter is any object with these members, registered under a name by a plugin's
``trimkit_register_adapters`` hook. Only :meth:`describe` and :meth:`example_inputs` are needed
to trim a model; :meth:`matches` lets trimkit pick the adapter from a model; :meth:`build` lets
``trimkit check`` and the benchmarks make one. :meth:`dataset_overrides` is optional: it lets the
trainer build a model that fits a dataset (image size, vocabulary, labels...) without the core
knowing any adapter's build options. ``from_pretrained`` is optional too: it loads a model from
pretrained weights, offline; call it through :func:`load_pretrained`.

This module also holds what adapters of Hugging Face ``transformers`` models share to load one
(:func:`load_transformers_pretrained`), so that every adapter checks a source the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .spec import ModelSpec

__all__ = ["Adapter", "DatasetFacts", "PretrainedLoadError", "PretrainedNotFoundError", "TransformersSource",
           "load_pretrained", "load_transformers_pretrained", "looks_like_hub_id", "pretrained_adapters", "set_base",
           "transformers_source"]


@dataclass(frozen=True)
class DatasetFacts:
    """What a dataset says about the model it needs, independent of any backbone.

    Read by :meth:`DatasetFacts.of` from the dataset's attributes (``None`` where it has none):
    ``image_size`` and ``patch_size`` (pixels; the patch is the smallest meaningful image unit,
    digit-grid's cell), ``num_labels`` (answer classes), ``variant`` (the task's kind, e.g.
    ``"vqa"`` or ``"nlvr2"``: NLVR2 items carry a second image), ``tokenizer`` (with
    ``vocab_size``, ``pad_token_id``, ``cls_token_id``, ``sep_token_id``) and ``longest_text``
    (tokens in the longest ``input_ids``, special tokens included).
    """

    image_size: int | None = None
    patch_size: int | None = None
    num_labels: int | None = None
    variant: str | None = None
    tokenizer: Any = None
    longest_text: int | None = None

    @classmethod
    def of(cls, dataset: Any) -> "DatasetFacts":
        ids = getattr(dataset, "input_ids", None)
        longest = max((len(x) for x in ids), default=None) if ids is not None else None
        return cls(image_size=getattr(dataset, "image_size", None), patch_size=getattr(dataset, "patch_size", None),
                   num_labels=getattr(dataset, "num_labels", None), variant=getattr(dataset, "variant", None),
                   tokenizer=getattr(dataset, "tokenizer", None), longest_text=longest)


@runtime_checkable
class Adapter(Protocol):
    """What trimkit needs from a backbone adapter.

    Optional member (not part of the runtime check; the trainer looks for it with ``getattr``):

    ``dataset_overrides(facts: DatasetFacts) -> dict``
        :meth:`build` options that make a model fit a dataset: the :class:`DatasetFacts` mapped to
        this adapter's option names (e.g. ``num_labels`` to the size of its classifier,
        ``tokenizer.vocab_size`` to its embedding table). The trainer's ``build_model`` passes
        them to :meth:`build` under the config's own ``model.overrides`` (those win; dict-valued
        options are merged key by key). Map only the facts that are not ``None``.

    ``root(model: nn.Module) -> nn.Module``
        The module trimkit traces for ``model``: a thin wrapper (weights shared) for a model the
        adapter matches but that is not traceable as it is, such as a transformers task model
        whose forward takes ``**kwargs`` and returns a ``ModelOutput``; the model itself when it
        already is one. :func:`trimkit.trim` (and so ``TrimmedModel.from_pretrained``) calls it
        first, so ``trim(LlavaForConditionalGeneration(...))`` works as ``trim(wrap(model))``
        does; the trimmed model then has the wrapper's forward (its inputs; it returns the
        wrapper's output, e.g. a logits tensor, not a ``ModelOutput``). It applies the wrapper's
        defaults: for other wrapper options (``trim_layers``, ``vision_trim_layers``...) wrap the
        model yourself, and load a checkpoint trained with such options onto the same wrapper
        (``TrimmedModel.from_pretrained(wrap(model, ...), directory)``).

    ``from_pretrained(source: str, *, revision: str | None = None, weights: str | None = None, **options) -> nn.Module``
        A model with pretrained weights, of the kind :meth:`build` returns (the same wrapper, so
        it can be trimmed as it is), read from local files only: nothing is downloaded. What
        ``source`` is depends on the adapter: a Hugging Face model id (looked up in the local HF
        cache, at ``revision``) or a local directory for ``transformers`` models, a checkpoint
        file for METER, a model name for timm and open_clip, whose weights file is ``weights``.
        ``options`` are the adapter's (a task, config fields...); an option it does not know is
        refused, never ignored. The module returned carries ``trimkit_base = {"model": source,
        "revision": revision}`` (checkpoints record it as the base model; :func:`set_base`).
        Errors are :class:`PretrainedLoadError` (:class:`PretrainedNotFoundError` when the source
        is not there) naming the source or file at fault and what was expected. Call it through
        :func:`load_pretrained`, which names the adapters that have it when one does not.
    """

    def matches(self, model: nn.Module) -> bool:
        """True if this adapter knows how to describe ``model``."""

    def describe(self, model: nn.Module) -> ModelSpec:
        """The model's streams, layers and attention modules (see :mod:`trimkit.spec`)."""

    def example_inputs(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
        """Random valid inputs for ``model`` (keyword arguments of its forward)."""

    def build(self, size: str = "tiny", seed: int = 0, **options: Any) -> nn.Module:
        """A randomly initialised model of a named size (``"tiny"`` must be fast on a CPU)."""


# ------------------------------------------------------------------------------------------------
# Pretrained starting points
# ------------------------------------------------------------------------------------------------
class PretrainedLoadError(ValueError):
    """Pretrained weights could not be loaded: the message names the source or file at fault and
    why (a model of another architecture, an unreadable file, weights that do not fit...)."""


class PretrainedNotFoundError(PretrainedLoadError, FileNotFoundError):
    """The pretrained source is not there: a missing path, or a model id that is not in the local
    cache (nothing is downloaded)."""


def set_base(module: nn.Module, source: str, revision: str | None = None) -> nn.Module:
    """Record the base model ``module`` was loaded from, ``module.trimkit_base = {"model": source,
    "revision": revision}`` (what a trimkit checkpoint saves as its base model); returns ``module``."""
    module.trimkit_base = {"model": str(source), "revision": revision}
    return module


def pretrained_adapters(registry: Any = None) -> list[str]:
    """Names of the registered adapters that have ``from_pretrained``."""
    if registry is None:
        from .plugins import get_registry

        registry = get_registry()
    return [e.name for e in registry.adapters.entries() if callable(getattr(e.obj, "from_pretrained", None))]


def load_pretrained(adapter: str | Any, source: str | os.PathLike, revision: str | None = None,
                    weights: str | os.PathLike | None = None, **options: Any) -> nn.Module:
    """A model with pretrained weights from ``adapter``'s ``from_pretrained`` (see :class:`Adapter`).

    ``adapter`` is a registered adapter name or an adapter object; ``source``, ``revision``,
    ``weights`` and ``options`` are passed on (what they mean is the adapter's). Nothing is
    downloaded. The module returned carries ``trimkit_base = {"model": source, "revision":
    revision}``. An adapter without ``from_pretrained`` is refused with a
    :class:`PretrainedLoadError` that names the adapters which have it; an unknown name lists
    the registered ones.
    """
    from .plugins import get_registry

    registry = get_registry()
    if isinstance(adapter, str):
        impl, name = registry.adapters.get(adapter), adapter  # UnknownNameError lists the registered names
    else:
        impl = adapter
        name = next((e.name for e in registry.adapters.entries() if e.obj is adapter), type(adapter).__qualname__)
    loader = getattr(impl, "from_pretrained", None)
    if not callable(loader):
        able = pretrained_adapters(registry)
        raise PretrainedLoadError(
            f"adapter {name!r} cannot load pretrained weights: it has no from_pretrained. Adapters that can: "
            f"{', '.join(able) or 'none'}. Build a random model with its build(...) instead, or load the weights "
            f"into one yourself")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise TypeError(f"load_pretrained({name!r}, source): source must be a non-empty string (a model id, a "
                        f"name or a path), got {type(source).__name__} {source!r:.80}")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise TypeError(f"load_pretrained({name!r}, {source!r}): revision must be a non-empty string or None, got "
                        f"{type(revision).__name__} {revision!r:.80}")
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise TypeError(f"load_pretrained({name!r}, {source!r}): weights must be a non-empty string (a file) or "
                        f"None, got {type(weights).__name__} {weights!r:.80}")
    module = loader(source, revision=revision, weights=weights, **options)
    if not isinstance(module, nn.Module):
        raise TypeError(f"adapter {name!r}: from_pretrained({source!r}) returned a {type(module).__qualname__}, not "
                        f"a torch.nn.Module")
    return set_base(module, source, revision)


# --- transformers models ------------------------------------------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95})?")


def looks_like_hub_id(name: str) -> bool:
    """``name`` has the shape of a Hugging Face Hub repo id (``"name"`` or ``"owner/name"``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name and not name.endswith((".", "-"))


@dataclass(frozen=True)
class TransformersSource:
    """A checked ``transformers`` model source: ``directory`` holds it (``source`` itself, or its
    snapshot in the local HF cache), ``config`` is its ``config.json``."""

    source: str
    revision: str | None
    directory: Path
    config: dict
    adapter: str

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> list[str]:
        return [a for a in self.config.get("architectures") or [] if isinstance(a, str)]

    def __str__(self) -> str:
        return repr(self.source) + (f" (revision {self.revision!r})" if self.revision else "")


def transformers_source(source: str, revision: str | None, *, adapter: str,
                        model_types: Sequence[str]) -> TransformersSource:
    """Find ``source`` (a local directory, or a Hugging Face model id in the local HF cache at
    ``revision``; nothing is downloaded) and check that its ``config.json`` is of one of
    ``model_types``. Raises :class:`PretrainedNotFoundError` when it is not there and
    :class:`PretrainedLoadError` when it is not a transformers model of those types."""
    expected = " or ".join(repr(t) for t in model_types)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PretrainedLoadError(
                f"{source}: a file, but adapter {adapter!r} loads a transformers model directory (config.json and "
                f"model.safetensors, as save_pretrained writes them) or a Hugging Face model id")
        directory = path
    elif not looks_like_hub_id(source):
        raise PretrainedNotFoundError(f"{source}: no such directory (adapter {adapter!r} loads a transformers model "
                                      f"directory, as save_pretrained writes it, or a Hugging Face model id)")
    else:
        directory = _hub_snapshot(source, revision, adapter)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise PretrainedLoadError(
            f"{source}: no config.json in {directory}, so it is not a transformers model directory (save_pretrained "
            f"writes config.json and model.safetensors); adapter {adapter!r} expects a model of type {expected}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedLoadError(f"{config_path}: not valid JSON ({e}); the file is damaged or truncated") from None
    if not isinstance(config, dict):
        raise PretrainedLoadError(f"{config_path}: expected a JSON object (a transformers config), got a JSON "
                                  f"{type(config).__name__}")
    src = TransformersSource(source, revision, directory, config, adapter)
    if src.model_type not in model_types:
        found = f"a model of type {src.model_type!r}" if src.model_type else "a config.json without model_type"
        arch = f" ({', '.join(src.architectures)})" if src.architectures else ""
        raise PretrainedLoadError(f"{src}: found {found}{arch}, but adapter {adapter!r} loads models of type "
                                  f"{expected}: use the adapter for that model, or another checkpoint")
    return src


def _hub_snapshot(source: str, revision: str | None, adapter: str) -> Path:
    from huggingface_hub import constants, errors, snapshot_download

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except errors.LocalEntryNotFoundError:
        raise PretrainedNotFoundError(
            f"{source!r}: no such local directory, and the Hugging Face model {source!r}{at} is not in the local HF "
            f"cache ({constants.HF_HUB_CACHE}); nothing is downloaded (local_files_only=True): download it where "
            f"there is a network (huggingface-cli download {source}{' --revision ' + revision if revision else ''}) "
            f"and bring the cache here (HF_HUB_CACHE), or pass a directory written by save_pretrained") from None
    except (OSError, ValueError) as e:  # a broken cache entry, an invalid revision
        raise PretrainedLoadError(f"{source!r}{at}: could not be read from the local HF cache "
                                  f"({constants.HF_HUB_CACHE}): {type(e).__name__}: {e}") from None


def load_transformers_pretrained(src: TransformersSource, cls: type, *, overrides: Mapping[str, Any] | None = None,
                                 accepted: Iterable[str] = (), wrap: Callable[[nn.Module], nn.Module] | None = None,
                                 uses: Sequence[str] | None = None, head: Sequence[str] = (),
                                 new_head: bool = False, seed: int | None = None) -> nn.Module:
    """``cls.from_pretrained(src.source, revision=src.revision, local_files_only=True)``, checked,
    then ``wrap``-ped; the result is in eval mode and carries ``trimkit_base``.

    ``overrides``: fields of ``cls``'s config set before the weights load (a dict value sets the
    fields of a sub-config, e.g. ``vision_config``); a name the config does not have is a
    ``TypeError`` that also lists ``accepted`` (the adapter's own options). The weights must
    cover every parameter the result uses (those the wrapped module shares with the loaded
    model, or those under the key prefixes ``uses``) with their shapes: otherwise the checkpoint
    holds another model (another task head aside) and a :class:`PretrainedLoadError` names the
    keys and the checkpoint's architectures. Parameters under ``head`` (the task head) may be
    missing or of another size only with ``new_head=True``: those start as ``cls`` initialises
    them (after ``torch.manual_seed(seed)`` when ``seed`` is given), the rest of the head loads.
    """
    config_class = cls.config_class
    try:
        config = config_class.from_pretrained(src.source, revision=src.revision, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PretrainedLoadError(f"{src}: its config.json could not be read as a {config_class.__name__}: "
                                  f"{e}") from None
    overrides = dict(overrides or {})
    _set_config_fields(config, overrides, src, cls, accepted)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    try:
        with _quiet_transformers():  # its load report would list what is checked (and reported) below
            model, info = cls.from_pretrained(src.source, config=config, revision=src.revision, local_files_only=True,
                                              output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as e:  # no weights file
        raise PretrainedLoadError(f"{src}: no {cls.__name__} weights could be loaded from {src.directory}: "
                                  f"{e}") from None
    except Exception as e:  # a damaged safetensors / pickle file
        raise PretrainedLoadError(f"{src}: the weights in {src.directory} could not be read ({type(e).__name__}: "
                                  f"{e}); the file is damaged or truncated (an interrupted copy or download?)") from e
    result = (model if wrap is None else wrap(model)).eval()  # as transformers returns it (a new wrapper is not)
    if uses is not None:
        used = {k for k in model.state_dict() if k.startswith(tuple(uses))}
    else:
        shared = {id(t) for t in (*result.parameters(), *result.buffers())}
        used = {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in shared}
    heads = tuple(head)
    missing = sorted(k for k in info.get("missing_keys", ()) if k in used)
    mismatched = {k: (tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ()) if k in used}
    body_missing = [k for k in missing if not (heads and k.startswith(heads))]
    body_mismatched = {k: v for k, v in mismatched.items() if not (heads and k.startswith(heads))}
    if body_missing or body_mismatched:
        problems = []
        if body_missing:
            problems.append(f"no weights for {len(body_missing)} parameter(s) it uses ({_listing(body_missing)})")
        if body_mismatched:
            items = [f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in sorted(body_mismatched.items())]
            problems.append(f"weights of other shapes ({_listing(items)})")
        saved = ", ".join(src.architectures) or "an unrecorded architecture"
        hint = (f"; the config fields set ({', '.join(sorted(overrides))}) must not change weight shapes"
                if overrides and body_mismatched else "")
        raise PretrainedLoadError(f"{src}: does not hold a {cls.__name__}: {'; '.join(problems)}. It was saved from "
                                  f"{saved} (config.json 'architectures'){hint}")
    head_problems = [k for k in missing] + [f"{k} (checkpoint {a} vs model {b})" for k, (a, b) in mismatched.items()]
    if head_problems and not new_head:
        raise PretrainedLoadError(
            f"{src}: its task head does not fit a {cls.__name__} ({_listing(sorted(head_problems))}: missing or of "
            f"another size; it was saved from {', '.join(src.architectures) or 'an unrecorded architecture'}): pass "
            f"new_head=True to start the head ({', '.join(h.rstrip('.') for h in heads)}) from random weights, e.g. "
            f"to fine-tune on a new task")
    return set_base(result, src.source, src.revision)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _set_config_fields(config: Any, overrides: dict, src: TransformersSource, cls: type,
                       accepted: Iterable[str]) -> None:
    from transformers import PretrainedConfig

    where = f"{src.adapter} from_pretrained({src.source!r})"
    for key, value in overrides.items():
        if key.startswith("_") or not hasattr(config, key):
            raise TypeError(f"{where}: unknown option {key!r}: not an option of the adapter "
                            f"({', '.join(sorted(accepted)) or 'none'}) nor a field of {type(config).__name__}")
        current = getattr(config, key)
        if isinstance(current, PretrainedConfig) and isinstance(value, Mapping):
            for sub, sub_value in value.items():
                if sub.startswith("_") or not hasattr(current, sub):
                    raise TypeError(f"{where}: unknown option {key}.{sub!s}: not a field of {type(current).__name__}")
                setattr(current, sub, sub_value)
        else:
            setattr(config, key, value)


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
