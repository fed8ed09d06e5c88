"""Tests for the shipped digit-grid task (trimkit_train.data)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trimkit_train.data import (
    NLVR2_ANSWERS,
    PATCH_SIZE,
    VQA_ANSWERS,
    DigitGridDataset,
    WordTokenizer,
    collate,
    digit_pools,
)
from trimkit_train.data.digit_grid import _load_digits


@pytest.fixture(scope="module")
def vqa() -> DigitGridDataset:
    return DigitGridDataset("train", size=600, seed=3)


@pytest.fixture(scope="module")
def nlvr2() -> DigitGridDataset:
    return DigitGridDataset("train", size=400, seed=3, variant="nlvr2")


@pytest.mark.parametrize("variant", ["vqa", "nlvr2"])
def test_deterministic_from_seed(variant: str) -> None:
    a, b = (DigitGridDataset("test", size=50, seed=7, variant=variant) for _ in range(2))
    c = DigitGridDataset("test", size=50, seed=8, variant=variant)
    assert a.questions == b.questions and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.samples, b.samples) and np.array_equal(a.offsets, b.offsets)
    for i in (0, 17, 49):
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key])
    assert a.questions != c.questions or not np.array_equal(a.samples, c.samples)


def test_pools_disjoint_and_splits_use_their_pool() -> None:
    pools = digit_pools()
    n = len(_load_digits()[1])
    assert not set(pools["train"]) & set(pools["test"])
    assert len(pools["train"]) + len(pools["test"]) == n
    assert np.array_equal(pools["test"], digit_pools()["test"])  # fixed, seed-independent
    for split in ("train", "test"):
        ds = DigitGridDataset(split, size=200, seed=1)
        used = ds.samples[ds.samples >= 0]
        assert set(used.tolist()) <= set(pools[split].tolist())


def test_existence_and_nlvr2_balanced(vqa: DigitGridDataset, nlvr2: DigitGridDataset) -> None:
    yesno = [vqa.describe(i)["answer"] for i in range(len(vqa)) if vqa.qtypes[i] == "existence"]
    assert len(yesno) > 50 and abs(yesno.count("yes") - yesno.count("no")) <= 1
    assert abs(int(nlvr2.labels.sum()) * 2 - len(nlvr2)) <= 1
    # every NLVR2 statement kind occurs, and empty-cell position questions stay a minority
    assert len(set(nlvr2.qtypes)) == 4
    pos = [vqa.describe(i)["answer"] for i in range(len(vqa)) if vqa.qtypes[i] == "position"]
    assert 0 < pos.count("none") < 0.35 * len(pos)


def test_image_shape_and_normalisation(vqa: DigitGridDataset) -> None:
    assert vqa.image_size % PATCH_SIZE == 0
    imgs = torch.stack([vqa[i]["pixel_values"] for i in range(64)])
    assert imgs.shape == (64, 3, 64, 64) and imgs.dtype == torch.float32
    assert torch.equal(imgs[:, 0], imgs[:, 2])
    assert abs(imgs.mean().item()) < 0.3 and 0.7 < imgs.std().item() < 1.4
    big = DigitGridDataset(size=4, grid=3, cell=32)
    assert big[0]["pixel_values"].shape == (3, 96, 96) and len(big.cell_patches([(0, 0)])) == 4
    with pytest.raises(ValueError):
        DigitGridDataset(size=4, cell=20)


def test_ink_only_in_occupied_cells(vqa: DigitGridDataset) -> None:
    """Digits are drawn inside their cells, so the image agrees with the stored grid."""
    cell = vqa.cell
    for i in range(20):
        img = vqa[i]["pixel_values"][0].reshape(vqa.grid, cell, vqa.grid, cell).permute(0, 2, 1, 3)
        ink = img.amax(dim=(2, 3))
        occupied = torch.from_numpy(vqa.describe(i)["grid"] >= 0)
        assert ink[occupied].min() > ink[~occupied].max()


def test_answers_match_grid(vqa: DigitGridDataset) -> None:
    assert vqa.answers == VQA_ANSWERS and vqa.num_labels == len(VQA_ANSWERS)
    for i in range(len(vqa)):
        info = vqa.describe(i)
        grid, q, answer = info["grid"], info["question"], info["answer"]
        assert vqa.answers[int(vqa[i]["labels"])] == answer
        if m := re.fullmatch(r"what digit is in row (\d) column (\d) \?", q):
            r, c = int(m[1]) - 1, int(m[2]) - 1
            assert answer == ("none" if grid[r, c] < 0 else str(grid[r, c]))
            assert info["relevant_cells"] == [(r, c)]
        elif m := re.fullmatch(r"is there a (\d) \?", q):
            assert answer == ("yes" if (grid == int(m[1])).any() else "no")
        elif m := re.fullmatch(r"how many (\d)s are there \?", q):
            assert answer == str(int((grid == int(m[1])).sum()))
        else:
            raise AssertionError(q)
        # the digit classes in the grid are those of the stored sklearn samples
        targets = _load_digits()[1]
        occ = grid >= 0
        assert np.array_equal(targets[info["samples"][occ]], grid[occ])


def test_position_answer_recoverable_from_grid(vqa: DigitGridDataset) -> None:
    """Learnability sanity check: the relevant cell + grid fully determine the answer."""
    pos = [i for i in range(len(vqa)) if vqa.qtypes[i] == "position"]
    for i in pos:
        info = vqa.describe(i)
        (r, c), = info["relevant_cells"]
        v = info["grid"][r, c]
        assert vqa.labels[i] == (VQA_ANSWERS.index("none") if v < 0 else v)
        assert len(info["relevant_patches"]) == 1  # 1 of 16 patches matters
    # answers vary with the cell asked about, so the text is needed to pick the answer
    answers = {vqa.describe(i)["answer"] for i in pos}
    assert len(answers) >= 8


def test_nlvr2_labels_match_grids(nlvr2: DigitGridDataset) -> None:
    assert nlvr2.answers == NLVR2_ANSWERS and nlvr2.num_labels == 2
    for i in range(len(nlvr2)):
        info = nlvr2.describe(i)
        counts = [np.bincount(g[g >= 0], minlength=10) for g in (info["grid"], info["grid_2"])]
        q = info["question"]
        if m := re.fullmatch(r"the (left|right) image has more (\d)s than the (left|right) one", q):
            s, d = int(m[1] == "right"), int(m[2])
            truth = counts[s][d] > counts[1 - s][d]
        elif m := re.fullmatch(r"the (left|right) image contains a (\d)", q):
            truth = counts[int(m[1] == "right")][int(m[2])] > 0
        elif m := re.fullmatch(r"both images contain a (\d)", q):
            truth = all(c[int(m[1])] > 0 for c in counts)
        elif m := re.fullmatch(r"neither image contains a (\d)", q):
            truth = all(c[int(m[1])] == 0 for c in counts)
        else:
            raise AssertionError(q)
        assert info["answer"] == ("true" if truth else "false")


def test_collate_contract(vqa: DigitGridDataset, nlvr2: DigitGridDataset) -> None:
    for ds in (vqa, nlvr2):
        batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn)))
        expected = {"pixel_values", "input_ids", "attention_mask", "labels"}
        expected |= {"pixel_values_2"} if ds.variant == "nlvr2" else set()
        assert set(batch) == expected
        lengths = [len(ds[i]["input_ids"]) for i in range(8)]
        assert batch["input_ids"].shape == (8, max(lengths))
        for key in ("input_ids", "attention_mask", "labels"):
            assert batch[key].dtype == torch.long
        assert batch["labels"].shape == (8,)
        for key in expected - {"input_ids", "attention_mask", "labels"}:
            assert batch[key].shape == (8, 3, 64, 64) and batch[key].dtype == torch.float32
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert (batch["input_ids"][batch["attention_mask"] == 0] == ds.tokenizer.pad_token_id).all()
        assert (batch["input_ids"][:, 0] == ds.tokenizer.cls_token_id).all()
    padded = collate([{"pixel_values": torch.zeros(3, 16, 16), "input_ids": torch.tensor([1, 5, 2]),
                       "labels": torch.tensor(1)}, {"pixel_values": torch.zeros(3, 16, 16),
                       "input_ids": torch.tensor([1, 2]), "labels": torch.tensor(0)}], pad_token_id=9)
    assert padded["input_ids"].tolist() == [[1, 5, 2], [1, 2, 9]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_tokenizer_round_trip_and_save_load(tmp_path, vqa: DigitGridDataset, nlvr2: DigitGridDataset) -> None:
    tok = WordTokenizer()
    assert len({tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.unk_token_id}) == 4
    for text in vqa.questions[:50] + nlvr2.questions[:50]:
        ids = tok.encode(text)
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode("is there a zebra ?", add_special_tokens=False)[3] == tok.unk_token_id
    path = tmp_path / "vocab.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded.vocab == tok.vocab and loaded.vocab_size == tok.vocab_size == len(tok)
    assert loaded.encode(vqa.questions[0]) == tok.encode(vqa.questions[0])
    path.write_text('{"vocab": {"a": 0}}')
    with pytest.raises(ValueError):
        WordTokenizer.load(path)
