"""Datasets shipped with trimkit (small, offline tasks for tests, demos and tutorials)."""
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

__all__ = [
    "DigitGridDataset",
    "WordTokenizer",
    "collate",
    "default_vocabulary",
    "digit_pools",
    "VQA_ANSWERS",
    "NLVR2_ANSWERS",
    "VQA_TEMPLATES",
    "NLVR2_TEMPLATES",
    "PATCH_SIZE",
]
