"""SmartTrim fine-tuning on a released task format end to end: METER on VQA v2 sample files (the
official questions/annotations json, COCO image names) trains with the vqa task's soft-score BCE
wrapped by the SmartTrim objective (cost + self-distillation with the task's discrepancy) and is
evaluated with the VQA score, through the trainer and `trimkit eval`."""

from __future__ import annotations

import json

import pytest
import torch

from trimkit.cli import main
from trimkit_train import ExperimentConfig, Trainer

ANSWERS = ["white", "gray", "2", "3", "yes", "no", "laptop"]


def test_smarttrim_on_vqa_v2_files(vqa_files, tmp_path, capsys):
    root, tok = vqa_files
    config = ExperimentConfig.from_dict({
        "model": {"adapter": "meter", "size": "tiny", "overrides": {"patch_size": 8}},
        "data": {"name": "vqa_v2", "options": {"root": str(root), "answers": ANSWERS, "tokenizer": str(tok),
                                               "image_size": 32},
                 "train_split": "train", "eval_split": "val", "train_size": None, "eval_size": None},
        "train": {"steps": 3, "batch_size": 2, "eval_batch_size": 2, "macs_instances": 1, "progress": False,
                  "out_dir": str(tmp_path / "run")},
        "trim": {"token_target": 0.5, "head_target": 0.75},
    })
    trainer = Trainer(config)
    assert trainer.task.name == "vqa"  # from the dataset, not a default
    batch = trainer.train_dataset.collate_fn([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["labels"].dtype.is_floating_point and batch["labels"].shape == (2, len(ANSWERS))
    metrics = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["type"] == "train"]
    assert len(steps) == 3 and all({"task", "cost", "sd", "vqa_score"} <= set(r) for r in steps)
    # the task term is the soft-score BCE (x number of answers), not a cross-entropy of a class index
    trainer.net.eval()
    with torch.no_grad():
        logits = trainer.net(**{k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")})
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"]) * len(ANSWERS)
    assert torch.isclose(trainer.task.loss(logits, batch["labels"]), expected)
    assert metrics["task"] == "vqa" and metrics["main_metric"] == "vqa_score" and 0 <= metrics["vqa_score"] <= 1
    assert metrics["n"] == 2 and "gmacs" in metrics
    capsys.readouterr()  # the trainer's own lines
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", "--macs-instances", "0"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["task"] == "vqa" and ev["vqa_score"] == pytest.approx(metrics["vqa_score"])
