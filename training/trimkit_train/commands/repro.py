"""``trimkit repro NAME [--seeds N] [--quick] [--steps N] [--out DIR] [--config FILE [--high-config FILE]]``: one of the paper's
experiments (trimkit_train.repro.EXPERIMENTS) on digit-grid or, with ``--config``, on a task's experiment
config; mean ± std over seeds, table/plot and command line."""

from __future__ import annotations

import shlex

from trimkit.commands._args import positive_int


def _experiments() -> dict:
    from trimkit_train.repro import EXPERIMENTS

    return EXPERIMENTS


def register(sub) -> None:
    exps = _experiments()
    listing = "; ".join(f"{name}: {e.help}" for name, e in exps.items())
    p = sub.add_parser(
        "repro", help="reproduce one of the paper's experiments (mean ± std over seeds): " + ", ".join(exps),
        description="Run one of the paper's experiments on the digit-grid setting of `trimkit demo` (a METER-"
                    "architecture backbone trained once, keep targets calibrated per MACs reduction, each "
                    "configuration fine-tuned once per seed), or with --config on your task and model, and write DIR/NAME.md (table: mean ± std over the "
                    "seeds, and the exact command line), DIR/results.json, DIR/command.txt and, for figures, "
                    "DIR/NAME.png. Experiments: " + listing + ".")
    p.add_argument("name", choices=list(exps), metavar="NAME", help="experiment: " + listing)
    p.add_argument("--seeds", type=positive_int, default=3, metavar="N", help="fine-tune seeds 0..N-1 (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="the demo's smoke-test sizes (seconds per configuration); the numbers mean nothing")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="steps of every fine-tune (default: the preset's, 300, or 8 with --quick)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: ./trimkit-repro/NAME)")
    generic = ", ".join(n for n, e in exps.items() if e.any_task)
    paired = ", ".join(n for n, e in exps.items() if e.paired)
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"run on a task instead of digit-grid ({generic}; and {paired} with --high-config): an "
                        "experiment config as `trimkit "
                        "train` takes (YAML); its model (model.pretrained / model.init: the task-fine-tuned full "
                        "model) is the reference and the backbone every run fine-tunes, its trim/recipe the base of "
                        "every run (keep targets calibrated on that model), its train settings each fine-tune's")
    p.add_argument("--high-config", default=None, metavar="FILE",
                   help=f"with --config, for {paired}: the same task's config at the higher input resolution (its "
                        "model fine-tuned at that resolution, its data producing those images), compared with "
                        "--config's model")
    p.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                   help="run only the configurations with these row labels (as in the table's first column, e.g. "
                        "--only defaults sd_teacher=joint), to measure some rows with more seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from trimkit_train.repro import run_experiment

    out = args.out if args.out is not None else str(Path("trimkit-repro") / args.name)
    argv = ["trimkit", "repro", args.name, "--seeds", str(args.seeds), "--out", out]
    if args.quick:
        argv.append("--quick")
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.no_progress:
        argv.append("--no-progress")
    if args.config is not None:
        argv += ["--config", args.config]
    if args.high_config is not None:
        argv += ["--high-config", args.high_config]
    if args.only:
        argv += ["--only", *args.only]
    run_experiment(args.name, out, seeds=args.seeds, quick=args.quick, steps=args.steps, command=shlex.join(argv),
                   progress=False if args.no_progress else None, config=args.config, only=args.only,
                   high_config=args.high_config)
    return 0
