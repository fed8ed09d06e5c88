"""Token and head policies: SmartTrim's cross-modal trimmers (paper Eq. 3-7) and baselines.

All final layers start at zero weight and bias ``config.init_logit`` > 0: the stable
initialisation of §4.2 (every token and head is kept at step 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _hidden(dim: int, config) -> int:
    return config.trimmer_dim or max(16, dim // 8)


def _run(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)`` for a Sequential of Linear/GELU layers, calling the functional ops directly.

    A trimmer runs at every trimmed layer on a handful of vectors, where the time is dispatch and
    not arithmetic: skipping the module calls (hooks, ``__call__``) of its small layers is a
    measured part of the per-layer fixed cost (benchmarks/RESULTS.md, "Fixed cost per trimmed
    layer"). Other layer types are called as modules."""
    for layer in layers:
        if type(layer) is nn.Linear:
            x = F.linear(x, layer.weight, layer.bias)
        elif type(layer) is nn.GELU:
            x = F.gelu(x, approximate=layer.approximate)
        else:
            x = layer(x)
    return x


def _stable(linear: nn.Linear, config) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.constant_(linear.bias, config.init_logit)
    linear._trimkit_stable = True  # found again by random_init
    return linear


@torch.no_grad()
def random_init(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Undo the stable initialisation (the "- Stable Initialization" ablation of the paper's Table 6):
    every policy layer that :func:`_stable` set to "keep everything" gets PyTorch's default random
    ``nn.Linear`` initialisation instead (Kaiming-uniform weights, uniform bias over +-1/sqrt(fan_in)),
    the Random policy's keep bias goes to 0 (keep each token with probability 1/2), and W_k of the
    cross-modal token policy gets the default initialisation too, so decisions at step 0 are random.
    Works on a :class:`trimkit.TrimmedModel` or any module holding these policies; returns how many
    layers were re-initialised."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and getattr(m, "_trimkit_stable", False):
            bound = 1.0 / max(1, m.in_features) ** 0.5
            nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=generator)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            count += 1
        elif isinstance(m, CrossModalTokenPolicy):
            nn.init.kaiming_uniform_(m.bilinear.weight, a=5 ** 0.5, generator=generator)
            count += 1
        elif isinstance(m, RandomTokenPolicy):
            m.bias.zero_()
            count += 1
    return count


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
        h = F.linear(hidden, self.proj.weight, self.proj.bias)  # (B, N, D')
        local = _run(self.local, h).squeeze(-1)
        if self.context_dim:
            ctx = cls_context if cls_context is not None else cls_self.new_zeros(cls_self.shape[0], self.context_dim)
            g = _run(self.glob, torch.cat([cls_self, ctx], dim=-1))  # (B, D')
        else:
            g = _run(self.glob, cls_self)
        wg = F.linear(g, self.bilinear.weight)  # (B, D')
        return torch.baddbmm(local.unsqueeze(-1), h, wg.unsqueeze(-1)).squeeze(-1)  # local + <W_k g, h_n>


class LocalTokenPolicy(nn.Module):
    """The Local baseline (§6.1): pi_t = MLP(Linear(H)), no [CLS] of either stream."""

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.proj = nn.Linear(dim, d)
        self.local = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), _stable(nn.Linear(d // 2, 1), config))

    def forward(self, hidden, cls_self, cls_context):
        return _run(self.local, F.linear(hidden, self.proj.weight, self.proj.bias)).squeeze(-1)


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
        return _run(self.net, x)
