"""``trimkit eval --device/--output``: where it evaluates, the metrics JSON it writes, and clear
errors for a device that is not there."""

from __future__ import annotations

import json

import pytest
import torch

from trimkit.cli import main
from trimkit_train import ExperimentConfig, Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    config = ExperimentConfig.from_dict({
        "model": {"adapter": "meter", "size": "tiny"},
        "data": {"options": {"grid": 2, "cell": 16, "digits_per_image": [1, 2]}, "train_size": 16, "eval_size": 6},
        "train": {"steps": 1, "batch_size": 8, "macs_instances": 0, "progress": False, "out_dir": str(out)},
        "trim": {"token_target": 0.5},
    })
    Trainer(config).fit()
    return out


def test_eval_writes_metrics_json_on_the_chosen_device(run_dir, tmp_path, capsys):
    out = tmp_path / "metrics" / "eval.json"
    out.parent.mkdir()
    assert main(["eval", "--checkpoint", str(run_dir), "--device", "cpu", "--output", str(out),
                 "--macs-instances", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert written == printed
    assert written["device"] == "cpu" and written["n"] == 6 and 0.0 <= written["accuracy"] <= 1.0
    assert written["gmacs"] > 0 and written["gmacs_full"] > 0 and written["macs_instances"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_eval_on_missing_cuda_is_a_usage_error(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(run_dir), "--device", "cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err


def test_eval_rejects_unknown_device(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(run_dir), "--device", "abacus"])
    assert exit_.value.code == 2
    assert "--device 'abacus'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_on_cuda_matches_cpu(run_dir, tmp_path):
    cpu, gpu = tmp_path / "cpu.json", tmp_path / "gpu.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--device", "cpu", "--output", str(cpu), "--json"]) == 0
    assert main(["eval", "--checkpoint", str(run_dir), "--device", "cuda", "--output", str(gpu), "--json"]) == 0
    a, b = json.loads(cpu.read_text()), json.loads(gpu.read_text())
    assert a["n"] == b["n"] and abs(a["accuracy"] - b["accuracy"]) <= 1 / a["n"]


def test_eval_on_another_dataset(run_dir, tmp_path, capsys):
    """--data: the checkpoint's model on a dataset given by a data section (here: other digit-grid
    questions), as a zero-shot evaluation on another dataset would."""
    data = tmp_path / "other.yaml"
    data.write_text("data:\n  options: {grid: 2, cell: 16, digits_per_image: [1, 2]}\n  eval_size: 3\n  seed: 40\n")
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(data), "--json", "--macs-instances", "0"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n"] == 3 and ev["task"] == "classification"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  eval_sise: 3\n")
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "eval_sise" in err
