"""Where the trimmers sit, and what that costs at CPU batch 1 (tiny, demo, base METER).

At small sizes a trimmed forward is bound by the operators it dispatches, not by its MACs
(``layer_overhead.py``): each trimmed layer adds its trimmers, one host synchronisation and the
gathers. Token removal is cumulative, so trimmers in fewer layers can reach the same MACs with less
of that fixed cost. For each size and each placement, untrained trimmers are calibrated to
``--reduction`` fewer MACs (mode ``remove``) and timed interleaved against the full model (mode
``off``):

* ``every layer``: token and head trimmers in every described layer (the paper's placement, the
  default of ``TrimConfig``);
* ``every layer, tokens``: token trimmers in every layer, no head trimmers;
* ``first vision layer``: one token trimmer, at the first vision block
  (``TrimConfig(token_layers=["vision.uni.0"], trim_heads=False)``); every later layer runs on the
  tokens it keeps;
* ``first vision + first text layer``: the same, and one token trimmer on the text stream at the
  first co-attention layer (``token_layers=["vision.uni.0", "text.cross.0"]``).

    python benchmarks/placement.py [--threads 2] [--sizes tiny demo base] [--reduction 2] [--repeats 8]

A second table gives the ceiling of any token pruning at each size: the full model itself, built
for a smaller image (fewer patch tokens from the input on, so no trimmer, decision or gather at
all), timed interleaved against the same model at its own resolution: about the best a pruned
forward saving those MACs in the vision stream can do (an approximate bound: placements that also
prune text tokens save MACs this table does not; ``--no-ceiling`` leaves it out).

This measures speed only; what a placement costs in accuracy is a training question:
``trimkit repro placement`` fine-tunes each placement on digit-grid.
"""

from __future__ import annotations

import argparse

import torch

import common
from layer_overhead import DEMO_MODEL, _ops

PLACEMENTS = {
    "every layer": {"token_target": 0.5, "head_target": 0.5},
    "every layer, tokens": {"token_target": 0.5, "trim_heads": False},
    "first vision layer": {"token_target": 0.5, "token_layers": ["vision.uni.0"], "trim_heads": False},
    "first vision + first text layer": {"token_target": 0.5, "token_layers": ["vision.uni.0", "text.cross.0"],
                                        "trim_heads": False},
}


def measure(size: str, placement: str, reduction: float, repeats: int, instances: int) -> list[str]:
    from trimkit import TrimConfig, trim
    from trimkit.engine.calibrate import calibrate
    from trimkit.engine.timing import interleaved

    model, impl = common.meter("tiny", **DEMO_MODEL) if size == "demo" else common.meter(size)
    tmodel = trim(model, TrimConfig(**PLACEMENTS[placement]), adapter="meter").eval()
    xs = [impl.example_inputs(model, batch_size=1, seed=i) for i in range(instances)]
    cal = calibrate(tmodel, xs, reduction, steps=7)
    tmodel.eval()

    def full(r):
        with tmodel.full():
            tmodel(**xs[r % len(xs)])

    def trimmed(r):
        tmodel(**xs[r % len(xs)])

    ops_full, ops_trim = _ops(lambda: full(0)), _ops(lambda: trimmed(0))
    t = interleaved({"full": full, "trimmed": trimmed}, repeats=repeats * len(xs), warmup=2)
    f, tr = t.median("full") * 1e3, t.median("trimmed") * 1e3
    speed = t.ratio("full", "trimmed")
    layers = sum(1 for lt in tmodel.trimmers.values() if lt.token is not None or len(lt.heads))
    return [size, placement, f"{cal.ratio:.2f}x", f"{f:.2f}", f"{tr:.2f}", f"**{speed:.2f}x**",
            f"{speed / cal.ratio:.2f}", f"{ops_full} / {ops_trim}",
            str(layers)]


CEILING_IMAGES = {"tiny": (64, 48, 32), "demo": (64, 48, 32), "base": (288, 208, 192)}
"""Image sizes of the ceiling table, per model size (the first is the model's own)."""


def ceiling(size: str, repeats: int) -> list[list[str]]:
    """The full model built for smaller images, against its own resolution: pruning's best case."""
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs

    fns, macs, tokens = {}, {}, {}
    for img in CEILING_IMAGES[size]:
        over = {**(DEMO_MODEL if size == "demo" else {}), "image_size": img}
        model, impl = common.meter("tiny" if size == "demo" else size, **over)
        x = impl.example_inputs(model, batch_size=1, seed=0)
        with torch.no_grad():
            macs[img] = count_macs(model, **x).total
        tokens[img] = (img // model.config.patch_size) ** 2 + 1
        fns[img] = (lambda m, x: (lambda r: m(**x)))(model, x)
    t = interleaved({str(k): v for k, v in fns.items()}, repeats=repeats, warmup=2)
    own = CEILING_IMAGES[size][0]
    rows = []
    for img in CEILING_IMAGES[size][1:]:
        m_ratio, speed = macs[own] / macs[img], t.ratio(str(own), str(img))
        rows.append([size, f"{own} -> {img} px", f"{tokens[own]} -> {tokens[img]}", f"{m_ratio:.2f}x",
                     f"{t.median(str(own)) * 1e3:.2f}", f"{t.median(str(img)) * 1e3:.2f}", f"**{speed:.2f}x**",
                     f"{speed / m_ratio:.2f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "demo", "base"], choices=["tiny", "demo", "base"])
    ap.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=8, help="rounds per instance (base: a quarter)")
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--no-ceiling", action="store_true", help="leave out the ceiling table (full model on smaller images)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = common.load()
    rows = []
    for size in args.sizes:
        for placement in args.placements:
            rows.append(measure(size, placement, args.reduction,
                                args.repeats if size != "base" else max(2, args.repeats // 4), args.instances))
            print(rows[-1], flush=True)
    ceil = []
    if not args.no_ceiling:
        for size in args.sizes:
            ceil += ceiling(size, 40 * args.repeats if size != "base" else max(4, args.repeats))
            print(ceil[-1], flush=True)
    ceiling_table = "" if not ceil else f"""
Ceiling of token pruning: the full model built for a smaller image (fewer vision tokens from the
input on; no trimmer, decision or gather), interleaved against the same model at its own
resolution: about the best speed a forward that saves those MACs by dropping vision tokens can reach
(approximate: a placement that also drops text tokens saves MACs this table does not).

{common.table(["size", "image", "vision tokens", "MACs ratio", "own ms", "smaller ms", "speed ratio", "speed/MACs"], ceil)}
"""
    body = f"""## Trimmer placement, CPU batch 1 (tiny, demo, base)

Command: `{common.command()}`
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
Untrained trimmers calibrated to {args.reduction:g}x fewer MACs, mode `remove`, interleaved with the full
model (medians). Placements: "every layer" = token and head trimmers in every described layer (the
paper's); "every layer, tokens" = no head trimmers; "first vision layer" = one token trimmer at the first
vision block (`TrimConfig(token_layers=["vision.uni.0"], trim_heads=False)`); "first vision + first text
layer" = that and one on the text stream at the first co-attention layer ("text.cross.0"). "aten ops":
top-level operators of one forward, full / trimmed.

{common.table(["size", "placement", "MACs ratio", "full ms", "trimmed ms", "speed ratio", "speed/MACs",
               "aten ops full / trimmed", "layers with trimmers"], rows)}
{ceiling_table}"""
    print(body)
    if not args.no_write:
        common.write_section("placement", body)


if __name__ == "__main__":
    main()
