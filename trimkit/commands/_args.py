"""Argument types shared by every ``trimkit`` subcommand (``type=`` functions for argparse).

Each one raises :class:`argparse.ArgumentTypeError` with the accepted range and the value given,
so argparse prints the subcommand's usage and ``trimkit CMD: error: argument --opt: ...`` and
exits with status 2, before anything is built or loaded::

    p.add_argument("--instances", type=positive_int)       # an integer >= 1
    p.add_argument("--macs-instances", type=nonneg_int)    # an integer >= 0
    p.add_argument("--batch", type=int_range(2))           # an integer >= 2
    p.add_argument("--reduction", type=finite_float(1.0))  # a finite number >= 1
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _describe(kind: str, lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{kind} <= {hi:g}"
    return kind


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either bound may be None: unbounded)."""
    want = _describe("an integer", lo, hi)

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = f"int_range({lo}, {hi})"
    return parse


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float (no nan, no inf) in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    want = _describe("a finite number", lo, hi, lo_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
                or (hi is not None and value > hi)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = f"finite_float({lo}, {hi})"
    return parse


positive_int = int_range(1)
"""An integer >= 1 (sizes, counts, steps, threads)."""
positive_int.__name__ = "positive_int"

nonneg_int = int_range(0)
"""An integer >= 0 (seeds; counts where 0 means "none")."""
nonneg_int.__name__ = "nonneg_int"

reduction_float = finite_float(1.0)
"""A MACs reduction factor: a finite number >= 1 (1: nothing trimmed)."""
reduction_float.__name__ = "reduction_float"
