"""The readers of the paper's tasks in their released formats, on small sample files.

The annotation samples live in tests/data/tasks/ (VQA v2 questions/annotations, NLVR2 and SNLI-VE
JSON lines, Karpathy split files); the images (tiny PNG/JPG files) and a BERT WordPiece tokenizer
are written by the fixtures.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from trimkit.adapter import DatasetFacts
from trimkit_train.data import (ImageFileError, KarpathyCaptioning, KarpathyRetrieval, NLVR2Dataset, SNLIVEDataset,
                                VQAv2Dataset, answer_vocabulary, clean_caption, normalize_answer, soft_score)
from trimkit_train.data.common import IGNORE_INDEX, CLIP_MEAN, CLIP_STD, load_image, select

DATA = Path(__file__).parent / "data" / "tasks"
ANSWERS = ["white", "gray", "2", "3", "yes", "no", "laptop"]


def _image(path: Path, color=(200, 30, 30), size=(10, 8)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A BERT WordPiece tokenizer whose vocabulary holds every word of the sample files."""
    from transformers import BertTokenizerFast

    words = set()
    for f in DATA.rglob("*.json*"):
        words |= set(re.findall(r"[a-z]+", f.read_text().lower()))
    words |= {"a", "picture", "of"}
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words),
                                            *".,?!'-0123456789"]) + "\n")
    BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(str(d))
    return str(d)


@pytest.fixture
def vqa_root(tmp_path) -> Path:
    root = tmp_path / "vqa"
    shutil.copytree(DATA / "vqa", root)
    for image_set, iid in [("train2014", 42), ("train2014", 7), ("val2014", 3), ("test2015", 5)]:
        _image(root / image_set / f"COCO_{image_set}_{iid:012d}.jpg", (iid * 20, 100, 50))
    return root


def _shapes(batch):
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --- VQA v2 ------------------------------------------------------------------------------------------------
def test_normalize_answer_as_the_official_evaluation():
    cases = {
        "Two": "2", "none": "0", "the dog.": "dog", "a red-white flag": "red white flag", "yes!": "yes",
        "1,000": "1000", "left , right": "left right", "3.5 ft": "3.5 ft", "U.S.A.": "usa", "dont": "don't",
        "hed've": "he'd've", "Nike.": "nike", " Tab\there ": "tab here", "x/y": "x y", "(a) cat": "cat",
        "im": "im",  # the official table's "Im" never matches a lower-cased word
    }
    for raw, want in cases.items():
        assert normalize_answer(raw) == want, raw


def test_soft_scores_follow_meter():
    assert [soft_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    # METER's scores are the official leave-one-out accuracy of an answer given c of 10 times
    for c in range(11):
        official = sum(min(1.0, (c - (k < c)) / 3) for k in range(10)) / 10
        assert soft_score(c) == pytest.approx(official)


def test_vqa_reader_items_batch_and_scores(vqa_root, tokenizer_dir):
    ds = VQAv2Dataset("train", root=str(vqa_root), answers=ANSWERS, tokenizer=tokenizer_dir, image_size=16)
    # question 71 (shoe brand) has no answer in the vocabulary: skipped in train, as METER does
    assert list(ds.question_ids) == [420, 421, 70]
    assert ds.task == "vqa" and ds.variant == "vqa" and ds.num_labels == 7 and ds.patch_size is None
    item = ds[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert int(item["input_ids"][0]) == ds.tokenizer.cls_token_id
    assert ds.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist()) == \
        ["[CLS]", "what", "color", "is", "the", "cat", "?", "[SEP]"]
    # "white" x5 + "White" -> 6 -> 1.0; "gray" x2 -> 0.6 ("grey", "white and gray": not in the vocabulary)
    torch.testing.assert_close(ds.scores(0), torch.tensor([1.0, 0.6, 0, 0, 0, 0, 0]))
    # "2" x4 + "two" -> 1.0; "3" x2 + "three" -> 0.9
    torch.testing.assert_close(ds.scores(1), torch.tensor([0, 0, 1.0, 0.9, 0, 0, 0]))
    torch.testing.assert_close(ds.scores(2), torch.tensor([0, 0, 0, 0, 1.0, 0, 0]))
    batch = ds.collate_fn([ds[0], ds[1], ds[2]])
    assert list(batch)[:5] == ["pixel_values", "input_ids", "attention_mask", "labels", "question_id"]
    s = _shapes(batch)
    assert s["pixel_values"] == (3, 3, 16, 16) and s["labels"] == (3, 7) and batch["labels"].dtype == torch.float32
    assert s["input_ids"] == s["attention_mask"] == (3, 8) and batch["question_id"] == [420, 421, 70]
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # "is it raining ?": right padding
    assert (batch["input_ids"][2, 6:] == ds.tokenizer.pad_token_id).all()
    facts = DatasetFacts.of(ds)
    assert (facts.num_labels, facts.variant, facts.image_size, facts.longest_text) == (7, "vqa", 16, 8)


def test_vqa_eval_split_keeps_unanswerable_and_normalises_answers(vqa_root, tokenizer_dir):
    ds = VQAv2Dataset("val", root=str(vqa_root), answers=ANSWERS, tokenizer=tokenizer_dir, image_size=8)
    assert list(ds.question_ids) == [30, 31]
    # "laptop" x6 + "a laptop" (article dropped) -> 1.0
    torch.testing.assert_close(ds.scores(0), torch.tensor([0, 0, 0, 0, 0, 0, 1.0]))
    torch.testing.assert_close(ds.scores(1), torch.tensor([0, 0, 0, 0, 1.0, 0.9, 0]))
    everything = VQAv2Dataset("train", root=str(vqa_root), answers=ANSWERS, tokenizer=tokenizer_dir, image_size=8,
                              skip_unanswerable=False)
    assert len(everything) == 4 and float(everything.scores(3).sum()) == 0.0


def test_vqa_vocabulary_built_given_or_read(vqa_root, tokenizer_dir, tmp_path):
    built = VQAv2Dataset("val", root=str(vqa_root), tokenizer=tokenizer_dir, min_answer_count=1, image_size=8)
    assert built.answers == ["white", "2", "yes", "nike"]  # normalised multiple_choice_answer of train, in order
    files = [vqa_root / "v2_mscoco_train2014_annotations.json", vqa_root / "v2_mscoco_val2014_annotations.json"]
    assert answer_vocabulary(files, min_count=1) == ["white", "2", "yes", "nike", "laptop"]
    assert answer_vocabulary(files, min_count=2) == ["yes"]
    (tmp_path / "a.json").write_text(json.dumps(ANSWERS))
    (tmp_path / "b.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    (tmp_path / "c.txt").write_text("\n".join(ANSWERS) + "\n")
    for f in ("a.json", "b.json", "c.txt"):
        ds = VQAv2Dataset("val", root=str(vqa_root), answers=str(tmp_path / f), tokenizer=tokenizer_dir, image_size=8)
        assert ds.answers == ANSWERS


def test_vqa_test_dev_and_explicit_paths(vqa_root, tokenizer_dir):
    ds = VQAv2Dataset("test-dev", root=str(vqa_root), answers=ANSWERS, tokenizer=tokenizer_dir, image_size=8)
    assert ds.image_paths == [vqa_root / "test2015" / "COCO_test2015_000000000005.jpg"]
    assert float(ds[0]["labels"].sum()) == 0.0  # no annotations: no scores
    explicit = VQAv2Dataset("val", questions=str(DATA / "vqa" / "v2_OpenEnded_mscoco_{split}2014_questions.json"),
                            annotations={"val": str(DATA / "vqa" / "v2_mscoco_val2014_annotations.json")},
                            images=str(vqa_root / "val2014"), answers=ANSWERS, tokenizer=tokenizer_dir, image_size=8)
    assert list(explicit.question_ids) == [30, 31] and explicit[1]["pixel_values"].shape == (3, 8, 8)
    both = VQAv2Dataset("train+val", root=str(vqa_root), answers=ANSWERS, tokenizer=tokenizer_dir, image_size=8)
    assert list(both.question_ids) == [420, 421, 70, 30, 31]


def test_missing_or_broken_image_names_the_file(vqa_root, tokenizer_dir):
    path = vqa_root / "train2014" / "COCO_train2014_000000000042.jpg"
    path.unlink()
    ds = VQAv2Dataset("train", root=str(vqa_root), answers=ANSWERS, tokenizer=tokenizer_dir, image_size=8)
    with pytest.raises(ImageFileError, match=re.escape(str(path))):
        ds[0]
    with pytest.raises(ImageFileError, match=re.escape(str(path))):
        VQAv2Dataset("train", root=str(vqa_root), answers=ANSWERS, tokenizer=tokenizer_dir, check_images=True)
    broken = vqa_root / "train2014" / "COCO_train2014_000000000007.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageFileError, match=re.escape(str(broken))):
        ds[2]


def test_image_preprocessing(tmp_path):
    _image(tmp_path / "x.png", (255, 0, 128), (12, 6))
    x = load_image(tmp_path / "x.png", 4)
    assert x.shape == (3, 4, 4)
    want = (torch.tensor([255, 0, 128]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 1, 1], want, atol=2e-2, rtol=0)
    assert load_image(tmp_path / "x.png", 4, mean=(0, 0, 0), std=(1, 1, 1), crop=True).max() <= 1.0


def test_size_is_a_seeded_subset_in_file_order():
    a = select(100, 10, seed=3)
    assert list(a) == sorted(a) and len(set(a)) == 10
    assert list(a) == list(select(100, 10, seed=3)) and list(a) != list(select(100, 10, seed=4))
    assert list(select(5, None, 0)) == list(select(5, 9, 0)) == [0, 1, 2, 3, 4]


# --- NLVR2, SNLI-VE ------------------------------------------------------------------------------------------
def test_nlvr2_reader(tmp_path, tokenizer_dir):
    root = tmp_path / "nlvr2"
    (root / "data").mkdir(parents=True)
    for f in ("train.json", "dev.json"):
        shutil.copy(DATA / "nlvr2" / f, root / "data" / f)
    for rel in ["images/train/21/train-10171-0", "images/train/5/train-3-1", "dev/dev-850-0", "dev/dev-851-2"]:
        for n in (0, 1):
            _image(root / f"{rel}-img{n}.png", (n * 200, 30, 30), (6, 9))
    ds = NLVR2Dataset("train", root=str(root), tokenizer=tokenizer_dir, image_size=8)
    assert ds.task == "nlvr2" and ds.variant == "nlvr2" and ds.num_labels == 2
    assert list(ds.labels) == [0, 1, 1]
    assert ds.image_paths[2] == (root / "images/train/5/train-3-1-img0.png", root / "images/train/5/train-3-1-img1.png")
    batch = ds.collate_fn([ds[0], ds[1]])
    s = _shapes(batch)
    assert s["pixel_values"] == s["pixel_values_2"] == (2, 3, 8, 8) and s["labels"] == (2,)
    assert batch["labels"].dtype == torch.long and batch["identifier"] == ["train-10171-0-0", "train-10171-0-1"]
    assert not torch.equal(batch["pixel_values"], batch["pixel_values_2"])  # img0 and img1 differ
    dev = NLVR2Dataset("dev", root=str(root), tokenizer=tokenizer_dir, image_size=8)
    assert dev.image_paths[0][1] == root / "dev" / "dev-850-0-img1.png" and list(dev.labels) == [0, 1]
    (root / "dev" / "dev-851-2-img1.png").unlink()
    with pytest.raises(ImageFileError, match="dev-851-2-img1.png"):
        dev[1]


def test_snli_ve_reader(tmp_path, tokenizer_dir):
    root = tmp_path / "snli"
    shutil.copytree(DATA / "snli_ve", root)
    for i in ("4705552913", "1000092795"):
        _image(root / "Flickr30K" / "images" / f"{i}.jpg")
    ds = SNLIVEDataset("train", root=str(root), tokenizer=tokenizer_dir, image_size=8)
    assert ds.task == "snli_ve" and ds.num_labels == 3
    assert ds.hypotheses[0] == "The sisters are hugging goodbye."  # sentence2, not the caption sentence1
    assert list(ds.labels) == [1, 2, 0]  # neutral, entailment, contradiction (METER's ids)
    batch = ds.collate_fn([ds[0], ds[2]])
    assert _shapes(batch)["pixel_values"] == (2, 3, 8, 8) and batch["labels"].tolist() == [1, 0]
    assert int(batch["input_ids"][0, 0]) == ds.tokenizer.cls_token_id
    assert len(SNLIVEDataset("dev", root=str(root), tokenizer=tokenizer_dir, image_size=8)) == 1


# --- Karpathy: retrieval and captioning ------------------------------------------------------------------------
@pytest.fixture
def flickr(tmp_path) -> tuple[str, str]:
    root = tmp_path / "flickr30k-images"
    for img in json.loads((DATA / "karpathy" / "dataset_flickr30k.json").read_text())["images"]:
        _image(root / img["filename"], (img["imgid"] * 40, 0, 0), (7, 7))
    return str(DATA / "karpathy" / "dataset_flickr30k.json"), str(root)


def test_retrieval_train_view_pairs_with_negatives(flickr, tokenizer_dir):
    ann, images = flickr
    ds = KarpathyRetrieval("train", annotations=ann, images=images, tokenizer=tokenizer_dir, image_size=8, negatives=1)
    assert ds.task == "retrieval" and ds.variant == "itm" and ds.num_labels == 2
    assert ds.num_images == 2 and ds.num_texts == 3 and len(ds) == 6
    assert [int(ds[k]["labels"]) for k in range(6)] == [1, 0, 1, 0, 1, 0]
    for k in range(6):
        i, t = ds.pair(k)
        assert (i == ds.text_to_image[t]) == (k % 2 == 0)
    again = KarpathyRetrieval("train", annotations=ann, images=images, tokenizer=tokenizer_dir, image_size=8)
    assert [ds.pair(k) for k in range(6)] == [again.pair(k) for k in range(6)]  # deterministic per item
    assert ds.texts[0] == "two young guys with shaggy hair look at their hands"  # cleaned as BLIP
    batch = ds.collate_fn([ds[0], ds[1]])
    assert _shapes(batch)["labels"] == (2,) and batch["image_index"] == [0, 1]


def test_retrieval_eval_view_every_pair(flickr, tokenizer_dir):
    ann, images = flickr
    ds = KarpathyRetrieval("test", annotations=ann, images=images, tokenizer=tokenizer_dir, image_size=8)
    assert ds.view == "eval" and (ds.num_images, ds.num_texts) == (3, 6) and len(ds) == 18
    assert list(ds.text_to_image) == [0, 0, 1, 1, 1, 2] and ds.image_to_texts == [[0, 1], [2, 3, 4], [5]]
    assert [int(ds[k]["labels"]) for k in range(len(ds))] == \
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert ds[7]["image_index"] == 1 and ds[7]["text_index"] == 1
    assert len(KarpathyRetrieval("test", 2, annotations=ann, images=images, tokenizer=tokenizer_dir)) == 2 * 3


def test_coco_karpathy_restval_and_filepath(tmp_path, tokenizer_dir):
    ann = str(DATA / "karpathy" / "dataset_coco.json")
    ds = KarpathyCaptioning("train", annotations=ann, images=str(tmp_path), tokenizer=tokenizer_dir)
    assert ds.image_ids == [522418, 318556]  # restval joins train
    assert ds.image_paths[0] == tmp_path / "val2014" / "COCO_val2014_000000522418.jpg"
    only = KarpathyCaptioning("train", annotations=ann, images=str(tmp_path), tokenizer=tokenizer_dir, restval=False)
    assert only.image_ids == [318556]
    with pytest.raises(ImageFileError, match="COCO_train2014_000000318556.jpg"):
        only[0]


def test_captioning_views(flickr, tokenizer_dir):
    ann, images = flickr
    ds = KarpathyCaptioning("train", annotations=ann, images=images, tokenizer=tokenizer_dir, image_size=8,
                            bos_token_id=4)
    assert ds.task == "captioning" and len(ds) == 3 and ds.prompt_length == 4  # BOS + "a picture of"
    item = ds[0]
    tokens = ds.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    assert int(item["input_ids"][0]) == 4 and tokens[1:5] == ["a", "picture", "of", "two"]
    assert (item["labels"][:4] == IGNORE_INDEX).all() and torch.equal(item["labels"][4:], item["input_ids"][4:])
    assert ds.prompt_ids().tolist() == item["input_ids"][:4].tolist()
    batch = ds.collate_fn([ds[0], ds[2]])
    assert batch["labels"].shape == batch["input_ids"].shape
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all()
    ev = KarpathyCaptioning("test", annotations=ann, images=images, tokenizer=tokenizer_dir, image_size=8)
    assert len(ev) == 3 and ev[1]["references"] == ["A dog runs on the grass.", "The dog is running.",
                                                     "A brown dog plays outside."]
    assert ev.collate_fn([ev[0], ev[1]])["references"][0][1] == "A man cleans the window of a building."
    assert clean_caption("A (small) dog; runs!", 3) == "a small dog"


def test_registered_names_build_through_the_trainer(vqa_root, tokenizer_dir, flickr):
    from trimkit_train.trainer import DataConfig, build_dataset

    data = DataConfig(name="vqa_v2", options={"root": str(vqa_root), "answers": ANSWERS, "tokenizer": tokenizer_dir,
                                              "image_size": 8}, train_split="train", eval_split="val",
                      train_size=2, eval_size=None)
    train, ev = build_dataset(data, "train"), build_dataset(data, "eval")
    assert isinstance(train, VQAv2Dataset) and len(train) == 2 and len(ev) == 2
    ann, images = flickr
    opts = {"annotations": ann, "images": images, "tokenizer": tokenizer_dir, "image_size": 8}
    for name, cls in [("karpathy_retrieval", KarpathyRetrieval), ("karpathy_caption", KarpathyCaptioning)]:
        assert isinstance(build_dataset(DataConfig(name=name, options=opts, eval_size=None), "eval"), cls)
    ds = build_dataset(DataConfig(name="karpathy", options={**opts, "mode": "captioning"}, eval_size=None), "eval")
    assert isinstance(ds, KarpathyCaptioning)


@pytest.mark.parametrize("name", ["vqa_v2", "nlvr2", "snli_ve", "flickr30k_retrieval", "coco_caption"])
def test_example_configs_validate(name):
    from trimkit_train.trainer import ExperimentConfig

    cfg = ExperimentConfig.load(Path(__file__).parent.parent / "examples" / f"{name}.yaml")
    assert cfg.data.name in ("vqa_v2", "nlvr2", "snli_ve", "karpathy_retrieval", "karpathy_caption")
