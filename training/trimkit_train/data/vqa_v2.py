"""VQA v2 in its released format (registered dataset ``vqa_v2``; task ``vqa``).

Files (https://visualqa.org/download.html), for a split ``train`` / ``val`` / ``test`` / ``test-dev``
under ``root``:

* questions ``v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json``:
  ``{"questions": [{"image_id", "question", "question_id"}, ...]}``;
* annotations ``v2_mscoco_{train2014,val2014}_annotations.json`` (none for the test splits):
  ``{"annotations": [{"question_id", "image_id", "multiple_choice_answer", "answers": [{"answer", ...}
  x 10], ...}]}``;
* COCO images ``{train2014,val2014,test2015}/COCO_{train2014,val2014,test2015}_{image_id:012d}.jpg``.

Every path can be given instead (``questions`` / ``annotations`` / ``images``: a path, a path with
``{split}``, or ``{split: path}``). ``split`` may join splits with ``+`` (``train+val``: METER's
training set for test-dev).

The task is classification over an answer vocabulary with soft scores, as METER: answers and
vocabulary entries are normalised as the official VQA evaluation does (:func:`normalize_answer`),
an answer given by ``c`` of the (ten) annotators scores ``0.3 c`` up to 1 (0, 0.3, 0.6, 0.9, 1.0 for
c = 0, 1, 2, 3, 4+: METER's rule, which equals the official accuracy ``mean over the 10
leave-one-out subsets of min(1, matches / 3)`` of that answer), and ``labels`` is the dense vector
of scores over the vocabulary. The vocabulary (``answers``) is a list, or a file (a JSON list, a
JSON ``{answer: index}`` dict or one answer per line); without one it is built from the training
annotations with :func:`answer_vocabulary` (normalised ``multiple_choice_answer`` seen at least
``min_answer_count`` = 9 times, in order of first appearance: METER's rule; METER counts train and
val together for its 3,129 answers: ``answer_sources: [train file, val file]``).
"""

from __future__ import annotations

import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import (CLIP_MEAN, CLIP_STD, ImageFileError, ImageLoader, Ragged, encode_texts, load_tokenizer,
                     pad_collate, per_split, read_json, select)

__all__ = ["VQAv2Dataset", "answer_token_ids", "answer_vocabulary", "decoder_collate", "normalize_answer",
           "soft_score", "vqa_predictions", "make_vqa_v2", "COCO_SPLITS"]

#: split -> (tag of the question / annotation files, COCO image set of its images)
COCO_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train2014", "train2014"), "val": ("val2014", "val2014"),
    "test": ("test2015", "test2015"), "test-dev": ("test-dev2015", "test2015"),
}

# --- the official evaluation's answer normalisation -----------------------------------------------------
# Punctuation the official evaluation (and METER's copy of it) removes or turns into spaces.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# Contractions the official evaluation restores. A form with one apostrophe is looked up without it
# ("dont" -> "don't"); a form with several is looked up with any one of them missing ("hed've",
# "he'dve" -> "he'd've"); plus one irregular entry of the official table.
_CONTRACTED_1 = ("'twas I'm I've ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't "
                 "he'd he's how'd how'll how's isn't it'd it'll ma'am might've mightn't must've mustn't needn't "
                 "not've o'clock oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll "
                 "someone's something'd something'll that's there'd there're there's they'd they'll they're they've "
                 "wasn't we've weren't what'll what're what's what've when's where'd where's where've who'd who'll "
                 "who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're you've").split()
_CONTRACTED_N = ("'ow's'at I'd've couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've "
                 "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've "
                 "y'all'd've y'all'll you'd've").split()


def _contractions() -> dict[str, str]:
    table = {w.replace("'", ""): w for w in _CONTRACTED_1}
    for w in _CONTRACTED_N:
        for i in [i for i, ch in enumerate(w) if ch == "'"]:
            table[w[:i] + w[i + 1:]] = w
    table["somebody'd"] = "somebodyd"  # as the official table has it
    return table


CONTRACTIONS = _contractions()


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it (its ``processPunctuation`` then
    ``processDigitArticle``): newlines/tabs to spaces and stripped; each punctuation mark of the
    official list removed where the answer has it next to a space or holds a digit-comma-digit, else
    made a space; periods not followed by a digit removed; lower-cased; number words to digits
    ("two" -> "2", "none" -> "0"); articles dropped; apostrophe-less contractions restored
    ("dont" -> "don't"); single spaces."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    glue = bool(_DIGIT_COMMA_DIGIT.search(text))
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if glue or (p + " ") in text or (" " + p) in text else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def soft_score(count: int) -> float:
    """METER's score of an answer ``count`` annotators gave: 0, 0.3, 0.6, 0.9, then 1.0 for 4 or more."""
    return 0.0 if count <= 0 else 1.0 if count >= 4 else round(0.3 * count, 1)


def answer_vocabulary(annotation_files: Iterable[str | Path], min_count: int = 9) -> list[str]:
    """METER's answer vocabulary: the normalised ``multiple_choice_answer`` of every annotation in
    ``annotation_files`` (in order) seen at least ``min_count`` times, in order of first appearance."""
    counts: Counter[str] = Counter()
    for path in annotation_files:
        for ann in _annotations(path):
            counts[normalize_answer(str(ann["multiple_choice_answer"]))] += 1
    return [a for a, c in counts.items() if c >= min_count]


def _annotations(path: str | Path) -> list[dict[str, Any]]:
    data = read_json(path, "VQA annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a VQA annotations file (expected {{\"annotations\": [...]}})")
    return data["annotations"]


def _questions(path: str | Path) -> list[dict[str, Any]]:
    data = read_json(path, "VQA questions")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{path}: not a VQA questions file (expected {{\"questions\": [...]}})")
    return data["questions"]


def _read_answers(answers: Any) -> list[str]:
    if isinstance(answers, (list, tuple)):
        return [str(a) for a in answers]
    path = Path(answers)
    if path.suffix == ".json":
        data = read_json(path, "answer vocabulary")
        if isinstance(data, dict):  # {answer: index}
            if sorted(data.values()) != list(range(len(data))):
                raise ValueError(f"{path}: an {{answer: index}} vocabulary needs the indices 0..{len(data) - 1}")
            return sorted(data, key=data.__getitem__)
        if isinstance(data, list):
            return [str(a) for a in data]
        raise ValueError(f"{path}: an answer vocabulary is a JSON list or an {{answer: index}} dict")
    try:
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"answer vocabulary file not found: {path}") from None


class VQAv2Dataset(Dataset):
    """VQA v2 questions with soft answer scores over a fixed answer vocabulary.

    Items: ``pixel_values`` (3, S, S), ``input_ids`` (T,) ([CLS] first), ``labels`` (A,) float soft
    scores (all zero for the test splits), ``question_id``. Attributes: ``answers`` (the vocabulary),
    ``num_labels``, ``question_ids``, ``image_ids``, ``questions``, ``input_ids``, ``tokenizer``,
    ``image_size``, ``patch_size`` (None), ``variant = "vqa"``, ``task = "vqa"``.

    ``answer_decoder=True`` (BLIP's answer-decoder training): ``variant`` and ``task`` are
    ``"vqa_decoder"``, ``answer_tokens`` holds every vocabulary answer tokenised (at most
    ``max_answer_len`` tokens, [CLS]/[SEP] included, else a ``ValueError`` naming them), and
    batches carry the decoder targets (:func:`decoder_collate`; ``labels`` a dict whose
    ``"scores"`` are the soft scores).
    """

    variant = "vqa"
    task = "vqa"
    patch_size = None

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, *, root: str | None = None,
                 questions: Any = None, annotations: Any = None, images: Any = None, image_set: Any = None,
                 image_template: str = "COCO_{image_set}_{image_id:012d}.jpg", answers: Any = None,
                 answer_sources: Sequence[str] | None = None, min_answer_count: int = 9,
                 skip_unanswerable: bool | None = None, tokenizer: Any = None, max_text_len: int = 40,
                 image_size: int = 288, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 crop: bool = False, check_images: bool = False, answer_decoder: bool = False,
                 max_answer_len: int = 16) -> None:
        self.split = split
        self.tokenizer = load_tokenizer(tokenizer)
        self.images = ImageLoader(image_size, mean, std, crop)
        self.image_size = self.images.image_size
        if answers is None:
            sources = list(answer_sources) if answer_sources is not None else \
                [self._path(annotations, root, "train", "annotations")]
            answers = answer_vocabulary(sources, min_answer_count)
        self.answers = _read_answers(answers)
        self.answer_to_label: dict[str, int] = {}
        for i, a in enumerate(self.answers):
            self.answer_to_label.setdefault(normalize_answer(a), i)
        if not self.answers:
            raise ValueError("the answer vocabulary is empty")
        self.num_labels = len(self.answers)
        self.answer_decoder = bool(answer_decoder)
        self.answer_tokens: list[list[int]] | None = None
        if self.answer_decoder:  # BLIP's answer-decoder training: every answer tokenised, [CLS] ... [SEP]
            self.variant = self.task = "vqa_decoder"
            self.answer_tokens = answer_token_ids(self.tokenizer, self.answers, max_answer_len)
        skip = "train" in split.split("+") if skip_unanswerable is None else bool(skip_unanswerable)

        recs: list[tuple[str, int, int, Path, list[tuple[int, float]]]] = []  # question, qid, iid, image, targets
        for part in split.split("+"):
            qpath = self._path(questions, root, part, "questions")
            apath = self._path(annotations, root, part, "annotations", required=False)
            anns = {int(a["question_id"]): a for a in _annotations(apath)} if apath is not None else None
            img_dir = per_split(images, part, "images") if images is not None else None
            if img_dir is None:
                if root is None:
                    raise ValueError("vqa_v2: give `root` or `images` (the directory of the split's COCO images)")
                img_dir = Path(root) / self._image_set(image_set, part)
            fields = {"image_set": self._image_set(image_set, part)} if "{image_set" in image_template else {}
            for q in _questions(qpath):
                qid, iid = int(q["question_id"]), int(q["image_id"])
                targets: list[tuple[int, float]] = []
                if anns is not None:
                    if qid not in anns:
                        raise ValueError(f"{apath}: no annotation for question {qid} of {qpath}")
                    targets = self.targets([str(a["answer"]) for a in anns[qid]["answers"]])
                    if skip and not targets:
                        continue
                name = image_template.format(image_id=iid, **fields)
                recs.append((str(q["question"]), qid, iid, Path(img_dir) / name, targets))
        keep = select(len(recs), size, seed)
        recs = [recs[i] for i in keep]
        self.questions = [r[0] for r in recs]
        self.question_ids = np.array([r[1] for r in recs], dtype=np.int64)
        self.image_ids = np.array([r[2] for r in recs], dtype=np.int64)
        self.image_paths = [r[3] for r in recs]
        self._labels = Ragged([[t[0] for t in r[4]] for r in recs])
        self._scores = [np.array([t[1] for t in r[4]], dtype=np.float32) for r in recs]
        self.input_ids = encode_texts(self.tokenizer, self.questions, max_text_len)
        if check_images:
            missing = [p for p in dict.fromkeys(self.image_paths) if not p.is_file()]
            if missing:
                raise ImageFileError(f"image file not found: {missing[0]} ({len(missing)} of the split's images are "
                                     "missing)")

    @staticmethod
    def _image_set(image_set: Any, part: str) -> str:
        value = per_split(image_set, part, "image_set") if image_set is not None else None
        if value is not None:
            return str(value)
        if part in COCO_SPLITS:
            return COCO_SPLITS[part][1]
        raise ValueError(f"vqa_v2: split {part!r} is not one of {sorted(COCO_SPLITS)}: give `image_set` (the COCO "
                         "image set of its images, e.g. val2014) and the file paths")

    @staticmethod
    def _path(value: Any, root: str | None, part: str, kind: str, required: bool = True) -> Path | None:
        """The ``kind`` file of split ``part``: given (``value``), else the released name under ``root``
        (annotations of the test splits: none)."""
        if isinstance(value, Mapping):
            if value.get(part) is not None:
                return Path(value[part])
            if required:
                raise ValueError(f"vqa_v2: option {kind!r} has no entry for split {part!r} (it has {sorted(value)})")
            return None
        if value is not None:
            return Path(per_split(value, part, kind))
        if not required and part.startswith("test"):
            return None  # the test splits have no annotations
        if root is None or part not in COCO_SPLITS:
            raise ValueError(f"vqa_v2: give the {kind} file of split {part!r} (option `{kind}`) or a `root` with the "
                             f"released files (splits {sorted(COCO_SPLITS)})")
        tag = COCO_SPLITS[part][0]
        if kind == "questions":
            return Path(root) / f"v2_OpenEnded_mscoco_{tag}_questions.json"
        return Path(root) / f"v2_mscoco_{tag}_annotations.json"

    def targets(self, annotator_answers: Sequence[str]) -> list[tuple[int, float]]:
        """``(label, soft score)`` of every vocabulary answer among ``annotator_answers`` (normalised)."""
        counts = Counter(normalize_answer(a) for a in annotator_answers)
        return [(self.answer_to_label[a], soft_score(c)) for a, c in counts.items() if a in self.answer_to_label]

    def __len__(self) -> int:
        return len(self.questions)

    def scores(self, i: int) -> torch.Tensor:
        """The dense ``(num_labels,)`` soft-score vector of question ``i``."""
        out = torch.zeros(self.num_labels)
        labels = self._labels[i]
        if len(labels):
            out[labels] = torch.from_numpy(self._scores[i])
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.images(self.image_paths[i]), "input_ids": self.input_ids[i],
                "labels": self.scores(i), "question_id": int(self.question_ids[i])}

    @property
    def collate_fn(self):
        """:func:`~trimkit_train.data.common.pad_collate` with the tokenizer's pad id; with
        ``answer_decoder``, :func:`decoder_collate` (the answer-decoder targets)."""
        pad = self.tokenizer.pad_token_id or 0
        if self.answer_decoder:
            return partial(decoder_collate, pad_token_id=pad, answer_tokens=self.answer_tokens)
        return partial(pad_collate, pad_token_id=pad)


def answer_token_ids(tokenizer: Any, answers: Sequence[str], max_answer_len: int) -> list[list[int]]:
    """Every vocabulary answer tokenised as BLIP's ``train_vqa`` does ([CLS] answer [SEP], the first
    token later replaced by the decoder's BOS). An answer of more than ``max_answer_len`` tokens
    (special tokens included) is an error: it would be truncated in training but scored whole by
    the ranking, so raise ``max_answer_len`` or drop it from the vocabulary."""
    if int(max_answer_len) < 2:
        raise ValueError(f"vqa_v2: max_answer_len must be >= 2 (BOS + [SEP]), got {max_answer_len!r}")
    ids = [list(map(int, tokenizer(str(a))["input_ids"])) for a in answers]
    long = [(a, len(t)) for a, t in zip(answers, ids) if len(t) > int(max_answer_len)]
    if long:
        shown = ", ".join(f"{a!r} ({n} tokens)" for a, n in long[:5])
        raise ValueError(f"vqa_v2: {len(long)} answer(s) of the vocabulary are longer than max_answer_len="
                         f"{max_answer_len} tokens ([CLS] and [SEP] included): {shown}; raise max_answer_len or "
                         "drop them from the answer vocabulary")
    return ids


def decoder_collate(batch: Sequence[dict[str, Any]], pad_token_id: int, answer_tokens: Sequence[Sequence[int]]
                    ) -> dict[str, Any]:
    """:func:`pad_collate`, plus the answer decoder's inputs and targets (task ``vqa_decoder``).

    The K rows of question ``b`` (``b * K .. b * K + K - 1``, K = the most answers of a question in
    the batch) are its vocabulary answers with a soft score > 0, in vocabulary order, right-padded
    to the longest (``answer_ids`` / ``answer_attention_mask`` ``(B * K, T)``, what the model's
    forward takes); rows of a question with fewer answers hold [CLS] alone and weigh 0.
    ``labels`` becomes ``{"scores": (B, A) soft scores, "answer_ids", "answer_attention_mask",
    "weights": (B, K) each row's soft score}``. A question without an answer in the vocabulary
    (kept with ``skip_unanswerable: false``) has K rows of weight 0: it adds nothing to the loss."""
    out = pad_collate(batch, pad_token_id)
    scores = out["labels"]
    rows = [torch.nonzero(s > 0).flatten().tolist() for s in scores]
    k = max(1, max(len(r) for r in rows))
    width = max([2] + [len(answer_tokens[a]) for r in rows for a in r])
    first = int(answer_tokens[0][0])
    ids = torch.full((len(batch) * k, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, 0], mask[:, 0] = first, 1
    weights = torch.zeros(len(batch), k)
    for b, r in enumerate(rows):
        for j, a in enumerate(r):
            tok = answer_tokens[a]
            ids[b * k + j, :len(tok)] = torch.tensor(tok)
            mask[b * k + j, :len(tok)] = 1
            weights[b, j] = scores[b, a]
    out["answer_ids"], out["answer_attention_mask"] = ids, mask
    out["labels"] = {"scores": scores, "answer_ids": ids, "answer_attention_mask": mask, "weights": weights}
    return out


def vqa_predictions(logits: torch.Tensor, question_ids: Sequence[int], answers: Sequence[str]) -> list[dict[str, Any]]:
    """The official results format ``[{"question_id", "answer"}]`` of the argmax answers (test-dev
    / test submissions)."""
    best = logits.argmax(-1).tolist()
    return [{"question_id": int(q), "answer": answers[b]} for q, b in zip(question_ids, best)]


def make_vqa_v2(split: str, size: int | None = None, seed: int = 0, **options: Any) -> VQAv2Dataset:
    """The ``vqa_v2`` dataset factory (see :class:`VQAv2Dataset` for the options)."""
    return VQAv2Dataset(split, size, seed, **options)


def _register() -> None:
    from ..trainer import register_dataset

    register_dataset("vqa_v2", make_vqa_v2)


_register()
