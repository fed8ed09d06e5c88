"""How to compute only the kept heads at batch 1 (the choice behind ``TrimAttention._kept_heads``).

METER-base attention shapes (D = 768, 12 heads, separate q/k/v/out projections), one instance,
N tokens, a random subset of heads kept. Three ways, timed interleaved:

* mask: compute every head, multiply the dropped ones by 0 (no saving);
* slice: gather the kept heads' weight rows (``index_select`` copies) and compute those;
* runs: group kept heads into runs of consecutive heads and compute each run on *views* of the
  weights (no copy), accumulating the output projection (trimkit's choice).

    python benchmarks/heads_strategy.py [--threads 2] [--tokens 24 40 100 325] [--keep 3 6 9]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import common

D, H = 768, 12
d = D // H


def attn(q, k, v, n, h):
    q, k, v = (t.view(1, n, h, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, n, h * d)


def masked(W, x, idx, m):
    wq, wk, wv, wo, b = W
    n = x.shape[1]
    y = attn(F.linear(x, wq, b), F.linear(x, wk, b), F.linear(x, wv, b), n, H).view(1, n, H, d) * m[:, None]
    return F.linear(y.view(1, n, D), wo, b)


def sliced(W, x, idx, m):
    wq, wk, wv, wo, b = W
    n, h = x.shape[1], idx.numel()
    q, k, v = (F.linear(x, w.view(H, d, D).index_select(0, idx).view(h * d, D), b.view(H, d).index_select(0, idx).view(-1))
               for w in (wq, wk, wv))
    return F.linear(attn(q, k, v, n, h), wo.view(D, H, d).index_select(1, idx).view(D, h * d), b)


def runs_of(idx):
    out = []
    for i in idx.tolist():
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def runs(W, x, idx, m):
    wq, wk, wv, wo, b = W
    n = x.shape[1]
    acc = None
    for a, e in runs_of(idx):
        r0, r1 = a * d, e * d
        y = attn(F.linear(x, wq[r0:r1], b[r0:r1]), F.linear(x, wk[r0:r1], b[r0:r1]), F.linear(x, wv[r0:r1], b[r0:r1]),
                 n, e - a)
        if acc is None:
            acc = F.linear(y, wo[:, r0:r1], b)
        else:
            acc.view(n, D).addmm_(y.view(n, -1), wo[:, r0:r1].t())
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[24, 40, 100, 325])
    ap.add_argument("--keep", type=int, nargs="+", default=[3, 6, 9])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trimkit.engine.timing import interleaved

    load_start = common.load()
    torch.manual_seed(0)
    W = [torch.randn(D, D) * 0.02 for _ in range(4)] + [torch.randn(D) * 0.02]
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in args.tokens:
        for keep in args.keep:
            x = torch.randn(1, n, D)
            idx = torch.randperm(H, generator=g)[:keep].sort().values
            m = torch.zeros(H)
            m[idx] = 1
            ref = masked(W, x, idx, m)
            torch.testing.assert_close(runs(W, x, idx, m), ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(sliced(W, x, idx, m), ref, atol=1e-4, rtol=1e-4)
            t = interleaved({f: (lambda r, f=f: globals()[f](W, x, idx, m)) for f in ("masked", "sliced", "runs")},
                            repeats=args.repeats, warmup=2)
            rows.append([str(n), f"{keep}/{H} ({len(runs_of(idx))} runs)"] +
                        [f"{t.median(f) * 1e3:.2f}" for f in ("masked", "sliced", "runs")] +
                        [f"{t.ratio('masked', 'runs'):.2f}x", f"{t.ratio('sliced', 'runs'):.2f}x"])
            print(rows[-1], flush=True)
    body = f"""## Kept heads at batch 1: mask vs slice vs runs (METER-base attention shapes)

Command: `{common.command()}`{' (OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ')' if 'OMP_WAIT_POLICY' in os.environ else ''}
Machine: {common.machine()}; {load_start} at start, {common.load()} at end. Date: {common.now()}.
One attention (q, k, v, out projections + SDPA), D = 768, 12 heads; {args.repeats} interleaved rounds, medians (ms).

{common.table(["tokens", "heads kept", "mask ms", "slice ms", "runs ms", "runs vs mask", "runs vs slice"], rows)}
"""
    print(body)
    if not args.no_write:
        common.write_section("heads_strategy", body)


if __name__ == "__main__":
    main()
