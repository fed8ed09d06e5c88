"""The adapters' optional ``dataset_overrides`` hook: what the trainer builds for a dataset.

The core knows no adapter's option names: ``build_model`` asks the adapter to map the dataset's
generic facts (:class:`trimkit.adapter.DatasetFacts`) to its ``build`` options."""

from __future__ import annotations

import pytest
import torch

from trimkit.adapter import DatasetFacts
from trimkit_train.data import DigitGridDataset
from trimkit.plugins import get_registry
from trimkit_train import ExperimentConfig, ModelConfig, Trainer, build_model
from trimkit_train.trainer import model_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = {"options": {"grid": 2, "cell": 16, "digits_per_image": [1, 3]}, "train_size": 64, "eval_size": 16}


@pytest.fixture(scope="module")
def grid():
    return DigitGridDataset("train", size=32, seed=0, grid=2, digits_per_image=(1, 3))


def test_facts_of_digit_grid(grid):
    facts = DatasetFacts.of(grid)
    assert (facts.image_size, facts.patch_size, facts.num_labels, facts.variant) == (32, 16, 13, "vqa")
    assert facts.tokenizer is grid.tokenizer and facts.longest_text == max(len(x) for x in grid.input_ids)
    assert DatasetFacts.of(object()) == DatasetFacts()  # a dataset that says nothing


def test_meter_mapping_is_unchanged(grid):
    """Exactly what the trainer hard-coded for METER before the hook existed."""
    longest = max(len(ids) for ids in grid.input_ids)
    tok = grid.tokenizer
    before = {"image_size": grid.image_size, "patch_size": grid.patch_size, "vocab_size": tok.vocab_size,
              "num_labels": grid.num_labels, "task": grid.variant, "pad_token_id": tok.pad_token_id,
              "cls_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
              "max_text_len": max(16, longest), "text_max_positions": max(32, longest + 2)}
    assert get_registry().adapters.get("meter").dataset_overrides(DatasetFacts.of(grid)) == before


def test_overrides_win_and_nested_options_merge():
    cfg = ExperimentConfig.from_dict({
        "model": {"adapter": "blip", "overrides": {"text_config": {"hidden_size": 16, "intermediate_size": 32}}},
        "data": DATA, "train": {"steps": 1}})
    net = build_model(cfg.model, cfg.data)
    text = net.config.text_config
    assert type(net).__name__ == "BlipVQAClassifierForTrimming" and net.num_labels == 13
    assert (text.hidden_size, text.vocab_size, text.bos_token_id) == (16, 49, 1)  # size from overrides, vocab from data
    assert net.config.vision_config.patch_size == 16 and net.config.vision_config.image_size == 32
    plain = build_model(ModelConfig(adapter="blip"))  # no data: the preset as it is
    assert type(plain).__name__ == "BlipVQAForTrimming"


@pytest.mark.parametrize("trim", [False, True])
def test_blip_fits_digit_grid_with_the_trainer(tmp_path, trim):
    cfg = ExperimentConfig.from_dict({
        "model": {"adapter": "blip"}, "data": DATA,
        "train": {"steps": 4, "batch_size": 8, "lr": 3e-3, "macs_instances": 1 if trim else 0,
                  "out_dir": str(tmp_path / "run"), "progress": False, "warmup_fraction": 0.0},
        "trim": {"token_target": 0.5, "head_target": 0.75, "init_logit": 0.3} if trim else None})
    trainer = Trainer(cfg)
    batch = next(trainer._batches(0))
    logits = trainer.net(**model_inputs(trainer.net, batch))
    assert logits.shape == (8, 13)
    ev = trainer.fit()
    assert ev["n"] == 16 and 0.0 <= ev["accuracy"] <= 1.0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history)
    if trim:
        assert trainer.tmodel is not None and ev["gmacs"] > 0  # four steps: the curriculum has not cut yet
        assert any(r.startswith("vision_model") for r in ev["keep"])


def test_blip_nlvr2_digit_grid():
    ds = DigitGridDataset("train", size=4, seed=0, grid=2, variant="nlvr2", digits_per_image=(1, 3))
    options = get_registry().adapters.get("blip").dataset_overrides(DatasetFacts.of(ds))
    assert options["task"] == "nlvr2"
    net = get_registry().adapters.get("blip").build("tiny", **options)
    batch = ds.collate_fn([ds[i] for i in range(4)])
    with torch.no_grad():
        assert net(**model_inputs(net, batch)).shape == (4, 2)
