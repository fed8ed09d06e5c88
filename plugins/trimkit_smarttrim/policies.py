"""Token and head policies: SmartTrim's cross-modal trimmers (paper Eq. 3-7) and baselines.

All final layers start at zero weight and bias ``config.init_logit`` > 0: the stable
initialisation of §4.2 (every token and head is kept at step 0).
"""

from __future__ import annotations

import torch
from torch import nn


def _hidden(dim: int, config) -> int:
    return config.trimmer_dim or max(16, dim // 8)


def _stable(linear: nn.Linear, config) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.constant_(linear.bias, config.init_logit)
    return linear


class CrossModalTokenPolicy(nn.Module):
    """pi_t = MLP(H') + g W_k H'^T with H' = Linear(H) and g = MLP([cls_self, cls_context]) (Eq. 3-6)."""

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.proj = nn.Linear(dim, d)
        self.local = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), _stable(nn.Linear(d // 2, 1), config))
        self.context_dim = context_dim or 0
        self.glob = nn.Sequential(nn.Linear(dim + self.context_dim, d), nn.GELU(), nn.Linear(d, d))
        self.bilinear = nn.Linear(d, d, bias=False)  # W_k
        nn.init.zeros_(self.bilinear.weight)

    def forward(self, hidden: torch.Tensor, cls_self: torch.Tensor, cls_context: torch.Tensor | None) -> torch.Tensor:
        h = self.proj(hidden)  # (B, N, D')
        local = self.local(h).squeeze(-1)
        parts = [cls_self] if not self.context_dim else [cls_self, cls_context if cls_context is not None else torch.zeros(
            cls_self.shape[0], self.context_dim, device=cls_self.device, dtype=cls_self.dtype)]
        g = self.glob(torch.cat(parts, dim=-1))  # (B, D')
        return local + torch.einsum("bd,bnd->bn", self.bilinear(g), h)


class LocalTokenPolicy(nn.Module):
    """The Local baseline (§6.1): pi_t = MLP(Linear(H)), no [CLS] of either stream."""

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.proj = nn.Linear(dim, d)
        self.local = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), _stable(nn.Linear(d // 2, 1), config))

    def forward(self, hidden, cls_self, cls_context):
        return self.local(self.proj(hidden)).squeeze(-1)


class RandomTokenPolicy(nn.Module):
    """The Random baseline (§6.1): each token kept at random; a learned bias sets how many.

    The bias is stored divided by :attr:`SCALE`: Adam moves a parameter by about the learning rate
    per step, so a bare scalar started at ``init_logit`` could not reach its target within a short
    fine-tune (measured: 300 steps at 1e-2 left the demo's Random run keeping 95% of the tokens),
    while the learned policies' logits move through many weights at once.
    """

    SCALE = 5.0

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(config.init_logit) / self.SCALE))

    def forward(self, hidden, cls_self, cls_context):
        u = torch.rand(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype).clamp(1e-6, 1 - 1e-6)
        return self.SCALE * self.bias + torch.log(u) - torch.log1p(-u)  # bias + logistic noise


class CrossModalHeadPolicy(nn.Module):
    """pi_h = P(cls_self) for self-attention, P([cls_self, cls_context]) for cross-attention (Eq. 7)."""

    def __init__(self, dim: int, context_dim: int | None, num_heads: int, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.context_dim = context_dim or 0
        self.net = nn.Sequential(nn.Linear(dim + self.context_dim, d), nn.GELU(), _stable(nn.Linear(d, num_heads), config))

    def forward(self, cls_self: torch.Tensor, cls_context: torch.Tensor | None) -> torch.Tensor:
        x = cls_self if not self.context_dim else torch.cat([cls_self, cls_context], dim=-1)
        return self.net(x)
