"""``trimkit check --adapter NAME [--size tiny|base] [--seed N] [--trials N] [--batch B]
[--build-option KEY=VALUE ...]``: adapter conformance check (see :mod:`trimkit.check`)."""

from __future__ import annotations

import argparse
import json

from trimkit.commands._args import int_range, nonneg_int, positive_int

DESCRIPTION = """\
Check that an adapter keeps trimkit's mask contract, on a small randomly initialised model that
the adapter builds. Steps, in order (each prints PASS, FAIL or SKIP with its numbers):

  build                     the adapter's build(size=..., seed=..., **build options)
  trace and rewrite         torch.fx tracing and rewriting: the streams, layers and trimmers found
                            (and the trimmed model's plan, printed under the header when it has one)
  all masks 1 == original   fresh trimmers keep everything: same outputs as the original model
                            (batch 1: removal path; batch 2: masked path)
  hard masks == physical    random trimmer weights and inputs: masked (mode hard) == tokens and
    removal                 heads physically removed (mode remove) at batch 1, and something dropped
  bucketed removal ==       batch-1 kept counts padded to 3 sizes per stream and layer, slack rows
    removal                 masked (what tmodel.compile runs) == mode remove, the same decisions, and
                            some layer call really padded; then compiled (exported layer graphs run
                            as they are), with the layers left eager listed
  packed == masked          a batch of B (--batch) from the adapter's example_inputs, with padding
    (batch B, padding,      where a stream declares StreamSpec.padding_input: modes packed and
    per-instance counts)    padded == mode hard, with the same decisions, per-instance kept counts
                            that differ across the batch and padding present (else it is vacuous).
                            SKIP when the packed engine refuses the model (e.g. a causal decoder)
  MACs fall when trimming   MACs of the trimmed model (mode remove) < the full model's

Every equivalence uses atol 1e-4; outputs are compared directly, or on the kept tokens (kept_mask)
for per-token outputs. Exit status 0 when nothing failed, 1 when a check failed or the adapter is
not registered (one line on stderr), 2 for bad arguments."""


def _build_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, JSON lists and dicts
    except json.JSONDecodeError:
        return key, value  # a plain string


def register(sub) -> None:
    p = sub.add_parser("check", help="check that an adapter keeps the mask contract (trace, all-ones == original, "
                                     "masked == removed, bucketed == removed, packed == masked with padding, "
                                     "MACs)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="registered adapter name (see `trimkit plugins`)")
    p.add_argument("--size", default="tiny", help="model size the adapter builds (default: tiny)")
    p.add_argument("--seed", metavar="S", type=nonneg_int, default=0,
                   help="seed of the build and the random inputs (>= 0, default: 0)")
    p.add_argument("--trials", metavar="N", type=positive_int, default=5,
                   help="random trimmer weights and inputs per equivalence check (>= 1, default: 5)")
    p.add_argument("--batch", metavar="B", type=int_range(2), default=3,
                   help="batch size of the packed == masked check (>= 2, default: 3)")
    p.add_argument("--build-option", dest="build_options", type=_build_option, action="append", default=[],
                   metavar="KEY=VALUE", help="keyword argument for the adapter's build, repeatable; VALUE is JSON "
                                             "or a string (e.g. task=nlvr2, token_outputs=true)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from trimkit.check import run_check
    from trimkit.plugins import get_registry

    get_registry().adapters.get(args.adapter)  # an unknown name is an error (listing the registered), not a check
    report = run_check(args.adapter, size=args.size, seed=args.seed, trials=args.trials, batch=args.batch,
                       build_options=dict(args.build_options))
    print(report.format())
    return 0 if report.ok else 1
