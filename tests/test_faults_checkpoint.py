"""Checkpoint faults (issue 11, "Nothing lost, nothing silent"): what save_pretrained / load_trimmed do
when a save fails midway or a checkpoint directory is incomplete, mixed or damaged.

* a save that fails (disk full while writing any file, or while renaming them into place) leaves the
  previous checkpoint byte-identical and loadable, with its weights; no temporary file is left;
* ``include_backbone=False`` over an older checkpoint removes its backbone: the caller's weights are used,
  and a stale backbone put back is refused;
* a missing backbone, a corrupt safetensors file, files of two saves, a broken/binary trim_config.json,
  a newer format, another adapter: each refused with a message naming the file and field, the caller's
  model left as it was;
* ``trim`` of a TrimmedModel says it is already trimmed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from trimkit_meter import build_meter, meter_example_inputs

import trimkit
from trimkit import TrimConfig, TrimmedModel, load_trimmed, trim
from trimkit.checkpoint import (
    BACKBONE_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_CARD_FILE,
    TRIMMERS_FILE,
    CheckpointError,
    CheckpointSaveError,
    MissingCheckpointFileError,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _trimmed(seed: int) -> TrimmedModel:
    """A tiny METER, trimmed, with random backbone and trimmer weights drawn from ``seed``."""
    torch.manual_seed(seed)
    tmodel = trim(build_meter("tiny"), TrimConfig(token_target=0.5))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return tmodel.eval()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _files(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (hidden ones too) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fresh() -> torch.nn.Module:
    torch.manual_seed(1234)  # another random init than any checkpoint's
    return build_meter("tiny")


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a model with seed 0: (directory, the model, its trimmer and backbone weights)."""
    tmodel = _trimmed(0)
    directory = tmodel.save_pretrained(tmp_path / "ckpt", include_backbone=True)
    return directory, tmodel, _state(tmodel.trimmers), _state(tmodel.model)


def _assert_loads_as(directory: Path, trimmers: dict, backbone: dict) -> TrimmedModel:
    restored = load_trimmed(directory, _fresh()).eval()
    assert _same(_state(restored.trimmers), trimmers)
    assert _same(_state(restored.model), backbone)
    return restored


def _assert_refused(directory: Path, exc: type[BaseException], *needles: str) -> str:
    """load_trimmed(directory) raises ``exc`` with each of ``needles`` in its message, and leaves the
    caller's model as it was (nothing loaded into it)."""
    model = _fresh()
    before = _state(model)
    with pytest.raises(exc) as info:
        load_trimmed(directory, model)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert _same(_state(model), before)
    return message


# ------------------------------------------------------------------------------------------------
# 1. a failed save leaves the previous checkpoint
# ------------------------------------------------------------------------------------------------
def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_safetensors_write(monkeypatch, at: int) -> None:
    """The ``at``-th safetensors write (0: trimmers, 1: backbone) writes half the file, then the disk is full."""
    import safetensors.torch as st

    real, calls = st.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        n, calls["n"] = calls["n"], calls["n"] + 1
        if n == at:
            data = st.save(tensors, metadata=metadata)
            Path(filename).write_bytes(data[: len(data) // 2])
            raise _enospc()
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)


def _fail_os_call(monkeypatch, name: str, at: int) -> None:
    real, calls = getattr(os, name), {"n": 0}

    def wrapper(*args, **kwargs):
        n, calls["n"] = calls["n"], calls["n"] + 1
        if n == at:
            raise _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, wrapper)


FAILURES = {
    "writing trimmers": lambda mp: _fail_safetensors_write(mp, 0),
    "writing backbone": lambda mp: _fail_safetensors_write(mp, 1),
    "fsync of trimmers": lambda mp: _fail_os_call(mp, "fsync", 0),
    "fsync of the model card": lambda mp: _fail_os_call(mp, "fsync", 2),
    "fsync of the config": lambda mp: _fail_os_call(mp, "fsync", 3),
    "renaming trimmers": lambda mp: _fail_os_call(mp, "replace", 0),
    "renaming backbone": lambda mp: _fail_os_call(mp, "replace", 1),  # trimmers already replaced: put back
    "renaming the model card": lambda mp: _fail_os_call(mp, "replace", 2),  # both weights replaced: put back
    "renaming the config": lambda mp: _fail_os_call(mp, "replace", 3),  # weights and card replaced: put back
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(saved, monkeypatch, failure):
    directory, _, trimmers0, backbone0 = saved
    before = _files(directory)
    newer = _trimmed(1)  # other trimmer and backbone weights
    assert not _same(_state(newer.trimmers), trimmers0) and not _same(_state(newer.model), backbone0)
    FAILURES[failure](monkeypatch)
    with pytest.raises(OSError) as info:
        newer.save_pretrained(directory, include_backbone=True)
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, CheckpointSaveError) and err.errno == errno.ENOSPC
    assert str(directory) in str(err) and "the previous checkpoint there is unchanged" in str(err)
    assert _files(directory) == before  # byte-identical, and no temporary or backup file left
    _assert_loads_as(directory, trimmers0, backbone0)
    # and the save works once the disk has room again
    newer.save_pretrained(directory, include_backbone=True)
    _assert_loads_as(directory, _state(newer.trimmers), _state(newer.model))


def test_a_failed_save_into_a_new_directory_leaves_nothing_loadable(tmp_path, monkeypatch):
    directory = tmp_path / "new"
    _fail_os_call(monkeypatch, "replace", 1)
    with pytest.raises(CheckpointSaveError):
        _trimmed(0).save_pretrained(directory)
    monkeypatch.undo()
    assert _files(directory) == {}  # the trimmers renamed into place were taken back out
    _assert_refused(directory, FileNotFoundError, str(directory / CONFIG_FILE), "not a trimkit checkpoint")


def test_files_of_two_saves_are_refused(saved, tmp_path):
    """What a save killed between two renames leaves (or a file copied in): never loaded as one checkpoint."""
    directory, *_ = saved
    other = _trimmed(1).save_pretrained(tmp_path / "other", include_backbone=True)
    for name in (TRIMMERS_FILE, BACKBONE_FILE):
        mixed = tmp_path / f"mixed-{name}"
        shutil.copytree(directory, mixed)
        shutil.copy(other / name, mixed / name)
        _assert_refused(mixed, CheckpointError, str(mixed / name), "does not belong to the checkpoint",
                        "two saves", "save the checkpoint again")


def test_leftovers_of_a_killed_save_are_removed_by_the_next(saved):
    directory, tmodel, *_ = saved
    (directory / ".trimmers.safetensors.0123456789ab.tmp").write_bytes(b"half")
    (directory / ".backbone.safetensors.0123456789ab.bak").write_bytes(b"old")
    (directory / "notes.txt").write_text("mine")
    tmodel.save_pretrained(directory, include_backbone=True)
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, TRIMMERS_FILE, BACKBONE_FILE,
                                                                  MODEL_CARD_FILE, "notes.txt"])
    assert (directory / "notes.txt").read_text() == "mine"  # other files are left alone


# ------------------------------------------------------------------------------------------------
# 2. with and without a backbone
# ------------------------------------------------------------------------------------------------
def test_saving_without_backbone_over_an_old_checkpoint_uses_no_stale_backbone(saved, tmp_path):
    directory, _, trimmers0, backbone0 = saved
    old_backbone = tmp_path / "old-backbone.safetensors"
    shutil.copy(directory / BACKBONE_FILE, old_backbone)
    newer = _trimmed(1)
    newer.save_pretrained(directory, include_backbone=False)
    assert not (directory / BACKBONE_FILE).exists()  # removed with the save
    meta = json.loads((directory / CONFIG_FILE).read_text())
    assert meta["backbone"] is False and meta["files"] == [TRIMMERS_FILE]
    # the caller's weights are used, the trimmers are the new save's
    model = _fresh()
    own = _state(model)
    restored = load_trimmed(directory, model)
    assert _same(_state(restored.model), own) and not _same(own, backbone0)
    assert _same(_state(restored.trimmers), _state(newer.trimmers))
    # a backbone put back (from the older save) is refused, not loaded
    shutil.copy(old_backbone, directory / BACKBONE_FILE)
    _assert_refused(directory, CheckpointError, str(directory / BACKBONE_FILE), "saved without a backbone",
                    "include_backbone=False", "delete it")
    # a caller that needs the saved backbone (a freshly built model) is told there is none
    tmodel = trim(_fresh(), TrimConfig(token_target=0.5))
    (directory / BACKBONE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="saved without a backbone"):
        tmodel.load_trimmers(directory, require_backbone=True)


def test_a_missing_backbone_is_refused_naming_the_path(saved):
    directory, *_ = saved
    (directory / BACKBONE_FILE).unlink()
    message = _assert_refused(directory, FileNotFoundError, str(directory / BACKBONE_FILE), "not found",
                              "include_backbone=True")
    assert "random" in message  # what loading anyway would have meant
    with pytest.raises(MissingCheckpointFileError):
        load_trimmed(directory, _fresh())


def test_a_missing_trimmers_file_is_refused_naming_the_path(saved):
    directory, *_ = saved
    (directory / TRIMMERS_FILE).unlink()
    _assert_refused(directory, FileNotFoundError, str(directory / TRIMMERS_FILE), "not found")


# ------------------------------------------------------------------------------------------------
# 3. damaged files
# ------------------------------------------------------------------------------------------------
CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) - 100],
    "header only": lambda data: data[:20],
    "garbage": lambda data: b"\x00\xffnot safetensors\x01" * 64,
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("name", [TRIMMERS_FILE, BACKBONE_FILE])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_safetensors_file_is_refused_naming_the_path(saved, name, corruption):
    directory, *_ = saved
    path = directory / name
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    _assert_refused(directory, CheckpointError, str(path), "not a readable safetensors file",
                    "save the checkpoint again")


def _edit_config(directory: Path, edit) -> None:
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


BROKEN_CONFIGS = {
    # name: (how the file is broken, what the message names besides the path)
    "invalid JSON": (lambda p: p.write_text(p.read_text()[:40]), ["invalid JSON at line"]),
    "binary": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 8), ["not a text file"]),
    "a list": (lambda p: p.write_text("[1, 2]"), ["expected a JSON object"]),
    "no adapter": (lambda p: _edit_config(p.parent, lambda d: d.pop("adapter")), ["missing field 'adapter'"]),
    "no config": (lambda p: _edit_config(p.parent, lambda d: d.pop("config")), ["missing field 'config'"]),
    "no save_id": (lambda p: _edit_config(p.parent, lambda d: d.pop("save_id")), ["missing field 'save_id'"]),
    "adapter a number": (lambda p: _edit_config(p.parent, lambda d: d.update(adapter=3)),
                         ["field 'adapter'", "must be a string", "got int"]),
    "backbone a string": (lambda p: _edit_config(p.parent, lambda d: d.update(backbone="yes")),
                          ["field 'backbone'", "true or false"]),
    "format a string": (lambda p: _edit_config(p.parent, lambda d: d.update(format="1")),
                        ["field 'format'", "whole number"]),
    "config a list": (lambda p: _edit_config(p.parent, lambda d: d.update(config=[])),
                      ["field 'config'", "a JSON object"]),
    "bad target": (lambda p: _edit_config(p.parent, lambda d: d["config"].update(token_target=2.0)),
                   ["field 'config.token_target'", "(0, 1]"]),
    "wrong type in config": (lambda p: _edit_config(p.parent, lambda d: d["config"].update(trim_heads="often")),
                             ["field 'config.trim_heads'", "'often'"]),
    "unknown policy": (lambda p: _edit_config(p.parent, lambda d: d["config"].update(token_policy="nosuch")),
                       ["'nosuch'", "plugin"]),
}


@pytest.mark.parametrize("broken", list(BROKEN_CONFIGS))
def test_a_broken_trim_config_is_refused_naming_file_and_field(saved, broken):
    directory, *_ = saved
    path = directory / CONFIG_FILE
    breaks, needles = BROKEN_CONFIGS[broken]
    breaks(path)
    _assert_refused(directory, CheckpointError, str(path), *needles)
    with pytest.raises(CheckpointError) as info:  # not a bare JSONDecodeError/KeyError/UnicodeDecodeError
        load_trimmed(directory, _fresh())
    assert not isinstance(info.value, (json.JSONDecodeError, KeyError, UnicodeDecodeError))


def test_a_directory_that_is_no_checkpoint_is_named(tmp_path):
    _assert_refused(tmp_path / "nowhere", FileNotFoundError, str(tmp_path / "nowhere" / CONFIG_FILE),
                    "does not exist", "not a trimkit checkpoint")


# ------------------------------------------------------------------------------------------------
# 4. provenance: format, version, adapter
# ------------------------------------------------------------------------------------------------
def test_the_config_records_provenance(saved):
    directory, *_ = saved
    meta = json.loads((directory / CONFIG_FILE).read_text())
    assert meta["format"] == FORMAT_VERSION and meta["trimkit_version"] == trimkit.__version__
    assert meta["adapter"] == "meter" and meta["backbone"] is True
    assert meta["files"] == [TRIMMERS_FILE, BACKBONE_FILE] and len(meta["save_id"]) == 32
    assert TrimConfig.model_validate(meta["config"]) == TrimConfig(token_target=0.5)


def test_a_newer_format_is_refused(saved):
    directory, *_ = saved
    _edit_config(directory, lambda d: d.update(format=FORMAT_VERSION + 1, trimkit_version="9.0"))
    _assert_refused(directory, CheckpointError, str(directory / CONFIG_FILE), f"format {FORMAT_VERSION + 1}",
                    "trimkit 9.0", trimkit.__version__, "upgrade trimkit")


def test_a_checkpoint_of_another_adapter_is_refused(saved, toy_registry):
    directory, tmodel, *_ = saved
    _edit_config(directory, lambda d: d.update(adapter="nosuch"))
    _assert_refused(directory, CheckpointError, str(directory / CONFIG_FILE), "'nosuch'", "not registered")
    _edit_config(directory, lambda d: d.update(adapter="toy"))  # registered, but the model is a METER
    _assert_refused(directory, CheckpointError, str(directory / CONFIG_FILE), "adapter 'toy'",
                    "one for adapter 'meter'")
    # a TrimmedModel of another adapter loading it
    _edit_config(directory, lambda d: d.update(adapter="meter"))
    from toyvlm import ToyVLM

    toy = trim(ToyVLM(), TrimConfig(token_target=0.5), adapter="toy")
    before = _state(toy)
    with pytest.raises(CheckpointError, match="field 'adapter' is 'meter', but this TrimmedModel was trimmed with "
                                              "adapter 'toy'"):
        toy.load_trimmers(directory)
    assert _same(_state(toy), before)


def test_a_checkpoint_written_before_formats_still_loads(saved):
    directory, _, trimmers0, backbone0 = saved
    _edit_config(directory, lambda d: [d.pop(k) for k in ("format", "trimkit_version", "save_id", "backbone",
                                                          "files")])
    _assert_loads_as(directory, trimmers0, backbone0)


def test_weights_for_another_model_are_refused_and_nothing_is_loaded(saved):
    directory, *_ = saved
    model = build_meter("tiny", cross_layers=1)
    before = _state(model)
    with pytest.raises(ValueError, match="does not match the model"):
        load_trimmed(directory, model)
    assert _same(_state(model), before)


# ------------------------------------------------------------------------------------------------
# 5. trimming twice
# ------------------------------------------------------------------------------------------------
def test_trimming_a_trimmed_model_says_so(saved):
    directory, tmodel, trimmers0, backbone0 = saved
    x = meter_example_inputs(tmodel.model, batch_size=1, seed=3)
    with torch.no_grad():
        ref = tmodel(**x)
    with pytest.raises(TypeError, match=r"this model is already trimmed \(TrimmedModel\); trim its \.model or "
                                        r"load_trimmed"):
        trim(tmodel, TrimConfig())
    with pytest.raises(TypeError, match=r"already trimmed \(TrimmedModel\); pass its \.model"):
        load_trimmed(directory, tmodel)
    # nothing changed: the same weights, the same outputs
    assert _same(_state(tmodel.trimmers), trimmers0) and _same(_state(tmodel.model), backbone0)
    with torch.no_grad():
        torch.testing.assert_close(tmodel(**x), ref)
