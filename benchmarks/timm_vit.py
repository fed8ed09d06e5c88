"""timm ViT-B/16 (224px), CPU: speed / MACs ratio at batch 1 (mode ``remove``) and in packed batches.

Issue 13's goals for a single-stream vision transformer: at 2x fewer MACs, speed/MACs >= 0.92 at
batch 1 and >= 0.95 in packed batches of 8. A randomly initialised ``vit_base_patch16_224`` (adapter
``timm``: one stream, a token trimmer and a head trimmer per block, no context stream), untrained
trimmers calibrated to ``--reduction`` fewer MACs at batch 1 (trimkit.engine.calibrate); each batch
size timed interleaved against the full model (mode ``off``), MACs of each batch counted on the
trimmed forward itself (per-instance decisions vary).

    python benchmarks/timm_vit.py [--threads 2] [--batches 1 8] [--reduction 2] [--repeats 4]
"""

from __future__ import annotations

import argparse
import os

import torch

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds per batch size")
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm model name (random weights)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.calibrate import calibrate
    from trimkit.plugins import get_registry

    load_start = common.load()
    impl = get_registry().adapters.get("timm")
    model = impl.build(args.model)
    tmodel = common.trimmed(model, adapter="timm")
    cal = calibrate(tmodel, [impl.example_inputs(model, batch_size=1, seed=i) for i in range(3)], args.reduction,
                    steps=7)
    tmodel.eval()
    rows = []
    for B in args.batches:
        x = impl.example_inputs(model, batch_size=B, seed=100 + B)
        engine, macs_ratio, t = common.batch_speed(tmodel, x, args.repeats)
        speed = t.ratio("full", engine)
        goal = 0.92 if B == 1 else 0.95
        rows.append([str(B), engine, f"{macs_ratio:.2f}x", f"{t.median('full') * 1e3:.1f}",
                     f"{t.median(engine) * 1e3:.1f}", f"**{speed:.2f}x**", f"{speed / macs_ratio:.2f}", f">= {goal}"])
        print(rows[-1], flush=True)
    body = f"""## timm {args.model}, CPU: speed vs MACs at batch 1 and packed batches

Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
Random weights; untrained trimmers calibrated to {cal.ratio:.2f}x fewer MACs at batch 1 (token and head
trimmer per block, no context stream); MACs of each batch counted on its trimmed forward;
{args.repeats} interleaved rounds, medians.

{common.table(["batch", "engine", "MACs ratio", "full ms", "trimmed ms", "speed ratio", "speed/MACs",
               "goal (issue 13)"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("timm_vit", body)


if __name__ == "__main__":
    main()
