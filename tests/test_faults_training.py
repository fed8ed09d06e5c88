"""Training runs lose nothing and fail loudly (issue 11, "Nothing lost, nothing silent").

* a run directory that holds a run is never replaced without ``--resume`` or ``--overwrite``;
* non-finite config numbers are rejected by field name;
* a diverging run stops (exit 1) naming the step and the loss terms, and the last checkpoint stays
  byte-identical (no NaN checkpoint is ever written);
* a SIGKILL leaves a log with every step up to the checkpoint, and ``--resume`` finishes with each step
  logged exactly once; a kill anywhere inside a checkpoint save leaves the old or the new one, complete;
* ``--resume`` with a config that changes the run is refused naming the fields.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml

from trimkit import TrimConfig
from trimkit.cli import build_parser, main
from trimkit_train.data import DigitGridDataset
from trimkit_train import (
    ConfigError,
    DivergedError,
    RESUMABLE_FIELDS,
    ExperimentConfig,
    ResumeConfigError,
    RunExistsError,
    TrainConfig,
    Trainer,
    load_checkpoint,
)
from trimkit_train import trainer as trainer_mod

pytestmark = pytest.mark.usefixtures("one_thread", "toy_registry_module")

TOY = {"dim": 32, "heads": 4, "image": 32, "patch": 8, "vocab": 64, "labels": 13}
DATA = {"options": {"grid": 2, "cell": 16, "digits_per_image": [1, 3]}, "train_size": 48, "eval_size": 8}


def _dict(steps=4, trim=True, **train):
    return {
        "model": {"adapter": "toy", "overrides": TOY},
        "data": DATA,
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "trimmer_lr": 1e-2, "macs_instances": 0,
                  "progress": False, **train},
        "trim": {"token_target": 0.5, "head_target": 0.75} if trim else None,
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: bytes and mtime (ns)."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def _train(*args: str) -> int:
    return main(["train", "--no-progress", *args])


# ------------------------------------------------------------------------------------------------
# 1. a run directory is never overwritten by accident
# ------------------------------------------------------------------------------------------------
def test_finished_run_is_not_overwritten_without_a_flag(tmp_path, capsys):
    cfg = _write(tmp_path / "exp.yaml", _dict(steps=2))
    run = tmp_path / "run"
    assert _train("--config", str(cfg), "--out", str(run)) == 0
    before = _snapshot(run)
    assert {"log.jsonl", "experiment.yaml", "metrics.json", "checkpoint/trainer_state.pt"} <= set(before)
    capsys.readouterr()

    assert _train("--config", str(cfg), "--out", str(run)) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(run) == before  # not a byte, not an mtime changed
    with pytest.raises(RunExistsError, match="--overwrite"):  # the Python API refuses too
        Trainer(ExperimentConfig.load(cfg), out_dir=run).fit()
    assert _snapshot(run) == before
    with pytest.raises(SystemExit) as exit_:  # argparse: the two flags exclude each other
        _train("--config", str(cfg), "--out", str(run), "--resume", "--overwrite")
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err

    (run / "notes.txt").write_text("mine")  # not the run's: --overwrite leaves it alone
    assert _train("--config", str(cfg), "--out", str(run), "--overwrite") == 0
    assert [r["step"] for r in _records(run)] == [1, 2]  # a new log, not a second one appended
    assert (run / "notes.txt").read_text() == "mine"
    assert _snapshot(run)["checkpoint/trainer_state.pt"][1] > before["checkpoint/trainer_state.pt"][1]


def test_a_directory_without_a_run_is_used(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "README").write_text("plans")
    Trainer(ExperimentConfig.from_dict(_dict(steps=1)), out_dir=run).fit()
    assert (run / "checkpoint" / "trainer_state.pt").exists() and (run / "README").read_text() == "plans"


# ------------------------------------------------------------------------------------------------
# 2a. non-finite config numbers
# ------------------------------------------------------------------------------------------------
def _float_fields(model: type) -> list[str]:
    def has_float(t) -> bool:
        return t is float or any(has_float(a) for a in typing.get_args(t))

    return [name for name, f in model.model_fields.items() if has_float(f.annotation)]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_every_float_field_rejects_non_finite_values(bad):
    from trimkit_train import RecipeConfig

    train_fields, trim_fields = _float_fields(TrainConfig), _float_fields(TrimConfig)
    recipe_fields = _float_fields(RecipeConfig)
    assert {"lr", "trimmer_lr", "betas", "epochs", "grad_clip"} <= set(train_fields)
    assert {"token_target", "head_target", "init_logit"} <= set(trim_fields)
    assert {"lambda_cost", "lambda_sd", "temperature", "final_temperature"} <= set(recipe_fields)
    for section, fields in (("train", train_fields), ("trim", trim_fields), ("recipe", recipe_fields)):
        for name in fields:
            value = (0.9, bad) if name == "betas" else bad
            data = _dict()
            data[section] = {**(data.get(section) or {}), name: value}
            if name == "epochs":
                data["train"].pop("steps")
            with pytest.raises(ConfigError) as err:
                ExperimentConfig.from_dict(data)
            assert f"{section}.{name}" in str(err.value) and "finite" in str(err.value), (name, str(err.value))


def test_yaml_inf_is_rejected_by_name(tmp_path, capsys):
    data = _dict()
    path = tmp_path / "exp.yaml"
    from trimkit_train import RecipeConfig

    path.write_text(yaml.safe_dump(data) + "recipe:\n  lambda_cost: .inf\n")
    assert yaml.safe_load(path.read_text())["recipe"]["lambda_cost"] == float("inf")
    assert _train("--config", str(path), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "recipe.lambda_cost: must be a finite number, got inf" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="lambda_cost"):
        RecipeConfig(lambda_cost=float("inf"))
    cfg = RecipeConfig()
    with pytest.raises(ValueError, match="temperature"):  # validate_assignment: no way round it
        cfg.temperature = float("nan")
    trim_cfg = TrimConfig()
    with pytest.raises(ValueError, match="init_logit"):
        trim_cfg.init_logit = float("nan")


# ------------------------------------------------------------------------------------------------
# 2b. divergence
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def nan_at_step(monkeypatch):
    """``nan_at_step(k)``: every Trainer built afterwards gets NaN loss terms at step k (None: never)."""
    init = Trainer.__init__
    at = {"k": None}

    def patched(self, *a, **kw):
        init(self, *a, **kw)
        objective = self.objective

        def poisoned(*args, **kwargs):
            terms = objective(*args, **kwargs)
            if self.step + 1 == at["k"]:
                terms = {name: t * float("nan") for name, t in terms.items()}
            return terms

        poisoned.needs_full_pass = getattr(objective, "needs_full_pass", False)
        self.objective = poisoned

    monkeypatch.setattr(Trainer, "__init__", patched)
    return lambda k: at.update(k=k)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, nan_at_step):
    cfg = _write(tmp_path / "exp.yaml", _dict(steps=8, save_every=2))
    run = tmp_path / "run"
    Trainer(ExperimentConfig.load(cfg), out_dir=run).fit(stop_after=4)
    good = _snapshot(run / "checkpoint")

    nan_at_step(6)  # step 5 is fine (logged, next checkpoint due at 6), step 6 diverges
    capsys.readouterr()
    assert _train("--config", str(cfg), "--out", str(run), "--resume") == 1
    err = capsys.readouterr().err
    assert "training diverged at step 6: non-finite loss" in err
    assert "loss=nan" in err and "task=nan" in err and "cost=nan" in err and "sd=nan" in err
    assert f"{run / 'checkpoint'} (step 4), is left as it was" in err
    assert _snapshot(run / "checkpoint") == good  # byte-identical: no NaN checkpoint replaced it
    model, _ = load_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (run / "metrics.json").exists()  # no evaluation of a broken model passed off as the result
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4, 5]
    (diverged,) = _records(run, "diverged")
    assert diverged["step"] == 6 and diverged["terms"]["loss"] == "nan" and "diverged at step 6" in diverged["error"]

    nan_at_step(None)  # e.g. after fixing the cause: the run resumes from step 4, nothing lost or doubled
    with pytest.raises(DivergedError):  # the Python API raises (with the step and the terms)
        nan_at_step(5)
        Trainer(ExperimentConfig.load(cfg), out_dir=run).fit(resume=True)
    assert _snapshot(run / "checkpoint") == good
    nan_at_step(None)
    assert _train("--config", str(cfg), "--out", str(run), "--resume") == 0
    assert [r["step"] for r in _records(run)] == list(range(1, 9)) and not _records(run, "diverged")


def test_huge_lr_diverges_with_exit_code_1(tmp_path, capsys):
    cfg = _write(tmp_path / "exp.yaml", _dict(steps=8, trim=False, lr=1e6, warmup_fraction=0.0, save_every=1))
    run = tmp_path / "run"
    assert _train("--config", str(cfg), "--out", str(run)) == 1
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "loss=nan" in err
    step = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    assert 1 <= step < 8
    model, _ = load_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(ExperimentConfig.from_dict(_dict(steps=2)), out_dir=run)
    trainer.fit()
    good = _snapshot(run / "checkpoint")
    with torch.no_grad():
        next(trainer.tmodel.trimmers.parameters()).fill_(float("nan"))
    with pytest.raises(DivergedError, match="non-finite weights.*no checkpoint was written for it"):
        trainer.save_checkpoint()
    assert _snapshot(run / "checkpoint") == good


# ------------------------------------------------------------------------------------------------
# 3. kills
# ------------------------------------------------------------------------------------------------
BLOCK_ENV = "TRIMKIT_TEST_BLOCK_AFTER"  # "<run dir>:<marker file>"


class _BlockingDigitGrid(DigitGridDataset):
    """Once the run has a checkpoint, lets two more steps through, then touches a marker file and
    hangs: the test kills the process there (after logging steps past the checkpoint)."""

    fetched = 0

    def __getitem__(self, i):
        run, marker = os.environ[BLOCK_ENV].rsplit(":", 1)
        if (Path(run) / "checkpoint" / "trainer_state.pt").exists():
            type(self).fetched += 1
            if type(self).fetched > 2 * 4:  # two batches of 4
                Path(marker).touch()
                time.sleep(600)
        return super().__getitem__(i)


def blocking_digit_grid(split, size=None, seed=0, **options):
    """A dataset factory (``data.name: test_faults_training:blocking_digit_grid``): the digit grid,
    blocking as above in the training split when ``TRIMKIT_TEST_BLOCK_AFTER`` is set."""
    if "digits_per_image" in options:
        options["digits_per_image"] = tuple(options["digits_per_image"])
    cls = _BlockingDigitGrid if split == "train" and os.environ.get(BLOCK_ENV) else DigitGridDataset
    return cls(split, size=size or 1000, seed=seed, **options)


METER = {"vision_width": 16, "vision_layers": 1, "vision_heads": 2, "text_hidden": 16, "text_layers": 1,
         "text_heads": 2, "text_intermediate": 32, "hidden_size": 16, "cross_layers": 1, "cross_heads": 2,
         "cross_intermediate": 32, "dropout": 0.0}


@pytest.mark.slow  # about 5 s, most of it the subprocess importing torch and the adapters
def test_sigkill_loses_no_logged_step_and_resume_finishes(tmp_path):
    """A real `python -m trimkit.cli train` (the built-in METER adapter, tiny), killed with SIGKILL two
    steps after its first checkpoint (steps 4 and 5 logged but not flushed); `--resume` finishes."""
    steps = 8
    data = _dict(steps=steps, save_every=3)
    data["model"] = {"adapter": "meter", "overrides": METER}
    data["data"] = {**DATA, "name": "test_faults_training:blocking_digit_grid"}
    data["train"]["batch_size"] = 4
    cfg = _write(tmp_path / "exp.yaml", data)
    run, marker = tmp_path / "run", tmp_path / "blocked"
    env = {**os.environ, BLOCK_ENV: f"{run}:{marker}", "OMP_NUM_THREADS": "1",
           "TRIMKIT_EXCLUDE_PLUGINS": "timm,open_clip,blip,bridgetower,vilt",  # unused here: a faster start
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "trimkit.cli", "train", "--config", str(cfg), "--out", str(run),
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the training process never reached its checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 3
    assert [r["step"] for r in _records(run)][:3] == [1, 2, 3]  # all flushed before the checkpoint was written
    assert not (run / "metrics.json").exists()

    assert _train("--config", str(cfg), "--out", str(run), "--resume") == 0
    assert [r["step"] for r in _records(run)] == list(range(1, steps + 1))  # each step exactly once
    assert [r["step"] for r in _records(run, "eval")] == [steps]
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == steps
    assert not any(p.name.startswith("checkpoint.") for p in run.iterdir())


class _Crash(BaseException):
    """A simulated kill (BaseException: nothing in the trainer catches it)."""


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at(k)``: the k-th file system operation of a checkpoint save (0-based; writes, renames,
    deletions) raises :class:`_Crash` before it happens; returns a counter of the operations seen."""
    import shutil

    seen = {"n": 0, "at": None}

    def hook(fn):
        def wrapper(*a, **kw):
            if seen["at"] is not None:
                if seen["n"] == seen["at"]:
                    raise _Crash()
                seen["n"] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(trainer_mod.os, "fsync", lambda fd: None)  # a kill, not a power cut: no need to wait
    monkeypatch.setattr(Path, "rename", hook(Path.rename))
    monkeypatch.setattr(Path, "mkdir", hook(Path.mkdir))
    monkeypatch.setattr(trainer_mod.os, "replace", hook(os.replace))
    monkeypatch.setattr(trainer_mod.shutil, "rmtree", hook(shutil.rmtree))
    monkeypatch.setattr(trainer_mod.torch, "save", hook(torch.save))
    monkeypatch.setattr(trainer_mod, "save_backbone", hook(trainer_mod.save_backbone))

    def arm(k):
        seen.update(n=0, at=k)
        return seen

    return arm


def test_a_kill_anywhere_in_a_checkpoint_save_leaves_a_complete_one(tmp_path, crash_at):
    """Crash before each file operation of a save in turn: a new process finds the old (step 2) or
    the new (step 5) checkpoint, complete, both by reading (load_checkpoint / eval) and on resume."""
    run = tmp_path / "run"
    trainer = Trainer(ExperimentConfig.from_dict(_dict(steps=2, trim=False)), out_dir=run)
    trainer.fit()
    probe = Trainer(ExperimentConfig.from_dict(_dict(steps=2, trim=False)), out_dir=run)
    outcomes, swapped_out = [], 0
    for k in range(100):
        trainer.step = 2
        trainer.save_checkpoint()  # a clean step-2 checkpoint (and recovers what the last crash left)
        trainer.step = 5
        crash_at(k)
        try:
            trainer.save_checkpoint()
            done = True
        except _Crash:
            done = False
        crash_at(None)
        swapped_out += not (run / "checkpoint").exists()  # killed between the two renames
        model, _ = load_checkpoint(run)  # a reader (trimkit eval) before any recovery
        assert all(torch.isfinite(p).all() for p in model.parameters())
        trainer_mod._recover_checkpoint(run / "checkpoint")  # what --resume and the next save do first
        assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
        probe.load_state(run / "checkpoint")
        outcomes.append(probe.step)
        if done:
            break
    assert done and set(outcomes) == {2, 5} and outcomes[-1] == 5 and swapped_out >= 1, outcomes
    assert outcomes == sorted(outcomes)  # old until the rename that publishes the new one, then new


# ------------------------------------------------------------------------------------------------
# 4. resume with a changed config
# ------------------------------------------------------------------------------------------------
def test_resume_with_a_changed_config_is_refused_by_field(tmp_path, capsys):
    base = _dict(steps=4, save_every=2)
    cfg = _write(tmp_path / "exp.yaml", base)
    run = tmp_path / "run"
    Trainer(ExperimentConfig.load(cfg), out_dir=run).fit(stop_after=2)
    before = _snapshot(run)
    capsys.readouterr()

    changed = _dict(steps=6, save_every=2, lr=5e-4)
    changed["recipe"] = {"lambda_cost": 10.0}
    bad = _write(tmp_path / "changed.yaml", changed)
    assert _train("--config", str(bad), "--out", str(run), "--resume") == 2
    err = capsys.readouterr().err
    assert "differs from the run's" in err and str(run / "checkpoint" / "experiment.yaml") in err
    assert "train.lr: 0.001 (run) -> 0.0005 (given)" in err
    assert "train.steps: 4 (run) -> 6 (given)" in err and "recipe.lambda_cost: 20.0 (run) -> 10.0 (given)" in err
    assert "--allow-config-change" in err and "train.eval_every" in err  # the way out, and what may change
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert all(f.split(".")[1] in help_text for f in RESUMABLE_FIELDS)  # --help lists them too
    assert _snapshot(run) == before
    with pytest.raises(ResumeConfigError, match="model.overrides.dim: 32 \\(run\\) -> 16"):
        data = _dict(steps=4, save_every=2)
        data["model"]["overrides"] = {**TOY, "dim": 16}
        Trainer(ExperimentConfig.from_dict(data), out_dir=run).fit(resume=True)
    assert _snapshot(run) == before

    # bookkeeping may change: another --out spelling, progress, evaluation and checkpoint frequency
    ok = _write(tmp_path / "ok.yaml", _dict(steps=4, save_every=1, eval_every=1, out_dir="elsewhere"))
    assert _train("--config", str(ok), "--out", str(run), "--resume") == 0
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4] and not _records(run, "config_change")


def test_allow_config_change_resumes_and_records_it(tmp_path, capsys):
    cfg = _write(tmp_path / "exp.yaml", _dict(steps=4, save_every=2))
    run = tmp_path / "run"
    Trainer(ExperimentConfig.load(cfg), out_dir=run).fit(stop_after=2)
    capsys.readouterr()
    longer = _write(tmp_path / "longer.yaml", _dict(steps=5, save_every=2))
    assert _train("--config", str(longer), "--allow-config-change") == 2  # needs --resume
    assert _train("--config", str(longer), "--out", str(run), "--resume", "--allow-config-change") == 0
    err = capsys.readouterr().err
    assert "on a changed config" in err and "train.steps: 4 (run) -> 5 (given)" in err
    (change,) = _records(run, "config_change")
    assert change["step"] == 2 and change["changes"]["train.steps"] == {"run": 4, "given": 5}
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4, 5]
    assert ExperimentConfig.load(run / "experiment.yaml").train.steps == 5
    assert ExperimentConfig.load(run / "checkpoint" / "experiment.yaml").train.steps == 5


def test_resume_before_the_first_checkpoint_says_what_to_do(tmp_path, capsys):
    cfg = _write(tmp_path / "exp.yaml", _dict(steps=2))
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"type": "train", "step": 1, "loss": 2.5}\n')  # killed before its first save
    before = _snapshot(run)
    assert _train("--config", str(cfg), "--out", str(run), "--resume") == 2
    err = capsys.readouterr().err
    assert "no " in err and "trainer_state.pt to resume from" in err and "--overwrite" in err
    assert _train("--config", str(cfg), "--out", str(run)) == 2 and "log.jsonl" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_unreadable_files_are_named(tmp_path):
    """Binary config files and damaged trainer state name the file (were UnicodeDecodeError and
    torch's unpickling error without a path)."""
    from trimkit.config import TrimConfig, TrimConfigError
    from trimkit_train.trainer import ConfigError, ExperimentConfig

    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(ConfigError, match=r"config\.yaml: not a text file"):
        ExperimentConfig.load(binary)
    with pytest.raises(TrimConfigError, match=r"config\.yaml: not a text file"):
        TrimConfig.load(binary)
    with pytest.raises(ConfigError, match="is a directory"):
        ExperimentConfig.load(tmp_path)


def test_a_damaged_trainer_state_is_named_on_resume(tmp_path, capsys):
    cfg = _write(tmp_path / "exp.yaml", _dict(steps=2))
    run = tmp_path / "run"
    assert _train("--config", str(cfg), "--out", str(run)) == 0
    state = run / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:40])  # truncated
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"trainer_state\.pt: the trainer state cannot be read"):
        Trainer(ExperimentConfig.load(cfg), out_dir=run).fit(resume=True)
