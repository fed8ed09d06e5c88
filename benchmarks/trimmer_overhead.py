"""(c) What the trimmers themselves cost on METER base (288px): MACs and time.

* Parameters of the trimmers vs the backbone.
* MACs of the trimmers with every token present (mode ``hard``, stable init: nothing dropped, the
  masked forward minus the full model) for several trimmer widths D' (``TrimConfig.trimmer_dim``;
  default ``max(16, D // 8)``), as a share of the full model's MACs.
* In a trimmed forward (mode ``remove``, calibrated to ``--reduction``): MACs and time of the
  trimmers, measured against the same forward with each trimmer's output replayed from a recording
  (same decisions, no trimmer compute), timed interleaved.

    python benchmarks/trimmer_overhead.py [--threads 2] [--reduction 2] [--widths 96 48 32 16]
"""

from __future__ import annotations

import argparse
import os

import torch

import common


class Replay:
    """Make every trimmer module return its recorded outputs (per instance, in call order)."""

    def __init__(self, tmodel):
        self.mods = []
        for lt in tmodel.trimmers.values():
            if lt.token is not None:
                self.mods.append(lt.token)
            self.mods += list(lt.heads.values())
        self.outs: dict[int, dict[int, list]] = {}
        self.instance = 0
        self.runtime = tmodel.runtime
        self._fuse = True

    def record(self, tmodel, instance: int, x: dict) -> None:
        rec = {id(m): [] for m in self.mods}
        hooks = [m.register_forward_hook(lambda mod, a, out: rec[id(mod)].append(out)) for m in self.mods]
        try:
            with torch.no_grad():
                tmodel(**x)
        finally:
            for h in hooks:
                h.remove()
        self.outs[instance] = rec

    def __enter__(self):
        # the policies' replaced forwards must be what runs, not the layers' fused forms of them
        self._fuse, self.runtime.fuse_trimmers = self.runtime.fuse_trimmers, False
        for m in self.mods:
            calls = [0]

            def forward(*a, _m=m, _calls=calls, **k):
                outs = self.outs[self.instance][id(_m)]
                out = outs[_calls[0] % len(outs)]
                _calls[0] += 1
                return out

            m.forward = forward
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            del m.forward
        self.runtime.fuse_trimmers = self._fuse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--widths", type=int, nargs="+", default=[96, 48, 32, 16])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--size", default="base")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit import TrimConfig, trim
    from trimkit.engine.calibrate import calibrate
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs

    load_start = common.load()
    model, impl = common.meter(args.size)
    xs = [impl.example_inputs(model, batch_size=1, seed=i) for i in range(args.instances)]
    x = xs[0]
    with torch.no_grad():
        full = count_macs(model, **x).total
    width_rows = []
    default_d = None
    for d in args.widths:
        tm = trim(model, TrimConfig(token_target=0.5, head_target=0.5, trimmer_dim=d), adapter="meter").eval()
        with tm.mode("hard"):
            masked = count_macs(tm, **x).total
        width_rows.append([str(d), f"{tm.trimmer_parameters() / 1e6:.2f} M", f"{(masked - full) / 1e6:.0f} M",
                           f"{100 * (masked - full) / full:.2f}%"])
    tmodel = common.trimmed(model)  # default width
    default_d = tmodel.trimmers[next(iter(tmodel.trimmers))].token.proj.out_features
    cal = calibrate(tmodel, xs, args.reduction, steps=7)
    replay = Replay(tmodel)
    with tmodel.mode("remove"):
        for i, xi in enumerate(xs):
            replay.record(tmodel, i, xi)
        with_trimmers = sum(count_macs(tmodel, **xi).total for xi in xs) / len(xs)
        without = 0
        with replay:
            for i, xi in enumerate(xs):
                replay.instance = i
                without += count_macs(tmodel, **xi).total / len(xs)

    def run_with(r):
        with tmodel.mode("remove"):
            tmodel(**xs[r % len(xs)])

    def run_replay(r):
        replay.instance = r % len(xs)
        with replay, tmodel.mode("remove"):
            tmodel(**xs[r % len(xs)])

    def run_full(r):
        with tmodel.full():
            tmodel(**xs[r % len(xs)])

    t = interleaved({"full": run_full, "trimmers": run_with, "replay": run_replay},
                    repeats=args.repeats * len(xs), warmup=1)
    tr_macs = with_trimmers - without
    time_share = 1 - 1 / t.ratio("trimmers", "replay")
    body = f"""## (c) Trimmer overhead, METER {args.size} (288px)

Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.

Trimmer width D' vs MACs with every token present (mode `hard` at stable init minus the full model,
{common.gmacs(full)} GMACs; default D' = max(16, D // 8) = {default_d} for D = 768):

{common.table(["D'", "trimmer params", "trimmer MACs", "share of full MACs"], width_rows)}

In a trimmed forward (mode `remove`, calibrated to {cal.ratio:.2f}x fewer MACs, default D'): trimmer MACs
{tr_macs / 1e6:.0f} M per instance = {100 * tr_macs / with_trimmers:.2f}% of the trimmed forward
({common.gmacs(with_trimmers)} G) and {100 * tr_macs / cal.macs_full:.2f}% of the full model. Time, interleaved
({len(t.times['full'])} rounds, medians): full {t.median('full') * 1e3:.0f} ms, trimmed {t.median('trimmers') * 1e3:.0f} ms,
trimmed with replayed decisions (no trimmer compute) {t.median('replay') * 1e3:.0f} ms: the trimmers take
{100 * time_share:.1f}% of the trimmed forward's time.
"""
    print(body)
    if not args.no_write:
        common.write_section("c_trimmer_overhead", body)


if __name__ == "__main__":
    main()
