"""SmartTrim fine-tuning of a decoder VLM (a tiny random LLaVA) on ``digit_grid_decoder`` with the
``decoder_vqa`` task: the rows and their targets, the LM loss on the answer only, self-distillation
(0 when nothing is trimmed, > 0 when image tokens are), a few Trainer steps on one batch lowering
the loss, trimmed evaluation layouts (batch 1 removed, packed) scoring as the masked batch does and
as greedy generation answers, and a trained checkpoint evaluated by ``trimkit eval``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_trimmers

import trimkit
from trimkit import TrimConfig

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")

from trimkit_train import ExperimentConfig, Trainer  # noqa: E402
from trimkit_train.data import DigitGridDecoderDataset  # noqa: E402
from trimkit_train.tasks import get_task  # noqa: E402
from trimkit_train.trainer import build_model, evaluate, model_inputs  # noqa: E402

DATA = {"name": "digit_grid_decoder", "options": {"grid": 3, "cell": 16, "digits_per_image": [1, 3]},
        "train_size": 32, "eval_size": 12}
MODEL = {"adapter": "llava", "size": "tiny"}
TRIM = {"token_target": {"image": 0.4}, "trim_heads": False}


@pytest.fixture(scope="module")
def data():
    return DigitGridDecoderDataset("train", size=16, seed=0, grid=3, cell=16, digits_per_image=(1, 3))


@pytest.fixture(scope="module")
def model(data):
    from trimkit_train.trainer import DataConfig, ModelConfig

    return build_model(ModelConfig(**MODEL), DataConfig(**DATA), data)


def _batch(data, idx=range(6)):
    return data.collate_fn([data[i] for i in idx])


def test_rows_score_only_the_answer_after_the_question(data, model):
    b = _batch(data)
    tok = data.tokenizer
    assert model.config.image_token_id == tok.image_token_id and model.config.text_config.vocab_size == tok.vocab_size
    assert model.config.vision_config.image_size == 48 and data.image_tokens == 9
    lengths = b["attention_mask"].sum(1)
    assert lengths.unique().numel() > 1  # questions of other lengths: right padding
    for j in range(len(lengths)):
        n = int(lengths[j])
        ids, labels = b["input_ids"][j], b["labels"][j]
        assert ids[0] == tok.bos_token_id and (ids[1:10] == tok.image_token_id).all()
        assert b["segment_starts"][j].tolist() == [0, 1, 10]
        scored = torch.nonzero(labels != -100).flatten().tolist()
        assert scored == [n - 1]  # only the question's last token: it predicts the answer
        assert tok.decode([int(labels[n - 1])]) == data.describe(j)["answer"]
        assert tok.decode(ids[10:n].tolist()) == data.describe(j)["question"]  # the row ends with the question


def test_lm_loss_is_the_cross_entropy_of_the_answer_positions_only(data, model):
    task = get_task("decoder_vqa")
    b = _batch(data)
    with torch.no_grad():
        logits = model(**model_inputs(model, b))
    labels = b["labels"]
    last = b["attention_mask"].sum(1) - 1
    by_hand = torch.stack([-F.log_softmax(logits[j, last[j]], -1)[labels[j, last[j]]] for j in range(len(last))]).mean()
    loss = task.loss(logits, labels)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    # prompt, image and question positions: whatever the model predicts there does not count
    moved = logits.clone()
    moved[:, :5] += torch.randn_like(moved[:, :5]) * 10
    moved[0, int(last[0]) - 1] += 10.0
    assert torch.equal(task.loss(moved, labels), loss)
    # the answer position does, and so does the answer
    moved = logits.clone()
    moved[0, int(last[0])] += torch.randn(logits.shape[-1]) * 10
    assert not torch.allclose(task.loss(moved, labels), loss)
    other = labels.clone()
    other[0, int(last[0])] = (int(labels[0, last[0]]) + 1) % logits.shape[-1]
    assert not torch.allclose(task.loss(logits, other), loss)
    with pytest.raises(ValueError, match="next-token targets"):
        task.loss(logits[:, :-1], labels)


def test_self_distillation_is_zero_untrimmed_and_positive_trimmed(data, model):
    task = get_task("decoder_vqa")
    b = _batch(data)
    x = model_inputs(model, b)
    tmodel = trimkit.trim(model, TrimConfig(**TRIM), adapter="llava").eval()
    with torch.no_grad(), tmodel.mode("hard"):
        kept = tmodel(**x)  # fresh trimmers keep every token
        assert all(bool(r.keep.all()) for r in tmodel.records if r.kind == "token")
    with torch.no_grad(), tmodel.full():
        full = tmodel(**x)
    assert float(task.distill(kept, full, b["labels"])) == pytest.approx(0.0, abs=1e-6)
    randomize_trimmers(tmodel, seed=3)
    with torch.no_grad(), tmodel.mode("hard"):
        trimmed = tmodel(**x)
        image = [r for r in tmodel.records if r.kind == "token" and r.key.endswith(":image")]
        assert image and float(image[0].keep.float().mean()) < 0.9  # image tokens really dropped
    assert float(task.distill(trimmed, full, b["labels"])) > 1e-4


def _config(tmp_path, steps, **train):
    return ExperimentConfig.from_dict({
        "model": MODEL, "data": DATA,
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "trimmer_lr": 3e-3, "warmup_fraction": 0.0,
                  "macs_instances": 1, "progress": False, "out_dir": str(tmp_path), **train},
        "trim": TRIM, "recipe": {"curriculum_fraction": 0.5},
    })


def test_trainer_steps_on_a_fixed_batch_lower_the_loss(tmp_path, data):
    trainer = Trainer(_config(tmp_path, 20), train_dataset=data)
    batch = _batch(data, range(8))
    recs = [trainer.training_step(batch) for _ in range(20)]
    assert {"task", "sd", "cost", "loss"} <= set(recs[0])
    assert recs[0]["sd"] > recs[0]["task"] - 1e-6  # SD holds the full pass's task loss (Eq. 11) plus the KL
    assert recs[-1]["task"] < recs[0]["task"] - 1.0  # ln(vocab) = 3.97 at step 0: 8 answers memorised in part
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_trimmed_layouts_score_as_the_masked_batch_and_as_generation(data, model):
    import trimkit_llava

    tmodel = trimkit.trim(model, TrimConfig(**TRIM), adapter="llava").eval()
    randomize_trimmers(tmodel, seed=5)
    task = get_task("decoder_vqa")
    masked = evaluate(tmodel, data, batch_size=16, macs_instances=0, task=task)
    removed = evaluate(tmodel, data, batch_size=1, macs_instances=0, task=task)  # mode remove: kept rows only
    assert removed["keep_tokens"] < 0.95
    tmodel.inference = "packed"
    packed = evaluate(tmodel, data, batch_size=16, macs_instances=0, task=task)
    tmodel.inference = "remove"
    assert masked["accuracy"] == removed["accuracy"] == packed["accuracy"]
    # the metric's prediction is the greedy next token after the question
    b = _batch(data, range(16))
    with torch.no_grad(), tmodel.mode("hard"):
        logits = tmodel(**model_inputs(tmodel, b))
    last = b["attention_mask"].sum(1) - 1
    argmax = logits[torch.arange(16), last].argmax(-1)
    out = trimkit_llava.generate(tmodel, input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                 attention_mask=b["attention_mask"], max_new_tokens=1, eos_token_id=[])
    assert out.tokens[:, 0].tolist() == argmax.tolist()
    answers = b["labels"][torch.arange(16), last]
    assert masked["accuracy"] == pytest.approx(float((argmax == answers).float().mean()))


def test_checkpoint_evaluates_with_trimkit_eval(tmp_path, capsys):
    from trimkit.cli import main

    run = tmp_path / "run"
    Trainer(_config(run, 4)).fit()
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(out), "--macs-instances", "1", "--json"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["task"] == "decoder_vqa" and metrics["main_metric"] == "accuracy" and metrics["n"] == 12
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["gmacs"] > 0 and metrics["gmacs_full"] > 0
    saved = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(saved["accuracy"])


def test_fine_tuning_with_the_vision_tower_trimmed_and_its_checkpoint(tmp_path, capsys):
    """``vision_trim_layers`` as a model override: the tower's trimmers train with the LM's (their
    records reach the cost loss), the checkpoint rebuilds the layer-by-layer tower, and ``trimkit
    eval`` scores it (its batch-1 rows are the kept tokens of both)."""
    from trimkit.cli import main

    run = tmp_path / "run"
    cfg = _config(run, 3)
    cfg.model.overrides = {"vision_config": {"num_hidden_layers": 3}, "vision_trim_layers": [0, 1]}
    cfg.trim.token_target = {"image": 0.5, "vision": 0.5}
    trainer = Trainer(cfg)
    tm = trainer.tmodel
    before = {n: p.detach().clone() for n, p in tm.trimmers.named_parameters() if "vision_tower" in n}
    trainer.fit()
    assert tm.model.vision_trim_layers == [0, 1]
    tower = [r for r in tm.records if r.kind == "token" and "vision_tower" in r.key]
    assert len(tower) == 2 and all(r.target < 1 for r in tower)  # in the cost loss, with their targets
    after = dict(tm.trimmers.named_parameters())
    assert before and any(not torch.equal(before[n], after[n]) for n in before), "the tower's trimmers did not train"
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(out), "--macs-instances", "1", "--json"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 12 and metrics["gmacs"] > 0 and metrics["gmacs_full"] > 0  # 3 steps: little or nothing dropped yet
    saved = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(saved["accuracy"])
    from trimkit_train.trainer import load_checkpoint

    assert load_checkpoint(run)[0].model.vision_trim_layers == [0, 1]  # rebuilt with the tower trimmed


def test_vocabulary_file_is_written_then_read(tmp_path, data):
    path = tmp_path / "vocab" / "decoder_vocab.json"
    first = DigitGridDecoderDataset("test", size=4, seed=1, grid=3, vocab_file=path)
    assert path.exists() and first.tokenizer.vocab == data.tokenizer.vocab
    vocab = json.loads(path.read_text())["vocab"]
    assert vocab["<image>"] == first.tokenizer.image_token_id and vocab["[CLS]"] == first.tokenizer.bos_token_id
    again = DigitGridDecoderDataset("test", size=4, seed=1, grid=3, vocab_file=path)  # read, not rewritten
    assert [x.tolist() for x in again.input_ids] == [x.tolist() for x in first.input_ids]
