"""A checkpoint rebuilds exactly the model its run trained: the build options (what the adapter
made of the *training* split's facts) are saved in build.json, so an evaluation split that implies
other options (a longer question, here) cannot change the rebuilt model."""

from __future__ import annotations

import json

import torch

from trimkit import TrimmedModel
from trimkit_train import ExperimentConfig, Trainer, build_options, load_checkpoint, register_dataset
from trimkit_train.data import DigitGridDataset


class _Split(torch.utils.data.Dataset):
    """digit-grid whose evaluation split claims a much longer question (as real splits do)."""

    def __init__(self, split, size, seed):
        self.base = DigitGridDataset(split, size=size, seed=seed, grid=3, cell=16)
        for name in ("image_size", "patch_size", "num_labels", "variant", "tokenizer", "collate_fn"):
            setattr(self, name, getattr(self.base, name))
        self.input_ids = list(self.base.input_ids) + ([[1] * 60] if split == "test" else [])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def _factory(split, size=None, seed=0, **options):
    return _Split(split, size or 16, seed)


def test_checkpoint_rebuilds_the_trained_model_whatever_the_eval_split(tmp_path):
    register_dataset("splits_differ", _factory)
    config = ExperimentConfig.from_dict({
        "model": {"adapter": "meter", "size": "tiny"},
        "data": {"name": "splits_differ", "train_size": 16, "eval_size": 4},
        "train": {"steps": 1, "batch_size": 8, "macs_instances": 0, "progress": False, "out_dir": str(tmp_path)},
        "trim": {"token_target": 0.5},
    })
    # the premise: the two splits imply different models
    train_opts = build_options(config.model, config.data, _factory("train", 16))
    eval_opts = build_options(config.model, config.data)
    assert train_opts["max_text_len"] != eval_opts["max_text_len"]
    trainer = Trainer(config)
    trainer.fit()
    saved = json.loads((tmp_path / "checkpoint" / "build.json").read_text())
    assert saved == {"adapter": "meter", "options": train_opts}
    meta = json.loads((tmp_path / "checkpoint" / "trim_config.json").read_text())
    assert meta["build_options"] == {"size": "tiny", "seed": 0, **train_opts}
    model, _ = load_checkpoint(tmp_path)
    assert isinstance(model, TrimmedModel)
    batch = trainer.train_dataset.collate_fn([trainer.train_dataset[i] for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    trainer.tmodel.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs), trainer.tmodel(**inputs))


def test_a_run_starts_from_pretrained_weights(tmp_path):
    """model.pretrained: the backbone of a finished run (a trimkit checkpoint directory, one of the
    METER adapter's pretrained sources) starts a new run; its weights are loaded, not random, and the
    new checkpoint records where it started from."""
    base = {
        "model": {"adapter": "meter", "size": "tiny"},
        "data": {"options": {"grid": 2, "cell": 16, "digits_per_image": [1, 2]}, "train_size": 16, "eval_size": 4},
        "train": {"steps": 1, "batch_size": 8, "macs_instances": 0, "progress": False},
        "trim": {"token_target": 0.5},
    }
    first = Trainer(ExperimentConfig.from_dict({**base, "train": {**base["train"], "out_dir": str(tmp_path / "a")}}))
    first.fit()
    source = str(tmp_path / "a" / "checkpoint")
    config = ExperimentConfig.from_dict({**base, "model": {"adapter": "meter", "pretrained": source, "seed": 5},
                                         "train": {**base["train"], "out_dir": str(tmp_path / "b"), "lr": 1e-12,
                                                   "trimmer_lr": 1e-12}})
    second = Trainer(config)
    start = {k: v.clone() for k, v in second.tmodel.model.state_dict().items()}
    trained = first.tmodel.model.state_dict()
    assert start.keys() == trained.keys()
    assert all(torch.equal(start[k], trained[k]) for k in start)  # the pretrained weights, not a random init
    second.fit()
    meta = json.loads((tmp_path / "b" / "checkpoint" / "trim_config.json").read_text())
    assert meta["base_model"] == source
    model, _ = load_checkpoint(tmp_path / "b")
    assert model.model.state_dict().keys() == start.keys()
