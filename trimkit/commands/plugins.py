"""``trimkit plugins [--json]``: every registered adapter, policy, sampler, objective and scheduler.

Third-party plugins that were skipped (failed to import, unknown hook, a hook that raised) follow
under ``failed to load:`` (with ``--json``, on stderr, so stdout stays the list of rows); the exit
status is 0 either way: the rest loaded. Entry points excluded by ``TRIMKIT_EXCLUDE_PLUGINS`` are
named last.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("plugins", help="list registered adapters and method parts, where they came from, "
                                       "and the plugins that failed to load")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)


def _table(rows: list[dict[str, str]], columns: list[str], indent: str = "") -> list[str]:
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns[:-1]}
    head = "  ".join(f"{c:<{widths[c]}}" for c in columns[:-1]) + "  " + columns[-1]
    lines = [indent + head]
    for r in rows:
        lines.append(indent + "  ".join(f"{r[c]:<{widths[c]}}" for c in columns[:-1]) + "  " + r[columns[-1]])
    return lines


def run(args: argparse.Namespace) -> int:
    from trimkit.plugins import EXCLUDE_ENV, describe_failures, describe_plugins, excluded

    rows = describe_plugins()
    failed = describe_failures()
    skipped = excluded()
    out = sys.stdout
    if args.json:
        print(json.dumps(rows, indent=2))
        out = sys.stderr  # the notes below must not break the JSON
    else:
        print("\n".join(_table(rows, ["kind", "name", "source"])))
    if failed:
        print("\nfailed to load:", file=out)
        print("\n".join(_table(failed, ["name", "source", "error"], indent="  ")), file=out)
    if skipped:
        print(f"\nexcluded by {EXCLUDE_ENV}: {', '.join(skipped)}", file=out)
    return 0
