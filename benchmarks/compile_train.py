"""Training step time, eager against ``torch.compile`` (inductor), masked mode (CPU).

The masked training forward has static shapes (masks multiply, nothing is removed), so the whole
step compiles into a few graphs (``train.compile`` in the trainer). One METER (the tests' ``tiny``
or the demo's model), trimmers with random weights, mode ``sample`` (the sampler's noise on), one
fixed batch: forward, a loss and backward, timed interleaved eager vs compiled after the compiled
one has been built (its compile time is printed separately).

    python benchmarks/compile_train.py [--threads 1] [--sizes tiny demo] [--batch 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

import common
from layer_overhead import DEMO_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.calibrate import randomise_trimmers
    from trimkit.engine.timing import interleaved

    load_start = common.load()
    rows = []
    for size in args.sizes:
        model, impl = common.meter("tiny", **DEMO_MODEL) if size == "demo" else common.meter(size)
        tmodel = common.trimmed(model)
        randomise_trimmers(tmodel, 0)
        tmodel.train()
        x = impl.example_inputs(model, batch_size=args.batch, seed=0)
        compiled = torch.compile(tmodel)

        def step(m):
            with torch.enable_grad():  # interleaved() times under no_grad
                m(**x).float().pow(2).mean().backward()

        t0 = time.perf_counter()
        step(compiled)
        compile_s = time.perf_counter() - t0
        t = interleaved({"eager": lambda r: step(tmodel), "compiled": lambda r: step(compiled)},
                        repeats=args.repeats, warmup=2, inference_mode=False)
        rows.append([size, str(args.batch), f"{t.median('eager') * 1e3:.1f}", f"{t.median('compiled') * 1e3:.1f}",
                     f"**{t.ratio('eager', 'compiled'):.2f}x**", f"{compile_s:.0f}"])
        print(rows[-1], flush=True)
    body = f"""## Training step, eager vs torch.compile (masked mode, CPU)

Command: `{common.command()}`
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
Mode `sample`, random trimmer weights, one fixed batch; forward + loss + backward, {args.repeats}
interleaved rounds, medians; the compiled step built first (its first call's time in the last column).

{common.table(["model", "batch", "eager ms", "compiled ms", "speed-up", "compile s"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("compile_train", body)


if __name__ == "__main__":
    main()
