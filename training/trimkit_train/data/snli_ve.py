"""SNLI-VE in its released format (registered dataset ``snli_ve``; task ``snli_ve``).

Files (https://github.com/necla-ml/SNLI-VE): ``snli_ve_{train,dev,test}.jsonl``, one JSON object per
line with ``Flickr30K_ID`` (the premise image, ``{Flickr30K_ID}.jpg`` among the Flickr30k images),
``sentence2`` (the hypothesis; ``sentence1`` is the caption the image stands in for and is not
used), ``gold_label`` (``entailment`` / ``neutral`` / ``contradiction``).

Paths: ``annotations`` (a file, a path with ``{split}``, or ``{split: path}``; default
``{root}/snli_ve_{split}.jsonl``), ``images`` (the Flickr30k image directory; default
``{root}/Flickr30K/images``, METER's layout). Labels as METER: contradiction 0, neutral 1,
entailment 2 (:data:`SNLI_VE_LABELS`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import (CLIP_MEAN, CLIP_STD, ImageFileError, ImageLoader, encode_texts, load_tokenizer, pad_collate,
                     per_split, read_jsonl, select)

__all__ = ["SNLI_VE_LABELS", "SNLIVEDataset", "make_snli_ve"]

SNLI_VE_LABELS = ("contradiction", "neutral", "entailment")
"""Class names by label index (METER's order)."""


class SNLIVEDataset(Dataset):
    """SNLI-VE (image premise, text hypothesis, three classes).

    Items: ``pixel_values``, ``input_ids``, ``labels`` (long), ``pair_id`` (the record's ``pairID``
    when present). Attributes: ``hypotheses``, ``image_ids``, ``labels``, ``input_ids``,
    ``tokenizer``, ``image_size``, ``patch_size`` (None), ``num_labels = 3``, ``answers``
    (:data:`SNLI_VE_LABELS`), ``variant = "snli_ve"``, ``task = "snli_ve"``.
    """

    variant = "snli_ve"
    task = "snli_ve"
    patch_size = None
    num_labels = 3
    answers = SNLI_VE_LABELS

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, *, root: str | None = None,
                 annotations: Any = None, images: Any = None, image_template: str = "{image_id}.jpg",
                 text_field: str = "sentence2", tokenizer: Any = None, max_text_len: int = 40, image_size: int = 288,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, crop: bool = False,
                 check_images: bool = False) -> None:
        self.split = split
        self.tokenizer = load_tokenizer(tokenizer)
        self.images = ImageLoader(image_size, mean, std, crop)
        self.image_size = self.images.image_size
        path = per_split(annotations, split, "annotations") if annotations is not None else None
        if path is None:
            if root is None:
                raise ValueError("snli_ve: give `annotations` (the split's .jsonl file) or `root`")
            path = Path(root) / f"snli_ve_{split}.jsonl"
        image_dir = per_split(images, split, "images") if images is not None else None
        if image_dir is None:
            if root is None:
                raise ValueError("snli_ve: give `images` (the Flickr30k image directory) or `root`")
            image_dir = Path(root) / "Flickr30K" / "images"
        rows = read_jsonl(path, "SNLI-VE")
        keep = select(len(rows), size, seed)
        self.hypotheses: list[str] = []
        self.image_ids: list[str] = []
        self.pair_ids: list[Any] = []
        labels = []
        for i in keep:
            row = rows[i]
            try:
                image_id, text, gold = str(row["Flickr30K_ID"]), str(row[text_field]), str(row["gold_label"])
            except KeyError as err:
                raise ValueError(f"{path}: line {i + 1}: no field {err}") from None
            if gold not in SNLI_VE_LABELS:
                raise ValueError(f"{path}: line {i + 1}: gold_label {gold!r} is not one of {SNLI_VE_LABELS}")
            self.hypotheses.append(text)
            self.image_ids.append(image_id)
            self.pair_ids.append(row.get("pairID"))
            labels.append(SNLI_VE_LABELS.index(gold))
        self.image_paths = [Path(image_dir) / image_template.format(image_id=iid) for iid in self.image_ids]
        self.labels = np.array(labels, dtype=np.int64)
        self.input_ids = encode_texts(self.tokenizer, self.hypotheses, max_text_len)
        if check_images:
            missing = [p for p in dict.fromkeys(self.image_paths) if not p.is_file()]
            if missing:
                raise ImageFileError(f"image file not found: {missing[0]} ({len(missing)} image files are missing)")

    def __len__(self) -> int:
        return len(self.hypotheses)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.images(self.image_paths[i]), "input_ids": self.input_ids[i],
                "labels": torch.tensor(self.labels[i]), "pair_id": self.pair_ids[i]}

    @property
    def collate_fn(self):
        return partial(pad_collate, pad_token_id=self.tokenizer.pad_token_id or 0)


def make_snli_ve(split: str, size: int | None = None, seed: int = 0, **options: Any) -> SNLIVEDataset:
    """The ``snli_ve`` dataset factory (see :class:`SNLIVEDataset` for the options)."""
    return SNLIVEDataset(split, size, seed, **options)


def _register() -> None:
    from ..trainer import register_dataset

    register_dataset("snli_ve", make_snli_ve)


_register()
