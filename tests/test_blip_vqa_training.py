"""SmartTrim fine-tuning of BLIP VQA with its answer decoder, through the Trainer and `trimkit train` /
`trimkit eval`, on the sample VQA v2 files (tiny random BLIP, tokenizer from a vocab file written here).

The fears: a loss that is not BLIP's ``-sum_k w_k log p(answer_k)`` over the ground-truth answers
(wrong rows, wrong weights, padding or BOS scored, packing that leaks between answers); a
self-distillation term that is not 0 when nothing is trimmed; a trained checkpoint that the
ranking protocol cannot evaluate; bad inputs that fail somewhere deep instead of saying why.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import trimkit
from conftest import randomize_trimmers, write_bert_tokenizer
from trimkit import TrimConfig
from trimkit.plugins import get_registry

transformers = pytest.importorskip("transformers")

from trimkit.cli import main  # noqa: E402
from trimkit_train import ExperimentConfig, Trainer  # noqa: E402
from trimkit_train.data import VQAv2Dataset  # noqa: E402
from trimkit_train.tasks import VQADecoderTask, get_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data" / "tasks"
ANSWERS = ["white", "gray", "2", "3", "yes", "no", "laptop", "a laptop computer"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    tmp = tmp_path_factory.mktemp("blip_vqa_train")
    words = {"a", "computer"}
    for f in DATA.rglob("*.json*"):
        words |= set(re.findall(r"[a-z]+", f.read_text().lower()))
    tok = write_bert_tokenizer(tmp / "tok", words)
    root = tmp / "vqa"
    shutil.copytree(DATA / "vqa", root)
    rng = np.random.default_rng(0)
    for image_set, iid in [("train2014", 42), ("train2014", 7), ("val2014", 3)]:
        path = root / image_set / f"COCO_{image_set}_{iid:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return {"root": str(root), "tok": str(tok)}


def _options(files, **extra):
    return {"root": files["root"], "answers": ANSWERS, "tokenizer": files["tok"], "image_size": 32,
            "answer_decoder": True, **extra}


def _config(files, out, steps=3, trim=True, lr=1e-3):
    cfg = {
        "model": {"adapter": "blip", "size": "tiny", "seed": 1},
        "data": {"name": "vqa_v2", "options": _options(files, skip_unanswerable=False),
                 "train_split": "train+val", "eval_split": "val", "train_size": None, "eval_size": None},
        "train": {"steps": steps, "batch_size": 3, "eval_batch_size": 2, "macs_instances": 1, "progress": False,
                  "lr": lr, "warmup_fraction": 0.0, "out_dir": str(out)},
        "trim": {"token_target": 0.5, "head_target": 0.75} if trim else None,
    }
    return ExperimentConfig.from_dict(cfg)


@pytest.fixture(scope="module")
def dataset(files):
    return VQAv2Dataset("train+val", **_options(files, skip_unanswerable=False))


def _batch(dataset):
    return dataset.collate_fn([dataset[i] for i in range(len(dataset))])


def test_decoder_batches_carry_every_answer_with_its_soft_score(dataset):
    """Rows b*K..b*K+K-1 are question b's vocabulary answers with score > 0, BOS-first token ids of
    that answer, weights = those scores; questions with fewer answers are padded with weight 0."""
    assert dataset.task == dataset.variant == "vqa_decoder" and get_task(dataset).name == "vqa_decoder"
    batch = _batch(dataset)
    labels = batch["labels"]
    scores, ids, mask, weights = labels["scores"], labels["answer_ids"], labels["answer_attention_mask"], \
        labels["weights"]
    b, a = scores.shape
    assert (b, a) == (len(dataset), len(ANSWERS))
    k = weights.shape[1]
    assert ids.shape[0] == b * k and batch["answer_ids"] is ids and batch["answer_attention_mask"] is mask
    assert k == int((scores > 0).sum(1).max()) and k >= 2  # the sample files give some question several answers
    tok = dataset.tokenizer
    for q in range(b):
        given = [i for i in range(a) if scores[q, i] > 0]
        for j in range(k):
            row, m = ids[q * k + j], mask[q * k + j]
            if j < len(given):
                assert weights[q, j] == scores[q, given[j]] > 0
                assert row[m.bool()].tolist() == tok(ANSWERS[given[j]])["input_ids"]
            else:
                assert weights[q, j] == 0 and int(m.sum()) == 1
    # the dataset is not only unanswerable questions: the loss has something to learn
    assert float(weights.sum()) > 0


def test_loss_is_minus_the_weighted_log_likelihood_of_the_answers(dataset):
    """label_smoothing 0: the task loss == -sum_k w_k log p(answer_k) / #questions with answers,
    log p from the *ranking* forward (BlipVQAForTrimming: every answer its own decoder row), so the
    packing of K answers into one row is checked too; label smoothing 0.1 (the default) == the same
    with transformers' label-smoothed token cross-entropy, what BLIP's decoder loss is."""
    adapter = get_registry().adapters.get("blip")
    from trimkit.adapter import DatasetFacts

    options = adapter.dataset_overrides(DatasetFacts.of(dataset))
    assert options["task"] == "vqa_decoder"
    model = adapter.build("tiny", seed=3, **options)
    ranking = adapter.build("tiny", seed=3, **{**options, "task": "vqa"})
    ranking.load_state_dict(model.state_dict())
    batch = _batch(dataset)
    labels = batch["labels"]
    x = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_attention_mask")}
    with torch.no_grad():
        logits = model(**x)
        logp = ranking(**x)  # (B, K): log-likelihood of each answer row
    w = labels["weights"]
    answered = int((w > 0).any(-1).sum())
    assert 0 < answered <= w.shape[0]
    plain = VQADecoderTask(label_smoothing=0.0)
    reference = -(w * logp).sum() / answered
    torch.testing.assert_close(plain.loss(logits, labels), reference, atol=1e-5, rtol=1e-5)
    # BLIP's smoothed loss, from transformers' own loss on each answer row (labels -100 on padding)
    from torch.nn.functional import cross_entropy

    ids, mask = labels["answer_ids"], labels["answer_attention_mask"]
    with torch.no_grad():
        full = ranking.text_decoder(input_ids=ids, attention_mask=mask, use_cache=False,
                                    encoder_hidden_states=ranking._encode(x["pixel_values"], x["input_ids"],
                                                                          x["attention_mask"]).repeat_interleave(
                                        w.shape[1], 0)).logits[:, :-1]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    tok = cross_entropy(full.reshape(-1, full.shape[-1]), tgt.reshape(-1), label_smoothing=0.1,
                        reduction="none").view(tgt.shape).sum(-1).view(w.shape)
    smoothed = get_task("vqa_decoder")
    assert smoothed.label_smoothing == 0.1
    torch.testing.assert_close(smoothed.loss(logits, labels), (w * tok).sum() / answered, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(smoothed.loss(logits, labels), plain.loss(logits, labels))


def test_self_distillation_is_zero_when_nothing_is_trimmed_and_positive_otherwise(dataset):
    adapter = get_registry().adapters.get("blip")
    model = adapter.build("tiny", seed=4, task="vqa_decoder", text_config={
        "vocab_size": dataset.tokenizer.vocab_size, "pad_token_id": 0, "bos_token_id": dataset.tokenizer.cls_token_id})
    with torch.no_grad():  # a random tiny decoder is near uniform over the vocabulary: sharpen it so KLs are visible
        for p in model.text_decoder.cls.parameters():
            p.mul_(30.0)
    task = get_task("vqa_decoder")
    batch = _batch(dataset)
    x = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_attention_mask")}
    tmodel = trimkit.trim(model, TrimConfig(token_target=0.5)).eval()
    with torch.no_grad():
        with tmodel.full():
            full = tmodel(**x)
        kept = tmodel(**x)  # fresh trimmers keep every token (stable init): nothing trimmed
        assert all(float(r.keep.float().mean()) == 1.0 for r in tmodel.records)
        assert float(task.distill(kept, full, batch["labels"])) == pytest.approx(0.0, abs=1e-6)
        randomize_trimmers(tmodel, 3)
        trimmed = tmodel(**x)  # masked batch of 3 questions, K answers each
        assert any(float(r.keep.float().mean()) < 1 for r in tmodel.records if r.kind == "token")
        sd = float(task.distill(trimmed, full, batch["labels"]))
    assert sd > 1e-3


def test_training_steps_lower_the_loss_on_a_fixed_batch(files, tmp_path):
    """Plain fine-tuning (no trimming) through the Trainer: 15 steps on one fixed batch lower its
    decoder loss by more than a quarter (a loss that does not reach the decoder, or rows that do
    not match their answers, would not)."""
    trainer = Trainer(_config(files, tmp_path / "run", steps=15, trim=False, lr=5e-3))
    assert trainer.task.name == "vqa_decoder" and type(trainer.net).__name__ == "BlipVQADecoderForTrimming"
    batch = _batch(trainer.train_dataset)
    x = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "answer_ids", "answer_attention_mask")}

    def loss() -> float:
        trainer.net.eval()
        with torch.no_grad():
            return float(trainer.task.loss(trainer.net(**x), batch["labels"]))

    before = loss()
    for _ in range(15):
        rec = trainer.training_step(batch)
        assert {"task", "loss"} <= set(rec)
    after = loss()
    assert after < 0.75 * before, (before, after)  # measured: 17.0 -> 11.1


def test_smarttrim_fit_and_trimkit_eval_rank_the_answer_list(files, tmp_path, capsys):
    """`Trainer.fit` with the SmartTrim objective (cost + SD around the decoder loss), then `trimkit
    eval` of the checkpoint: BLIP's ranking protocol scores the val questions."""
    out = tmp_path / "run"
    trainer = Trainer(_config(files, out, steps=3))
    metrics = trainer.fit()
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "train"]
    assert len(steps) == 3 and all({"task", "cost", "sd", "keep_tokens"} <= set(r) for r in steps)
    assert all(np.isfinite(r["loss"]) and r["sd"] >= 0 for r in steps)
    assert metrics["task"] == "vqa_decoder" and metrics["main_metric"] == "vqa_score" and 0 <= metrics["vqa_score"] <= 1
    capsys.readouterr()
    calls = []
    import trimkit_blip.evaluation as ev_mod

    original = ev_mod.rank_answers

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    ev_mod.rank_answers = spy
    try:
        assert main(["eval", "--checkpoint", str(out), "--json", "--macs-instances", "1"]) == 0
    finally:
        ev_mod.rank_answers = original
    ev = json.loads(capsys.readouterr().out)
    assert calls, "trimkit eval did not run the ranking protocol"
    assert ev["task"] == "vqa_decoder" and ev["vqa_score"] == pytest.approx(metrics["vqa_score"])
    assert ev["n"] == metrics["n"] and ev["gmacs"] > 0


def test_bad_inputs_say_why(files, dataset):
    with pytest.raises(ValueError, match=r"longer than max_answer_len=3 .*'a laptop computer'"):
        VQAv2Dataset("train", **_options(files, max_answer_len=3))
    task = get_task("vqa_decoder")
    batch = _batch(dataset)
    with pytest.raises(ValueError, match="answer-decoder targets"):
        task.loss(torch.zeros(3, len(ANSWERS)), batch["labels"]["scores"])  # a classifier's batch
    with pytest.raises(ValueError, match="next-token logits"):
        task.loss(torch.zeros(len(dataset), len(ANSWERS)), batch["labels"])  # a classifier's logits
    # questions without an answer in the vocabulary weigh 0: only answered questions count
    labels = dict(batch["labels"])
    rows = labels["answer_ids"].shape
    logits = torch.randn(rows[0], rows[1] - 1, dataset.tokenizer.vocab_size)
    zero = {**labels, "weights": torch.zeros_like(labels["weights"])}
    assert float(task.loss(logits, zero)) == 0.0 and float(task.distill(logits, logits + 1, zero)) == 0.0


def test_a_pretrained_vqa_checkpoint_loads_as_the_decoder_training_model(tmp_path):
    """from_pretrained(task="vqa_decoder") of a BlipForQuestionAnswering directory: the training
    wrapper with the checkpoint's weights, scoring answers as the ranking wrapper of the same files."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    from trimkit_blip import TINY, BlipVQADecoderForTrimming

    torch.manual_seed(0)
    vqa = BlipForQuestionAnswering(BlipConfig(**{k: dict(v) for k, v in TINY.items()}))
    vqa.save_pretrained(str(tmp_path / "ckpt"))
    adapter = get_registry().adapters.get("blip")
    model = adapter.from_pretrained(str(tmp_path / "ckpt"), task="vqa_decoder")
    ranking = adapter.from_pretrained(str(tmp_path / "ckpt"))
    assert isinstance(model, BlipVQADecoderForTrimming) and type(ranking).__name__ == "BlipVQAForTrimming"
    for (n, p), (m, q) in zip(model.state_dict().items(), vqa.state_dict().items()):
        assert n == m and torch.equal(p, q)
    x = adapter.example_inputs(ranking, batch_size=2, seed=3, num_answers=3)
    with torch.no_grad():
        logits = model.eval()(**x)
        scores = ranking.eval()(**x)
    ids, mask = x["answer_ids"], x["answer_attention_mask"]
    mine = (logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1).view(2, 3)
    torch.testing.assert_close(mine, scores, atol=1e-5, rtol=1e-5)
