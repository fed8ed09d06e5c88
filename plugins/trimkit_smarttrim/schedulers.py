"""Curriculum schedulers (paper §4.2): move each target from 1.0 to its final value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LinearCurriculum:
    """gamma(step) = 1 - min(1, step / (fraction * total)) * (1 - gamma_final); fixed temperature."""

    fraction: float = 0.5
    temperature: float = 1.0

    def progress(self, step: int, total: int) -> float:
        span = self.fraction * max(total, 1)
        return 1.0 if span <= 0 else min(1.0, step / span)

    def targets(self, step: int, total: int, final: dict[str, float]) -> dict[str, float]:
        p = self.progress(step, total)
        return {k: 1.0 - p * (1.0 - v) for k, v in final.items()}

    def temperature_at(self, step: int, total: int) -> float:
        return self.temperature


@dataclass
class ConstantTargets(LinearCurriculum):
    """No curriculum: the final targets from the first step (the paper's ablation)."""

    def progress(self, step: int, total: int) -> float:
        return 1.0
