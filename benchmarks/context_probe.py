"""Does the cross-modal trimmers' context carry what a question asks for? (issue 3 diagnosis)

On a trained digit-grid METER backbone (a ``trimkit demo`` run's ``runs/backbone``), take the
position questions ("what digit is in row r column c ?") and train *fresh* token policies,
supervised, to pick the asked cell among the patches entering the first vision layer (cross-entropy
over the patches; features cached from the frozen backbone). Contexts compared:

* ``local``: :class:`~trimkit_smarttrim.policies.LocalTokenPolicy` (no context; the prior of where
  digits are is all it can learn),
* ``text_cls``: :class:`~trimkit_smarttrim.policies.CrossModalTokenPolicy` with the text
  encoder's [CLS], the context the demo's vision trimmers get,
* ``oracle``: the same policy with a one-hot of (row, column) as context (an upper bound for the
  policy's form).

If ``text_cls`` beats ``local``, the question's region is in the context and the policy can read
it: a demo where the trained cross-modal trimmers still ignore the question is then short of
training signal, not wired wrong. Writes ``benchmarks/results/context_probe.{md,json}``.

    python benchmarks/context_probe.py --backbone trimkit-demo/runs/backbone
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from trimkit_train import ExperimentConfig, build_dataset, build_model
from trimkit_train.trainer import collate_of, model_inputs
from trimkit_smarttrim.policies import CrossModalTokenPolicy, LocalTokenPolicy

OUT = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def features(net, cfg, split: str, size: int, batch: int = 256):
    """First-vision-layer inputs (B, 1 + cells, D), text hidden states, masks and the asked cell."""
    data = cfg.data.model_copy(update={"train_size": size, "eval_size": size})
    ds = build_dataset(data, split)
    collate = collate_of(ds)
    idx = [i for i in range(len(ds)) if ds.qtypes[i] == "position"]
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [net.vit_model.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: grabbed.update(v=a[0])),
             net.text_transformer.register_forward_hook(lambda m, a, o: grabbed.update(t=o))]
    vis, cls, rows, cols = [], [], [], []
    try:
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            b = collate([ds[i] for i in chunk])
            net(**model_inputs(net, b))
            v = grabbed["v"]
            vis.append(v if v.shape[0] == len(chunk) else v.transpose(0, 1))
            cls.append(grabbed["t"][:, 0])
            for i in chunk:
                r, c = ds.describe(i)["relevant_cells"][0]
                rows.append(r)
                cols.append(c)
    finally:
        for h in hooks:
            h.remove()
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    oracle = torch.cat([F.one_hot(rows_t, ds.grid), F.one_hot(cols_t, ds.grid)], dim=1).float()
    return torch.cat(vis), torch.cat(cls), oracle, rows_t * ds.grid + cols_t


def probe(kind: str, train, test, steps: int, lr: float, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    (v_tr, cls_tr, or_tr, y_tr), (v_te, cls_te, or_te, y_te) = train, test
    ctx_tr, ctx_te = (cls_tr, cls_te) if kind == "text_cls" else (or_tr, or_te)
    config = SimpleNamespace(trimmer_dim=None, init_logit=5.0)
    policy = (LocalTokenPolicy if kind == "local" else CrossModalTokenPolicy)(v_tr.shape[-1], ctx_tr.shape[-1], config)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(0, len(y_tr), (64,))
        loss = F.cross_entropy(policy(v_tr[i], v_tr[i, 0], ctx_tr[i])[:, 1:], y_tr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        def acc(v, c, y):
            return float((policy(v, v[:, 0], c)[:, 1:].argmax(-1) == y).float().mean())
        return {"train": acc(v_tr[:2000], ctx_tr[:2000], y_tr[:2000]), "test": acc(v_te, ctx_te, y_te)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="a trained backbone run directory (has experiment.yaml, checkpoint/)")
    ap.add_argument("--train-size", type=int, default=6000, help="digit-grid questions to draw (about 1/3 are position)")
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "context_probe"), help="output path without suffix (.md and .json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.backbone)
    cfg = ExperimentConfig.load(run / "experiment.yaml")
    net = build_model(cfg.model.model_copy(update={"init": str(run)}), cfg.data, None).eval()
    train = features(net, cfg, "train", args.train_size)
    test = features(net, cfg, "eval", args.test_size)
    cells = train[0].shape[1] - 1
    rows = {kind: probe(kind, train, test, args.steps, args.lr, args.seed) for kind in ("local", "text_cls", "oracle")}
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, "backbone": str(run), "cells": cells, "train_questions": len(train[3]),
              "test_questions": len(test[3]), "steps": args.steps, "lr": args.lr, "rows": rows}
    lines = ["# Context probe: can a token trimmer find the asked cell?\n",
             f"Command: `{command}`\n",
             f"Position questions only ({len(train[3])} train / {len(test[3])} test), {cells} patches "
             f"(chance {100 / cells:.1f}%); fresh policies trained supervised for {args.steps} steps at lr {args.lr} on "
             f"the frozen backbone's first-vision-layer inputs.\n",
             "| context | picks the asked cell (test) | (train) |", "|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {100 * r['test']:.1f}% | {100 * r['train']:.1f}% |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
