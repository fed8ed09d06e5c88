"""Speed ratio of one checkout, full vs trimmed (mode ``remove``, CPU batch 1), for before/after
comparisons between versions.

Each size: untrained trimmers calibrated to ``--reduction`` fewer MACs, then the full and the trimmed
forward timed interleaved (``trimkit.engine.timing.interleaved``, medians). The ratio is taken side
by side in one process, so the ratios of two checkouts can be compared when their runs alternate
(the machine's speed drifts between runs; a ratio drifts much less)::

    git worktree add /tmp/before <commit>
    for i in 1 2 3; do
      (cd /tmp && PYTHONPATH=/tmp/before:/tmp/before/adapters:/tmp/before/plugins:/tmp/before/training \\
         python /path/to/checkout/benchmarks/speed_ratio.py --sizes tiny demo)
      (cd /tmp && PYTHONPATH=/path/to/checkout:/path/to/checkout/adapters:/path/to/checkout/plugins:/path/to/checkout/training \\
         python /path/to/checkout/benchmarks/speed_ratio.py --sizes tiny demo)
    done

(run from a directory outside both checkouts, so that ``PYTHONPATH`` decides which trimkit is
imported; the first field printed is the checkout that was). Prints one line per run; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from layer_overhead import DEMO_MODEL  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo", "base"])
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=40, help="rounds (base: a seventh of them, at least 4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import trimkit
    from trimkit.engine.calibrate import calibrate
    from trimkit.engine.timing import interleaved

    fields = [os.path.dirname(os.path.dirname(os.path.abspath(trimkit.__file__))), f"{args.threads} thread(s)"]
    for size in args.sizes:
        model, impl = common.meter("tiny", **DEMO_MODEL) if size == "demo" else common.meter(size)
        tmodel = common.trimmed(model)
        xs = [impl.example_inputs(model, batch_size=1, seed=i) for i in range(3)]
        cal = calibrate(tmodel, xs, args.reduction, steps=7)
        tmodel.eval()

        def full(r):
            with tmodel.full():
                tmodel(**xs[r % len(xs)])

        def trimmed(r):
            tmodel(**xs[r % len(xs)])

        rounds = args.repeats if size != "base" else max(4, args.repeats // 7)
        t = interleaved({"full": full, "trimmed": trimmed}, repeats=rounds, warmup=2)
        fields.append(f"{size}: MACs {cal.ratio:.2f}x, full {t.median('full') * 1e3:.2f} ms, trimmed "
                      f"{t.median('trimmed') * 1e3:.2f} ms, speed {t.ratio('full', 'trimmed'):.3f}x")
    print(" | ".join(fields), flush=True)


if __name__ == "__main__":
    main()
