"""``trimkit check --adapter NAME [--size tiny|base] [--seed N]``: adapter conformance check."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check", help="check that an adapter keeps the mask contract (trace, equivalence, MACs)")
    p.add_argument("--adapter", required=True, help="registered adapter name (see `trimkit plugins`)")
    p.add_argument("--size", default="tiny", help="model size the adapter builds (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=5, help="random mask trials for the equivalence check")
    p.set_defaults(handler=run)


def run(args) -> int:
    from trimkit.check import run_check

    report = run_check(args.adapter, size=args.size, seed=args.seed, trials=args.trials)
    print(report.format())
    return 0 if report.ok else 1
