"""What the readers of the released task formats share: images, tokenizers, paths, subsets, batching.

* :func:`load_image`: PIL, converted to RGB, resized to a square ``image_size`` (bicubic; or the
  shorter side resized and the centre cropped), scaled to [0, 1] and normalised per channel with
  ``mean`` / ``std`` (CLIP's by default). A missing or unreadable file raises
  :class:`ImageFileError` naming the file.
* :func:`load_tokenizer`: ``AutoTokenizer.from_pretrained(path, local_files_only=True)`` (a local
  directory, or a name already in the Hugging Face cache: nothing is downloaded), or a tokenizer
  object passed through. The tokenizer must put its [CLS] / BOS token first (trimkit keeps text
  position 0).
* :class:`Ragged`: token ids of many texts in one flat array (``dataset.input_ids``; what
  :class:`trimkit.adapter.DatasetFacts` reads for the longest text).
* :func:`select`: the ``size`` rule shared by every reader: all examples in file order when ``size``
  is ``None`` or at least their number, else ``size`` of them drawn with ``numpy``'s
  ``default_rng(seed)`` and kept in file order.
* :func:`pad_collate`: the batch contract of ``docs/datasets.md`` for items with tensors of any
  label shape and metadata (non-tensor values become lists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IGNORE_INDEX", "ImageFileError", "ImageLoader", "Ragged", "load_image",
    "load_tokenizer", "pad_collate", "per_split", "read_json", "read_jsonl", "select", "encode_texts",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100
"""Label of a token position that is not scored (PyTorch's ``cross_entropy`` default)."""


class ImageFileError(FileNotFoundError):
    """An image file of a dataset that is missing or cannot be decoded; the message names the file."""


def load_image(path: str | Path, image_size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD, crop: bool = False) -> torch.Tensor:
    """A normalised ``(3, image_size, image_size)`` float tensor of the image file ``path``.

    ``crop=False``: the whole image resized to a square (bicubic); ``crop=True``: the shorter side
    resized to ``image_size`` and the centre cropped (CLIP's and METER's evaluation transform).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if crop:
                w, h = img.size
                scale = image_size / min(w, h)
                nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - image_size) // 2, (nh - image_size) // 2
                img = img.crop((left, top, left + image_size, top + image_size))
            else:
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ImageFileError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise ImageFileError(f"image file not found: {path} is a directory") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageFileError(f"cannot read image file {path}: {type(err).__name__}: {err}") from None
    x = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((x - m) / s).contiguous()


class ImageLoader:
    """:func:`load_image` with fixed options (``image_size``, ``mean``, ``std``, ``crop``)."""

    def __init__(self, image_size: int = 288, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 crop: bool = False) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values (std positive), got {mean!r}, {std!r}")
        self.image_size, self.mean, self.std, self.crop = int(image_size), tuple(mean), tuple(std), bool(crop)

    def __call__(self, path: str | Path) -> torch.Tensor:
        return load_image(path, self.image_size, self.mean, self.std, self.crop)


def load_tokenizer(tokenizer: Any) -> Any:
    """A Hugging Face tokenizer: ``tokenizer`` is a local directory or a cached model name (loaded with
    ``AutoTokenizer.from_pretrained(..., local_files_only=True)``), or a tokenizer object (returned)."""
    if tokenizer is None:
        raise ValueError("option `tokenizer` is required: a local tokenizer directory (e.g. a saved "
                         "bert-base-uncased or roberta-base tokenizer) or a name in the Hugging Face cache")
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer {str(tokenizer)!r} (a local directory or a name in the "
                         f"Hugging Face cache; nothing is downloaded): {err}") from None


def first_token_ids(tokenizer: Any) -> set[int]:
    """The ids a text may start with: the tokenizer's [CLS] and BOS tokens (those it has)."""
    return {i for i in (getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "bos_token_id", None))
            if i is not None}


class Ragged:
    """Variable-length int sequences in one flat array: ``len``, ``[i]`` (a long tensor), iteration."""

    def __init__(self, sequences: Iterable[Sequence[int]]) -> None:
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return torch.from_numpy(self.flat[self.offsets[i]:self.offsets[i + 1]].copy())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_text_len: int) -> Ragged:
    """Token ids of ``texts`` (special tokens added, truncated to ``max_text_len``), checked to start
    with the tokenizer's [CLS]/BOS token."""
    if int(max_text_len) < 2:
        raise ValueError(f"max_text_len must be at least 2 ([CLS] and one token), got {max_text_len!r}")
    ids: list[list[int]] = []
    for start in range(0, len(texts), 4096):
        enc = tokenizer(list(texts[start:start + 4096]), truncation=True, max_length=int(max_text_len))
        ids.extend(enc["input_ids"])
    firsts = first_token_ids(tokenizer)
    if ids and (not firsts or ids[0][0] not in firsts):
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} does not start texts with a [CLS]/BOS token "
                         f"(first id {ids[0][0] if ids[0] else None}, its cls/bos ids {sorted(firsts)}): trimkit keeps "
                         "text position 0 as the [CLS] token; use a BERT/RoBERTa-style tokenizer")
    return Ragged(ids)


def per_split(value: Any, split: str, what: str) -> Any:
    """``value`` for ``split``: a mapping ``{split: value}`` is indexed (a missing split is an error
    naming ``what``), a string gets ``{split}`` filled in, anything else is returned as is."""
    if isinstance(value, Mapping):
        if split not in value:
            raise ValueError(f"option {what!r} has no entry for split {split!r} (it has {sorted(value)})")
        return value[split]
    if isinstance(value, str) and "{split}" in value:
        return value.replace("{split}", split)
    return value


def read_json(path: str | Path, what: str) -> Any:
    import json

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except ValueError as err:
        raise ValueError(f"{path}: not a valid JSON {what} file: {err}") from None


def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    """One JSON object per non-empty line (NLVR2's ``*.json`` and SNLI-VE's ``*.jsonl``)."""
    import json

    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"{path}:{n}: not a JSON line of the {what} file: {err}") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    return rows


def select(n: int, size: int | None, seed: int) -> np.ndarray:
    """Indices of the examples a reader keeps out of ``n`` (see the module docstring)."""
    if size is not None and int(size) <= 0:
        raise ValueError(f"size must be positive or None, got {size!r}")
    if size is None or int(size) >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:int(size)])


def pad_collate(batch: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Stack items into one batch dict.

    ``input_ids`` (1-D, unpadded) are right-padded with ``pad_token_id`` and get an
    ``attention_mask``; 1-D long ``labels`` of the same length as ``input_ids`` (token labels) are
    padded with :data:`IGNORE_INDEX`; every other tensor is stacked (same shapes); other values are
    collected into lists (metadata such as references or ids).
    """
    if not batch:
        raise ValueError("pad_collate: empty batch")
    out: dict[str, Any] = {}
    lengths = [len(item["input_ids"]) for item in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, (item, n) in enumerate(zip(batch, lengths)):
        ids[j, :n] = item["input_ids"]
        mask[j, :n] = 1
    for key in batch[0]:
        if key in ("input_ids", "attention_mask"):
            continue
        values = [item[key] for item in batch]
        if key == "labels" and isinstance(values[0], torch.Tensor) and values[0].dim() == 1 \
                and not values[0].is_floating_point():  # token labels, aligned with input_ids
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for j, v in enumerate(values):
                labels[j, :len(v)] = v
            out[key] = labels
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    out["input_ids"], out["attention_mask"] = ids, mask
    # the documented key order: images, text, labels, then metadata
    order = ["pixel_values", "pixel_values_2", "input_ids", "attention_mask", "labels"]
    return {k: out[k] for k in [*[k for k in order if k in out], *[k for k in out if k not in order]]}
