"""(a) METER at the paper's size (CLIP ViT-B/16 288px + RoBERTa + 6 co-attention layers), CPU, batch 1.

Untrained trimmers calibrated to 1.5x, 2x and 3x fewer MACs (random weights: the kept fraction
varies per instance; see trimkit.engine.calibrate), mode ``remove`` (tokens and heads physically
dropped), timed interleaved with the full model (mode ``off``) over a few instances. Next to the
paper's Table 4 (METER 48.3 G, 343 ms; SmartTrim 2x 26.2 G, 214 ms; 3x 17.3 G, 178 ms).

    python benchmarks/meter_cpu_batch1.py [--threads 2] [--reductions 1.5 2 3] [--instances 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os

import torch

import common

PAPER = {2.0: ("26.2", 343 / 214, 48.3 / 26.2), 3.0: ("17.3", 343 / 178, 48.3 / 17.3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reductions", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per instance")
    ap.add_argument("--size", default="base")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.calibrate import calibrate, prepare
    from trimkit.engine.timing import interleaved

    load_start = common.load()
    model, impl = common.meter(args.size)
    tmodel = common.trimmed(model)
    xs = [impl.example_inputs(model, batch_size=1, seed=i) for i in range(args.instances)]
    prepared = prepare(tmodel, xs, seed=0)
    rows = []
    for red in args.reductions:
        cal = calibrate(tmodel, xs, red, prepared=prepared, steps=7)

        def full(r):
            with tmodel.full():
                tmodel(**xs[r % len(xs)])

        def trim_(r):
            with tmodel.mode("remove"):
                tmodel(**xs[r % len(xs)])

        t = interleaved({"full": full, "trimmed": trim_}, repeats=args.repeats * len(xs), warmup=1)
        macs_ratio = cal.ratio
        speed = t.ratio("full", "trimmed")
        paper = PAPER.get(red)
        per = "/".join(common.gmacs(tr) for _, tr in cal.per_instance)
        rows.append([f"{red:g}x", common.gmacs(cal.macs_full), f"{common.gmacs(cal.macs_trimmed)} ({per})",
                     f"{macs_ratio:.2f}x", f"{t.median('full') * 1e3:.0f}", f"{t.median('trimmed') * 1e3:.0f}",
                     f"**{speed:.2f}x**", f"{speed / macs_ratio:.2f}",
                     f"{paper[0]} G: {paper[1]:.2f}x for {paper[2]:.2f}x ({paper[1] / paper[2]:.2f})" if paper else "-"])
        print(rows[-1], flush=True)
    body = f"""## (a) METER {args.size} (288px), CPU, batch 1: speed vs MACs

Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
Decisions: untrained trimmers calibrated per row to the MACs reduction (random weights, per-instance
variation; bisection on measured MACs over {args.instances} instances), mode `remove`. Full = mode `off`
(the unwrapped model). {args.repeats * args.instances} interleaved rounds per row, medians.
Goal: speed ratio >= 0.9 x MACs ratio (column speed/MACs). Paper (Table 4, Xeon E5-2640 v4):
METER 48.3 G, 343 ms.

{common.table(["target", "GMACs full", "GMACs trimmed (per instance)", "MACs ratio", "full ms", "trimmed ms",
               "speed ratio", "speed/MACs", "paper SmartTrim (speed for MACs ratio)"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("a_meter_cpu_batch1", body)


if __name__ == "__main__":
    main()
