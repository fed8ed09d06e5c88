"""``trimkit train --config FILE [--out DIR] [--resume]``: plain or SmartTrim fine-tuning from a YAML config."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a backbone (plain or with SmartTrim) from a YAML experiment config",
                       description="Train as described by an experiment config (sections model/data/train/trim; "
                                   "see examples/digit_grid.yaml). Without a `trim` section the plain backbone is "
                                   "trained. Writes DIR/log.jsonl, DIR/checkpoint/ and DIR/metrics.json.")
    p.add_argument("--config", required=True, help="experiment YAML file")
    p.add_argument("--out", default=None, help="run directory (default: train.out_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint (step, optimizer, RNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    import sys

    from trimkit.training import ConfigError, ExperimentConfig, Trainer

    try:
        config = ExperimentConfig.load(args.config)
    except (ConfigError, FileNotFoundError) as err:
        print(f"trimkit train: {err}", file=sys.stderr)
        return 2
    if args.no_progress:
        config.train.progress = False
    trainer = Trainer(config, out_dir=args.out)
    try:
        metrics = trainer.fit(resume=args.resume)
    except FileNotFoundError as err:
        print(f"trimkit train: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "keep"}, indent=2))
    print(f"checkpoint: {trainer.out_dir / 'checkpoint'}")
    return 0
