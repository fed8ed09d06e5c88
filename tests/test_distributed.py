"""Training on several processes (accelerate on torch.distributed, CPU, gloo): two processes launched
with torchrun see disjoint data, end with identical weights, train the same function as one process
with the same global batch, and resume exactly; the same with the model sharded (``train.fsdp``,
FSDP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch(out: Path, mode: str, nproc: int, *extra: str, env_extra: dict | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), mode, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _weights(out: Path, tag: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights_{tag}.pt")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def trim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_trim")
    _launch(out, "trim", 2)
    return out


def test_two_processes_see_disjoint_data_and_end_identical(trim_run):
    out = trim_run
    assert (out / "num_processes_0").read_text() == "2"
    seen0 = json.loads((out / "seen_0.json").read_text())
    seen1 = json.loads((out / "seen_1.json").read_text())
    # 6 steps of a global batch of 8: 4 examples per process per step; 48 examples = one epoch
    assert len(seen0) == len(seen1) == 24
    assert not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == list(range(48))
    w0, w1 = _weights(out, "0"), _weights(out, "1")
    assert _max_diff(w0, w1) == 0.0
    # the trimmers trained (SmartTrim with self-distillation under DDP: one module call per step)
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # one line per step: only the main process logs
    assert all("sd" in r and r["sd"] > 0 for r in train)
    assert (out / "run" / "checkpoint" / "rng_state_1.pt").exists()


@pytest.fixture(scope="module")
def plain_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_one")
    _launch(out, "plain", 1)
    return out


def test_two_processes_train_what_one_process_trains(plain_one, tmp_path):
    """Plain fine-tuning (no noise, no dropout): DDP's averaged gradient of two half batches is the
    gradient of the whole batch, so 2 processes and 1 process end with the same weights."""
    _launch(tmp_path / "two", "plain", 2)
    two, one = _weights(tmp_path / "two", "0"), _weights(plain_one, "0")
    assert sorted(json.loads((plain_one / "seen_0.json").read_text())) == list(range(48))
    assert _max_diff(one, two) < 1e-4


def test_two_processes_resume_exactly(trim_run, tmp_path):
    """Stopped after 2 steps (checkpoint) and resumed to 6 on 2 processes == 6 steps straight."""
    out = tmp_path
    _launch(out, "trim", 2, "2")
    _launch(out, "trim", 2, "6", "resume")
    straight = _weights(trim_run, "0")
    for rank in (0, 1):
        assert _max_diff(straight, _weights(out, f"{rank}_stop6_resumed")) == 0.0


def test_a_failure_on_one_process_stops_every_process(tmp_path):
    """NaN inputs on process 1 only: both processes stop with DivergedError at that step (none waits
    in the gradient reduction for the other), and the main process logs the divergence."""
    _launch(tmp_path, "trim", 2, env_extra={"TRIMKIT_TEST_NAN_RANK": "1"})
    assert "non-finite" in (tmp_path / "diverged_1").read_text()
    assert "another process" in (tmp_path / "diverged_0").read_text()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in log][-1] == "diverged" and log[-1]["step"] == 2


def _cost_on_two_processes(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from trimkit.ops import Record
    from trimkit_smarttrim import cost_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # this process's slice keeps 90% (rank 0) or 10% (rank 1): the whole batch keeps 50%, the target
        keep = torch.full((4,), 0.9 if rank == 0 else 0.1, requires_grad=True)
        loss = cost_loss([Record("layer", "token", 0.5, keep)])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": keep.grad}, f"{out_dir}/cost_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_cost_term_is_the_whole_batchs_across_processes(tmp_path):
    """Eq. 10 squares the batch's keep ratio: with the batch split over processes the ratio is
    reduced over all slices first (a slice keeping 90% and one keeping 10% meet a 50% target: no
    cost, no gradient), not averaged as per-slice squares (which would give 0.16)."""
    import torch.multiprocessing as mp

    mp.spawn(_cost_on_two_processes, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"cost_{rank}.pt")
        assert float(got["loss"]) < 1e-12 and float(got["grad"].abs().max()) < 1e-6


# --- sharded (FSDP2, train.fsdp) -------------------------------------------------------------------
FSDP = {"TRIMKIT_TEST_FSDP": "1"}


@pytest.fixture(scope="module")
def fsdp_trim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trim")
    _launch(out, "trim", 2, env_extra=FSDP)
    return out


def test_sharded_training_holds_half_the_weights_per_process_and_ends_identical(fsdp_trim_run, trim_run):
    out = fsdp_trim_run
    shards = [json.loads((out / f"shard_{r}.json").read_text()) for r in (0, 1)]
    whole = shards[0]["whole"]
    # really sharded: each process holds its part of every parameter, the parts add up to the model
    assert shards[0]["local"] + shards[1]["local"] == whole
    assert all(s["local"] < 0.6 * whole for s in shards)
    seen0 = json.loads((out / "seen_0.json").read_text())
    seen1 = json.loads((out / "seen_1.json").read_text())
    assert not set(seen0) & set(seen1) and sorted(seen0 + seen1) == list(range(48))
    assert _max_diff(_weights(out, "0"), _weights(out, "1")) == 0.0  # gathered whole on both processes
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(r["sd"] > 0 for r in train)
    assert [r["step"] for r in log if r["type"] == "eval"] == [6]  # evaluated on the gathered weights
    # the first step is the data-parallel run's (same weights, data and noise; later steps differ by
    # the order of float sums in the gradient reduction)
    ddp = [json.loads(line) for line in (trim_run / "run" / "log.jsonl").read_text().splitlines()]
    assert abs(train[0]["loss"] - ddp[0]["loss"]) < 1e-6


def test_sharded_training_trains_what_one_process_trains(plain_one, tmp_path):
    _launch(tmp_path, "plain", 2, env_extra=FSDP)
    assert _max_diff(_weights(plain_one, "0"), _weights(tmp_path, "0")) < 1e-4


def test_a_sharded_runs_checkpoint_is_whole_and_loads_on_one_process(fsdp_trim_run):
    """The checkpoint holds whole tensors (gathered from the shards), so eval, save_pretrained and
    a resume on an unsharded launch read it like any other."""
    import importlib.util

    from trimkit_train import load_checkpoint, register_dataset

    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    register_dataset("recording", worker.factory)  # the run's dataset, as its config names it
    model, _ = load_checkpoint(fsdp_trim_run / "run")
    final = _weights(fsdp_trim_run, "0")
    assert _max_diff({k: v for k, v in model.state_dict().items()}, final) == 0.0
    state = torch.load(fsdp_trim_run / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
    params = {p.shape for p in model.parameters()}
    shapes = {v.shape for st in state["optimizer"]["state"].values() for k, v in st.items() if k == "exp_avg"}
    assert shapes <= params and not any(type(v).__name__ == "DTensor" for st in state["optimizer"]["state"].values()
                                         for v in st.values())


def test_sharded_training_resumes_exactly(fsdp_trim_run, tmp_path):
    _launch(tmp_path, "trim", 2, "2", env_extra=FSDP)
    _launch(tmp_path, "trim", 2, "6", "resume", env_extra=FSDP)
    for rank in (0, 1):
        assert _max_diff(_weights(fsdp_trim_run, "0"), _weights(tmp_path, f"{rank}_stop6_resumed")) == 0.0


def test_a_data_parallel_run_continues_sharded(trim_run, tmp_path):
    """train.fsdp may change on resume (checkpoints hold whole tensors either way): the first step
    after a sharded resume of a DDP run's checkpoint is the DDP run's own step (same weights, data
    and noise)."""
    _launch(tmp_path, "trim", 2, "2")
    _launch(tmp_path, "trim", 2, "6", "resume", env_extra=FSDP)
    resumed = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (trim_run / "run" / "log.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in straight if r["type"] == "train"}
    after = [r for r in resumed if r["type"] == "train" and r["step"] > 2]
    assert [r["step"] for r in after] == [3, 4, 5, 6]
    assert abs(after[0]["loss"] - loss[3]) < 1e-6
    assert json.loads((tmp_path / "shard_0.json").read_text())["local"] < 0.6 * json.loads(
        (tmp_path / "shard_0.json").read_text())["whole"]
