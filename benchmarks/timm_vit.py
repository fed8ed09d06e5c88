"""timm ViT-B/16 (224px), CPU: speed / MACs ratio at batch 1 (mode ``remove``) and in packed batches.

Issue 13's goals for a single-stream vision transformer: at 2x fewer MACs, speed/MACs >= 0.92 at
batch 1 and >= 0.95 in packed batches of 8. A randomly initialised ``vit_base_patch16_224`` (adapter
``timm``: one stream, a token trimmer and a head trimmer per block, no context stream), untrained
trimmers calibrated to ``--reduction`` fewer MACs at batch 1 (trimkit.engine.calibrate); each batch
size timed interleaved against the full model (mode ``off``), MACs of each batch counted on the
trimmed forward itself (per-instance decisions vary).

    python benchmarks/timm_vit.py [--threads 2] [--batches 1 8] [--reduction 2] [--repeats 4]

At batch 1 it also times an **oracle**: timm's own blocks, no trimkit at all, each block run on the
first ``n`` tokens where ``n`` is what the trimmed forward kept before that block (heads not
trimmed). Its speed/MACs is what this machine's kernels allow at those token counts (each GEMM has a
cost that does not shrink with its rows: reading and packing the weights), the ceiling trimkit's
batch-1 speed/MACs can reach; trimkit's over the oracle's is what its own work costs (trimmers,
decision sync, gathers, kept-head runs).
"""

from __future__ import annotations

import argparse
import os

import torch

import common


def oracle(model, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """timm's forward with block ``i`` run on the first ``counts[i]`` tokens (no trimkit)."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for block, n in zip(model.blocks, counts):
        h = block(h[:, :n])
    return model.forward_head(model.norm(h))


def oracle_speed(tmodel, model, x: dict, repeats: int) -> tuple[float, float, float]:
    """(oracle MACs ratio, oracle speed ratio, trimmed speed over oracle speed) at batch 1, the three
    timed interleaved."""
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs

    with torch.no_grad(), tmodel.mode("remove"):
        tmodel(**x)
    tokens = {r.key: len(r.index) for r in tmodel.records if r.kind == "token"}
    n0 = x["x"].shape[-1] // model.patch_embed.patch_size[0]
    n = n0 * n0 + model.num_prefix_tokens
    counts = []
    for i in range(len(model.blocks)):
        n = tokens.get(f"blocks.{i}", n)
        counts.append(n)
    with tmodel.full():
        mf = count_macs(tmodel, **x).total
    mo = count_macs(oracle, model, x["x"], counts).total
    fns = {"full": lambda r: common.run_mode(tmodel, "off", x), "oracle": lambda r: oracle(model, x["x"], counts),
           "remove": lambda r: common.run_mode(tmodel, "remove", x)}
    t = interleaved(fns, repeats=repeats, warmup=1)
    return mf / mo, t.ratio("full", "oracle"), t.ratio("oracle", "remove")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reduction", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds per batch size")
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm model name (random weights)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.calibrate import calibrate
    from trimkit.plugins import get_registry

    load_start = common.load()
    impl = get_registry().adapters.get("timm")
    model = impl.build(args.model)
    tmodel = common.trimmed(model, adapter="timm")
    cal = calibrate(tmodel, [impl.example_inputs(model, batch_size=1, seed=i) for i in range(3)], args.reduction,
                    steps=7)
    tmodel.eval()
    rows = []
    for B in args.batches:
        x = impl.example_inputs(model, batch_size=B, seed=100 + B)
        engine, macs_ratio, t = common.batch_speed(tmodel, x, args.repeats)
        speed = t.ratio("full", engine)
        goal = 0.92 if B == 1 else 0.95
        ceiling = "-"
        if B == 1:
            om, os_, share = oracle_speed(tmodel, model, x, args.repeats)
            ceiling = f"{os_ / om:.2f} ({om:.2f}x fewer MACs, {os_:.2f}x faster); trimmed at {share:.2f}x its speed"
        rows.append([str(B), engine, f"{macs_ratio:.2f}x", f"{t.median('full') * 1e3:.1f}",
                     f"{t.median(engine) * 1e3:.1f}", f"**{speed:.2f}x**", f"{speed / macs_ratio:.2f}", f">= {goal}",
                     ceiling])
        print(rows[-1], flush=True)
    body = f"""## timm {args.model}, CPU: speed vs MACs at batch 1 and packed batches

Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
Random weights; untrained trimmers calibrated to {cal.ratio:.2f}x fewer MACs at batch 1 (token and head
trimmer per block, no context stream); MACs of each batch counted on its trimmed forward;
{args.repeats} interleaved rounds, medians.

{common.table(["batch", "engine", "MACs ratio", "full ms", "trimmed ms", "speed ratio", "speed/MACs",
               "goal (issue 13)", "oracle speed/MACs (no trimkit, same token counts)"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("timm_vit", body)


if __name__ == "__main__":
    main()
