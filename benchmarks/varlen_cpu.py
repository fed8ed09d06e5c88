"""Attention over packed rows on CPU: which way is fastest (the choice behind
``trimkit.engine.packed.varlen_attention`` off CUDA)?

Packed q/k/v rows (R, H, d) of B instances with per-instance counts, three exact ways:

* loop: one SDPA call per instance on its row slices (trimkit's choice);
* pad: scatter rows into (B, H, max, d), one SDPA call with a key-padding mask, gather back;
* jagged: nested jagged tensors (``torch.nested``, layout=torch.jagged) and one SDPA call.

    python benchmarks/varlen_cpu.py [--threads 2] [--batches 4 16 64]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import common

H, d = 12, 64


def loop(q, k, v, offs):
    return torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                                     v[a:b].transpose(0, 1)[None])[0].transpose(0, 1)
                      for a, b in zip(offs[:-1], offs[1:])])


def pad(q, k, v, counts, slots, bias):
    B, m = len(counts), max(counts)

    def up(t):
        out = t.new_zeros(B * m, H, d)
        out.index_copy_(0, slots, t)
        return out.view(B, m, H, d).transpose(1, 2)

    y = F.scaled_dot_product_attention(up(q), up(k), up(v), attn_mask=bias)
    return y.transpose(1, 2).reshape(B * m, H, d).index_select(0, slots)


def jagged(q, k, v, offsets):
    def nt(t):
        return torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)

    return F.scaled_dot_product_attention(nt(q), nt(k), nt(v)).transpose(1, 2).values()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.timing import interleaved

    load_start = common.load()
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in args.batches:
        counts = torch.randint(40, 326, (B,), generator=g).tolist()  # METER vision: 325 tokens, trimmed per instance
        offs = [0]
        for c in counts:
            offs.append(offs[-1] + c)
        R, m = offs[-1], max(counts)
        q, k, v = (torch.randn(R, H, d, generator=g) for _ in range(3))
        bidx = torch.cat([torch.full((c,), b) for b, c in enumerate(counts)])
        within = torch.cat([torch.arange(c) for c in counts])
        slots = bidx * m + within
        bias = torch.zeros(B, m).masked_fill(torch.arange(m)[None] >= torch.tensor(counts)[:, None], float("-inf"))
        bias = bias[:, None, None, :]
        offsets = torch.tensor(offs)
        ref = loop(q, k, v, offs)
        torch.testing.assert_close(pad(q, k, v, counts, slots, bias), ref, atol=1e-4, rtol=1e-4)
        fns = {"loop": lambda r: loop(q, k, v, offs), "pad": lambda r: pad(q, k, v, counts, slots, bias)}
        try:
            torch.testing.assert_close(jagged(q, k, v, offsets), ref, atol=1e-4, rtol=1e-4)
            fns["jagged"] = lambda r: jagged(q, k, v, offsets)
        except Exception as err:  # noqa: BLE001 - report, do not fail
            print("jagged unavailable:", type(err).__name__, str(err)[:200])
        t = interleaved(fns, repeats=args.repeats, warmup=1, inference_mode=False)  # nested tensors refuse inference tensors
        rows.append([str(B), f"{R} (max {m})", f"{t.median('loop') * 1e3:.1f}", f"{t.median('pad') * 1e3:.1f}",
                     f"{t.median('jagged') * 1e3:.1f}" if "jagged" in fns else "n/a",
                     f"{t.ratio('pad', 'loop'):.2f}x", f"{t.ratio('jagged', 'loop'):.2f}x" if "jagged" in fns else "n/a"])
        print(rows[-1], flush=True)
    body = f"""## Packed attention on CPU: per-instance loop vs padding inside attention vs jagged

Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
q/k/v rows of B instances with random counts in [40, 325] (METER vision tokens after trimming), 12 heads of 64;
self-attention; {args.repeats} interleaved rounds, medians (ms). "loop" is what trimkit runs off CUDA.

{common.table(["batch", "rows", "loop ms", "pad ms", "jagged ms", "loop vs pad", "loop vs jagged"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("varlen_cpu", body)


if __name__ == "__main__":
    main()
