"""The built-in tasks' losses, self-distillation terms and metrics, on hand-computable cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trimkit_train.tasks import (CaptioningTask, ClassificationTask, RetrievalTask, VQATask, caption_scores,
                                 evaluate_retrieval, itm_score, retrieval_recalls, tokenize_caption)

torch.manual_seed(0)


def _check_distill(task, logits, labels):
    """A scalar, exactly 0 at equality, positive otherwise, with gradients into both outputs."""
    same = task.distill(logits, logits.clone(), labels)
    assert same.shape == () and float(same) == 0.0
    a = logits.clone().requires_grad_(True)
    b = (logits + torch.randn_like(logits)).requires_grad_(True)
    d = task.distill(a, b, labels)
    assert d.shape == () and float(d.detach()) > 0
    d.backward()
    assert a.grad is not None and b.grad is not None and float(a.grad.abs().sum()) > 0


# --- classification -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["classification", "nlvr2", "snli_ve"])
def test_classification_tasks(name):
    task = ClassificationTask(name)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    loss = task.loss(logits, labels)
    assert loss.shape == () and torch.allclose(loss, F.cross_entropy(logits, labels))
    _check_distill(task, logits, labels)
    m = task.metric()
    m.update(torch.tensor([[2.0, 0, 0], [0, 0, 1]]), {"labels": torch.tensor([0, 1])})
    m.update(torch.tensor([[0.0, 3, 0]]), {"labels": torch.tensor([1])})
    assert m.compute() == {"accuracy": pytest.approx(2 / 3)} and task.main_metric == "accuracy"


def test_classification_distill_is_the_kl_of_the_softmaxes():
    p, q = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])  # softmax (1/4, 3/4) vs (1/2, 1/2)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(ClassificationTask().distill(p, q, torch.tensor([1]))) == pytest.approx(want)


# --- VQA -------------------------------------------------------------------------------------------------------
def test_vqa_loss_is_meters_bce_times_the_answers():
    task = VQATask()
    logits, scores = torch.randn(4, 6), torch.zeros(4, 6)
    scores[0, 1], scores[1, [2, 3]], scores[2, 0] = 1.0, torch.tensor([0.9, 0.3]), 0.6
    loss = task.loss(logits, scores)
    assert loss.shape == ()
    want = F.binary_cross_entropy_with_logits(logits, scores, reduction="none").sum(1).mean()
    assert torch.allclose(loss, want)
    _check_distill(task, logits, scores)


def test_vqa_distill_is_the_soft_target_bce_minus_its_entropy():
    task = VQATask()
    trim, full = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, -2.0]])
    q = torch.sigmoid(full)
    bce = F.binary_cross_entropy_with_logits(trim, q, reduction="sum")
    entropy = F.binary_cross_entropy_with_logits(full, q, reduction="sum")
    assert float(task.distill(trim, full, None)) == pytest.approx(float(bce - entropy), rel=1e-5)


def test_vqa_score_by_hand():
    m = VQATask().metric()
    scores = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.6, 0.9], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])  # picks 1.0, 0.6, 0.3, 0
    m.update(logits[:2], {"labels": scores[:2]})
    m.update(logits[2:], {"labels": scores[2:]})
    out = m.compute()
    assert out["vqa_score"] == pytest.approx((1.0 + 0.6 + 0.3 + 0.0) / 4)
    assert out["accuracy"] == pytest.approx(2 / 4)  # rows 0 and 2 pick their best answer; row 3 has none


# --- captioning --------------------------------------------------------------------------------------------
def test_captioning_loss_ignores_prompt_and_padding():
    task = CaptioningTask()
    labels = torch.tensor([[-100, -100, 7, 8, 2], [-100, -100, 9, 2, -100]])  # aligned with input_ids (B, T)
    shifted = torch.randn(2, 4, 12)  # BLIP's wrapper: position t predicts token t + 1
    loss = task.loss(shifted, labels)
    picks = [(0, 1, 7), (0, 2, 8), (0, 3, 2), (1, 1, 9), (1, 2, 2)]
    want = torch.stack([-F.log_softmax(shifted[b, t], -1)[y] for b, t, y in picks]).mean()
    assert loss.shape == () and torch.allclose(loss, want)
    aligned = torch.cat([shifted, torch.randn(2, 1, 12)], 1)  # HF style (B, T, V): the last position is dropped
    assert torch.allclose(task.loss(aligned, labels), want)
    _check_distill(task, shifted, labels)
    assert float(CaptioningTask(label_smoothing=0.1).loss(shifted, labels)) != pytest.approx(float(want))
    with pytest.raises(ValueError, match="positions"):
        task.loss(torch.randn(2, 2, 12), labels)


def test_caption_tokenisation():
    assert tokenize_caption("A Dog's ball, on the grass.") == ["a", "dog", "'s", "ball", "on", "the", "grass"]


def test_bleu_and_cider_known_cases():
    # identical to a reference: BLEU-4 = 1
    assert caption_scores([["a dog runs on the grass"]], ["A dog runs on the grass."])["bleu4"] == pytest.approx(1.0)
    # every n-gram matches, brevity penalty exp(1 - 5/4) (the closest reference has 5 words)
    assert caption_scores([["a b c d e"]], ["a b c d"])["bleu4"] == pytest.approx(math.exp(-0.25), rel=1e-6)
    # CIDEr-D: two images with disjoint words, each caption equal to its one reference: 10 (cosine 1 x 10)
    refs = [["a dog runs on grass"], ["two cats sleep inside today"]]
    assert caption_scores(refs, ["a dog runs on grass", "two cats sleep inside today"])["cider"] == pytest.approx(10.0)
    assert caption_scores(refs, ["two cats sleep inside today", "a dog runs on grass"])["cider"] == pytest.approx(0.0)


class _Tok:
    """The decode part of a tokenizer: ids are indices into ``words`` (0-3 special)."""

    words = ["[PAD]", "[CLS]", "[SEP]", "[DEC]", "a", "picture", "of", "dog", "runs", "on", "the", "grass"]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids if not (skip_special_tokens and i < 4))


class _Data:
    tokenizer, prompt = _Tok(), "a picture of "


def test_caption_metric_generated_and_teacher_forced():
    task = CaptioningTask()
    refs = [["a dog runs on the grass", "the dog runs"]]
    m = task.metric(_Data())
    gen = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 2, 0]])  # [DEC] a picture of dog runs on the grass [SEP] [PAD]
    m.update(torch.zeros(1, 1, 12), {"generated": gen, "references": refs})
    assert m.hypotheses == ["dog runs on the grass"]  # prompt and special tokens dropped
    m2 = task.metric()
    m2.update(torch.zeros(1, 1, 12), {"generated": ["a dog runs on the grass"], "references": refs})
    assert m2.compute()["bleu4"] == pytest.approx(1.0)
    # without "generated": the argmax of the logits at the scored positions
    labels = torch.tensor([[3, 4, 5, 6, 4, 7, 8, 9, 10, 11, 2]])
    labels[0, :4] = -100
    logits = torch.full((1, 10, 12), -5.0)
    for t in range(10):
        y = int(labels[0, t + 1])
        logits[0, t, y if y >= 0 else 0] = 5.0
    m3 = task.metric(_Data())
    m3.update(logits, {"labels": labels, "references": refs})
    assert m3.hypotheses == ["a dog runs on the grass"] and m3.compute()["bleu4"] == pytest.approx(1.0)
    assert task.main_metric == "cider" and "cider" in m3.compute()


# --- retrieval ----------------------------------------------------------------------------------------------
# 3 images, 4 texts; text t describes image [0, 0, 1, 2][t]
SCORES = torch.tensor([[0.9, 0.1, 0.8, 0.0],
                       [0.2, 0.3, 0.1, 0.7],
                       [0.5, 0.4, 0.6, 0.2]])
T2I = [0, 0, 1, 2]


def test_retrieval_recalls_by_hand():
    r = retrieval_recalls(SCORES, T2I, ks=(1, 2, 3))
    # image 0: its best text (0.9) ranks first; image 1: its text 2 (0.1) ranks 4th; image 2: text 3 (0.2) 4th
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # text 0 -> image 0 first; text 1 -> image 0 (0.1) last; text 2 -> image 1 (0.1) last; text 3 -> image 2 (0.2) 2nd
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((1 / 4, 2 / 4, 1.0))
    assert r["r_mean"] == pytest.approx(((1 / 3) + (1 / 4 + 2 / 4 + 1) / 3) / 2)
    # ties count against the ground truth; -inf ground truths are never retrieved
    tied = retrieval_recalls(torch.zeros(2, 2), [0, 1], ks=(1,))
    assert tied["i2t_r1"] == tied["t2i_r1"] == 0.0
    inf = retrieval_recalls(torch.tensor([[float("-inf"), 1.0], [float("-inf"), 2.0]]), [0, 1], ks=(1, 2))
    assert inf["t2i_r2"] == 0.5 and inf["i2t_r2"] == 0.5


def test_retrieval_task_loss_distill_and_metric_over_pairs():
    task = RetrievalTask()
    logits, labels = torch.randn(6, 2), torch.tensor([1, 0, 1, 0, 0, 1])
    assert torch.allclose(task.loss(logits, labels), F.cross_entropy(logits, labels))
    _check_distill(task, logits, labels)
    one = torch.randn(6, 1)
    assert torch.allclose(task.loss(one, labels), F.binary_cross_entropy_with_logits(one[:, 0], labels.float()))
    _check_distill(task, one, labels)
    # every (image, text) pair as an eval batch; logits whose log-odds are the score matrix
    m = task.metric()
    pairs = [(i, t) for i in range(3) for t in range(4)]
    for start in (0, 5):
        chunk = pairs[start:start + 5] if start == 0 else pairs[start:]
        s = torch.tensor([float(SCORES[i, t]) for i, t in chunk])
        m.update(torch.stack([torch.zeros_like(s), s], 1),
                 {"labels": torch.tensor([int(T2I[t] == i) for i, t in chunk]),
                  "image_index": [i for i, _ in chunk], "text_index": [t for _, t in chunk]})
    got = m.compute()
    want = retrieval_recalls(SCORES, T2I)
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k
    assert task.main_metric == "r_mean" and 0 <= got["itm_accuracy"] <= 1
    assert torch.equal(itm_score(torch.tensor([[1.0, 3.0]])), torch.tensor([2.0]))


class _PairData:
    """A retrieval dataset whose 'images' and 'texts' are their indices (for an oracle score_fn)."""

    num_images, num_texts, text_to_image = 3, 4, T2I

    def image(self, i):
        return torch.full((3, 2, 2), float(i))

    @property
    def input_ids(self):
        return [torch.tensor([1, 10 + t]) for t in range(4)]

    def collate_fn(self, items):
        from trimkit_train.data.common import pad_collate

        return pad_collate(items)


def _oracle(batch):
    i = batch["pixel_values"][:, 0, 0, 0].long()
    t = batch["input_ids"][:, 1] - 10
    return SCORES[i, t]


def test_evaluate_retrieval_full_and_reranked():
    full = evaluate_retrieval(_oracle, _PairData(), batch_size=3, return_scores=True)
    assert torch.allclose(full["scores_i2t"].float(), SCORES)
    assert full["r_mean"] == pytest.approx(retrieval_recalls(SCORES, T2I)["r_mean"])
    # rerank the top 2 of a coarse score equal to the fine one: R@1 is unchanged, the rest ranks last
    rr = evaluate_retrieval(_oracle, _PairData(), k_rerank=2, coarse_scores=SCORES, return_scores=True)
    assert rr["i2t_r1"] == pytest.approx(full["i2t_r1"]) and rr["t2i_r1"] == pytest.approx(full["t2i_r1"])
    assert int(torch.isfinite(rr["scores_i2t"]).sum()) == 3 * 2 and int(torch.isfinite(rr["scores_t2i"]).sum()) == 4 * 2
    with pytest.raises(ValueError, match="coarse_scores"):
        evaluate_retrieval(_oracle, _PairData(), k_rerank=2)
