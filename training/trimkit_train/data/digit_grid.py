"""The shipped "digit-grid" task: a small, offline VQA / NLVR2-style benchmark.

Images are grids of cells built from scikit-learn's bundled handwritten digits (1797 8x8
samples, no download). Most cells are empty; a few hold an upscaled, jittered digit. Questions
come from templates and always name a cell or a digit, so the text is needed to find the few
relevant patches (like real VQA, most patches are irrelevant to any one question).

The batch dict made by :func:`collate` is the documented contract for user datasets:
``pixel_values`` float (B,3,H,W); for NLVR2 also ``pixel_values_2``; ``input_ids`` long (B,T);
``attention_mask`` long (B,T) with 1 for real tokens; ``labels`` long (B,) class index.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

PATCH_SIZE = 16
POOL_SEED = 0  # fixed: the train/test split of the 1797 digit samples never changes
TEST_FRACTION = 0.2
DIGIT_WORDS = [str(d) for d in range(10)]
VQA_ANSWERS = DIGIT_WORDS + ["none", "yes", "no"]
NLVR2_ANSWERS = ["false", "true"]
VQA_TEMPLATES = {
    "position": "what digit is in row {row} column {col} ?",
    "existence": "is there a {d} ?",
    "count": "how many {d}s are there ?",
}
NLVR2_TEMPLATES = {
    "more": "the {side} image has more {d}s than the {other} one",
    "contains": "the {side} image contains a {d}",
    "both": "both images contain a {d}",
    "neither": "neither image contains a {d}",
}
# Affine normalisation measured on the default configuration (4x4 grid, 16 px cells).
PIXEL_MEAN, PIXEL_STD = 0.05, 0.18
_SPLITS = {"train": 0, "test": 1}
_Cells = list[tuple[int, int]]
_Example = tuple[str, str, str, list[_Cells]]  # text, qtype, answer, relevant cells per view
_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from .._extras import require_extras

    require_extras("sklearn", feature="the digit-grid task (scikit-learn's bundled digits)")
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digit_pools() -> dict[str, np.ndarray]:
    """Disjoint ``{"train", "test"}`` pools of sklearn digit sample indices (fixed permutation)."""
    n = len(_load_digits()[1])
    perm = np.random.default_rng(POOL_SEED).permutation(n)
    n_test = int(round(n * TEST_FRACTION))
    return {"train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}


def default_vocabulary() -> list[str]:
    """Every word the VQA and NLVR2 templates can produce, sorted."""
    words: set[str] = set()
    for template in [*VQA_TEMPLATES.values(), *NLVR2_TEMPLATES.values()]:
        for d in DIGIT_WORDS:
            for side, other in (("left", "right"), ("right", "left")):
                text = template.format(d=d, row=d, col=d, side=side, other=other)
                words.update(_TOKEN_RE.findall(text))
    return sorted(words)


class WordTokenizer:
    """Word-level tokenizer with ``[PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3`` then the vocabulary.

    ``encode`` lower-cases, splits words and punctuation, prepends ``[CLS]`` (so the text
    [CLS] is at position 0) and appends ``[SEP]``.
    """

    special_tokens = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")

    def __init__(self, words: Iterable[str] | None = None) -> None:
        words = default_vocabulary() if words is None else words
        extra = [w for w in dict.fromkeys(words) if w not in self.special_tokens]
        self.tokens: list[str] = list(self.special_tokens) + extra
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        self.pad_token_id, self.cls_token_id, self.sep_token_id, self.unk_token_id = range(4)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return len(self.tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into lower-case words and punctuation marks."""
        return _TOKEN_RE.findall(text.lower())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, as ``[CLS] ... [SEP]`` unless ``add_special_tokens`` is False."""
        ids = [self.vocab.get(t, self.unk_token_id) for t in self.tokenize(text)]
        return [self.cls_token_id, *ids, self.sep_token_id] if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Join the tokens of ``ids`` with spaces (special tokens dropped by default)."""
        ids = [int(i) for i in ids]
        return " ".join(self.tokens[i] for i in ids if not (skip_special_tokens and i < 4))

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON ``{"vocab": {token: id}}``."""
        Path(path).write_text(json.dumps({"vocab": self.vocab}, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        """Read a vocabulary written by :meth:`save`."""
        vocab: dict[str, int] = json.loads(Path(path).read_text())["vocab"]
        tokens = sorted(vocab, key=vocab.__getitem__)
        if tuple(tokens[:4]) != cls.special_tokens or [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(f"{path}: not a WordTokenizer vocabulary")
        return cls(tokens[4:])


def _resize_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) bilinear interpolation matrix (align_corners=False); ``A @ img @ A.T``."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    mat = np.zeros((dst, src), np.float32)
    np.add.at(mat, (np.arange(dst), lo), 1 - (pos - lo))
    np.add.at(mat, (np.arange(dst), hi), pos - lo)
    return mat


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack dataset items into the batch contract, right-padding text to the batch maximum."""
    lengths = [len(item["input_ids"]) for item in batch]
    input_ids = torch.full((len(batch), max(lengths)), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for j, (item, n) in enumerate(zip(batch, lengths)):
        input_ids[j, :n] = item["input_ids"]
        attention_mask[j, :n] = 1
    out = {"pixel_values": torch.stack([item["pixel_values"] for item in batch])}
    if "pixel_values_2" in batch[0]:
        out["pixel_values_2"] = torch.stack([item["pixel_values_2"] for item in batch])
    out.update(input_ids=input_ids, attention_mask=attention_mask,
               labels=torch.stack([torch.as_tensor(item["labels"]) for item in batch]).long())
    return out


class DigitGridDataset(Dataset):
    """Digit-grid VQA (``variant="vqa"``) or NLVR2-like (``variant="nlvr2"``) examples.

    Grids, digit samples, jitter and questions are generated in ``__init__`` from ``seed``
    (deterministic; train and test draw from disjoint digit-sample pools, see
    :func:`digit_pools`); images are rendered on access. Items are dicts with
    ``pixel_values`` (3,H,W) float, ``pixel_values_2`` (nlvr2 only), ``input_ids`` (T,) long
    (unpadded) and ``labels`` () long; batch them with :attr:`collate_fn`.

    Args:
        split: ``"train"`` or ``"test"``.
        size: number of examples.
        seed: generation seed.
        variant: ``"vqa"`` or ``"nlvr2"``.
        grid: cells per side (2..9).
        cell: cell size in pixels, a multiple of 16 (each cell is one or more patches).
        digits_per_image: inclusive (min, max) number of digits per image.
        digit_scale: digit side as a fraction of the cell (the rest is jitter room).
        noise: std of the Gaussian background noise, in [0, 1] ink units.
        empty_fraction: probability that a position question asks about an empty cell.
        question_types: VQA question types to draw from (uniformly).
        tokenizer: a :class:`WordTokenizer` (default vocabulary if None).
    """

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, variant: str = "vqa",
                 grid: int = 4, cell: int = 16, digits_per_image: tuple[int, int] = (3, 6),
                 digit_scale: float = 0.75, noise: float = 0.05, empty_fraction: float = 0.15,
                 question_types: Sequence[str] = tuple(VQA_TEMPLATES),
                 tokenizer: WordTokenizer | None = None) -> None:
        lo, hi = digits_per_image
        if split not in _SPLITS or variant not in ("vqa", "nlvr2"):
            raise ValueError(f"split must be train/test and variant vqa/nlvr2, got {split!r}, {variant!r}")
        if not 2 <= grid <= 9 or cell % PATCH_SIZE or cell <= 0:
            raise ValueError(f"need 2 <= grid <= 9 and cell a multiple of {PATCH_SIZE}")
        if not 1 <= lo <= hi <= min(9, grid * grid) or set(question_types) - set(VQA_TEMPLATES):
            raise ValueError("bad digits_per_image or question_types")
        self.split, self.seed, self.variant, self.grid, self.cell = split, seed, variant, grid, cell
        self.noise, self.empty_fraction, self.question_types = noise, empty_fraction, tuple(question_types)
        self.tokenizer = tokenizer or WordTokenizer()
        self.image_size, self.patch_size = grid * cell, PATCH_SIZE
        self.answers = list(VQA_ANSWERS if variant == "vqa" else NLVR2_ANSWERS)
        self.num_labels = len(self.answers)
        self.pool = digit_pools()[split]
        targets = _load_digits()[1]
        by_class = [self.pool[targets[self.pool] == d] for d in range(10)]
        self.digit_size = int(np.clip(round(cell * digit_scale), 2, cell))
        self._resize = _resize_matrix(8, self.digit_size)

        views = 2 if variant == "nlvr2" else 1
        rng = np.random.default_rng([seed, _SPLITS[split], views])
        shape = (size, views, grid, grid)
        self.grids = np.full(shape, -1, np.int8)  # digit class per cell, -1 = empty
        self.samples = np.full(shape, -1, np.int32)  # sklearn sample index per cell
        self.offsets = rng.integers(0, cell - self.digit_size + 1, (*shape, 2)).astype(np.int16)
        self.questions: list[str] = []
        self.qtypes: list[str] = []
        self.relevant: list[list[_Cells]] = []  # per example, per view: cells
        self.labels = np.empty(size, np.int64)
        flips = {"existence": 0, "nlvr2": 0}  # alternate yes/no and true/false: exact balance
        for i in range(size):
            for v in range(views):
                k = rng.integers(lo, hi + 1)
                cells = rng.choice(grid * grid, k, replace=False)
                digits = rng.integers(0, 10, k)
                picks = [c[rng.integers(len(c))] for c in (by_class[d] for d in digits)]
                self.grids[i, v].flat[cells] = digits
                self.samples[i, v].flat[cells] = picks
            make = self._vqa_question if variant == "vqa" else self._nlvr2_statement
            text, qtype, answer, relevant = make(rng, self.grids[i], flips)
            self.questions.append(text)
            self.qtypes.append(qtype)
            self.relevant.append(relevant)
            self.labels[i] = self.answers.index(answer)
        self.input_ids = [torch.tensor(self.tokenizer.encode(q), dtype=torch.long) for q in self.questions]

    def _vqa_question(self, rng: np.random.Generator, grids: np.ndarray,
                      flips: dict[str, int]) -> _Example:
        grid = grids[0]
        qtype = self.question_types[rng.integers(len(self.question_types))]
        if qtype == "position":
            empty, full = np.argwhere(grid < 0), np.argwhere(grid >= 0)
            use_empty = len(empty) > 0 and rng.random() < self.empty_fraction
            r, c = (empty if use_empty else full)[rng.integers(len(empty) if use_empty else len(full))]
            answer = "none" if grid[r, c] < 0 else str(grid[r, c])
            return VQA_TEMPLATES[qtype].format(row=r + 1, col=c + 1), qtype, answer, [[(int(r), int(c))]]
        present = np.unique(grid[grid >= 0])
        absent = np.setdiff1d(np.arange(10), present)
        if qtype == "existence":
            want = flips["existence"] % 2 == 0
            flips["existence"] += 1
        else:  # count: mostly digits that are there, so answers are not mostly "0"
            want = rng.random() < 0.75
        choices = present if want else absent
        d = int(choices[rng.integers(len(choices))])
        count = int((grid == d).sum())
        answer = ("yes" if count else "no") if qtype == "existence" else str(count)
        cells = [(int(r), int(c)) for r, c in np.argwhere(grid == d)]
        return VQA_TEMPLATES[qtype].format(d=d), qtype, answer, [cells]

    def _nlvr2_statement(self, rng: np.random.Generator, grids: np.ndarray,
                         flips: dict[str, int]) -> _Example:
        want = flips["nlvr2"] % 2 == 1
        flips["nlvr2"] += 1
        counts = np.stack([np.bincount(g[g >= 0], minlength=10) for g in grids])
        side = int(rng.integers(2))
        a, b = counts[side], counts[1 - side]
        seen = (a + b) > 0  # false statements about digits absent everywhere are too easy
        for kind in rng.permutation(list(NLVR2_TEMPLATES)):  # "contains" always has candidates
            truth = {"more": a > b, "contains": a > 0, "both": (a > 0) & (b > 0), "neither": ~seen}[kind]
            ok = truth == want
            if not want and kind in ("more", "both"):
                ok &= seen
            if ok.any():
                break
        d = int(rng.choice(np.flatnonzero(ok)))
        names = ("left", "right")
        text = NLVR2_TEMPLATES[kind].format(d=d, side=names[side], other=names[1 - side])
        cells = [[(int(r), int(c)) for r, c in np.argwhere(g == d)] for g in grids]
        if kind == "contains":
            cells[1 - side] = []
        return text, str(kind), "true" if want else "false", cells

    def __len__(self) -> int:
        return len(self.labels)

    def render(self, i: int, view: int = 0) -> torch.Tensor:
        """Normalised (3,H,W) image of example ``i`` (``view`` 1 = right image for nlvr2)."""
        size, cell, d = self.image_size, self.cell, self.digit_size
        noise_rng = np.random.default_rng([self.seed, _SPLITS[self.split], i, view])
        img = noise_rng.normal(0.0, self.noise, (size, size)).astype(np.float32)
        images = _load_digits()[0]
        for r, c in np.argwhere(self.grids[i, view] >= 0):
            y, x = r * cell + self.offsets[i, view, r, c, 0], c * cell + self.offsets[i, view, r, c, 1]
            img[y:y + d, x:x + d] += self._resize @ images[self.samples[i, view, r, c]] @ self._resize.T
        img = (img - PIXEL_MEAN) / PIXEL_STD
        return torch.from_numpy(img).expand(3, size, size).clone()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.render(i, 0)}
        if self.variant == "nlvr2":
            item["pixel_values_2"] = self.render(i, 1)
        item.update(input_ids=self.input_ids[i], labels=torch.tensor(self.labels[i]))
        return item

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
        """:func:`collate` bound to this dataset's tokenizer's pad id (for a ``DataLoader``)."""
        return partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    def cell_patches(self, cells: Iterable[tuple[int, int]]) -> list[int]:
        """Row-major indices (no [CLS] offset) of the 16x16 patches covering grid ``cells``."""
        k, side = self.cell // PATCH_SIZE, self.image_size // PATCH_SIZE
        return sorted((r * k + dy) * side + c * k + dx
                      for r, c in cells for dy in range(k) for dx in range(k))

    def describe(self, i: int) -> dict[str, Any]:
        """Metadata of example ``i`` for visualisation and checks.

        Keys: ``question``, ``answer``, ``label``, ``qtype``, ``grid`` ((G,G) digit per cell,
        -1 empty), ``samples`` (sklearn indices), ``relevant_cells`` (cells the question is
        about), ``relevant_patches``; for nlvr2 also the same keys suffixed ``_2``.
        """
        out: dict[str, Any] = {"question": self.questions[i], "answer": self.answers[self.labels[i]],
                               "label": int(self.labels[i]), "qtype": self.qtypes[i]}
        for v, cells in enumerate(self.relevant[i]):
            sfx = "_2" if v else ""
            out.update({f"grid{sfx}": self.grids[i, v].copy(),
                        f"samples{sfx}": self.samples[i, v].copy(),
                        f"relevant_cells{sfx}": list(cells),
                        f"relevant_patches{sfx}": self.cell_patches(cells)})
        return out
