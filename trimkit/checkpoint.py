"""The files of a trimkit checkpoint, written atomically and read with checks.

:meth:`TrimmedModel.save_pretrained <trimkit.model.TrimmedModel.save_pretrained>` writes three
files into a directory:

``trimmers.safetensors``
    the trimmers' weights;
``backbone.safetensors``
    the model's own weights (only with ``include_backbone=True``; saving without it *removes* a
    backbone an earlier save left in the directory, so it can never be mistaken for this one's);
``trim_config.json``
    what the weights are: the :class:`~trimkit.config.TrimConfig`, the adapter, the checkpoint
    ``format`` (:data:`FORMAT_VERSION`), the ``trimkit_version`` that wrote it, whether a backbone
    was saved (``backbone``), the ``files`` saved and a ``save_id``.

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
    "MissingCheckpointFileError", "TRIMMERS_FILE", "atomic_write_bytes", "check_backbone", "read_meta",
    "read_tensors", "write_checkpoint",
]

CONFIG_FILE = "trim_config.json"
TRIMMERS_FILE = "trimmers.safetensors"
BACKBONE_FILE = "backbone.safetensors"

#: The checkpoint format this trimkit writes; it reads every format up to this one (0: written
#: before formats were recorded, no ``format`` field).
FORMAT_VERSION = 1

#: safetensors header metadata key holding the save id (the config's ``save_id``).
SAVE_ID_KEY = "trimkit_save_id"
#: safetensors header metadata key holding which file of the checkpoint this is.
ROLE_KEY = "trimkit_file"

_FILES = (CONFIG_FILE, TRIMMERS_FILE, BACKBONE_FILE)
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
    for format 0)."""

    path: Path
    format: int
    adapter: str
    config: Any  # TrimConfig
    trimkit_version: str | None
    save_id: str | None
    backbone: bool | None
    raw: dict

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


def write_checkpoint(directory: str | Path, *, adapter: str, config: Mapping[str, Any],
                     trimmers: Mapping[str, torch.Tensor], backbone: Mapping[str, torch.Tensor] | None) -> Path:
    """Write a checkpoint (see the module docstring): ``trimmers`` and, unless ``None``,
    ``backbone`` (state dicts of contiguous tensors, no shared storage), and ``trim_config.json``
    recording ``adapter`` and ``config`` (a JSON-ready TrimConfig dump).

    All or nothing: the files are staged under temporary names and fsynced, then renamed into
    place, the config last; an exception at any point leaves the directory's previous checkpoint
    as it was (the previous files are put back) and re-raises; an :class:`OSError` becomes a
    :class:`CheckpointSaveError` (an OSError with the same errno) whose message names the
    directory and the step that failed and says the previous checkpoint is unchanged. ``backbone=None`` removes
    a ``backbone.safetensors`` an earlier save left there (it does not belong to this save).
    Other files in the directory are left alone."""
    import safetensors.torch as st

    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_scratch(directory)
    save_id = uuid.uuid4().hex
    token = save_id[:12]
    meta = {
        "format": FORMAT_VERSION,
        "trimkit_version": __version__,
        "adapter": adapter,
        "save_id": save_id,
        "backbone": backbone is not None,
        "files": [TRIMMERS_FILE] + ([BACKBONE_FILE] if backbone is not None else []),
        "config": dict(config),
    }
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
        step = f"writing {CONFIG_FILE}"
        tmp = staged[CONFIG_FILE] = _scratch(directory, CONFIG_FILE, token, "tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
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
        config = TrimConfig.model_validate(config_data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in ("config", *err["loc"]))
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        got = f"; got {err['input']!r:.80}" if "input" in err and err["loc"] else ""
        plugin = ("; a name unknown here may need the plugin the checkpoint was saved with"
                  if "unknown" in err["msg"] else "")
        raise CheckpointError(f"{path}: field {loc!r}: {err['msg']}{got}{more}{plugin}. Fix the field, or "
                              f"{_REDO}") from None
    return CheckpointMeta(path, fmt, adapter, config, version, save_id, backbone, data)


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
