"""Curriculum schedulers (paper §4.2): move each target from 1.0 to its final value."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LinearCurriculum:
    """gamma(step) = 1 - min(1, step / (fraction * total)) * (1 - gamma_final).

    The temperature is ``temperature`` throughout, or, with ``final_temperature``, stays at
    ``temperature`` while the targets move and then decays geometrically to ``final_temperature``
    at the last step (decisions sharpen once the budget is fixed; sharpening earlier freezes
    trimmers still at the stable initialisation, whose gradients vanish as the temperature falls).
    """

    fraction: float = 0.5
    temperature: float = 1.0
    final_temperature: float | None = None

    def progress(self, step: int, total: int) -> float:
        span = self.fraction * max(total, 1)
        return 1.0 if span <= 0 else min(1.0, step / span)

    def targets(self, step: int, total: int, final: dict[str, float]) -> dict[str, float]:
        p = self.progress(step, total)
        return {k: 1.0 - p * (1.0 - v) for k, v in final.items()}

    def temperature_at(self, step: int, total: int) -> float:
        if self.final_temperature is None or total <= 1:
            return self.temperature if self.final_temperature is None else self.final_temperature
        start = self.fraction * total if self.progress(0, total) < 1.0 else 0.0
        p = min(1.0, max(0.0, (step - start) / max(total - 1 - start, 1e-9)))
        return math.exp((1 - p) * math.log(self.temperature) + p * math.log(self.final_temperature))


@dataclass
class ConstantTargets(LinearCurriculum):
    """No curriculum: the final targets from the first step (the paper's ablation)."""

    def progress(self, step: int, total: int) -> float:
        return 1.0
