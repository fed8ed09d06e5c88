"""Flickr30k and COCO in Karpathy's split files: image-text retrieval and captioning.

Registered datasets ``karpathy_retrieval`` (task ``retrieval``), ``karpathy_caption`` (task
``captioning``) and ``karpathy`` (option ``mode``: ``"retrieval"`` or ``"captioning"``).

Files: ``dataset_flickr30k.json`` / ``dataset_coco.json`` (Karpathy & Fei-Fei 2015):
``{"images": [{"filename", ["filepath"], "split", "sentences": [{"raw", "tokens", ...}], ...}]}``;
``split`` is ``train``, ``val``, ``test`` or (COCO) ``restval``, which joins ``train`` unless
``restval=False`` (the usual 113k/29k training images of COCO/Flickr30k). An image file is
``{images}/{filepath}/{filename}`` (COCO: ``val2014/COCO_val2014_....jpg``) or
``{images}/{filename}`` (Flickr30k). ``annotations`` is the JSON file (one file for every split),
``images`` the image root.

Views (``view``; default ``"train"`` for the split ``train``, else ``"eval"``):

* retrieval, train: ITM pairs. Every caption gives one positive item (its image, label 1) followed
  by ``negatives`` negative items (the same caption with another image of the split drawn from
  ``numpy``'s ``default_rng([seed, item])``, label 0): deterministic per item;
* retrieval, eval: every (image, text) pair of the split, image-major: item ``k`` is image
  ``k // num_texts`` with text ``k % num_texts`` (label 1 where the text describes the image; items
  carry ``image_index`` and ``text_index``). The full lists are attributes: ``image_paths``,
  ``texts``, ``text_to_image``, ``image_to_texts``; :func:`trimkit_train.tasks.evaluate_retrieval`
  ranks them with a score function without going through the pairs one by one;
* captioning, train: one item per caption; ``input_ids`` = BOS, the ``prompt`` (BLIP's
  ``"a picture of "``), the caption, [SEP]; ``labels`` the same ids with the BOS and prompt
  positions set to -100 (token labels aligned with ``input_ids``: position ``t`` is predicted from
  the positions before it);
* captioning, eval: one item per image, the first caption as the teacher-forced target and
  ``references`` (every raw caption) and ``image_id`` for BLEU / CIDEr.

``size`` counts captions (retrieval train, before negatives are added; captioning train) or images
(eval views): a seeded draw kept in file order (:func:`~trimkit_train.data.common.select`).
Captions are cleaned as BLIP does (lower case, ``.!"()*#:;~`` to spaces, at most ``max_words``
words) unless ``clean=False``.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import (CLIP_MEAN, CLIP_STD, IGNORE_INDEX, ImageFileError, ImageLoader, encode_texts, load_tokenizer,
                     pad_collate, read_json, select)

__all__ = ["KarpathyCaptioning", "KarpathyRetrieval", "clean_caption", "make_karpathy",
           "make_karpathy_caption", "make_karpathy_retrieval", "read_karpathy"]

_CAPTION_PUNCT = re.compile(r"[.!\"()*#:;~]")


def clean_caption(text: str, max_words: int | None = 30) -> str:
    """BLIP's caption cleaning: lower case, ``.!"()*#:;~`` to spaces, single spaces, stripped, the
    first ``max_words`` words."""
    words = _CAPTION_PUNCT.sub(" ", text.lower()).split()
    return " ".join(words if max_words is None else words[:max_words])


def read_karpathy(path: str | Path, split: str, restval: bool = True) -> list[dict[str, Any]]:
    """The images of ``split`` (``+`` joins splits) in a Karpathy split file, in file order:
    ``{"file": relative path, "image_id", "captions": [raw, ...]}``."""
    data = read_json(path, "Karpathy split")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy split file (expected {{\"images\": [...]}})")
    wanted = set(split.split("+"))
    if restval and "train" in wanted:
        wanted.add("restval")
    out = []
    for n, img in enumerate(data["images"]):
        try:
            if img["split"] not in wanted:
                continue
            rel = Path(img.get("filepath") or "") / img["filename"]
            captions = [str(s["raw"]) for s in img["sentences"]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: images[{n}] lacks {err} (a Karpathy image has filename, split, "
                             "sentences[].raw)") from None
        if not captions:
            raise ValueError(f"{path}: images[{n}] ({rel}) has no sentences")
        image_id = img.get("cocoid", img.get("imgid", Path(img["filename"]).stem))
        out.append({"file": rel, "image_id": image_id, "captions": captions})
    if not out:
        splits = sorted({str(i.get("split")) for i in data["images"]})
        raise ValueError(f"{path}: no image of split {split!r} (its splits: {splits})")
    return out


class _Karpathy(Dataset):
    patch_size = None

    def __init__(self, split: str, size: int | None, seed: int, *, annotations: str | None, images: str | None,
                 view: str | None, restval: bool, tokenizer: Any, max_text_len: int, max_words: int | None,
                 clean: bool, image_size: int, mean: Sequence[float], std: Sequence[float], crop: bool,
                 check_images: bool) -> None:
        if annotations is None or images is None:
            raise ValueError(f"{type(self).__name__}: give `annotations` (dataset_flickr30k.json or dataset_coco.json) "
                             "and `images` (the image root)")
        self.split, self.seed = split, seed
        self.view = view or ("train" if split == "train" else "eval")
        if self.view not in ("train", "eval"):
            raise ValueError(f"view must be 'train' or 'eval', got {view!r}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.images = ImageLoader(image_size, mean, std, crop)
        self.image_size = self.images.image_size
        self.max_text_len = max_text_len
        self.clean, self.max_words = bool(clean), max_words
        self._records = read_karpathy(annotations, split, restval)
        self._root = Path(images)
        self._cache: tuple[int, torch.Tensor] | None = None
        self._check = check_images

    def _clean(self, text: str) -> str:
        return clean_caption(text, self.max_words) if self.clean else text

    def _check_images(self) -> None:
        if self._check:
            missing = [p for p in self.image_paths if not p.is_file()]
            if missing:
                raise ImageFileError(f"image file not found: {missing[0]} ({len(missing)} image files are missing)")

    def image(self, i: int) -> torch.Tensor:
        """The normalised image ``i`` of :attr:`image_paths` (the last one is cached)."""
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, self.images(self.image_paths[i]))
        return self._cache[1]

    @property
    def collate_fn(self):
        return partial(pad_collate, pad_token_id=self.tokenizer.pad_token_id or 0)


class KarpathyRetrieval(_Karpathy):
    """Image-text retrieval on a Karpathy split (see the module docstring for the two views).

    Attributes: ``image_paths``, ``image_ids``, ``texts``, ``text_to_image`` (image index of every
    text), ``image_to_texts``, ``input_ids`` (of ``texts``), ``num_images``, ``num_texts``,
    ``tokenizer``, ``image_size``, ``patch_size`` (None), ``num_labels = 2`` (ITM classes),
    ``variant = "itm"``, ``task = "retrieval"``.
    """

    variant = "itm"
    task = "retrieval"
    num_labels = 2

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, *, annotations: str | None = None,
                 images: str | None = None, view: Literal["train", "eval"] | None = None, negatives: int = 1,
                 restval: bool = True, tokenizer: Any = None, max_text_len: int = 40, max_words: int | None = 30,
                 clean: bool = True, image_size: int = 288, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, crop: bool = False, check_images: bool = False) -> None:
        super().__init__(split, size, seed, annotations=annotations, images=images, view=view, restval=restval,
                         tokenizer=tokenizer, max_text_len=max_text_len, max_words=max_words, clean=clean,
                         image_size=image_size, mean=mean, std=std, crop=crop, check_images=check_images)
        if int(negatives) < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives!r}")
        self.negatives = int(negatives)
        recs = self._records
        if self.view == "eval":
            recs = [recs[i] for i in select(len(recs), size, seed)]
        self.image_paths = [self._root / r["file"] for r in recs]
        self.image_ids = [r["image_id"] for r in recs]
        pairs = [(i, c) for i, r in enumerate(recs) for c in r["captions"]]
        if self.view == "train":
            pairs = [pairs[j] for j in select(len(pairs), size, seed)]
            used = sorted({i for i, _ in pairs})  # keep only the images of the kept captions
            remap = {old: new for new, old in enumerate(used)}
            self.image_paths = [self.image_paths[i] for i in used]
            self.image_ids = [self.image_ids[i] for i in used]
            pairs = [(remap[i], c) for i, c in pairs]
            if self.negatives and len(used) < 2:
                raise ValueError("retrieval training with negatives needs at least 2 images")
        self.texts = [self._clean(c) for _, c in pairs]
        self.text_to_image = np.array([i for i, _ in pairs], dtype=np.int64)
        self.image_to_texts = [[] for _ in self.image_paths]
        for t, i in enumerate(self.text_to_image):
            self.image_to_texts[i].append(t)
        self.num_images, self.num_texts = len(self.image_paths), len(self.texts)
        self.input_ids = encode_texts(self.tokenizer, self.texts, max_text_len)
        self._check_images()

    def __len__(self) -> int:
        if self.view == "eval":
            return self.num_images * self.num_texts
        return self.num_texts * (1 + self.negatives)

    def pair(self, k: int) -> tuple[int, int]:
        """``(image index, text index)`` of item ``k``."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        if self.view == "eval":
            return divmod(k, self.num_texts)
        t, r = divmod(k, 1 + self.negatives)
        own = int(self.text_to_image[t])
        if r == 0:
            return own, t
        other = int(np.random.default_rng([self.seed, k]).integers(self.num_images - 1))
        return (other + (other >= own)), t  # uniform over the other images

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, t = self.pair(k)
        return {"pixel_values": self.image(i), "input_ids": self.input_ids[t],
                "labels": torch.tensor(int(self.text_to_image[t] == i)), "image_index": i, "text_index": t}


class KarpathyCaptioning(_Karpathy):
    """Captioning on a Karpathy split (see the module docstring for the two views).

    Attributes: ``image_paths``, ``image_ids``, ``references`` (raw captions per image),
    ``captions`` (the cleaned target caption of each item), ``input_ids``, ``prompt``,
    ``prompt_length`` (tokens of BOS + prompt, the positions not scored), ``bos_token_id``,
    ``tokenizer``, ``image_size``, ``patch_size`` (None), ``num_labels`` (None),
    ``variant = "captioning"``, ``task = "captioning"``.
    """

    variant = "captioning"
    task = "captioning"
    num_labels = None

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, *, annotations: str | None = None,
                 images: str | None = None, view: Literal["train", "eval"] | None = None,
                 prompt: str = "a picture of ", bos_token_id: int | None = None, restval: bool = True,
                 tokenizer: Any = None, max_text_len: int = 40, max_words: int | None = 30, clean: bool = True,
                 image_size: int = 288, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 crop: bool = False, check_images: bool = False) -> None:
        super().__init__(split, size, seed, annotations=annotations, images=images, view=view, restval=restval,
                         tokenizer=tokenizer, max_text_len=max_text_len, max_words=max_words, clean=clean,
                         image_size=image_size, mean=mean, std=std, crop=crop, check_images=check_images)
        recs = self._records
        if self.view == "eval":
            recs = [recs[i] for i in select(len(recs), size, seed)]
            items = [(i, r["captions"][0]) for i, r in enumerate(recs)]
        else:
            items = [(i, c) for i, r in enumerate(recs) for c in r["captions"]]
            items = [items[j] for j in select(len(items), size, seed)]
            used = sorted({i for i, _ in items})
            remap = {old: new for new, old in enumerate(used)}
            recs = [recs[i] for i in used]
            items = [(remap[i], c) for i, c in items]
        self.image_paths = [self._root / r["file"] for r in recs]
        self.image_ids = [r["image_id"] for r in recs]
        self.references = [list(r["captions"]) for r in recs]
        self.item_image = np.array([i for i, _ in items], dtype=np.int64)
        self.prompt = prompt
        self.captions = [self._clean(c) for _, c in items]
        # prompt + caption in one text: the prompt's tokens are the first ones after BOS
        prompt_ids = self.tokenizer(prompt, truncation=True, max_length=max_text_len)["input_ids"]
        self.prompt_length = len(prompt_ids) - (1 if prompt_ids[-1:] == [self.tokenizer.sep_token_id] else 0)
        self.input_ids = encode_texts(self.tokenizer, [prompt + c for c in self.captions], max_text_len)
        if len(self.captions) and self.input_ids[0][:self.prompt_length].tolist() != prompt_ids[:self.prompt_length]:
            raise ValueError(f"the tokenizer splits the prompt {prompt!r} differently inside a caption than alone; "
                             "the prompt positions cannot be found (use a WordPiece tokenizer such as BERT's, or "
                             "another prompt)")
        self.bos_token_id = bos_token_id
        if bos_token_id is not None:  # e.g. BLIP's [DEC] in place of the tokenizer's [CLS]
            self.input_ids.flat[self.input_ids.offsets[:-1]] = int(bos_token_id)
        self._check_images()

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.item_image[k])
        ids = self.input_ids[k]
        labels = ids.clone()
        labels[:self.prompt_length] = IGNORE_INDEX
        item = {"pixel_values": self.image(i), "input_ids": ids, "labels": labels, "image_id": self.image_ids[i]}
        if self.view == "eval":
            item["references"] = self.references[i]
        return item

    def prompt_ids(self) -> torch.Tensor:
        """The ids generation starts from: BOS and the prompt (``prompt_length`` tokens)."""
        return self.input_ids[0][:self.prompt_length].clone() if len(self) else torch.zeros(0, dtype=torch.long)


def make_karpathy_retrieval(split: str, size: int | None = None, seed: int = 0, **options: Any) -> KarpathyRetrieval:
    """The ``karpathy_retrieval`` dataset factory (see :class:`KarpathyRetrieval`)."""
    return KarpathyRetrieval(split, size, seed, **options)


def make_karpathy_caption(split: str, size: int | None = None, seed: int = 0, **options: Any) -> KarpathyCaptioning:
    """The ``karpathy_caption`` dataset factory (see :class:`KarpathyCaptioning`)."""
    return KarpathyCaptioning(split, size, seed, **options)


def make_karpathy(split: str, size: int | None = None, seed: int = 0, mode: str = "retrieval",
                  **options: Any) -> KarpathyRetrieval | KarpathyCaptioning:
    """The ``karpathy`` dataset factory: ``mode="retrieval"`` or ``"captioning"``."""
    if mode == "retrieval":
        return KarpathyRetrieval(split, size, seed, **options)
    if mode in ("captioning", "caption"):
        return KarpathyCaptioning(split, size, seed, **options)
    raise ValueError(f"karpathy: mode must be 'retrieval' or 'captioning', got {mode!r}")


def _register() -> None:
    from ..trainer import register_dataset

    register_dataset("karpathy", make_karpathy)
    register_dataset("karpathy_retrieval", make_karpathy_retrieval)
    register_dataset("karpathy_caption", make_karpathy_caption)


_register()
