"""``trimkit plugins [--json]``: every registered adapter, policy, sampler, objective and scheduler."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("plugins", help="list registered adapters and method parts, and where they came from")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)


def run(args) -> int:
    from trimkit.plugins import describe_plugins

    rows = describe_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["name"]) for r in rows), default=4)
    kind_w = max((len(r["kind"]) for r in rows), default=4)
    print(f"{'kind':<{kind_w}}  {'name':<{width}}  source")
    for r in rows:
        print(f"{r['kind']:<{kind_w}}  {r['name']:<{width}}  {r['source']}")
    return 0
