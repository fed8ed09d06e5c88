"""Speed as a ratio: callables timed interleaved in one run (A B, B A, A B...), medians reported.

On a shared or throttling machine absolute times drift; timing the variants round-robin makes the
drift hit all of them alike, and the per-round ratio pairs measurements taken seconds apart.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per call of each variant, round by round."""

    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of time(slow) / time(fast): the speed-up of ``fast`` over ``slow``."""
        return statistics.median(a / b for a, b in zip(self.times[slow], self.times[fast]))


def interleaved(fns: dict[str, Callable[[int], object]], repeats: int, warmup: int = 1,
                device: str | torch.device | None = None, inference_mode: bool = True) -> Timings:
    """Time ``fns[name](round)`` for every name, round-robin, alternating the order each round.

    Each callable gets the round index (to cycle through instances). Runs under
    ``torch.inference_mode`` (``torch.no_grad`` with ``inference_mode=False``); CUDA work is
    synchronised around each call.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode() if inference_mode else torch.no_grad():
        for w in range(warmup):
            for n in names:
                fns[n](w)
        _sync(device)
        for r in range(repeats):
            for n in (names if r % 2 == 0 else names[::-1]):
                _sync(device)
                t = time.perf_counter()
                fns[n](r)
                _sync(device)
                times[n].append(time.perf_counter() - t)
    return Timings(times)
