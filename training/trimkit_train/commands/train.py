"""``trimkit train --config FILE [--out DIR] [--resume [--allow-config-change] | --overwrite]``: plain or
SmartTrim fine-tuning from a YAML config.

Exit codes: 0 done; 1 the run diverged (non-finite loss, gradients or weights: stopped, the last
checkpoint left as it was); 2 a usage problem (bad config, a run directory that already holds a run,
nothing to resume, a resume config that differs from the run's)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a backbone (plain or with SmartTrim) from a YAML experiment config",
                       description="Train as described by an experiment config (sections model/data/train/trim; "
                                   "see examples/digit_grid.yaml). Without a `trim` section the plain backbone is "
                                   "trained. Writes DIR/log.jsonl, DIR/checkpoint/ and DIR/metrics.json. A DIR that "
                                   "already holds a run is only touched with --resume or --overwrite. A run whose "
                                   "loss (or gradients) turns NaN/inf stops with exit code 1 and no new checkpoint.")
    p.add_argument("--config", required=True, help="experiment YAML file")
    p.add_argument("--out", default=None, help="run directory (default: train.out_dir of the config)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from DIR/checkpoint (step, optimizer, RNG); the config must match the run's "
                           "except for bookkeeping fields (progress, out_dir, eval_every, eval_instances, "
                           "eval_batch_size, macs_instances, save_every, num_workers, find_unused_parameters, fsdp)")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the run in DIR (checkpoint/, log.jsonl, experiment.yaml, metrics.json) and start over")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue on a config that differs from the run's (the changes are printed "
                        "and recorded in log.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    import sys

    from trimkit_train import ConfigError, DivergedError, ExperimentConfig, RunExistsError, Trainer

    if args.allow_config_change and not args.resume:
        print("trimkit train: --allow-config-change only applies to --resume", file=sys.stderr)
        return 2
    try:
        config = ExperimentConfig.load(args.config)
    except (ConfigError, FileNotFoundError) as err:
        print(f"trimkit train: {err}", file=sys.stderr)
        return 2
    if args.no_progress:
        config.train.progress = False
    try:
        trainer = Trainer(config, out_dir=args.out)
        metrics = trainer.fit(resume=args.resume, overwrite=args.overwrite,
                              allow_config_change=args.allow_config_change)
    except DivergedError as err:
        print(f"trimkit train: {err}", file=sys.stderr)
        return 1
    except (ConfigError, RunExistsError, FileNotFoundError) as err:
        print(f"trimkit train: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "keep"}, indent=2))
    print(f"checkpoint: {trainer.out_dir / 'checkpoint'}")
    return 0
