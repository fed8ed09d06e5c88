"""The training recipe: loss goes down, checkpoints resume, the JSONL log, stable init, curriculum, configs."""

from __future__ import annotations

import json

import pytest
import torch

import trimkit
from trimkit import TrimConfig, TrimmedModel, get_registry, hookimpl
from trimkit_train import ConfigError, ExperimentConfig, Trainer, evaluate, load_checkpoint
from trimkit_train.trainer import model_inputs

from toyvlm import ToyAdapter

TOY = {"dim": 32, "heads": 4, "image": 32, "patch": 8, "vocab": 64, "labels": 13}


class _ToyPlugin:
    @hookimpl
    def trimkit_register_adapters(self, registry):
        registry.adapters.register("toy", ToyAdapter())


@pytest.fixture(scope="module", autouse=True)
def toy_adapter():
    get_registry(plugins=[_ToyPlugin()])
    yield


def _config(tmp_path, steps=6, trim=True, **train):
    data = {
        "model": {"adapter": "toy", "overrides": TOY},
        "data": {"options": {"grid": 2, "cell": 16, "digits_per_image": [1, 3]}, "train_size": 96, "eval_size": 16},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "trimmer_lr": 1e-2, "macs_instances": 2,
                  "out_dir": str(tmp_path / "run"), "progress": False, **train},
        "trim": {"token_target": 0.5, "head_target": 0.75} if trim else None,
    }
    return ExperimentConfig.from_dict(data)


def test_plain_training_reduces_the_loss(tmp_path):
    cfg = _config(tmp_path, steps=30, trim=False, lr=3e-3, warmup_fraction=0.0)
    trainer = Trainer(cfg)
    # a fixed batch: the first and last steps see different batches, so compare on one batch
    batch = next(trainer._batches(0))
    x = model_inputs(trainer.net, batch)

    def loss():
        trainer.net.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(trainer.net(**x), batch["labels"]))

    before = loss()
    trainer.fit()
    assert loss() < before - 0.1
    assert trainer.tmodel is None and (tmp_path / "run" / "checkpoint" / "backbone.safetensors").exists()


def test_smarttrim_steps_log_every_term(tmp_path):
    trainer = Trainer(_config(tmp_path, steps=4, eval_every=2))
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["type"] == "train"]
    evals = [r for r in lines if r["type"] == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for r in steps:
        for key in ("loss", "task", "cost", "sd", "lr_trimmers", "lr_backbone", "keep", "targets", "temperature"):
            assert key in r, key
        assert set(r["keep"]) == set(trainer.tmodel.final_targets) == set(r["targets"])
        assert r["loss"] == pytest.approx(r["task"] + 20 * r["cost"] + r["sd"], rel=1e-4)
    assert steps[0]["lr_trimmers"] > steps[0]["lr_backbone"]
    for key in ("accuracy", "gmacs", "gmacs_full", "macs_ratio", "keep", "keep_tokens", "keep_heads"):
        assert key in evals[-1], key
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracy"] == evals[-1]["accuracy"]


def test_temperature_schedule_reaches_the_sampler(tmp_path):
    cfg = _config(tmp_path, steps=5)
    cfg.trim = cfg.trim.model_copy(update={"sampler": "sharpen"})
    cfg.recipe = cfg.recipe.model_copy(update={"temperature": 1.0, "final_temperature": 0.0625,
                                               "curriculum_fraction": 0.0})
    trainer = Trainer(cfg)
    trainer.fit()
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    temps = [r["temperature"] for r in steps if r["type"] == "train"]
    assert temps == pytest.approx([1.0, 0.5, 0.25, 0.125, 0.0625])
    assert trainer.tmodel.runtime.sampler is get_registry().samplers.get("sharpen")


def test_smarttrim_few_steps_reduce_the_loss(tmp_path):
    cfg = _config(tmp_path, steps=25, lr=3e-3, warmup_fraction=0.0, macs_instances=0)
    trainer = Trainer(cfg)
    trainer.fit()
    losses = [r["task"] for r in trainer.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_curriculum_moves_targets_from_one(tmp_path):
    trainer = Trainer(_config(tmp_path, steps=8, macs_instances=0))
    trainer.fit()
    first, mid, last = trainer.history[0]["targets"], trainer.history[3]["targets"], trainer.history[-1]["targets"]
    final = trainer.tmodel.final_targets
    assert all(v == 1.0 for v in first.values())  # step 0 of the curriculum: keep everything
    token_key = next(k for k in final if final[k] == 0.5)
    assert 0.5 < mid[token_key] < 1.0
    assert last[token_key] == pytest.approx(0.5)  # reached after curriculum_fraction (0.5) of training
    assert trainer.history[-1]["keep_tokens"] < trainer.history[0]["keep_tokens"]


def test_stable_init_keeps_everything_and_matches_the_model(tmp_path):
    trainer = Trainer(_config(tmp_path))
    tm = trainer.tmodel
    tm.eval()
    ds = trainer.eval_dataset
    batch = ds.collate_fn([ds[i] for i in range(4)])
    x = model_inputs(tm, batch)
    with torch.no_grad():
        hard = tm(**x)  # batch 4: hard masks
        assert tm.records and all(float(r.keep.min()) == 1.0 for r in tm.records)
        full = tm.model(**x)
        torch.testing.assert_close(hard, full, rtol=1e-5, atol=1e-5)
        one = {k: v[:1] for k, v in ds.collate_fn([ds[0]]).items() if k != "labels"}
        removed = tm(**one)  # batch 1: removal
        assert all(float(r.keep.min()) == 1.0 for r in tm.records)
        torch.testing.assert_close(removed, tm.model(**one), rtol=1e-5, atol=1e-5)
    ev = evaluate(tm, ds, macs_instances=0)
    assert ev["keep_tokens"] == 1.0 and ev["keep_heads"] == 1.0


def test_checkpoint_resume_continues_the_step_count(tmp_path):
    cfg = _config(tmp_path, steps=6, save_every=3, macs_instances=0)
    first = Trainer(cfg)
    first.fit(stop_after=3)  # stop half-way, as an interrupted run would
    assert first.step == 3
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3
    resumed = Trainer(cfg)
    resumed.fit(resume=True)
    assert resumed.step == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    # the resumed optimizer state came along (AdamW's step counters continue from 3)
    assert all(int(s["step"]) == 6 for s in resumed.optimizer.state_dict()["state"].values())
    # bit-exactness against an uninterrupted run: test_resume_is_bit_exact


def _log(path):
    """log.jsonl records without the wall-clock ``time``."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("token_policy", ["cross_modal", "random"])
def test_resume_is_bit_exact(tmp_path, token_policy):
    """8 steps straight == 4 steps, checkpoint, a new Trainer resumed to 8: every parameter and every
    log record (loss terms, keep ratios, lrs, targets, temperature, evaluations) identical.

    Exercises what a resume must carry: Gumbel noise (and the random policy's) from the global torch
    RNG, an evaluation mid-run (eval_every=3: before the checkpoint, and after it at step 6), an epoch
    boundary after the resume (6 batches per epoch), the temperature decay and curriculum, AdamW
    state of the trimmer and backbone groups, and the LR schedule.
    """

    def config(run):
        cfg = _config(tmp_path / run, steps=8, eval_every=3, eval_instances=8, macs_instances=1)
        cfg.data.train_size = 48  # 6 batches per epoch: the resumed run crosses an epoch boundary
        cfg.trim = cfg.trim.model_copy(update={"sampler": "gumbel", "token_policy": token_policy})
        cfg.recipe = cfg.recipe.model_copy(update={"final_temperature": 0.25})
        return cfg

    straight = Trainer(config("straight"))
    straight.fit()

    Trainer(config("resumed")).fit(stop_after=4)
    log = tmp_path / "resumed" / "run" / "log.jsonl"
    # an interrupted run may have logged past its last checkpoint (and cut a line short): dropped on resume
    with open(log, "a") as f:
        f.write(json.dumps({"type": "train", "step": 5, "loss": 0.0}) + "\n" + '{"type": "tr')
    resumed = Trainer(config("resumed"))  # a new Trainer, as a new process would build
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 8

    a, b = dict(straight.tmodel.named_parameters()), dict(resumed.tmodel.named_parameters())
    assert a.keys() == b.keys() and any(k.startswith("trimmers.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)}/{len(a)} parameters differ, e.g. {differ[:3]}"

    want, got = _log(tmp_path / "straight" / "run" / "log.jsonl"), _log(log)
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in want]
    assert [r["step"] for r in want if r["type"] == "eval"] == [3, 6, 8]
    late = [r for r in want if r["step"] >= 5]
    assert late and all("task" in r and "cost" in r and "sd" in r for r in late if r["type"] == "train")
    assert got == want  # exact float equality of every term, not approx


def test_load_checkpoint_and_eval_command(tmp_path, capsys):
    Trainer(_config(tmp_path, steps=2, macs_instances=0)).fit()
    model, cfg = load_checkpoint(tmp_path / "run")
    assert isinstance(model, TrimmedModel) and cfg.trim.token_target == 0.5
    from trimkit.cli import main

    capsys.readouterr()  # drop the training log

    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", "--macs-instances", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trimmed"] and 0 <= out["accuracy"] <= 1 and out["gmacs_full"] > 0


def test_train_command_and_resume(tmp_path, capsys):
    import yaml

    cfg = _config(tmp_path, steps=2, macs_instances=0)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    from trimkit.cli import main

    assert main(["train", "--config", str(path), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert (tmp_path / "cli" / "checkpoint" / "trimmers.safetensors").exists()
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no " in capsys.readouterr().err


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="train.*exactly one of"):
        ExperimentConfig.from_dict({"train": {"batch_size": 4}})
    with pytest.raises(ConfigError, match="train.batch_szie: unknown field"):
        ExperimentConfig.from_dict({"train": {"steps": 1, "batch_szie": 4}})
    with pytest.raises(ConfigError, match="model.adapter.*unknown adapter 'nope'"):
        ExperimentConfig.from_dict({"train": {"steps": 1}, "model": {"adapter": "nope"}})
    with pytest.raises(ConfigError, match="trim.token_target"):
        ExperimentConfig.from_dict({"train": {"steps": 1}, "trim": {"token_target": 1.5}})
    with pytest.raises(ConfigError, match="data.name.*unknown dataset"):
        ExperimentConfig.from_dict({"train": {"steps": 1}, "data": {"name": "imagenet"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        ExperimentConfig.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        ExperimentConfig.load(tmp_path / "missing.yaml")


def test_example_config_loads():
    from pathlib import Path

    cfg = ExperimentConfig.load(Path(__file__).parents[1] / "examples" / "digit_grid.yaml")
    assert cfg.model.adapter == "meter" and cfg.trim is not None and cfg.data.name == "digit_grid"


@pytest.mark.slow
def test_compiled_training_steps_equal_eager(tmp_path):
    """train.compile: the step runs under torch.compile (backend aot_eager here: the same capture and
    autograd tracing as inductor, no code generation) with the same losses as eager, in a few graphs
    (no recompilation per trimmed layer: that would mean dynamo broke the graph inside a layer)."""
    import torch._dynamo

    runs = {}
    for comp in ("no", "aot_eager"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer = Trainer(_config(tmp_path / comp, steps=2, compile=comp, macs_instances=0))
        trainer.fit()
        runs[comp] = [v for r in trainer.history for v in (r["loss"], r["task"], r["cost"])]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        if comp == "no":
            assert graphs == 0
        else:
            assert type(trainer.model).__name__ == "OptimizedModule" and 1 <= graphs <= 4
    assert runs["aot_eager"] == pytest.approx(runs["no"], rel=1e-5)
    with pytest.raises(ValueError, match="compile"):
        _config(tmp_path, compile="fast")


def test_a_teacher_model_gives_the_objective_its_logits_and_never_trains(tmp_path):
    """Trainer(objective=, teacher=) (FTKD's distillation): the objective gets the teacher's logits on
    the same batch as full_logits, the teacher stays frozen and in eval mode, the student trains;
    a teacher that shares weights with the student, or next to self-distillation, is refused."""
    import copy

    cfg = _config(tmp_path, steps=3, trim=False)
    student = Trainer(cfg).net
    teacher = copy.deepcopy(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    start = {k: v.clone() for k, v in student.state_dict().items()}
    seen = []

    def objective(logits, labels, records, full_logits=None):
        seen.append((full_logits, teacher.training))
        mse = torch.nn.functional.mse_loss(logits, full_logits)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels) + mse, "mse": mse}

    trainer = Trainer(cfg, model=student, objective=objective, teacher=teacher)
    batch = next(trainer._batches(0))
    trainer.fit()
    assert len(seen) == 3 and all(f is not None and not f.requires_grad and not training for f, training in seen)
    teacher.eval()
    with torch.no_grad():  # the first step's full_logits are the teacher's on that batch
        torch.testing.assert_close(seen[0][0], teacher(**model_inputs(teacher, batch)))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in trainer.net.state_dict().items())
    assert [r.get("mse") is not None for r in trainer.history] == [True] * 3
    with pytest.raises(ConfigError, match="shares .* parameters with the model being trained"):
        Trainer(cfg, model=student, objective=objective, teacher=student)
    sd = ExperimentConfig.from_dict({**cfg.model_dump(), "trim": {"token_target": 0.5}, "recipe": {"lambda_sd": 1.0}})
    with pytest.raises(ConfigError, match="choose one"):
        Trainer(sd, teacher=teacher)
