"""NoCaps (novel object captioning; registered dataset ``nocaps``, task ``captioning``): evaluation only.

The zero-shot protocol of BLIP and the SmartTrim paper's captioning study: a captioner fine-tuned on
COCO (``karpathy_caption``) captions the NoCaps validation images, scored against their human
captions (BLEU, CIDEr overall and per domain: ``cider_in_domain``, ``cider_near_domain``,
``cider_out_domain``).

File (https://nocaps.org/download): ``nocaps_val_4500_captions.json``, in the COCO captions format::

    {"images": [{"id": 0, "open_images_id": "0013ea2087020901", "file_name": "0013ea2087020901.jpg",
                 "domain": "in-domain", "height", "width", "coco_url", ...}],
     "annotations": [{"image_id": 0, "id": 0, "caption": "A baby is standing in front of a house."}]}

(``domain`` where the file has it); the images are ``{images}/{file_name}``. Defaults under ``root``:
``nocaps_{split}_4500_captions.json`` and ``{split}/`` (the layout of the download's ``coco_url``s).
The test split's file has no ``annotations`` (its captions are on the EvalAI server): it is refused.

Items are those of ``karpathy_caption``'s eval view: one per image, ``input_ids`` = BOS, the
``prompt`` (BLIP's ``"a picture of "``) and the image's first caption (cleaned as BLIP does) with
[SEP], ``labels`` the same ids with BOS and prompt set to -100, ``references`` (every raw caption),
``image_id`` (NoCaps' ``id``) and ``domain``. ``generation`` (default BLIP's NoCaps setting,
``{"repetition_penalty": 1.1}``) is read by a model that generates captions (BLIP) over the task's
decoding options. ``domain``: keep only images of that domain (or list of domains).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .common import (CLIP_MEAN, CLIP_STD, IGNORE_INDEX, ImageFileError, ImageLoader, encode_texts, load_tokenizer,
                     pad_collate, per_split, read_json, select)
from .karpathy import clean_caption

__all__ = ["NOCAPS_DOMAINS", "NoCapsCaptioning", "make_nocaps", "read_nocaps"]

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
BLIP_NOCAPS_GENERATION = {"repetition_penalty": 1.1}
"""What BLIP's ``eval_nocaps.py`` decodes with beyond its COCO settings (beam 3, 5 to 20 tokens)."""


def read_nocaps(path: str | Path) -> list[dict[str, Any]]:
    """The images of a NoCaps (COCO-captions format) file in file order: ``{"file", "image_id",
    "domain" (or None), "captions": [raw, ...]}``; an image without captions is an error."""
    data = read_json(path, "NoCaps annotations")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a NoCaps / COCO captions file (expected {{\"images\": [...], "
                         "\"annotations\": [...]}})")
    if not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: has no \"annotations\" (NoCaps' test split keeps its captions on the EvalAI "
                         "server): evaluate on the validation file, nocaps_val_4500_captions.json")
    captions: dict[Any, list[str]] = {}
    for n, ann in enumerate(data["annotations"]):
        try:
            captions.setdefault(ann["image_id"], []).append(str(ann["caption"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: annotations[{n}] lacks {err} (an annotation has image_id, caption)") from None
    out = []
    for n, img in enumerate(data["images"]):
        try:
            image_id, name = img["id"], img["file_name"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: images[{n}] lacks {err} (an image has id, file_name)") from None
        if image_id not in captions:
            raise ValueError(f"{path}: images[{n}] ({name}, id {image_id}) has no caption in \"annotations\"")
        out.append({"file": Path(name), "image_id": image_id, "domain": img.get("domain"),
                    "captions": captions[image_id]})
    if not out:
        raise ValueError(f"{path}: no images")
    return out


class NoCapsCaptioning(Dataset):
    """NoCaps images with their reference captions, for captioning evaluation (see the module docstring).

    Attributes as :class:`~trimkit_train.data.karpathy.KarpathyCaptioning`'s eval view:
    ``image_paths``, ``image_ids``, ``domains``, ``references``, ``captions``, ``input_ids``,
    ``prompt``, ``prompt_length``, ``bos_token_id``, ``tokenizer``, ``image_size``, ``patch_size``
    (None), ``num_labels`` (None), ``generation``, ``variant = "captioning"``, ``task = "captioning"``.
    """

    variant = "captioning"
    task = "captioning"
    num_labels = None
    patch_size = None

    def __init__(self, split: str = "val", size: int | None = None, seed: int = 0, *, root: str | None = None,
                 annotations: Any = None, images: Any = None, domain: str | Sequence[str] | None = None,
                 prompt: str = "a picture of ", bos_token_id: int | None = None, tokenizer: Any = None,
                 max_text_len: int = 40, max_words: int | None = 30, clean: bool = True, image_size: int = 288,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, crop: bool = False,
                 check_images: bool = False, generation: dict[str, Any] | None = None) -> None:
        if annotations is None and root is None:
            raise ValueError("nocaps: give `annotations` (nocaps_val_4500_captions.json) and `images`, or a `root` "
                             "holding them")
        ann = Path(per_split(annotations, split, "annotations")) if annotations is not None else \
            Path(root) / f"nocaps_{split}_4500_captions.json"
        img_root = Path(per_split(images, split, "images")) if images is not None else None
        if img_root is None:
            if root is None:
                raise ValueError("nocaps: give `images` (the folder of the split's images) or a `root`")
            img_root = Path(root) / split
        self.split, self.seed = split, seed
        self.tokenizer = load_tokenizer(tokenizer)
        self.images = ImageLoader(image_size, mean, std, crop)
        self.image_size = self.images.image_size
        self.generation = dict(BLIP_NOCAPS_GENERATION if generation is None else generation)
        recs = read_nocaps(ann)
        if domain is not None:
            wanted = {domain} if isinstance(domain, str) else set(domain)
            unknown = wanted - set(NOCAPS_DOMAINS)
            if unknown:
                raise ValueError(f"nocaps: unknown domain(s) {sorted(unknown)}; NoCaps has {list(NOCAPS_DOMAINS)}")
            recs = [r for r in recs if r["domain"] in wanted]
            if not recs:
                raise ValueError(f"nocaps: {ann} has no image of domain {sorted(wanted)} (images without a "
                                 "`domain` field never match)")
        recs = [recs[i] for i in select(len(recs), size, seed)]
        self.image_paths = [img_root / r["file"] for r in recs]
        self.image_ids = [r["image_id"] for r in recs]
        self.domains = [r["domain"] for r in recs]
        self.references = [list(r["captions"]) for r in recs]
        self.prompt = prompt
        self.captions = [clean_caption(r["captions"][0], max_words) if clean else r["captions"][0] for r in recs]
        prompt_ids = self.tokenizer(prompt, truncation=True, max_length=max_text_len)["input_ids"]
        self.prompt_length = len(prompt_ids) - (1 if prompt_ids[-1:] == [self.tokenizer.sep_token_id] else 0)
        self.input_ids = encode_texts(self.tokenizer, [prompt + c for c in self.captions], max_text_len)
        if self.input_ids[0][:self.prompt_length].tolist() != prompt_ids[:self.prompt_length]:
            raise ValueError(f"the tokenizer splits the prompt {prompt!r} differently inside a caption than alone; "
                             "use a WordPiece tokenizer such as BERT's, or another prompt")
        self.bos_token_id = bos_token_id
        if bos_token_id is not None:  # e.g. BLIP's [DEC] in place of the tokenizer's [CLS]
            self.input_ids.flat[self.input_ids.offsets[:-1]] = int(bos_token_id)
        if check_images:
            missing = [p for p in self.image_paths if not p.is_file()]
            if missing:
                raise ImageFileError(f"image file not found: {missing[0]} ({len(missing)} image files are missing)")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.input_ids[i]
        labels = ids.clone()
        labels[:self.prompt_length] = IGNORE_INDEX
        return {"pixel_values": self.images(self.image_paths[i]), "input_ids": ids, "labels": labels,
                "references": self.references[i], "image_id": self.image_ids[i], "domain": self.domains[i]}

    def prompt_ids(self) -> torch.Tensor:
        """The ids generation starts from: BOS and the prompt (``prompt_length`` tokens)."""
        return self.input_ids[0][:self.prompt_length].clone()

    @property
    def collate_fn(self):
        return partial(pad_collate, pad_token_id=self.tokenizer.pad_token_id or 0)


def make_nocaps(split: str = "val", size: int | None = None, seed: int = 0, **options: Any) -> NoCapsCaptioning:
    """The ``nocaps`` dataset factory (see :class:`NoCapsCaptioning`)."""
    return NoCapsCaptioning(split, size, seed, **options)


def _register() -> None:
    from ..trainer import register_dataset

    register_dataset("nocaps", make_nocaps)


_register()
