"""``trimkit demo [--quick] [--seeds N] [--out DIR]``: train a small METER on digit-grid VQA, SmartTrim it at 1.5x/2x/3x
fewer MACs plus the Local and Random baselines, and report accuracy, GMACs and CPU latency."""

from __future__ import annotations

from trimkit.commands._args import positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="SmartTrim end to end on CPU: train, trim at 1.5x/2x/3x, compare with baselines (~8 min)",
        description="Train a small METER-architecture model on the shipped digit-grid VQA task, fine-tune trimmed "
                    "copies with SmartTrim at about 1.5x, 2x and 3x fewer MACs and the Local/Random token-policy "
                    "baselines at 3x, then measure accuracy, GMACs per instance (batch 1, tokens and heads removed) "
                    "and interleaved CPU latency. Writes DIR/results.json, DIR/results.md and DIR/pareto.png.")
    p.add_argument("--quick", action="store_true", help="tiny everything (a smoke test, < 2 minutes); numbers mean nothing")
    p.add_argument("--out", default="trimkit-demo", help="output directory (default: ./trimkit-demo)")
    p.add_argument("--finetune-steps", type=positive_int, default=None, metavar="N",
                   help="steps of each SmartTrim fine-tune, >= 1 (default: the preset's, 300, or 8 with --quick; "
                        "each 300 more add about 5 minutes on 2 cores)")
    p.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                   help="repeat every fine-tune with seeds 0..N-1 (one backbone) and report mean ± std in the table "
                        "and error bars in the plot (default 1: the demo as it is; each seed adds the fine-tunes' "
                        "time, about 5 minutes on 2 cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    from trimkit_train.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=False if args.no_progress else None, finetune_steps=args.finetune_steps,
             seeds=args.seeds)
    return 0
