"""(b) GPU, bf16, batch 64, adaptive per-instance counts: packed vs padded vs full (METER base 288px).

Untrained trimmers calibrated (fp32, batch 1) to ``--reduction`` fewer MACs with per-instance
variation, then the model is cast to ``--dtype``. Timed interleaved, CUDA-synchronised, medians:

* full: mode ``off`` (the unwrapped model);
* packed: mode ``packed`` (kept tokens of the batch in one row matrix, attention by
  ``torch.nn.attention.varlen.varlen_attn``);
* padded: mode ``padded`` (same decisions; each layer on (B, max kept, D) with key masks);
* masked: mode ``hard`` (nothing removed, masks only: the training-time forward).

    python benchmarks/gpu_packed.py [--batch 64] [--reduction 2] [--repeats 20] [--dtype bfloat16]

Smoke test without a GPU: ``python benchmarks/gpu_packed.py --device cpu --dtype float32 --size tiny
--batch 8 --no-write``. Without CUDA and ``--device cuda`` it writes a "not run" section.
"""

from __future__ import annotations

import argparse

import torch

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="base")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        body = f"""## (b) GPU bf16, batch {args.batch}: packed vs padded vs full

**Not run**: this task had no GPU machine (CUDA unavailable; {common.now()}). The script is
`{common.command()}`; run it on a CUDA machine to fill this section. What it measures: METER base
288px in bf16, batch {args.batch}, untrained trimmers calibrated to {args.reduction:g}x fewer MACs with
per-instance counts; full (mode `off`) vs packed (one row matrix + `varlen_attn`) vs padded (same
decisions, (B, max kept, D) per layer) vs masked (mode `hard`), interleaved. The shared probe
(`probes/token_budget_limit.py`, H100, METER-sized stack, 1.8x fewer MACs) measured padded adaptive
batches at 0.63-0.91x of the full model and packed rows + varlen at 1.69-1.74x.
"""
        print(body)
        if not args.no_write:
            common.write_section("b_gpu_packed", body)
        return
    from trimkit.engine.calibrate import calibrate
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs

    dt = getattr(torch, args.dtype)
    model, impl = common.meter(args.size)
    tmodel = common.trimmed(model).to(args.device)
    singles = [{k: v.to(args.device) for k, v in impl.example_inputs(model, batch_size=1, seed=i).items()}
               for i in range(3)]
    cal = calibrate(tmodel, singles, args.reduction, steps=7)
    tmodel.to(dtype=dt)
    x = impl.example_inputs(model, batch_size=args.batch, seed=7)
    x = {k: (v.to(args.device, dt) if v.is_floating_point() else v.to(args.device)) for k, v in x.items()}

    def run(mode):
        def fn(r):
            with tmodel.mode(mode):
                tmodel(**x)
        return fn

    with torch.no_grad():
        with tmodel.full():
            mf = count_macs(tmodel, **x).total
        with tmodel.mode("packed"):
            mp = count_macs(tmodel, **x).total
            counts = [r.counts for r in tmodel.records if r.kind == "token" and r.counts]
    spread = ""
    if counts:
        last = counts[-1]
        spread = f"; kept tokens per instance after the last token trimmer: min {min(last)}, max {max(last)}"
    t = interleaved({m: run(m) for m in ("off", "packed", "padded", "hard")}, repeats=args.repeats, warmup=3,
                    device=args.device)
    rows = [[m, f"{t.median(m) * 1e3:.1f}", f"{args.batch / t.median(m):.0f}",
             "1.00x" if m == "off" else f"**{t.ratio('off', m):.2f}x**"] for m in ("off", "packed", "padded", "hard")]
    body = f"""## (b) GPU {args.dtype}, batch {args.batch}: packed vs padded vs full

Command: `{common.command()}`
Machine: {common.machine(args.device)}. Date: {common.now()}.
METER {args.size} ({model.config.image_size}px), untrained trimmers calibrated to {cal.ratio:.2f}x fewer MACs at batch 1 (fp32);
this batch: {mf / mp:.2f}x fewer MACs (counted on the packed forward){spread}. {args.repeats} interleaved rounds,
CUDA-synchronised, medians.

{common.table(["engine", "ms / batch", "instances/s", "speed ratio vs full"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("b_gpu_packed", body)


if __name__ == "__main__":
    main()
