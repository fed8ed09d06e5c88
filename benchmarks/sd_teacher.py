"""The self-distillation teacher (RecipeConfig.sd_teacher) at one MACs target: ``detached`` (the default)
against ``joint``, SmartTrim cross-modal on the demo's digit-grid setting, fine-tune seeds 0..N-1 of one
backbone (``trimkit repro``'s runner). ``trimkit repro switches`` compares them at 2x only; this script
checks another target (the achieved MACs ratio as well as the accuracy: a teacher that trims less at the
same target is not better at equal MACs).

    python benchmarks/sd_teacher.py [--ratio 3] [--seeds 3] [--out benchmarks/results/repro/sd_teacher_3x]
"""

from __future__ import annotations

import argparse
import shlex
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/repro/sd_teacher_3x")
    args = ap.parse_args()
    from trimkit_train import repro as R

    def write(res):
        what = (f"RecipeConfig.sd_teacher at {args.ratio:g}x: 'detached' (the default since 2026-12-04) vs 'joint' "
                "(the default before), SmartTrim cross-modal, the demo's recipe otherwise.")
        path = res.out / "sd_teacher.md"
        path.write_text(R._header(res, what) + R._table(res.rows, res.full, "sd_teacher") + "\n")
        return [path]

    R.EXPERIMENTS["sd_teacher"] = R.Experiment(
        "sd_teacher", f"Self-distillation teacher at {args.ratio:g}x", "sd_teacher detached vs joint",
        lambda: [R.Run("detached", "cross_modal", args.ratio), R.Run("joint", "cross_modal", args.ratio,
                                                                      recipe={"sd_teacher": "joint"})],
        write)
    R.run_experiment("sd_teacher", args.out, seeds=args.seeds, steps=args.steps,
                     command="python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
