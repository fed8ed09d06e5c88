"""Where a trimmed model on digit-grid keeps its tokens, per question type (adapter-agnostic).

Measurements on trained digit-grid runs (any adapter whose vision stream is named ``vision``):
per-type accuracy and kept vision tokens, *question sensitivity* (same image, two questions: the
fraction of vision token decisions that differ), and, for position questions, whether the asked
cell survives. Used by ``blip_digit_grid.py`` and for the demo analysis in
``benchmarks/results/demo/README.md``::

    python benchmarks/digit_grid_analysis.py trimkit-demo/runs/backbone trimkit-demo/runs/cross_modal-3x \
        trimkit-demo/runs/local-3x --out benchmarks/results/demo/analysis
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from trimkit.model import TrimmedModel


def _last_vision_mask(tmodel) -> torch.Tensor:
    last = [l.path for l in tmodel.spec.layers if l.stream == "vision"][-1]
    return next(r.mask for r in tmodel.records if r.kind == "token" and r.key == last)


@torch.no_grad()
def kept_by_type(tmodel, dataset, batch_size: int = 250) -> dict[str, float]:
    """Per question type: mean fraction of vision tokens kept after the last vision trimmer (hard masks)."""
    from trimkit_train import model_inputs

    kept: dict[str, list[float]] = {}
    tmodel.eval()
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(len(dataset), start + batch_size)))
        with tmodel.mode("hard"):
            tmodel(**model_inputs(tmodel, dataset.collate_fn([dataset[i] for i in idx])))
        for i, k in zip(idx, _last_vision_mask(tmodel).mean(1).tolist()):
            kept.setdefault(dataset.qtypes[i], []).append(k)
    return {t: sum(v) / len(v) for t, v in sorted(kept.items())}


@torch.no_grad()
def per_type_accuracy(model, dataset, batch_size: int = 250) -> dict[str, float]:
    from trimkit_train import model_inputs

    model.eval()
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(len(dataset), start + batch_size)))
        batch = dataset.collate_fn([dataset[i] for i in idx])
        pred = model(**model_inputs(model, batch)).argmax(-1)
        for i, ok in zip(idx, (pred == batch["labels"]).tolist()):
            t = dataset.qtypes[i]
            correct[t] = correct.get(t, 0) + int(ok)
            total[t] = total.get(t, 0) + 1
    return {t: correct[t] / total[t] for t in sorted(total)}


@torch.no_grad()
def question_sensitivity(tmodel, dataset, pairs: int) -> dict[str, Any]:
    """Examples 2k and 2k+1 of the test split, both asked about the image of 2k: per vision layer, the
    fraction of token decisions (hard masks, [CLS] included) that differ between the two questions."""
    from trimkit_train import model_inputs

    vision = [l.path for l in tmodel.spec.layers if l.stream == "vision"]
    diff = dict.fromkeys(vision, 0)
    tot = dict.fromkeys(vision, 0)
    used = 0
    tmodel.eval()
    for k in range(pairs):
        a, b = dataset[2 * k], dataset[2 * k + 1]
        if dataset.questions[2 * k] == dataset.questions[2 * k + 1]:
            continue
        used += 1
        x = dataset.collate_fn([a, dict(b, pixel_values=a["pixel_values"])])
        with tmodel.mode("hard"):
            tmodel(**model_inputs(tmodel, x))
        for r in tmodel.records:
            if r.kind == "token" and r.key in diff:
                diff[r.key] += int((r.mask[0] != r.mask[1]).sum())
                tot[r.key] += r.mask.shape[1]
    per_layer = {k: diff[k] / tot[k] for k in vision if tot[k]}
    return {"pairs": used, "first_layer": per_layer.get(vision[0], float("nan")), "per_layer": per_layer}


@torch.no_grad()
def asked_cell_kept(tmodel, dataset, limit: int = 1000) -> dict[str, float]:
    """Position questions: how often the asked cell's patch is still kept after the last vision
    layer's trimmer (hard masks), split by whether that cell holds a digit."""
    from trimkit_train import model_inputs

    last = [l.path for l in tmodel.spec.layers if l.stream == "vision"][-1]
    idx = [i for i in range(min(limit, len(dataset))) if dataset.qtypes[i] == "position"]
    kept = {"digit": [0, 0], "empty": [0, 0]}
    tmodel.eval()
    for start in range(0, len(idx), 250):
        chunk = idx[start:start + 250]
        with tmodel.mode("hard"):
            tmodel(**model_inputs(tmodel, dataset.collate_fn([dataset[i] for i in chunk])))
        mask = next(r.mask for r in tmodel.records if r.kind == "token" and r.key == last)
        for row, i in enumerate(chunk):
            d = dataset.describe(i)
            patch = d["relevant_patches"][0] + 1  # + [CLS]
            which = "empty" if d["answer"] == "none" else "digit"
            kept[which][0] += int(mask[row, patch] > 0.5)
            kept[which][1] += 1
    return {k: v[0] / v[1] if v[1] else float("nan") for k, v in kept.items()} | {
        f"n_{k}": v[1] for k, v in kept.items()}


@torch.no_grad()
def digit_cells_kept(tmodel, dataset, limit: int = 1000) -> dict[str, dict[str, float]]:
    """Per question type: the fraction of digit cells still kept after the last vision layer's
    trimmer (hard masks), and, for existence and count questions, of the cells holding the asked digit."""
    from trimkit_train import model_inputs

    last = [l.path for l in tmodel.spec.layers if l.stream == "vision"][-1]
    n = min(limit, len(dataset))
    kept: dict[str, list[int]] = {}
    asked: dict[str, list[int]] = {}
    tmodel.eval()
    for start in range(0, n, 250):
        idx = list(range(start, min(n, start + 250)))
        with tmodel.mode("hard"):
            tmodel(**model_inputs(tmodel, dataset.collate_fn([dataset[i] for i in idx])))
        mask = next(r.mask for r in tmodel.records if r.kind == "token" and r.key == last)
        for row, i in enumerate(idx):
            d = dataset.describe(i)
            cells = [j for j, v in enumerate(d["grid"].reshape(-1)) if v >= 0]
            k = kept.setdefault(d["qtype"], [0, 0])
            k[0] += sum(int(mask[row, j + 1] > 0.5) for j in cells)  # + [CLS]
            k[1] += len(cells)
            if d["qtype"] != "position" and d["relevant_patches"]:
                a = asked.setdefault(d["qtype"], [0, 0])
                a[0] += sum(int(mask[row, j + 1] > 0.5) for j in d["relevant_patches"])
                a[1] += len(d["relevant_patches"])
    return {"digit_cells": {t: v[0] / v[1] for t, v in sorted(kept.items())},
            "asked_digit_cells": {t: v[0] / v[1] for t, v in sorted(asked.items())}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (trimkit train / demo runs with checkpoint/)")
    ap.add_argument("--pairs", type=int, default=100, help="image pairs for the question sensitivity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (path without suffix)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from trimkit_train import build_dataset, load_checkpoint

    rows = []
    for run in args.runs:
        model, cfg = load_checkpoint(run)
        test = build_dataset(cfg.data, "eval")
        row: dict[str, Any] = {"run": run, "per_type": per_type_accuracy(model, test)}
        if isinstance(model, TrimmedModel):
            qs = question_sensitivity(model, test, args.pairs)
            row |= {"kept_by_type": kept_by_type(model, test), "question_sensitivity": qs,
                    "asked_cell_kept": asked_cell_kept(model, test)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    types = sorted({t for r in rows for t in r["per_type"]})
    lines = [f"Command: `{command}`\n", "| run | " + " | ".join(f"{t}: acc (kept vision)" for t in types)
             + " | question sensitivity (vision layers, mean) | asked cell kept (digit / empty) |",
             "|---" * (len(types) + 3) + "|"]
    for r in rows:
        cells = [f"{100 * r['per_type'][t]:.1f}" + (f" ({r['kept_by_type'][t]:.2f})" if "kept_by_type" in r else "")
                 for t in types]
        qs = r.get("question_sensitivity")
        sens = (f"{sum(qs['per_layer'].values()) / len(qs['per_layer']):.3f} ({qs['pairs']} pairs)" if qs else "-")
        ck = r.get("asked_cell_kept")
        asked = f"{ck['digit']:.2f} / {ck['empty']:.2f}" if ck else "-"
        lines.append(f"| {Path(r['run']).name} | " + " | ".join(cells) + f" | {sens} | {asked} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(text)
    return {"command": command, "rows": rows}


if __name__ == "__main__":
    main()
