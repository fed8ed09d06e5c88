"""Untrained trimmers set to reach a MACs reduction, for profiling without a trained checkpoint.

1. Every trimmer weight is drawn at random (``N(0, 1/fan_in)``), so decisions depend on the input
   (the [CLS] tokens drive the global term): the kept fraction varies per instance.
2. Each trimmer's logits are measured with nothing dropped (mean and spread over tokens/heads).
3. The final layer's bias is set so that a token trimmer keeps a fraction ``p`` of the tokens it
   sees and a head trimmer ``1 - head_share * (1 - p)`` of its heads (normal approximation);
   ``p`` is found by bisection on MACs measured with :func:`~trimkit.macs.count_macs` at batch 1
   over a few instances (mode ``remove``), to reach the requested reduction.

Works with policies whose output is ``final_linear(...) (+ terms)``: the last ``nn.Linear`` with a
bias and 1 output (token policies) or ``num_heads`` outputs (head policies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from torch import nn

__all__ = ["Calibration", "CalibrationError", "calibrate", "prepare", "randomise_trimmers", "set_keep"]


class CalibrationError(RuntimeError):
    """The trimmers cannot be calibrated (unknown policy structure)."""


@dataclass
class _Trimmer:
    key: str
    kind: str  # token | head
    module: nn.Module
    final: nn.Linear
    mean: float = 0.0
    std: float = 1.0


@dataclass
class Calibration:
    """Result of :func:`calibrate`: the per-layer keep level and the MACs it reached."""

    level: float  # token keep probability per layer (p)
    head_level: float
    macs_full: float  # mean over instances
    macs_trimmed: float
    per_instance: list[tuple[int, int]] = field(default_factory=list)  # (full, trimmed) MACs per instance
    steps: int = 0

    @property
    def ratio(self) -> float:
        return self.macs_full / self.macs_trimmed


def _final_linear(module: nn.Module, out_features: int | None) -> nn.Linear:
    found = [m for m in module.modules() if isinstance(m, nn.Linear) and m.bias is not None
             and (out_features is None or m.out_features == out_features)]
    if not found:
        raise CalibrationError(f"cannot calibrate a {type(module).__name__}: no final nn.Linear with a bias "
                               f"and {out_features or 'num_heads'} outputs (pass a trained checkpoint instead)")
    return found[-1]


def _trimmers(tmodel) -> list[_Trimmer]:
    out = []
    for key, lt in tmodel.trimmers.items():
        if lt.token is not None:
            out.append(_Trimmer(key, "token", lt.token, _final_linear(lt.token, 1)))
        for j, head in lt.heads.items():
            out.append(_Trimmer(f"{key}.{j}", "head", head, _final_linear(head, None)))
    if not out:
        raise CalibrationError("the model has no trimmers to calibrate")
    return out


@torch.no_grad()
def randomise_trimmers(tmodel, seed: int = 0) -> None:
    """Draw every trimmer weight from N(0, 1/fan_in) and zero the biases."""
    g = torch.Generator().manual_seed(seed)
    for m in tmodel.trimmers.modules():
        if isinstance(m, nn.Linear):
            w = torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features)
            m.weight.copy_(w.to(m.weight))
            if m.bias is not None:
                m.bias.zero_()


@torch.no_grad()
def _measure(tmodel, trimmers: list[_Trimmer], instances: list[dict[str, Any]]) -> None:
    big = 1e4  # every token and head kept while measuring: the statistics of the full model's states
    outs: dict[str, list[torch.Tensor]] = {t.key: [] for t in trimmers}
    hooks = []
    for t in trimmers:
        t.final.bias.fill_(big)
        hooks.append(t.module.register_forward_hook(lambda mod, args, out, key=t.key: outs[key].append(out.float() - big)))
    try:
        with tmodel.mode("hard"):
            for x in instances:
                tmodel(**x)
    finally:
        for h in hooks:
            h.remove()
    for t in trimmers:
        v = torch.cat([o.reshape(-1) for o in outs[t.key]]) if outs[t.key] else torch.zeros(2)
        t.mean, t.std = float(v.mean()), max(float(v.std()), 1e-6)


@torch.no_grad()
def set_keep(trimmers: list[_Trimmer], level: float, head_level: float) -> None:
    """Final biases for a keep probability ``level`` per token trimmer and ``head_level`` per head trimmer."""
    nd = NormalDist()
    for t in trimmers:
        p = min(max(level if t.kind == "token" else head_level, 1e-4), 1 - 1e-4)
        t.final.bias.fill_(-t.mean + t.std * nd.inv_cdf(p))


def prepare(tmodel, instances: list[dict[str, Any]], seed: int = 0) -> list[_Trimmer]:
    """Steps 1-2: random trimmer weights, logits measured with nothing dropped."""
    trimmers = _trimmers(tmodel)
    randomise_trimmers(tmodel, seed)
    _measure(tmodel, trimmers, instances)
    return trimmers


def calibrate(tmodel, instances: list[dict[str, Any]], reduction: float, head_share: float = 0.5, seed: int = 0,
              steps: int = 8, prepared: list[_Trimmer] | None = None) -> Calibration:
    """Set ``tmodel``'s (untrained) trimmers so that MACs fall ``reduction``-fold on average over
    ``instances`` (batch-1 inputs). Returns the level found and the MACs per instance.
    ``prepared``: the result of :func:`prepare` on the same model and instances (skips steps 1-2)."""
    from ..macs import count_macs

    if reduction < 1:
        raise ValueError(f"reduction must be >= 1, got {reduction}")
    was_training = tmodel.training
    tmodel.eval()
    trimmers = prepared if prepared is not None else prepare(tmodel, instances, seed)
    with tmodel.full():
        full = [count_macs(tmodel, **x).total for x in instances]

    def evaluate(p: float) -> list[int]:
        set_keep(trimmers, p, 1 - head_share * (1 - p))
        with tmodel.mode("remove"):
            return [count_macs(tmodel, **x).total for x in instances]

    lo, hi = 0.02, 1.0  # keep probability per layer: ratio(lo) >= reduction >= ratio(hi)
    best = (1.0, list(full))
    n = 0
    if reduction > 1:
        for _ in range(steps):
            mid = (lo + hi) / 2
            trimmed = evaluate(mid)
            n += 1
            ratio = sum(full) / sum(trimmed)
            if abs(ratio - reduction) < abs(sum(full) / sum(best[1]) - reduction):
                best = (mid, trimmed)
            if ratio > reduction:
                lo = mid
            else:
                hi = mid
    level = best[0]
    head_level = 1 - head_share * (1 - level)
    set_keep(trimmers, level, head_level)
    tmodel.train(was_training)
    k = len(instances)
    return Calibration(level, head_level, sum(full) / k, sum(best[1]) / k, list(zip(full, best[1])), n)
