"""Batch-1 inference, eager vs compiled (issue 13, point 3): ``TrimmedModel.compile(buckets=...)``.

Per size: a randomly initialised METER, untrained trimmers calibrated to ``--reduction`` fewer MACs,
``--inputs`` instances cycled through (their kept counts differ, so the buckets matter). Timed
interleaved (``trimkit.engine.timing.interleaved``, medians over rounds):

* full eager (the model itself) and full compiled (``torch.compile(model)``, its shapes are fixed);
* trimmed eager (mode ``remove``, exact counts) and trimmed compiled (each trimmed layer's own code
  through ``torch.compile`` on kept counts padded to ``--buckets`` sizes per stream; the trimmers,
  the decision and the gathers eager; see ``trimkit.engine.buckets``).

Before timing, every instance runs once compiled (that pass compiles every bucket combination the
instances reach: its time is the "compile s" column, cold or from inductor's on-disk cache as the
machine has it) and its outputs are compared with the eager trimmed model's. Writes the
``compile_infer`` section of RESULTS.md (``compile_infer_Nt`` for N threads).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._pytree import tree_leaves

import common
from layer_overhead import DEMO_MODEL


def _diff(a, b) -> float:
    return max(((x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b))
                if isinstance(x, torch.Tensor)), default=0.0)


def _phases(tmodel, xs) -> str:
    """Wall time per forward inside the compiled trimmed forward, by part (wrappers timed, 10 passes)."""
    import collections

    from trimkit.engine.compiled import CompiledLayer, CompiledModule
    from trimkit.layer import TrimmedLayer
    from trimkit.ops import Runtime

    spent: collections.Counter = collections.Counter()
    patched = []

    def timed(owner, name, label):
        f = getattr(owner, name)

        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t

        setattr(owner, name, g)
        patched.append((owner, name, f))

    timed(TrimmedLayer, "_decide", "trimmers")
    timed(Runtime, "remove_step", "decision sync + gather")
    timed(CompiledLayer, "__call__", "compiled layer bodies")
    timed(CompiledModule, "forward", "compiled modules outside the layers")
    timed(TrimmedLayer, "forward", "trimmed layers in all")
    timed(type(tmodel), "forward", "forward")
    try:
        with torch.inference_mode():
            for _ in range(10):
                for x in xs:
                    tmodel(**x)
    finally:
        for owner, name, f in reversed(patched):
            setattr(owner, name, f)
    n = 10 * len(xs)
    return ", ".join(f"{k} {v / n * 1e3:.2f}" for k, v in spent.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo", "base"])
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--buckets", type=int, default=4, help="sizes per stream and layer")
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=40, help="rounds (base: a fifth of them, at least 6)")
    ap.add_argument("--phases", action="store_true",
                    help="also time the parts of the compiled trimmed forward (trimmers, decision and gather, layer "
                         "bodies, modules outside the layers) over a pass of the instances")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.calibrate import calibrate
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs

    buckets = args.buckets
    rows, notes = [], []
    for size in args.sizes:
        model, impl = common.meter("tiny", **DEMO_MODEL) if size == "demo" else common.meter(size)
        tmodel = common.trimmed(model)
        xs = [impl.example_inputs(model, batch_size=1, seed=i) for i in range(args.inputs)]
        cal = calibrate(tmodel, xs[:3], args.reduction, steps=7)
        tmodel.eval()
        with torch.inference_mode():
            with tmodel.full():
                full_macs = sum(count_macs(tmodel, **x).total for x in xs)
            with tmodel.mode("remove"):
                trimmed_macs = sum(count_macs(tmodel, **x).total for x in xs)
            ref = [tmodel(**x) for x in xs]
        full_c = torch.compile(model, dynamic=False, options={"cpp_wrapper": True})  # what the layers get
        t0 = time.perf_counter()
        tmodel.compile(buckets=buckets)
        with torch.inference_mode():
            got = [tmodel(**x) for x in xs]
        compile_s = time.perf_counter() - t0
        layers = [l._compiled for l in tmodel._trimmed_layers()]
        graphs = sum(len(c.graphs) for c in layers)
        worst = max(_diff(a, b) for a, b in zip(ref, got))
        bucketing = tmodel.bucketing
        padded = f"{bucketing.padded} of {bucketing.calls}"
        if bucketing.failures:
            raise SystemExit(f"layers that could not be compiled: {bucketing.failures}")
        t1 = time.perf_counter()
        with torch.inference_mode():
            full_c(**xs[0])
        full_compile_s = time.perf_counter() - t1

        def full(r):
            model(**xs[r % len(xs)])

        def full_compiled(r):
            full_c(**xs[r % len(xs)])

        def eager(r):
            tmodel.runtime.bucketing = None
            tmodel(**xs[r % len(xs)])

        def compiled(r):
            tmodel.runtime.bucketing = bucketing
            tmodel(**xs[r % len(xs)])

        rounds = args.repeats if size != "base" else max(6, args.repeats // 5)
        t = interleaved({"full": full, "full_c": full_compiled, "eager": eager, "compiled": compiled},
                        repeats=rounds, warmup=len(xs))
        new_graphs = sum(len(c.graphs) for c in layers) - graphs
        ms = {k: f"{t.median(k) * 1e3:.2f}" for k in ("full", "full_c", "eager", "compiled")}
        if args.phases:
            tmodel.runtime.bucketing = bucketing
            notes.append(f"{size}, where a compiled trimmed forward's time goes (ms per forward, {args.inputs} "
                         f"instances x 10): {_phases(tmodel, xs)}")
        rows.append([size, f"{full_macs / trimmed_macs:.2f}x", ms["full"], ms["eager"],
                     f"**{t.ratio('full', 'eager'):.2f}x**", ms["full_c"], ms["compiled"],
                     f"**{t.ratio('full_c', 'compiled'):.2f}x**", f"{t.ratio('eager', 'compiled'):.2f}x",
                     f"{compile_s:.0f} ({graphs} graphs)", f"{worst:.1e}"])
        notes.append(f"{size}: calibrated to {cal.ratio:.2f}x at batch 1 on 3 instances; {padded} layer calls padded "
                     f"in the compiling pass; {new_graphs} graphs compiled during timing; full model's compile "
                     f"{full_compile_s:.0f} s")
        print(rows[-1], notes[-1], flush=True)
        torch._dynamo.reset()
        print(f"{size}: compiled layer calls {bucketing.compiled_calls}", flush=True)
    headers = ["size", "MACs ratio", "full eager ms", "trimmed eager ms", "speed eager", "full compiled ms",
               "trimmed compiled ms", "speed compiled", "trimmed: compiled vs eager", "compile s", "max |diff|"]
    body = [
        "## Batch-1 inference compiled: `TrimmedModel.compile(buckets=...)` against eager (CPU)",
        "",
        f"Command: `{common.command()}`",
        f"Machine: {common.machine()}; {common.load()}. Date: {common.now()}.",
        f"Random weights; untrained trimmers calibrated to {args.reduction}x fewer MACs; {args.inputs} instances "
        f"cycled; kept counts padded to {buckets} sizes per stream and layer. Compiled: inductor with its C++ "
        "wrapper (`cpp_wrapper`), the full model through `torch.compile`, each trimmed layer through "
        "`TrimmedModel.compile` (exported per bucket signature, called without guards). MACs ratio: full / trimmed over the instances "
        "(trimmed counted without padding). 'speed': full / trimmed, each pair timed interleaved, medians. "
        "'compile s': the first pass over the instances compiled (it compiles every bucket combination they "
        "reach); 'max |diff|': compiled trimmed outputs against eager trimmed ones.",
        "",
        common.table(headers, rows),
        "",
        *[f"- {n}" for n in notes],
    ]
    # one section per thread count (the small sizes at 1 thread, base at 2, as the other tables)
    common.write_section("compile_infer" if args.threads == 1 else f"compile_infer_{args.threads}t", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
