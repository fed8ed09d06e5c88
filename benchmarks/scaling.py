"""(d) How the speed-up grows with batch size (CPU, packed engine) and with image size (batch 1).

Batch sizes: METER base 288px, untrained trimmers calibrated to ``--reduction`` fewer MACs (per-
instance variation), one batch of random inputs (padded text rows) per size; the full model (mode
``off``), the packed engine (mode ``packed``, batch 1: ``remove``) and the padded baseline (mode
``padded``: same decisions, each layer on (B, max kept, D) with key masks) timed interleaved.
Image sizes: METER base at each size, calibrated to the same reduction, batch 1, mode ``remove``.

    python benchmarks/scaling.py [--threads 2] [--batches 1 2 4 8] [--sizes 224 288 384] [--reduction 2]
"""

from __future__ import annotations

import argparse
import os

import torch

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--sizes", type=int, nargs="*", default=[224, 288, 384])
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="base")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.calibrate import calibrate
    from trimkit.engine.timing import interleaved

    load_start = common.load()
    sections = []
    if args.batches:
        model, impl = common.meter(args.model)
        tmodel = common.trimmed(model)
        cal = calibrate(tmodel, [impl.example_inputs(model, batch_size=1, seed=i) for i in range(2)], args.reduction,
                        steps=7)
        rows = []
        for B in args.batches:
            x = impl.example_inputs(model, batch_size=B, seed=100 + B)
            engine, macs_ratio, t = common.batch_speed(tmodel, x, args.repeats, padded=True)
            rows.append([str(B), f"{macs_ratio:.2f}x", f"{B / t.median('full'):.2f}",
                         f"{B / t.median(engine):.2f}", f"**{t.ratio('full', engine):.2f}x**",
                         f"{t.ratio('full', 'padded'):.2f}x" if B > 1 else "-",
                         f"{t.ratio('full', engine) / macs_ratio:.2f}"])
            print(rows[-1], flush=True)
        sections.append(("d_scaling_batch", "Speed vs batch size (CPU, packed engine)", f"""Batch size (METER {args.model} 288px; trimmers calibrated to {cal.ratio:.2f}x fewer MACs at batch 1;
MACs ratio of each batch counted on the packed forward; {args.repeats} interleaved rounds, medians):

{common.table(["batch", "MACs ratio", "full inst/s", "packed inst/s", "packed speed ratio", "padded speed ratio",
               "packed speed/MACs"], rows)}
"""))
    if args.sizes:
        rows = []
        for size in args.sizes:
            model, impl = common.meter(args.model, image_size=size)
            tmodel = common.trimmed(model)
            xs = [impl.example_inputs(model, batch_size=1, seed=i) for i in range(2)]
            cal = calibrate(tmodel, xs, args.reduction, steps=7)
            t = interleaved({"full": lambda r: common.run_mode(tmodel, "off", xs[r % 2]),
                             "remove": lambda r: common.run_mode(tmodel, "remove", xs[r % 2])}, repeats=2 * args.repeats,
                            warmup=1)
            tokens = (size // 16) ** 2 + 1
            rows.append([f"{size}px ({tokens} tokens)", common.gmacs(cal.macs_full), f"{cal.ratio:.2f}x",
                         f"{t.median('full') * 1e3:.0f}", f"{t.median('remove') * 1e3:.0f}",
                         f"**{t.ratio('full', 'remove'):.2f}x**", f"{t.ratio('full', 'remove') / cal.ratio:.2f}"])
            print(rows[-1], flush=True)
        sections.append(("d_scaling_image", "Speed vs image size (CPU, batch 1)", f"""Image size (METER {args.model}, batch 1, mode `remove`, each size calibrated to {args.reduction:g}x;
{2 * args.repeats} interleaved rounds over 2 instances, medians):

{common.table(["image", "GMACs full", "MACs ratio", "full ms", "trimmed ms", "speed ratio", "speed/MACs"], rows)}
"""))
    head = f"""Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.

"""
    for name, title, part in sections:
        body = f"### (d) {title}\n\n" + head + part
        print(body)
        if not args.no_write:
            common.write_section(name, body)


if __name__ == "__main__":
    main()
