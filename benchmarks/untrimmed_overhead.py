"""The untrimmed path costs nothing: ``with tmodel.full(): tmodel(**x)`` vs the unwrapped model.

Goal: at most 3% slower. Mode ``off`` calls the original module directly (no graph, no wrapper, no
signature binding), so the only cost is one attribute check. For reference, the trimmed path at
stable init (mode ``remove``, every token and head kept: the trimmers run, nothing is dropped) is
timed too.

    python benchmarks/untrimmed_overhead.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os

import torch

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sizes", nargs="+", default=["base", "tiny"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.timing import interleaved

    load_start = common.load()
    rows = []
    for size in args.sizes:
        model, impl = common.meter(size)
        tmodel = common.trimmed(model)
        x = impl.example_inputs(model, batch_size=1, seed=0)

        def unwrapped(r):
            model(**x)

        def off(r):
            with tmodel.full():
                tmodel(**x)

        def kept(r):
            with tmodel.mode("remove"):
                tmodel(**x)

        reps = args.repeats * (10 if size == "tiny" else 1)
        t = interleaved({"model": unwrapped, "off": off, "kept": kept}, repeats=reps, warmup=2)
        rows.append([f"METER {size}", str(reps), f"{t.median('model') * 1e3:.2f}", f"{t.median('off') * 1e3:.2f}",
                     f"**{100 * (t.ratio('off', 'model') - 1):+.1f}%**", f"{t.median('kept') * 1e3:.2f}",
                     f"{100 * (t.ratio('kept', 'model') - 1):+.1f}%"])
        print(rows[-1], flush=True)
    body = f"""## Untrimmed path overhead (mode `off` vs the unwrapped model), batch 1

Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
Goal: mode `off` at most 3% slower than the unwrapped model. "kept": mode `remove` at stable init
(trimmers run, nothing dropped). Interleaved rounds, medians; overhead = median per-round time ratio - 1.

{common.table(["model", "rounds", "unwrapped ms", "off ms", "off overhead", "kept ms", "kept overhead"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("untrimmed_overhead", body)


if __name__ == "__main__":
    main()
