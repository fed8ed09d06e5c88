"""``trimkit eval --checkpoint DIR [--split test] [--json]``: accuracy, GMACs full vs trimmed, keep ratios."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, mean GMACs per instance (full vs trimmed), keep ratios")
    p.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint/ directory")
    p.add_argument("--split", default=None, help="dataset split to evaluate (default: data.eval_split of the run)")
    p.add_argument("--instances", type=int, default=None, help="evaluate on the first N examples (default: all)")
    p.add_argument("--macs-instances", type=int, default=None,
                   help="instances whose MACs are counted at batch 1 (default: train.macs_instances of the run)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    import sys

    from trimkit.training import build_dataset, evaluate, load_checkpoint

    try:
        model, config = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"trimkit eval: {err}", file=sys.stderr)
        return 2
    data = config.data
    if args.split is not None:
        data = data.model_copy(update={"eval_split": args.split})
    dataset = build_dataset(data, "eval")
    macs_n = config.train.macs_instances if args.macs_instances is None else args.macs_instances
    ev = evaluate(model, dataset, batch_size=config.train.eval_batch_size, instances=args.instances,
                  macs_instances=macs_n)
    ev.update(checkpoint=str(args.checkpoint), split=data.eval_split, trimmed=config.trim is not None)
    if args.json:
        print(json.dumps(ev, indent=2))
        return 0
    print(f"checkpoint   {args.checkpoint}  (split {data.eval_split}, {ev['n']} examples)")
    print(f"accuracy     {ev['accuracy']:.4f}")
    if "gmacs" in ev:
        print(f"GMACs/inst.  full {ev['gmacs_full']:.4f}  trimmed {ev['gmacs']:.4f}  "
              f"({ev['macs_ratio']:.2f}x fewer, {ev['macs_instances']} instances at batch 1)")
    if ev["keep"]:
        print(f"keep ratio   tokens {ev['keep_tokens']:.3f}  heads {ev['keep_heads']:.3f}")
        width = max(len(k) for k in ev["keep"])
        for k, v in ev["keep"].items():
            print(f"  {k:<{width}}  {v:.3f}")
    return 0
