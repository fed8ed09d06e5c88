"""NLVR2 in its released format (registered dataset ``nlvr2``; task ``nlvr2``).

Files (https://lil.nlp.cornell.edu/nlvr/, repository lil-lab/nlvr): one JSON object per line in
``{train,dev,test1}.json`` (also ``balanced/`` and ``unbalanced/`` variants), each with
``identifier`` (``"dev-850-0-0"``), ``sentence``, ``label`` (``"True"`` / ``"False"``) and, in
train, ``directory`` (the image sub-directory 0..99). The two images of a statement are
``{prefix}-img0.png`` and ``{prefix}-img1.png``, ``prefix`` being the identifier without its last
``-N`` (``"dev-850-0"``).

Paths: ``annotations`` (a file, a path with ``{split}``, or ``{split: path}``; default
``{root}/data/{split}.json``) and ``images`` (the directory that holds the split's images; default
METER's layout under ``root``: ``images/train`` for identifiers starting with ``train``, else the
identifier's split, e.g. ``dev``). ``image_template`` names a file inside ``images``: default
``"{directory}/{prefix}-img{n}.png"`` for records with a ``directory`` (train) and
``"{prefix}-img{n}.png"`` otherwise.

Items: ``pixel_values`` (left image), ``pixel_values_2`` (right image), ``input_ids``, ``labels``
(long: 1 for ``"True"``, 0 for ``"False"``), ``identifier``.
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

__all__ = ["NLVR2Dataset", "make_nlvr2", "nlvr2_label", "nlvr2_prefix"]


def nlvr2_prefix(identifier: str) -> str:
    """The image-pair prefix of a statement: its identifier without the last ``-N``."""
    head, sep, _ = identifier.rpartition("-")
    if not sep or not head:
        raise ValueError(f"not an NLVR2 identifier (split-set-pair-statement): {identifier!r}")
    return head


def nlvr2_label(value: Any) -> int:
    """1 for ``"True"`` (also ``true``/``True``), 0 for ``"False"``."""
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"NLVR2 label must be 'True' or 'False', got {value!r}")
    return int(text == "true")


class NLVR2Dataset(Dataset):
    """NLVR2 statements about image pairs (two images, true/false).

    Attributes: ``sentences``, ``identifiers``, ``labels``, ``input_ids``, ``tokenizer``,
    ``image_size``, ``patch_size`` (None), ``num_labels = 2``, ``variant = "nlvr2"``,
    ``task = "nlvr2"``.
    """

    variant = "nlvr2"
    task = "nlvr2"
    patch_size = None
    num_labels = 2

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, *, root: str | None = None,
                 annotations: Any = None, images: Any = None, image_template: str | None = None,
                 tokenizer: Any = None, max_text_len: int = 40, image_size: int = 288,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, crop: bool = False,
                 check_images: bool = False) -> None:
        self.split = split
        self.tokenizer = load_tokenizer(tokenizer)
        self.images = ImageLoader(image_size, mean, std, crop)
        self.image_size = self.images.image_size
        path = per_split(annotations, split, "annotations") if annotations is not None else None
        if path is None:
            if root is None:
                raise ValueError("nlvr2: give `annotations` (the split's .json lines file) or `root`")
            path = Path(root) / "data" / f"{split}.json"
        image_dir = per_split(images, split, "images") if images is not None else None
        if image_dir is None and root is None:
            raise ValueError("nlvr2: give `images` (the directory of the split's images) or `root`")
        rows = read_jsonl(path, "NLVR2")
        keep = select(len(rows), size, seed)
        self.sentences: list[str] = []
        self.identifiers: list[str] = []
        self.image_paths: list[tuple[Path, Path]] = []
        labels = []
        for i in keep:
            row = rows[i]
            try:
                ident, sentence = str(row["identifier"]), str(row["sentence"])
                label = nlvr2_label(row["label"])
            except (KeyError, ValueError) as err:
                raise ValueError(f"{path}: line {i + 1}: {err}") from None
            prefix = nlvr2_prefix(ident)
            folder = Path(image_dir) if image_dir is not None else \
                Path(root) / ("images/train" if ident.startswith("train") else ident.split("-")[0])
            template = image_template or ("{directory}/{prefix}-img{n}.png" if "directory" in row
                                          else "{prefix}-img{n}.png")
            self.image_paths.append(tuple(folder / template.format(prefix=prefix, n=n, directory=row.get("directory"),
                                                                   identifier=ident) for n in (0, 1)))
            self.sentences.append(sentence)
            self.identifiers.append(ident)
            labels.append(label)
        self.labels = np.array(labels, dtype=np.int64)
        self.input_ids = encode_texts(self.tokenizer, self.sentences, max_text_len)
        if check_images:
            missing = [p for pair in self.image_paths for p in pair if not p.is_file()]
            if missing:
                raise ImageFileError(f"image file not found: {missing[0]} ({len(missing)} image files are missing)")

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int) -> dict[str, Any]:
        left, right = self.image_paths[i]
        return {"pixel_values": self.images(left), "pixel_values_2": self.images(right),
                "input_ids": self.input_ids[i], "labels": torch.tensor(self.labels[i]),
                "identifier": self.identifiers[i]}

    @property
    def collate_fn(self):
        return partial(pad_collate, pad_token_id=self.tokenizer.pad_token_id or 0)


def make_nlvr2(split: str, size: int | None = None, seed: int = 0, **options: Any) -> NLVR2Dataset:
    """The ``nlvr2`` dataset factory (see :class:`NLVR2Dataset` for the options)."""
    return NLVR2Dataset(split, size, seed, **options)


def _register() -> None:
    from ..trainer import register_dataset

    register_dataset("nlvr2", make_nlvr2)


_register()
