"""PEFT-style checkpoints: ``save_pretrained`` writes the trimmers only by default, records the base
model and writes a Hub model card; ``TrimmedModel.from_pretrained(base_model, dir_or_repo)`` rebuilds the
trimmed model onto a base model, from a directory or a repo in the local Hugging Face cache.

* round trips (trimmers only onto the same base weights; with the backbone onto a fresh random model)
  give identical eval-mode outputs;
* the default save has no backbone file and is much smaller;
* ``README.md``: front matter (library_name, base_model, tags) and how to load; a README trimkit did
  not write is never overwritten;
* the base model id and revision come from the arguments, else the model's ``trimkit_base``, else a
  Hugging Face ``name_or_path``; a different base model at load time warns;
* a repo id is looked up in the local HF cache only: a missing one is named, a cached one loads;
* checkpoints written before these fields existed still load.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_trimmers
from trimkit_meter import build_meter, meter_example_inputs

from trimkit import TrimConfig, TrimmedModel, load_trimmed, trim
from trimkit.checkpoint import (
    BACKBONE_FILE,
    CONFIG_FILE,
    MODEL_CARD_FILE,
    MODEL_CARD_MARKER,
    TRIMMERS_FILE,
    CheckpointError,
    CheckpointSaveError,
    MissingCheckpointFileError,
    read_meta,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _base(seed: int = 0) -> torch.nn.Module:
    """A tiny METER whose random weights are drawn from ``seed`` (the same seed: the same weights)."""
    torch.manual_seed(seed)
    return build_meter("tiny")


def _trimmed(seed: int = 0, **attrs) -> TrimmedModel:
    """A trimmed tiny METER (eval mode) with random backbone weights from ``seed`` and random trimmer
    weights (about half the tokens kept, per instance); ``attrs`` are set on the base model first."""
    base = _base(seed)
    for k, v in attrs.items():
        setattr(base, k, v)
    tmodel = trim(base, TrimConfig(token_target=0.5, head_target=0.7))
    randomize_trimmers(tmodel, seed=seed + 100)
    return tmodel.eval()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _inputs(tmodel: TrimmedModel) -> list[dict]:
    return [meter_example_inputs(tmodel.model, batch_size=1, seed=s) for s in (1, 2)] + [
        meter_example_inputs(tmodel.model, batch_size=3, seed=3)]


def _outputs(tmodel: TrimmedModel, inputs: list[dict]) -> list:
    with torch.no_grad():
        return [tmodel(**x) for x in inputs]


def _assert_identical(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _meta(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text())


def _front_matter(directory: Path) -> tuple[dict, str]:
    text = (directory / MODEL_CARD_FILE).read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name != MODEL_CARD_FILE)


# ------------------------------------------------------------------------------------------------
# 1. round trips
# ------------------------------------------------------------------------------------------------
def test_trimmers_only_round_trip_onto_the_same_base_gives_identical_outputs(tmp_path):
    tmodel = _trimmed(0)
    inputs = _inputs(tmodel)
    ref = _outputs(tmodel, inputs)
    kept = [r.keep.clone() for r in tmodel.records]
    directory = tmodel.save_pretrained(tmp_path / "ckpt")  # default: trimmers only
    assert {p.name for p in directory.iterdir()} == {CONFIG_FILE, TRIMMERS_FILE, MODEL_CARD_FILE}
    meta = _meta(directory)
    assert meta["backbone"] is False and meta["files"] == [TRIMMERS_FILE] and meta["model_card"] == MODEL_CARD_FILE

    base = _base(0)  # another object with the same weights, as a pretrained loader would give
    restored = TrimmedModel.from_pretrained(base, directory)
    assert isinstance(restored, TrimmedModel) and restored.model is base
    assert restored.config == tmodel.config and restored.adapter_name == "meter"
    assert _same(_state(restored.trimmers), _state(tmodel.trimmers))
    got = _outputs(restored.eval(), inputs)
    _assert_identical(got, ref)
    assert all(torch.equal(r.keep, k) for r, k in zip(restored.records, kept, strict=True))  # the same decisions
    # load_trimmed is the same load (it delegates)
    _assert_identical(_outputs(load_trimmed(directory, _base(0)).eval(), inputs), ref)


def test_the_default_save_has_no_backbone_and_is_much_smaller(tmp_path):
    tmodel = _trimmed(0)
    small = tmodel.save_pretrained(tmp_path / "small")
    full = tmodel.save_pretrained(tmp_path / "full", include_backbone=True)
    assert not (small / BACKBONE_FILE).exists() and (full / BACKBONE_FILE).is_file()
    assert _meta(full)["files"] == [TRIMMERS_FILE, BACKBONE_FILE] and _meta(full)["backbone"] is True
    assert _size(small) * 10 < _size(full), (_size(small), _size(full))
    # a trimmers-only save over a full one removes the stale backbone
    tmodel.save_pretrained(full)
    assert not (full / BACKBONE_FILE).exists()


def test_a_backbone_round_trip_onto_a_fresh_random_model_reproduces_outputs(tmp_path):
    tmodel = _trimmed(0)
    inputs = _inputs(tmodel)
    ref = _outputs(tmodel, inputs)
    directory = tmodel.save_pretrained(tmp_path / "ckpt", include_backbone=True)
    fresh = _base(1234)  # another random init
    assert not _same(_state(fresh), _state(tmodel.model))
    restored = TrimmedModel.from_pretrained(fresh, str(directory)).eval()  # a str path works as a Path does
    assert _same(_state(restored.model), _state(tmodel.model))
    _assert_identical(_outputs(restored, inputs), ref)
    # the same checkpoint without its backbone file is refused, not run on random weights
    (directory / BACKBONE_FILE).unlink()
    with pytest.raises(MissingCheckpointFileError, match="random"):
        TrimmedModel.from_pretrained(_base(1234), directory)


def test_from_pretrained_refuses_what_is_not_an_untrimmed_model(tmp_path):
    tmodel = _trimmed(0)
    directory = tmodel.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(TypeError, match=r"base_model must be the untrimmed model \(an nn.Module\), got str"):
        TrimmedModel.from_pretrained("org/meter", directory)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"already trimmed \(TrimmedModel\); pass its \.model"):
        TrimmedModel.from_pretrained(tmodel, directory)


# ------------------------------------------------------------------------------------------------
# 2. the model card
# ------------------------------------------------------------------------------------------------
def test_the_model_card_has_hub_front_matter_and_says_how_to_load(tmp_path):
    directory = _trimmed(0).save_pretrained(tmp_path / "my_trimmed", base_model="org/meter-tiny",
                                            base_revision="v1", build_options={"size": "tiny", "seed": 0})
    front, body = _front_matter(directory)
    assert front == {"library_name": "trimkit", "base_model": "org/meter-tiny", "tags": ["trimkit", "smarttrim"]}
    assert MODEL_CARD_MARKER in body
    assert 'TrimmedModel.from_pretrained(base, "path/to/this/directory")' in body
    assert "build(size='tiny', seed=0)" in body and "`org/meter-tiny` (revision `v1`)" in body
    assert "trimmers only" in body


def test_the_model_card_without_a_known_base_model(tmp_path):
    directory = _trimmed(0).save_pretrained(tmp_path / "ckpt", include_backbone=True)
    front, body = _front_matter(directory)
    assert front == {"library_name": "trimkit", "tags": ["trimkit", "smarttrim"]}
    assert "backbone.safetensors" in body and "TrimmedModel.from_pretrained(base, " in body
    # a local path is recorded, but is no Hub id for the front matter
    directory = _trimmed(0).save_pretrained(tmp_path / "local", base_model="/models/meter-tiny")
    assert "base_model" not in _front_matter(directory)[0] and _meta(directory)["base_model"] == "/models/meter-tiny"


def test_a_readme_trimkit_did_not_write_is_left_alone(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / MODEL_CARD_FILE).write_text("# my own notes\n")
    tmodel = _trimmed(0)
    tmodel.save_pretrained(directory, base_model="org/a")
    assert (directory / MODEL_CARD_FILE).read_text() == "# my own notes\n"
    assert _meta(directory)["model_card"] is None
    _assert_identical(_outputs(TrimmedModel.from_pretrained(_base(0), directory).eval(), _inputs(tmodel)),
                      _outputs(tmodel, _inputs(tmodel)))
    # trimkit's own card is replaced by the next save
    (directory / MODEL_CARD_FILE).unlink()
    tmodel.save_pretrained(directory, base_model="org/a")
    assert _front_matter(directory)[0]["base_model"] == "org/a"
    tmodel.save_pretrained(directory, base_model="org/b")
    assert _front_matter(directory)[0]["base_model"] == "org/b" and _meta(directory)["model_card"] == MODEL_CARD_FILE


def test_a_failed_save_leaves_the_previous_model_card(tmp_path, monkeypatch):
    import os

    tmodel = _trimmed(0)
    directory = tmodel.save_pretrained(tmp_path / "ckpt", base_model="org/a")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real, calls = os.replace, {"n": 0}

    def replace(*args, **kwargs):  # 0: trimmers, 1: the card, 2: the config
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointSaveError):
        tmodel.save_pretrained(directory, base_model="org/b")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


# ------------------------------------------------------------------------------------------------
# 3. the base model
# ------------------------------------------------------------------------------------------------
def test_the_base_model_is_recorded_from_the_arguments(tmp_path):
    options = {"size": "tiny", "seed": 0, "overrides": {"cross_layers": 2}, "extra": [1, 2.5, None, True]}
    directory = _trimmed(0).save_pretrained(tmp_path / "ckpt", base_model="org/meter-tiny", base_revision="abc123",
                                            build_options=options)
    meta = _meta(directory)
    assert meta["base_model"] == "org/meter-tiny" and meta["base_revision"] == "abc123"
    assert meta["build_options"] == options
    import trimkit

    assert meta["trimkit_version"] == trimkit.__version__ and meta["adapter"] == "meter"
    assert TrimConfig.model_validate(meta["config"]) == TrimConfig(token_target=0.5, head_target=0.7)
    read = read_meta(directory)
    assert (read.base_model, read.base_revision, read.build_options, read.model_card) == (
        "org/meter-tiny", "abc123", options, MODEL_CARD_FILE)


def test_nothing_recorded_is_null(tmp_path):
    meta = _meta(_trimmed(0).save_pretrained(tmp_path / "ckpt"))
    assert meta["base_model"] is None and meta["base_revision"] is None and meta["build_options"] is None


def test_the_base_model_is_recorded_from_trimkit_base(tmp_path):
    tmodel = _trimmed(0, trimkit_base={"model": "org/meter-tiny", "revision": "r2"})
    meta = _meta(tmodel.save_pretrained(tmp_path / "a"))
    assert (meta["base_model"], meta["base_revision"]) == ("org/meter-tiny", "r2")
    assert _front_matter(tmp_path / "a")[0]["base_model"] == "org/meter-tiny"
    # the arguments win; a revision goes with its own id only
    meta = _meta(tmodel.save_pretrained(tmp_path / "b", base_model="org/other"))
    assert (meta["base_model"], meta["base_revision"]) == ("org/other", None)
    meta = _meta(tmodel.save_pretrained(tmp_path / "c", base_model="org/meter-tiny"))
    assert (meta["base_model"], meta["base_revision"]) == ("org/meter-tiny", "r2")
    meta = _meta(tmodel.save_pretrained(tmp_path / "d", base_revision="r3"))
    assert (meta["base_model"], meta["base_revision"]) == ("org/meter-tiny", "r3")


def test_the_base_model_is_recorded_from_a_hugging_face_name_or_path(tmp_path):
    tmodel = _trimmed(0, name_or_path="org/hf-meter")
    meta = _meta(tmodel.save_pretrained(tmp_path / "a"))
    assert (meta["base_model"], meta["base_revision"]) == ("org/hf-meter", None)
    tmodel.model.config._name_or_path = "org/from-config"  # config._name_or_path comes first
    assert _meta(tmodel.save_pretrained(tmp_path / "b"))["base_model"] == "org/from-config"
    tmodel.model.config._name_or_path = ""  # empty: not a name
    assert _meta(tmodel.save_pretrained(tmp_path / "c"))["base_model"] == "org/hf-meter"


def test_bad_base_model_arguments_are_refused_before_anything_is_written(tmp_path):
    tmodel = _trimmed(0)
    directory = tmp_path / "ckpt"
    with pytest.raises(TypeError, match=r"build_options=.*not JSON-able"):
        tmodel.save_pretrained(directory, build_options={"device": torch.device("cpu")})
    with pytest.raises(TypeError, match=r"build_options=.*string keys"):
        tmodel.save_pretrained(directory, build_options={1: "x"})
    with pytest.raises(TypeError, match=r"base_model=.*non-empty string"):
        tmodel.save_pretrained(directory, base_model="")
    with pytest.raises(ValueError, match=r"base_revision='r1'.*no base model id"):
        tmodel.save_pretrained(directory, base_revision="r1")
    assert not directory.exists()
    tmodel.model.trimkit_base = {"revision": "r1"}
    with pytest.raises(ValueError, match=r"MeterModel.trimkit_base must be a dict"):
        tmodel.save_pretrained(directory)
    assert not directory.exists()


def test_a_different_base_model_warns_and_loads(tmp_path):
    tmodel = _trimmed(0)
    inputs = _inputs(tmodel)
    directory = tmodel.save_pretrained(tmp_path / "ckpt", base_model="org/meter-a")
    other = _base(0)
    other.trimkit_base = {"model": "org/meter-b", "revision": None}
    with pytest.warns(UserWarning, match=r"'org/meter-a'.*'org/meter-b'"):
        restored = TrimmedModel.from_pretrained(other, directory)
    _assert_identical(_outputs(restored.eval(), inputs), _outputs(tmodel, inputs))
    # the same id, or a model that does not say: no warning
    for base_info in ({"model": "org/meter-a", "revision": "x"}, None):
        base = _base(0)
        if base_info is not None:
            base.trimkit_base = base_info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TrimmedModel.from_pretrained(base, directory)
        assert not [w for w in caught if "saved from base model" in str(w.message)]


def test_a_broken_base_model_field_is_refused_naming_file_and_field(tmp_path):
    directory = _trimmed(0).save_pretrained(tmp_path / "ckpt")
    original = _meta(directory)
    for field, value, needle in (("base_model", 3, "got int 3"), ("base_model", "", "non-empty string"),
                                 ("base_revision", ["x"], "got list"), ("build_options", "tiny", "a JSON object")):
        data = dict(original)
        data[field] = value
        (directory / CONFIG_FILE).write_text(json.dumps(data))
        with pytest.raises(CheckpointError) as info:
            TrimmedModel.from_pretrained(_base(0), directory)
        message = str(info.value)
        assert str(directory / CONFIG_FILE) in message and f"field {field!r}" in message and needle in message


# ------------------------------------------------------------------------------------------------
# 4. Hub repo ids: the local Hugging Face cache only
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in ``tmp_path`` (nothing is read from or written to the user's)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _put_in_cache(cache: Path, repo_id: str, directory: Path, commit: str, ref: str = "main") -> None:
    """What ``huggingface-cli download repo_id`` leaves in the cache (files copied, not symlinked)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def test_a_repo_id_not_in_the_cache_is_named(hf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "org/not-here" is no directory here either
    with pytest.raises(MissingCheckpointFileError) as info:
        TrimmedModel.from_pretrained(_base(0), "org/not-here")
    message = str(info.value)
    assert "'org/not-here'" in message and "not in the local HF cache" in message and str(hf_cache) in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(MissingCheckpointFileError, match=r"'org/not-here' at revision 'v2' is not in the local HF "
                                                         r"cache"):
        TrimmedModel.from_pretrained(_base(0), "org/not-here", revision="v2")


def test_a_repo_in_the_cache_loads(hf_cache, tmp_path, monkeypatch):
    tmodel = _trimmed(0)
    inputs = _inputs(tmodel)
    ref = _outputs(tmodel, inputs)
    directory = tmodel.save_pretrained(tmp_path / "ckpt", include_backbone=True, base_model="org/meter-tiny")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _put_in_cache(hf_cache, "me/meter-trimmed", directory, commit)
    monkeypatch.chdir(tmp_path)
    for revision in (None, "main", commit):
        restored = TrimmedModel.from_pretrained(_base(1234), "me/meter-trimmed", revision=revision).eval()
        _assert_identical(_outputs(restored, inputs), ref)
    with pytest.raises(MissingCheckpointFileError, match="at revision 'v9'"):
        TrimmedModel.from_pretrained(_base(0), "me/meter-trimmed", revision="v9")


def test_an_existing_directory_wins_over_a_repo_id(hf_cache, tmp_path, monkeypatch):
    tmodel = _trimmed(0)
    (tmp_path / "org").mkdir()
    tmodel.save_pretrained(tmp_path / "org" / "ckpt")
    monkeypatch.chdir(tmp_path)
    restored = TrimmedModel.from_pretrained(_base(0), "org/ckpt")  # a valid repo id too, but a directory here
    assert _same(_state(restored.trimmers), _state(tmodel.trimmers))


# ------------------------------------------------------------------------------------------------
# 5. checkpoints of the earlier layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", [True, False])
def test_a_checkpoint_without_the_new_fields_still_loads(tmp_path, backbone):
    """What trimkit wrote before base models and model cards were recorded: the same format, no
    base_model/base_revision/build_options/model_card fields, no README.md."""
    tmodel = _trimmed(0)
    inputs = _inputs(tmodel)
    ref = _outputs(tmodel, inputs)
    directory = tmodel.save_pretrained(tmp_path / "ckpt", include_backbone=backbone, base_model="org/meter-tiny")
    data = _meta(directory)
    for field in ("base_model", "base_revision", "build_options", "model_card"):
        data.pop(field)
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=2))
    (directory / MODEL_CARD_FILE).unlink()
    meta = read_meta(directory)
    assert (meta.base_model, meta.base_revision, meta.build_options, meta.model_card) == (None,) * 4
    base = _base(1234 if backbone else 0)
    base.trimkit_base = {"model": "org/anything", "revision": None}  # nothing recorded to compare with: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = TrimmedModel.from_pretrained(base, directory).eval()
    assert not [w for w in caught if "saved from base model" in str(w.message)]
    _assert_identical(_outputs(restored, inputs), ref)
    # and saving again over it writes the new layout
    restored.save_pretrained(directory, include_backbone=backbone)
    assert (directory / MODEL_CARD_FILE).is_file() and _meta(directory)["base_model"] == "org/anything"
