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


def sharpened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigma(pi / tau + G' - G''): Gumbel-sigmoid whose *noise* shrinks with the temperature.

    At tau = 1 it is :func:`gumbel_sigmoid` at tau = 1; as tau -> 0 the sample tends to
    1[pi > 0], the decision inference takes. With a decaying temperature
    (``TrimConfig.final_temperature``) the masks seen in training, and the keep ratios the cost
    loss measures, converge to the ones inference will use. With the plain Gumbel-sigmoid a token
    of logit pi is kept with probability sigma(pi) at any temperature, so a fine-tune too short
    for the logits to polarise meets its cost target on average while inference (pi > 0) keeps a
    different fraction.

    Not written as ``RelaxedBernoulli(1, logits=pi / tau)``: that distribution clamps its
    probabilities to float eps, i.e. pi / tau to about +-16, which caps how deterministic a small
    temperature can make the sample. Here only the uniform draw is clamped (noise within +-16).
    """
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand_like(logits).clamp(eps, 1 - eps)
    return torch.sigmoid(logits / t + (u.log() - torch.log1p(-u)))
