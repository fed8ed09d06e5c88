"""A training process of tests/test_distributed.py (launched twice with torchrun, CPU, gloo).

``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR MODE [STOP_AFTER]``
trains a tiny METER on digit-grid (MODE ``trim``: SmartTrim with self-distillation; ``plain``: the
backbone), records which training examples this process was given (``OUT_DIR/seen_RANK.json``) and
writes its final weights (``OUT_DIR/weights_RANK.pt``). With ``TRIMKIT_TEST_NAN_RANK=R`` process R's
examples turn NaN from its second step: every process must stop with DivergedError
(``OUT_DIR/diverged_RANK``) instead of waiting for the failed one. With ``TRIMKIT_TEST_FSDP=1`` the
model is sharded (``train.fsdp``): ``OUT_DIR/shard_RANK.json`` records how much of the weights this
process held while training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from trimkit_train import DivergedError, ExperimentConfig, Trainer, register_dataset
from trimkit_train.data import DigitGridDataset


class Recording(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.seen = base, []
        for name in ("image_size", "patch_size", "num_labels", "variant", "tokenizer", "input_ids", "collate_fn"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(int(i))
        item = self.base[i]
        if os.environ.get("TRIMKIT_TEST_NAN_RANK") == os.environ.get("RANK") and len(self.seen) > 4:
            item = dict(item, pixel_values=torch.full_like(item["pixel_values"], float("nan")))
        return item


def factory(split, size=None, seed=0, **options):
    return Recording(DigitGridDataset(split, size=size or 64, seed=seed, grid=3, cell=16, **options))


def config(out: Path, mode: str, steps: int) -> ExperimentConfig:
    data = {
        "model": {"adapter": "meter", "size": "tiny", "overrides": {"dropout": 0.0}},
        "data": {"name": "recording", "train_size": 48, "eval_size": 8},
        "train": {"steps": steps, "batch_size": 8, "eval_batch_size": 8, "macs_instances": 0, "cpu": True,
                  "out_dir": str(out / "run"), "progress": False, "save_every": 2, "lr": 1e-3,
                  "fsdp": os.environ.get("TRIMKIT_TEST_FSDP") == "1"},
    }
    if mode == "trim":
        data["trim"] = {"token_target": 0.6, "head_target": 0.8}
        data["recipe"] = {"lambda_sd": 1.0, "curriculum_fraction": 0.5}
    return ExperimentConfig.from_dict(data)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    resume = len(sys.argv) > 4 and sys.argv[4] == "resume"
    register_dataset("recording", factory)
    trainer = Trainer(config(out, mode, steps=6))
    rank = trainer.accelerator.process_index
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.net.parameters())
    whole = sum(p.numel() for p in trainer.net.parameters())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"shard_{rank}.json").write_text(json.dumps({"local": local, "whole": whole}))
    try:
        trainer.fit(stop_after=stop_after, resume=resume, overwrite=not resume)
    except DivergedError as err:
        (out / f"diverged_{rank}").write_text(str(err))
        return
    tag = f"{rank}" + ("" if stop_after is None else f"_stop{stop_after}") + ("_resumed" if resume else "")
    (out / f"seen_{tag}.json").write_text(json.dumps(trainer.train_dataset.seen))
    torch.save(trainer.model_state_dict(), out / f"weights_{tag}.pt")  # whole weights on every process
    (out / f"num_processes_{tag}").write_text(str(trainer.accelerator.num_processes))


if __name__ == "__main__":
    main()
