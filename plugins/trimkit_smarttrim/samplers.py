"""Mask samplers for training (paper Eq. 8)."""

from __future__ import annotations

import torch
from torch.distributions import RelaxedBernoulli


def gumbel_sigmoid(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigma((pi + G' - G'') / tau): exactly ``RelaxedBernoulli(tau, logits).rsample()``."""
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    return RelaxedBernoulli(t, logits=logits).rsample()


def hard_straight_through(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary masks forward, Gumbel-sigmoid gradients backward (straight-through)."""
    soft = gumbel_sigmoid(logits, temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly binary forward: x - x == 0
