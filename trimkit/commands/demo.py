"""``trimkit demo [--quick] [--out DIR]``: SmartTrim on the shipped digit-grid task, end to end."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a METER-architecture model on digit-grid, SmartTrim it at 1.5x/2x/3x "
                                    "and the Local/Random baselines, print accuracy vs compute")
    p.add_argument("--quick", action="store_true", help="tiny sizes, under 2 minutes (smoke test; numbers mean nothing)")
    p.add_argument("--out", default="trimkit-demo", help="output directory (results.json, results.md, pareto.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    from trimkit.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=False if args.no_progress else None)
    return 0
