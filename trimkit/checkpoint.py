"""The files of a trimkit checkpoint, written atomically and read with checks.

A checkpoint is laid out like a Hugging Face PEFT adapter: the added weights only (by default),
a config saying what they belong to, and a model card, so the directory can be pushed to the Hub
as it is and loaded back with ``TrimmedModel.from_pretrained(base_model, "dir_or_repo")``.
:meth:`TrimmedModel.save_pretrained <trimkit.model.TrimmedModel.save_pretrained>` writes:

``trimmers.safetensors``
    the trimmers' weights;
``backbone.safetensors``
    the model's own weights (only with ``include_backbone=True``; saving without it *removes* a
    backbone an earlier save left in the directory, so it can never be mistaken for this one's);
``README.md``
    a model card (YAML front matter ``library_name: trimkit``, ``base_model``, ``tags``, and how
    to load it), marked as trimkit's by :data:`MODEL_CARD_MARKER`. A ``README.md`` without the
    marker (the user's own) is left alone and no card is written;
``trim_config.json``
    what the weights are: the :class:`~trimkit.config.TrimConfig`, the adapter, the checkpoint
    ``format`` (:data:`FORMAT_VERSION`), the ``trimkit_version`` that wrote it, whether a backbone
    was saved (``backbone``), the weight ``files`` saved, a ``save_id``, and the base model:
    ``base_model`` (an id, e.g. a Hub repo id), ``base_revision``, ``build_options`` (the
    adapter build options that made the backbone, as the caller gave them) and ``model_card``
    (``"README.md"``, or ``null`` when the card was not written). The last four are optional when
    reading (``null`` when absent): checkpoints written before they existed are the same format.

**Nothing lost.** Every file is first written next to its final name under a temporary name and
fsynced; only when all of them are complete are they renamed into place (``os.replace``), the
config last. A failure while writing (a full disk, say) leaves the previous checkpoint exactly as
it was; a failure while renaming puts the previous files back (hard-linked aside beforehand).

**Nothing silent.** Each weight file carries the ``save_id`` of its save in its safetensors
header, and loading checks it against the config's: a directory that mixes two saves (a save
killed between two renames, a file copied in from elsewhere), a backbone the config does not
list, a missing file, a corrupt safetensors file, a broken config, a checkpoint from a newer
trimkit or for another adapter are each refused with a :class:`CheckpointError` that names the
file, the field or value, and what to do.

Checkpoints written before formats were recorded (no ``format`` field) still load, unchecked:
their backbone is loaded when the file is there.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "BACKBONE_FILE", "CONFIG_FILE", "CheckpointError", "CheckpointMeta", "CheckpointSaveError", "FORMAT_VERSION",
    "MODEL_CARD_FILE", "MODEL_CARD_MARKER", "MissingCheckpointFileError", "TRIMMERS_FILE", "atomic_write_bytes",
    "base_model_of", "check_backbone", "model_card", "read_meta", "read_tensors", "resolve_checkpoint",
    "write_checkpoint",
]

CONFIG_FILE = "trim_config.json"
TRIMMERS_FILE = "trimmers.safetensors"
BACKBONE_FILE = "backbone.safetensors"
MODEL_CARD_FILE = "README.md"

#: The line that marks a ``README.md`` as the model card trimkit wrote (and may replace on the
#: next save). A ``README.md`` without it is the user's and is never overwritten.
MODEL_CARD_MARKER = "<!-- trimkit:model-card"

#: The checkpoint format this trimkit writes; it reads every format up to this one (0: written
#: before formats were recorded, no ``format`` field). The base-model fields and the model card
#: did not change it: they are optional, and a trimkit that does not know them loads the weights
#: just the same.
FORMAT_VERSION = 1

#: safetensors header metadata key holding the save id (the config's ``save_id``).
SAVE_ID_KEY = "trimkit_save_id"
#: safetensors header metadata key holding which file of the checkpoint this is.
ROLE_KEY = "trimkit_file"

_FILES = (CONFIG_FILE, TRIMMERS_FILE, BACKBONE_FILE, MODEL_CARD_FILE)
# ".<file>.<12 hex>.tmp" (a file being written) and ".<file>.<12 hex>.bak" (the previous file, kept
# until the save is complete); a save that was killed leaves them behind and the next one removes them
_SCRATCH = re.compile(r"\.(" + "|".join(re.escape(f) for f in _FILES) + r")\.[0-9a-f]{12}\.(tmp|bak)")
_REDO = "save the checkpoint again (save_pretrained) or restore the directory from a copy"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is. The message names the file, the
    field or value, and what to do."""


class MissingCheckpointFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is not there (also a :class:`FileNotFoundError`)."""


class CheckpointSaveError(OSError):
    """``save_pretrained`` failed (a full disk, a permission...); the directory's previous
    checkpoint is unchanged. ``errno`` is the cause's (``errno.ENOSPC`` for a full disk), the
    cause itself is ``__cause__``."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The checked contents of ``trim_config.json``.

    ``backbone``: whether ``backbone.safetensors`` was saved (``None``: a format-0 checkpoint,
    which did not record it). ``save_id``: the id every weight file of the save carries (``None``
    for format 0). ``base_model``, ``base_revision``, ``build_options``: what the trimmers were
    trained on (``None`` when not recorded). ``model_card``: the card's file name, ``None`` when
    trimkit did not write one."""

    path: Path
    format: int
    adapter: str
    config: Any  # TrimConfig
    trimkit_version: str | None
    save_id: str | None
    backbone: bool | None
    raw: dict
    base_model: str | None = None
    base_revision: str | None = None
    build_options: dict | None = None
    model_card: str | None = None

    @property
    def directory(self) -> Path:
        return self.path.parent


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _scratch(directory: Path, name: str, token: str, kind: str) -> Path:
    return directory / f".{name}.{token}.{kind}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: into a temporary file next to it, fsynced, then
    renamed over it (``os.replace``). On failure ``path`` is unchanged and the temporary file is
    removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _remove_scratch(directory: Path) -> None:
    """Remove what a killed save left behind (see ``_SCRATCH``)."""
    for entry in directory.iterdir():
        if _SCRATCH.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                entry.unlink()


def _stage_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _writes_card(directory: Path) -> bool:
    """Whether a save may write ``directory/README.md``: there is none, or it is the card an
    earlier save wrote (it carries :data:`MODEL_CARD_MARKER`). The user's own README is kept."""
    path = directory / MODEL_CARD_FILE
    if not os.path.lexists(path):
        return True
    try:
        return path.is_file() and MODEL_CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95})?")


def _looks_like_repo_id(name: str) -> bool:
    """``name`` has the shape of a Hugging Face Hub repo id (``"name"`` or ``"owner/name"``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name and not name.endswith((".", "-"))


def model_card(*, adapter: str, backbone: bool, base_model: str | None = None, base_revision: str | None = None,
               build_options: Mapping[str, Any] | None = None) -> str:
    """The ``README.md`` a save writes: Hub front matter (``library_name: trimkit``, ``base_model``
    when it is a Hub repo id, ``tags``), :data:`MODEL_CARD_MARKER`, and how to load the checkpoint.
    It names no directory (checkpoints are renamed, copied and pushed) and holds nothing that
    changes from save to save of the same model (no save id, no time)."""
    from . import __version__

    front = ["---", "library_name: trimkit"]
    if base_model and _looks_like_repo_id(base_model):  # the Hub validates it: a local path is named below only
        front.append(f"base_model: {json.dumps(base_model)}")
    front += ["tags:", "- trimkit", "- smarttrim", "---"]
    base = f"`{base_model}`" + (f" (revision `{base_revision}`)" if base_revision else "") if base_model else None
    holds = ("the trimmers and the backbone weights they were trained with (`backbone.safetensors`)" if backbone else
             "the trimmers only: the base model's own weights are not in it")
    if build_options is not None:
        kwargs = dict(build_options)
        args = (", ".join(f"{k}={v!r}" for k, v in kwargs.items()) if all(str(k).isidentifier() for k in kwargs)
                else f"**{kwargs!r}")
        make = f'base = get_registry().adapters.get({adapter!r}).build({args})'
        imports = "from trimkit import TrimmedModel, get_registry"
    else:
        make = f"base = ...  # {'the base model ' + base_model if base_model else 'the base model'}, untrimmed"
        imports = "from trimkit import TrimmedModel"
    if not backbone:
        make += "  # must hold the weights the trimmers were trained with"
    body = [
        f"{MODEL_CARD_MARKER}: written by trimkit save_pretrained and replaced by the next save into this "
        f"directory; delete this line to keep the file as your own -->",
        "",
        f"# SmartTrim trimmers{' for ' + base if base else ''}",
        "",
        f"Learned token and head trimmers (SmartTrim) saved by trimkit {__version__}, adapter `{adapter}`. "
        f"This checkpoint holds {holds}.",
        "",
        "## Load",
        "",
        "```python",
        imports,
        "",
        make,
        'tmodel = TrimmedModel.from_pretrained(base, "path/to/this/directory")  # or its Hub repo id',
        "tmodel.eval()",
        "```",
        "",
        f"`trim_config.json` records the `TrimConfig`, the adapter and the base model; "
        f"`TrimmedModel.from_pretrained` trims `base` with them and loads the weights.",
        "",
    ]
    return "\n".join(front + body)


def write_checkpoint(directory: str | Path, *, adapter: str, config: Mapping[str, Any],
                     trimmers: Mapping[str, torch.Tensor], backbone: Mapping[str, torch.Tensor] | None,
                     base_model: str | None = None, base_revision: str | None = None,
                     build_options: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint (see the module docstring): ``trimmers`` and, unless ``None``,
    ``backbone`` (state dicts of contiguous tensors, no shared storage), the model card, and
    ``trim_config.json`` recording ``adapter``, ``config`` (a JSON-ready TrimConfig dump), the
    base model (``base_model``, ``base_revision``) and ``build_options`` (JSON-ready).

    All or nothing: the files are staged under temporary names and fsynced, then renamed into
    place, the config last; an exception at any point leaves the directory's previous checkpoint
    as it was (the previous files are put back) and re-raises; an :class:`OSError` becomes a
    :class:`CheckpointSaveError` (an OSError with the same errno) whose message names the
    directory and the step that failed and says the previous checkpoint is unchanged. ``backbone=None`` removes
    a ``backbone.safetensors`` an earlier save left there (it does not belong to this save).
    A ``README.md`` trimkit did not write is kept (no card is written then, and the config's
    ``model_card`` is ``null``). Other files in the directory are left alone."""
    import safetensors.torch as st

    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_scratch(directory)
    save_id = uuid.uuid4().hex
    token = save_id[:12]
    card = None
    if _writes_card(directory):
        card = model_card(adapter=adapter, backbone=backbone is not None, base_model=base_model,
                          base_revision=base_revision, build_options=build_options)
    meta = {
        "format": FORMAT_VERSION,
        "trimkit_version": __version__,
        "adapter": adapter,
        "save_id": save_id,
        "backbone": backbone is not None,
        "files": [TRIMMERS_FILE] + ([BACKBONE_FILE] if backbone is not None else []),
        "base_model": base_model,
        "base_revision": base_revision,
        "build_options": None if build_options is None else dict(build_options),
        "model_card": MODEL_CARD_FILE if card is not None else None,
        "config": dict(config),
    }
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"  # before anything is written: a bad value fails here
    weights = {TRIMMERS_FILE: trimmers, BACKBONE_FILE: backbone}
    staged: dict[str, Path | None] = {}
    step = ""
    try:
        # 1. stage: every new file complete and on disk under a temporary name
        for name, state in weights.items():
            if state is None:
                staged[name] = None
                continue
            step = f"writing {name}"
            tmp = staged[name] = _scratch(directory, name, token, "tmp")
            st.save_file(dict(state), str(tmp), metadata={SAVE_ID_KEY: save_id, ROLE_KEY: name,
                                                          "trimkit_version": __version__})
            _fsync_file(tmp)
        if card is not None:
            step = f"writing {MODEL_CARD_FILE}"
            tmp = staged[MODEL_CARD_FILE] = _scratch(directory, MODEL_CARD_FILE, token, "tmp")
            _stage_text(tmp, card)
        step = f"writing {CONFIG_FILE}"
        tmp = staged[CONFIG_FILE] = _scratch(directory, CONFIG_FILE, token, "tmp")
        _stage_text(tmp, text)
        # 2. commit: rename into place, the config last; undone on failure
        step = "renaming the new files into place"
        _commit(directory, staged, token)
    except OSError as e:
        raise CheckpointSaveError(e.errno or _errno.EIO,
                      f"save_pretrained into {directory} failed while {step} ({e.strerror or e}); the previous "
                      f"checkpoint there is unchanged: free space or fix the cause, and save again",
                      str(directory)) from e
    finally:
        for tmp in staged.values():
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
    return directory


def _commit(directory: Path, staged: Mapping[str, Path | None], token: str) -> None:
    """Rename ``staged`` files over their names (``None``: remove the file) in order, keeping the
    previous files hard-linked aside; on any failure put the previous files back."""
    done: list[tuple[Path, Path | None, bool]] = []  # (target, backup, existed)
    backups: list[Path] = []
    try:
        for name, tmp in staged.items():
            target = directory / name
            existed = target.exists()
            if tmp is None:  # remove: set it aside until the new config is in place
                if existed:
                    backup = _scratch(directory, name, token, "bak")
                    os.replace(target, backup)
                    backups.append(backup)
                    done.append((target, backup, True))
                continue
            backup = None
            if existed:
                backup = _scratch(directory, name, token, "bak")
                try:
                    os.link(target, backup)
                    backups.append(backup)
                except OSError:  # no hard links here: no undo for this file (its save id still exposes a mix)
                    backup = None
            os.replace(tmp, target)
            done.append((target, backup, existed))
    except BaseException:
        for target, backup, existed in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                elif not existed:
                    target.unlink()
        raise
    finally:
        _fsync_dir(directory)
        for backup in backups:
            with contextlib.suppress(OSError):
                backup.unlink()


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _field(path: Path, data: dict, name: str, kind: type, what: str) -> Any:
    """``data[name]``, checked to be a ``kind``; else a CheckpointError naming the file and field."""
    if name not in data:
        raise CheckpointError(f"{path}: missing field {name!r} ({what}); the file is damaged or was not written by "
                              f"save_pretrained: {_REDO}")
    value = data[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = {str: "a string", bool: "true or false", dict: "a JSON object"}.get(kind, kind.__name__)
        raise CheckpointError(f"{path}: field {name!r} ({what}) must be {expected}, got {type(value).__name__} "
                              f"{value!r:.80}: {_REDO}")
    return value


def _optional_field(path: Path, data: dict, name: str, kind: type, what: str) -> Any:
    """``data[name]`` when present and not null (else ``None``), checked to be a ``kind`` (a
    non-empty one for strings); else a CheckpointError naming the file and field."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
        expected = {str: "a non-empty string", dict: "a JSON object"}.get(kind, kind.__name__)
        raise CheckpointError(f"{path}: field {name!r} ({what}) must be {expected} or null, got "
                              f"{type(value).__name__} {value!r:.80}: fix the field, or {_REDO}")
    return value


def read_meta(directory: str | Path) -> CheckpointMeta:
    """Read and check ``directory/trim_config.json``: valid UTF-8 JSON, the fields present with
    the right types, a format this trimkit reads, a valid TrimConfig. Raises
    :class:`CheckpointError` (:class:`MissingCheckpointFileError` when the file is missing)
    naming the file and the field."""
    from pydantic import ValidationError

    from . import __version__
    from .config import TrimConfig

    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        there = "does not exist" if not directory.exists() else "has no " + CONFIG_FILE
        raise MissingCheckpointFileError(
            f"{path}: not found; {directory} {there}, so it is not a trimkit checkpoint directory (save_pretrained "
            f"writes {CONFIG_FILE}, {TRIMMERS_FILE} and, with include_backbone=True, {BACKBONE_FILE})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not a text file (byte {e.start} is not UTF-8; a binary file in place of the "
                              f"JSON that save_pretrained writes): {_REDO}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); the file is "
                              f"damaged or truncated: {_REDO}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object with the fields 'format', 'adapter' and 'config', "
                              f"got a JSON {type(data).__name__}: {_REDO}")
    version = data.get("trimkit_version")
    fmt = data.get("format", 0)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 0:
        raise CheckpointError(f"{path}: field 'format' (the checkpoint format) must be a whole number >= 0, got "
                              f"{fmt!r:.80}: {_REDO}")
    if fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt} (written by trimkit {version or '?'}) is newer than "
                              f"this trimkit ({__version__}) reads, formats up to {FORMAT_VERSION}: upgrade trimkit "
                              f"to load it")
    adapter = _field(path, data, "adapter", str, "the adapter name the checkpoint was saved with")
    if not adapter:
        raise CheckpointError(f"{path}: field 'adapter' is empty; it names the adapter the model was trimmed with: "
                              f"{_REDO}")
    config_data = _field(path, data, "config", dict, "the TrimConfig")
    save_id = backbone = None
    if fmt >= 1:
        version = _field(path, data, "trimkit_version", str, "the trimkit version that wrote it")
        save_id = _field(path, data, "save_id", str, "the id its weight files carry")
        backbone = _field(path, data, "backbone", bool, "whether backbone.safetensors was saved")
    try:
        config = TrimConfig.from_saved(config_data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in ("config", *err["loc"]))
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        got = f"; got {err['input']!r:.80}" if "input" in err and err["loc"] else ""
        plugin = ("; a name unknown here may need the plugin the checkpoint was saved with"
                  if "unknown" in err["msg"] else "")
        raise CheckpointError(f"{path}: field {loc!r}: {err['msg']}{got}{more}{plugin}. Fix the field, or "
                              f"{_REDO}") from None
    base_model = _optional_field(path, data, "base_model", str, "the id of the base model the trimmers were trained on")
    base_revision = _optional_field(path, data, "base_revision", str, "the base model's revision")
    build_options = _optional_field(path, data, "build_options", dict,
                                    "the adapter build options that made the backbone")
    model_card = _optional_field(path, data, "model_card", str, "the model card's file name")
    return CheckpointMeta(path, fmt, adapter, config, version, save_id, backbone, data, base_model=base_model,
                          base_revision=base_revision, build_options=build_options, model_card=model_card)


def resolve_checkpoint(directory_or_repo: str | Path, revision: str | None = None) -> Path:
    """The local directory of a checkpoint: ``directory_or_repo`` itself when it is a path (a
    :class:`~pathlib.Path`, an existing path, or a string that cannot be a Hub repo id), else the
    snapshot of the Hugging Face Hub repo ``directory_or_repo`` (at ``revision``) in the local HF
    cache (``huggingface_hub.snapshot_download(..., local_files_only=True)``: nothing is
    downloaded). Raises :class:`MissingCheckpointFileError` naming the repo id when it is not in
    the cache, :class:`CheckpointError` when the cache cannot be read. ``revision`` is ignored
    for a local directory."""
    if revision is not None and not (isinstance(revision, str) and revision):
        raise TypeError(f"revision must be a non-empty string or None, got {type(revision).__name__} {revision!r:.80}")
    if isinstance(directory_or_repo, os.PathLike) or not isinstance(directory_or_repo, str):
        return Path(directory_or_repo)
    name = directory_or_repo
    if os.path.exists(name) or not _looks_like_repo_id(name):
        return Path(name)
    at = f" at revision {revision!r}" if revision else ""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise MissingCheckpointFileError(
            f"{name!r}: no such directory, and huggingface_hub (needed to look it up as a Hub repo id{at}) is not "
            f"installed: pass the checkpoint directory, or pip install huggingface_hub") from None
    from huggingface_hub import errors

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # a LocalEntryNotFoundError, but there
    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except incomplete as e:
        raise CheckpointError(f"{name!r}: the Hugging Face Hub repo{at} is only partly in the local HF cache "
                              f"({constants.HF_HUB_CACHE}): {e}") from None
    except errors.LocalEntryNotFoundError:
        raise MissingCheckpointFileError(
            f"{name!r}: no such directory, and the Hugging Face Hub repo {name!r}{at} is not in the local HF cache "
            f"({constants.HF_HUB_CACHE}); trimkit only reads the cache (local_files_only=True), it downloads "
            f"nothing: download it first (huggingface-cli download {name}"
            f"{' --revision ' + revision if revision else ''}) or pass the checkpoint directory") from None
    except (OSError, ValueError) as e:  # an incomplete snapshot, a broken cache entry, an invalid revision
        raise CheckpointError(f"{name!r}: the Hugging Face Hub repo{at} could not be read from the local HF cache "
                              f"({constants.HF_HUB_CACHE}): {type(e).__name__}: {e}") from None


def base_model_of(model: Any) -> tuple[str | None, str | None]:
    """``(id, revision)`` of the base model ``model`` says it is, ``(None, None)`` when it says
    nothing: its ``trimkit_base`` attribute (``{"model": str, "revision": str | None}``, set by
    adapters' pretrained loaders), else a Hugging Face model's ``config._name_or_path`` or
    ``name_or_path`` (non-empty; no revision). A malformed ``trimkit_base`` is a ValueError."""
    base = getattr(model, "trimkit_base", None)
    if base is not None:
        ok = (isinstance(base, Mapping) and isinstance(base.get("model"), str) and base["model"]
              and (base.get("revision") is None or isinstance(base.get("revision"), str)))
        if not ok:
            raise ValueError(f"{type(model).__qualname__}.trimkit_base must be a dict {{'model': non-empty str, "
                             f"'revision': str or None}} naming the base model, got {base!r:.120}")
        return base["model"], base.get("revision") or None
    for value in (getattr(getattr(model, "config", None), "_name_or_path", None), getattr(model, "name_or_path", None)):
        if isinstance(value, str) and value:
            return value, None
    return None, None


def read_tensors(path: str | Path, meta: CheckpointMeta | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU), read with safetensors' ``safe_open``.

    Raises :class:`MissingCheckpointFileError` if it is missing and :class:`CheckpointError`
    naming the path if it is not a readable safetensors file (corrupt, truncated) or, given the
    checkpoint's ``meta`` of format >= 1, if it carries another save's id (a mixed directory)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointFileError(f"{path}: not found; the checkpoint needs it: {_REDO}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if meta is not None and meta.save_id is not None:
                _check_save_id(path, header, meta)
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is corrupt or truncated (an "
                              f"interrupted copy or download?): {_REDO}") from None


def laid_out_like(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (whole tensors) for ``module.load_state_dict``: a value whose parameter or buffer is
    sharded (a DTensor, e.g. under FSDP2) is cut into this process's shard, without communication;
    the rest is returned as is. Lets a checkpoint load into a sharded model like into a plain one."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # torch without distributed: nothing can be sharded
        return dict(state)
    own = dict(module.named_parameters(remove_duplicate=False))
    own.update(module.named_buffers(remove_duplicate=False))
    if not any(isinstance(v, DTensor) for v in own.values()):
        return dict(state)
    out = {}
    for key, value in state.items():
        ref = own.get(key)
        if isinstance(ref, DTensor) and not isinstance(value, DTensor) and tuple(value.shape) == tuple(ref.shape):
            value = distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements,
                                      src_data_rank=None)
        out[key] = value
    return out


def _check_save_id(path: Path, header: Mapping[str, str], meta: CheckpointMeta) -> None:
    got = header.get(SAVE_ID_KEY)
    if got == meta.save_id:
        return
    was = f"save {got}" if got else "a save that recorded no id"
    raise CheckpointError(
        f"{path} does not belong to the checkpoint {meta.path} describes: it was written by {was}, the config by "
        f"save {meta.save_id}. The directory mixes files of two saves (a save_pretrained killed midway, or a file "
        f"copied in from elsewhere); loading it would combine weights that were never trained together: {_REDO}")


def check_backbone(meta: CheckpointMeta, require: bool = False) -> Path | None:
    """Where the checkpoint's backbone weights are, or ``None`` when it has none (the model's own
    weights are then used). Refuses a backbone the config says was saved but is missing, a
    ``backbone.safetensors`` the config says was not saved (left by another save), and, with
    ``require``, a checkpoint without a backbone."""
    path = meta.directory / BACKBONE_FILE
    if meta.backbone is True and not path.is_file():
        raise MissingCheckpointFileError(
            f"{path}: not found, but {meta.path} says the backbone was saved with the trimmers "
            f"(include_backbone=True); "
            f"without it the trimmers would run on whatever weights the model has (random ones for a freshly built "
            f"model): restore the file (or the whole directory from a copy), or save the checkpoint again")
    if meta.backbone is False and path.exists():
        raise CheckpointError(
            f"{path}: present, but {meta.path} says this checkpoint was saved without a backbone "
            f"(include_backbone=False), so the file is left from another save and its weights do not go with these "
            f"trimmers: delete it (the caller's model weights are then used), or save again with include_backbone=True")
    if not path.is_file():
        if require:
            why = ("was saved without a backbone (include_backbone=False)" if meta.backbone is False
                   else f"has no {BACKBONE_FILE}")
            raise MissingCheckpointFileError(
                f"{meta.directory}: the checkpoint {why}, and its trimmers need the weights they were trained with; "
                f"load it with load_trimmed(directory, model) onto a model holding those weights, or save it with "
                f"include_backbone=True")
        return None
    return path
