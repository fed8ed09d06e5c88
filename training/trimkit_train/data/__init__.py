"""Datasets: the shipped digit-grid task (small, offline: tests, demos, tutorials) and readers of the
paper's tasks in their released formats (registered names ``digit_grid_decoder`` (digit-grid VQA as
decoder rows, for LLaVA-style models), ``vqa_v2``, ``nlvr2``, ``snli_ve``,
``karpathy`` / ``karpathy_retrieval`` / ``karpathy_caption``, and ``nocaps`` for zero-shot captioning
evaluation; see docs/datasets.md)."""
from trimkit_train.data.digit_grid import (
    NLVR2_ANSWERS,
    NLVR2_TEMPLATES,
    PATCH_SIZE,
    VQA_ANSWERS,
    VQA_TEMPLATES,
    DigitGridDataset,
    WordTokenizer,
    collate,
    default_vocabulary,
    digit_pools,
)
from trimkit_train.data.digit_grid_decoder import DecoderWordTokenizer, DigitGridDecoderDataset, decoder_collate
from trimkit_train.data.common import ImageFileError, load_image, load_tokenizer, pad_collate
from trimkit_train.data.karpathy import KarpathyCaptioning, KarpathyRetrieval, clean_caption, read_karpathy
from trimkit_train.data.nlvr2 import NLVR2Dataset
from trimkit_train.data.nocaps import NoCapsCaptioning, read_nocaps
from trimkit_train.data.snli_ve import SNLI_VE_LABELS, SNLIVEDataset
from trimkit_train.data.vqa_v2 import VQAv2Dataset, answer_vocabulary, normalize_answer, soft_score, vqa_predictions

__all__ = [
    "DigitGridDataset",
    "DigitGridDecoderDataset",
    "DecoderWordTokenizer",
    "decoder_collate",
    "WordTokenizer",
    "collate",
    "default_vocabulary",
    "digit_pools",
    "VQA_ANSWERS",
    "NLVR2_ANSWERS",
    "VQA_TEMPLATES",
    "NLVR2_TEMPLATES",
    "PATCH_SIZE",
    "ImageFileError",
    "KarpathyCaptioning",
    "KarpathyRetrieval",
    "NLVR2Dataset",
    "NoCapsCaptioning",
    "SNLIVEDataset",
    "SNLI_VE_LABELS",
    "VQAv2Dataset",
    "answer_vocabulary",
    "clean_caption",
    "load_image",
    "load_tokenizer",
    "normalize_answer",
    "pad_collate",
    "read_karpathy",
    "read_nocaps",
    "soft_score",
    "vqa_predictions",
]
