"""Shared helpers of the benchmark scripts: machine description, model building and RESULTS.md sections.

Every script writes one section of ``benchmarks/RESULTS.md`` (between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers, so the scripts can run in any order) with its exact command, the
machine and the date. Speed is only ever reported as ratios of variants timed interleaved in the
same run (:func:`trimkit.engine.timing.interleaved`), medians over rounds.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# trimkit benchmark results

Written by the scripts in `benchmarks/` (each section names its command; re-run it to refresh the
section). Speed is reported as ratios of variants timed **interleaved in the same run** (median over
rounds of the per-round ratio); absolute times are indicative only. MACs are counted with
`trimkit.macs.count_macs` (torchprofile-style MACs = FLOPs / 2, as the SmartTrim paper's "FLOPs").
"""


def load() -> str:
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{cpu_name()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_section(name: str, body: str) -> None:
    """Replace (or append) section ``name`` of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def meter(size: str = "base", **overrides):
    """A randomly initialised METER (the paper's 288px model for ``base``) and its adapter."""
    from trimkit.plugins import get_registry

    impl = get_registry().adapters.get("meter")
    torch.manual_seed(0)
    from trimkit_meter import build_meter

    return build_meter(size, **overrides).eval(), impl


def trimmed(model, adapter: str = "meter"):
    from trimkit import TrimConfig, trim

    return trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter=adapter).eval()


def run_mode(tmodel, mode: str, x: dict) -> None:
    with tmodel.mode(mode):
        tmodel(**x)


def batch_speed(tmodel, x: dict, repeats: int, padded: bool = False):
    """One batch ``x``, full (mode ``off``) against trimmed (``remove`` at batch 1, else ``packed``; and
    ``padded`` when asked), timed interleaved: (engine, full MACs / trimmed MACs counted on this batch,
    the :class:`~trimkit.engine.timing.Timings`)."""
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs

    engine = "remove" if next(iter(x.values())).shape[0] == 1 else "packed"
    with tmodel.full():
        mf = count_macs(tmodel, **x).total
    with tmodel.mode(engine):
        mp = count_macs(tmodel, **x).total
    fns = {"full": lambda r: run_mode(tmodel, "off", x), engine: lambda r: run_mode(tmodel, engine, x)}
    if padded and engine == "packed":
        fns["padded"] = lambda r: run_mode(tmodel, "padded", x)
    return engine, mf / mp, interleaved(fns, repeats=repeats, warmup=1)


def gmacs(n: float) -> str:
    return f"{n / 1e9:.1f}"
