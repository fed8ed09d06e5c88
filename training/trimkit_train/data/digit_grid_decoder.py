"""Digit-grid VQA rendered for a decoder VLM (LLaVA-style): registered as ``digit_grid_decoder``.

The images and questions are :class:`~trimkit_train.data.digit_grid.DigitGridDataset`'s (variant
``vqa``, same seeds, same answers); only the text side changes. Each item is one decoder row

    [BOS] [<image> x image_tokens] [question words ... ?]

with right padding in a batch, and the answer (one word: a digit, ``none``, ``yes`` or ``no``, one
token each) is the **next token after the question**: the LM target of the question's last
position. The answer is not in the input. Why: trimkit's decoder layout summarises the question by
its *last real token* (the cross-modal signal the image tokens' trimmers read, see
``trimkit_llava``); were the answer in the row, that token would be an answer token, so in training
the image tokens' keep decisions would read the answer (a leak, and a different signal from
inference, where the prefill ends at the question). With the answer as the next-token target of the
question's last token, training, evaluation and greedy generation read the same prefill.

Batch contract (:func:`decoder_collate`): ``pixel_values`` (B, 3, H, W); ``input_ids``,
``attention_mask`` (B, N) (1 on real tokens, right padding); ``segment_starts`` (B, 3) long, the
starts of the ``prompt`` / ``image`` / ``question`` segments (``[0, 1, 1 + image_tokens]``: the
prompt is the BOS token); ``labels`` (B, N) long **next-token targets**: ``labels[b, t]`` is the
token the logits at position ``t`` should predict, ``IGNORE_INDEX`` (-100) where nothing is scored:
everywhere except each row's last real token, which holds the answer (task ``decoder_vqa``).

Tokenizer: a :class:`DecoderWordTokenizer` over the templates' words, the answers and ``<image>``,
with ``[CLS]`` as BOS (id 1), ``[SEP]`` as EOS (id 2) and ``[PAD]`` 0. With ``vocab_file`` the
dataset writes its vocabulary there (JSON, :meth:`WordTokenizer.save`) when the file does not exist
and builds the tokenizer from the file, so another process (an evaluation) reads the same ids.
The adapter maps the dataset's facts to a model that fits (``trimkit_llava``'s ``dataset_overrides``:
image and patch size, vocabulary, special ids, ``image_token_id``, positions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .common import IGNORE_INDEX
from .digit_grid import PATCH_SIZE, VQA_ANSWERS, DigitGridDataset, WordTokenizer, default_vocabulary

__all__ = ["IMAGE_TOKEN", "DecoderWordTokenizer", "DigitGridDecoderDataset", "decoder_collate",
           "decoder_vocabulary", "make_digit_grid_decoder"]

IMAGE_TOKEN = "<image>"
"""The image placeholder's token (one per image token, as LLaVA's processor expands ``<image>``)."""


def decoder_vocabulary() -> list[str]:
    """The template words, the answers and the image placeholder (sorted words, then ``<image>``)."""
    return sorted(set(default_vocabulary()) | set(VQA_ANSWERS)) + [IMAGE_TOKEN]


class DecoderWordTokenizer(WordTokenizer):
    """A :class:`WordTokenizer` for a decoder: ``[CLS]`` is its BOS, ``[SEP]`` its EOS, and
    ``image_token_id`` is ``<image>``'s id. ``encode`` adds only BOS (a decoder prompt does not end
    with EOS)."""

    def __init__(self, words: Sequence[str] | None = None) -> None:
        words = decoder_vocabulary() if words is None else list(words)
        if IMAGE_TOKEN not in words:
            raise ValueError(f"DecoderWordTokenizer: the vocabulary has no {IMAGE_TOKEN!r} token")
        super().__init__(words)
        self.bos_token_id, self.eos_token_id = self.cls_token_id, self.sep_token_id
        self.image_token_id = self.vocab[IMAGE_TOKEN]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = super().encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) == self.image_token_id)]
        return super().decode(ids, skip_special_tokens=skip_special_tokens)


def decoder_collate(batch: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad decoder rows into the batch contract of this module's docstring."""
    lengths = [len(item["input_ids"]) for item in batch]
    n = max(lengths)
    input_ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for j, (item, k) in enumerate(zip(batch, lengths)):
        input_ids[j, :k] = item["input_ids"]
        attention_mask[j, :k] = 1
        labels[j, :k] = item["labels"]
    return {"pixel_values": torch.stack([item["pixel_values"] for item in batch]), "input_ids": input_ids,
            "attention_mask": attention_mask,
            "segment_starts": torch.stack([item["segment_starts"] for item in batch]), "labels": labels}


class DigitGridDecoderDataset(Dataset):
    """Digit-grid VQA as decoder rows (see the module docstring).

    Args:
        split, size, seed: as :class:`DigitGridDataset` (same grids, questions and answers for the
            same arguments).
        image_tokens: image placeholders per row; default one per ``patch_size`` patch,
            ``(image_size // patch_size) ** 2`` (a LLaVA whose vision tower has that patch size and
            crops its [CLS], as ``dataset_overrides`` builds it).
        vocab_file: where the vocabulary is written (if absent) and read from; ``None``: in memory.
        **options: :class:`DigitGridDataset`'s (``grid``, ``cell``, ``digits_per_image``,
            ``question_types``, ``noise``...; ``variant`` must be ``vqa``).
    """

    task = "decoder_vqa"
    variant = "decoder_vqa"

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, image_tokens: int | None = None,
                 vocab_file: str | Path | None = None, **options: Any) -> None:
        if options.pop("variant", "vqa") != "vqa":
            raise ValueError("digit_grid_decoder: only variant 'vqa' (one image, one-word answers)")
        if "digits_per_image" in options:
            options["digits_per_image"] = tuple(options["digits_per_image"])
        if vocab_file is not None:
            path = Path(vocab_file)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                DecoderWordTokenizer().save(path)
            words = WordTokenizer.load(path).tokens[len(WordTokenizer.special_tokens):]
            tokenizer = DecoderWordTokenizer(words)
        else:
            tokenizer = DecoderWordTokenizer()
        self.grid_data = DigitGridDataset(split, size=size, seed=seed, variant="vqa", tokenizer=tokenizer, **options)
        self.tokenizer = tokenizer
        self.image_size, self.patch_size = self.grid_data.image_size, PATCH_SIZE
        self.image_tokens = int(image_tokens) if image_tokens is not None else (self.image_size // PATCH_SIZE) ** 2
        if self.image_tokens < 1:
            raise ValueError(f"digit_grid_decoder: image_tokens must be >= 1, got {image_tokens!r}")
        self.answers = list(self.grid_data.answers)
        self.answer_ids = [tokenizer.vocab[a] for a in self.answers]
        unknown = [a for a, i in zip(self.answers, self.answer_ids) if i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"digit_grid_decoder: answers {unknown} are not in the vocabulary")
        image = [tokenizer.image_token_id] * self.image_tokens
        self.input_ids = [torch.tensor([tokenizer.bos_token_id, *image, *tokenizer.encode(q, add_special_tokens=False)],
                                       dtype=torch.long) for q in self.grid_data.questions]
        self.segment_starts = torch.tensor([0, 1, 1 + self.image_tokens], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.grid_data)

    def answer_token(self, i: int) -> int:
        """The answer's token id of example ``i``."""
        return self.answer_ids[int(self.grid_data.labels[i])]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-1] = self.answer_token(i)  # the question's last token predicts the answer
        return {"pixel_values": self.grid_data.render(i), "input_ids": ids, "segment_starts": self.segment_starts,
                "labels": labels}

    @property
    def collate_fn(self) -> Callable[[Sequence[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
        from functools import partial

        return partial(decoder_collate, pad_token_id=self.tokenizer.pad_token_id)

    def describe(self, i: int) -> dict[str, Any]:
        """:meth:`DigitGridDataset.describe` plus the row's ``answer_token``."""
        return {**self.grid_data.describe(i), "answer_token": self.answer_token(i)}


def make_digit_grid_decoder(split: str, size: int | None = None, seed: int = 0, **options: Any) -> DigitGridDecoderDataset:
    """The ``digit_grid_decoder`` factory: ``split`` ``train`` or ``test`` (the held-out digit samples)."""
    return DigitGridDecoderDataset(split, size=size or 1000, seed=seed, **options)


def _register() -> None:
    from ..trainer import register_dataset

    register_dataset("digit_grid_decoder", make_digit_grid_decoder)


_register()
