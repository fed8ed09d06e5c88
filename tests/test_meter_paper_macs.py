"""The paper-size METER counts the paper's MACs (Table 1: 48.3 G at 288px)."""

import pytest
import torch
from trimkit_meter import build_meter

from trimkit.macs import count_macs

PAPER_GMACS = 48.3


def test_meter_base_288px_counts_within_10_percent_of_paper():
    torch.manual_seed(0)
    model = build_meter("base").eval()
    assert model.config.image_size == 288
    tokens = 16  # a typical VQA question with <s> and </s>
    x = {"pixel_values": torch.randn(1, 3, 288, 288), "input_ids": torch.randint(3, 1000, (1, tokens)),
         "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
    gmacs = count_macs(model, **x).total / 1e9
    assert gmacs == pytest.approx(PAPER_GMACS, rel=0.10), f"{gmacs:.1f} G vs the paper's {PAPER_GMACS} G"
