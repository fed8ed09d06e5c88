"""BLIP on digit-grid VQA: the QuestionSummary (cross-modal) token policy against Local (issue 5.1).

BLIP's vision encoder runs before its text encoder, so its image-token trimmers cannot read a text
[CLS]; the ``blip`` adapter gives them :class:`trimkit_blip.QuestionSummary` (masked mean of the
question's word embeddings) instead. This script measures whether that signal helps, on the shipped
digit-grid task, against the Local policy (no cross-modal input), same budget, same steps:

1. **Backbone.** ``BlipVQAClassifierForTrimming`` (BLIP's vision encoder + question encoder
   cross-attending to the image + a linear head over the 13 answers; what the ``blip`` adapter's
   ``dataset_overrides`` builds for a VQA dataset) trained by :class:`trimkit_train.Trainer`.
   As in ``trimkit demo`` (METER), the vision tower is first pretrained on the cells (every patch
   predicts its cell's digit and position: :func:`pretrain_vision`), the text part and head are
   re-initialised with std 1/sqrt(width) (:func:`reinit_for_scratch`), and the tower stays frozen
   while the rest learns VQA. These are BLIP versions of ``trimkit_train.demo``'s METER helpers.
2. **Targets** for ``--ratio`` fewer MACs, calibrated with :func:`trimkit_train.demo.calibrate` (forced
   keep ratios at batch 1, bisected on the MACs ratio).
3. **SmartTrim fine-tunes**, one per token policy (``cross_modal``: QuestionSummary context;
   ``local``), same targets, steps, learning rates and seed; head trimmers ``cross_modal`` in both;
   ``sampler: sharpen`` with the temperature decaying to 0.05.
4. **Measure**: accuracy on the test split (overall and per question type); achieved MACs ratio
   (:func:`trimkit_train.evaluate`: batch 1, tokens and heads removed); question sensitivity (same
   image, two different questions: fraction of the vision layers' token decisions that differ); how
   often the cell a position question asks about survives the vision encoder; the QuestionSummary's
   share of the MACs.

Writes ``benchmarks/results/blip_digit_grid.{md,json}`` (with the command line). ``--quick`` is a
smoke run whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trimkit_train.demo import pretrain_cells, reinit_normal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digit_grid_analysis import asked_cell_kept, digit_cells_kept, per_type_accuracy, question_sensitivity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/blip_digit_grid", help="run directories (checkpoints, logs)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "blip_digit_grid"),
                   help="results path without suffix (.md and .json are written)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--train-size", type=int, default=24000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--text-width", type=int, default=128, help="64 did not learn existence questions (results md)")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=300, help="vision tower pretraining on cells")
    p.add_argument("--backbone-steps", type=int, default=2000)
    p.add_argument("--backbone-lr", type=float, default=5e-4)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--ratio", type=float, default=3.0, help="wanted MACs reduction")
    p.add_argument("--policies", nargs="*", default=["cross_modal", "local"],
                   help="token policies to fine-tune (none: the backbone only)")
    p.add_argument("--macs-instances", type=int, default=64)
    p.add_argument("--pairs", type=int, default=200, help="image pairs for the question sensitivity")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (numbers mean nothing)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.eval_size, args.vision_width, args.vision_layers = 256, 64, 32, 2
        args.text_width, args.pretrain_steps, args.backbone_steps, args.finetune_steps = 32, 5, 10, 6
        args.macs_instances, args.pairs = 4, 8
    return args


# ------------------------------------------------------------------------------------------------
# BLIP versions of trimkit_train.demo's METER helpers
# ------------------------------------------------------------------------------------------------
def pretrain_vision(model, dataset, steps: int, lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> float:
    """:func:`trimkit_train.demo.pretrain_cells` for BLIP's vision tower (patch tokens after its final
    LayerNorm). Needs one patch per cell. Returns the last batch's cell accuracy."""
    vision = model.vision_model
    if dataset.cell != model.config.vision_config.patch_size:
        raise ValueError("pretrain_vision: one patch per cell needed")
    return pretrain_cells(vision, lambda pixels: vision(pixel_values=pixels).last_hidden_state[:, 1:],
                          model.config.vision_config.hidden_size, dataset, steps, lr, batch_size, seed)


def reinit_for_scratch(model) -> None:
    """Re-initialise the question encoder and the classifier with std 1/sqrt(text width) (BLIP's
    BERT init, N(0, 0.02), suits fine-tuning pretrained weights; from scratch at these widths the
    METER demo found it collapses to the answer prior: see ``trimkit_train.demo.reinit_for_scratch``)."""
    reinit_normal([model.text_encoder, model.classifier], model.config.text_config.hidden_size ** -0.5)


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def summary_macs_share(model, dataset) -> dict[str, float]:
    """MACs of the QuestionSummary path (word embeddings + masked mean) vs the whole model, one instance."""
    from trimkit.macs import count_macs
    from trimkit_train import model_inputs

    x = model_inputs(model, dataset.collate_fn([dataset[0]]))
    with torch.no_grad():
        full = count_macs(model, **x).total
        summary = count_macs(lambda: model.question_summary(model.text_encoder.embeddings(input_ids=x["input_ids"]),
                                                            x["attention_mask"])).total
    return {"summary_macs": summary, "model_macs": full, "share": summary / full}


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from trimkit import TrimConfig, trim
    from trimkit_train.demo import _selector_targets, calibrate
    from trimkit_train import (DataConfig, ExperimentConfig, ModelConfig, RecipeConfig, TrainConfig, Trainer, build_dataset,
                                  build_model, evaluate)

    t_start = time.perf_counter()
    work = Path(args.work_dir)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    heads_v, heads_t = max(1, args.vision_width // 32), max(1, args.text_width // 32)
    overrides = {
        "vision_config": {"hidden_size": args.vision_width, "intermediate_size": 2 * args.vision_width,
                          "num_hidden_layers": args.vision_layers, "num_attention_heads": heads_v},
        "text_config": {"hidden_size": args.text_width, "intermediate_size": 2 * args.text_width,
                        "num_hidden_layers": args.text_layers, "num_attention_heads": heads_t},
    }
    data = DataConfig(name="digit_grid", options={"variant": "vqa", "grid": 4, "cell": 16, "digits_per_image": [2, 5]},
                      train_size=args.train_size, eval_size=args.eval_size, seed=0)
    trim_common = {"sampler": "sharpen"}
    recipe = RecipeConfig(final_temperature=0.05, curriculum_fraction=0.5)

    def experiment(train: dict[str, Any], name: str, trim_cfg: dict[str, Any] | None, init: str | None):
        return ExperimentConfig(
            model=ModelConfig(adapter="blip", size="tiny", overrides=overrides, init=init), data=data,
            train=TrainConfig(**{"macs_instances": 0, "eval_batch_size": 250, "seed": 0, "progress": False, **train,
                                 "out_dir": str(work / name)}),
            trim=TrimConfig(**{**trim_common, **trim_cfg}) if trim_cfg is not None else None, recipe=recipe)

    # 1. backbone --------------------------------------------------------------------------------
    cfg = experiment({"steps": args.backbone_steps, "batch_size": 32, "lr": args.backbone_lr, "warmup_fraction": 0.05},
                     "backbone", None, None)
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "eval")
    net = build_model(cfg.model, cfg.data, train_ds)
    log(f"backbone {type(net).__name__}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
    t0 = time.perf_counter()
    cell_acc = pretrain_vision(net, train_ds, args.pretrain_steps)
    pretrain_s = time.perf_counter() - t0
    log(f"vision tower pretrained ({args.pretrain_steps} steps, {pretrain_s:.0f}s): cell accuracy {cell_acc:.3f}")
    reinit_for_scratch(net)
    net.vision_model.requires_grad_(False)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, model=net, train_dataset=train_ds, eval_dataset=test_ds)
    trainer.fit(overwrite=True)  # the benchmark owns its output directory: a rerun replaces its runs
    backbone_s = time.perf_counter() - t0
    net.vision_model.requires_grad_(True)
    backbone_dir = str(trainer.out_dir / "checkpoint")
    backbone = trainer.net.eval()
    full_ev = evaluate(backbone, test_ds, batch_size=250, macs_instances=args.macs_instances)
    full_types = per_type_accuracy(backbone, test_ds)
    summary = summary_macs_share(backbone, test_ds)
    log(f"backbone trained ({backbone_s:.0f}s): accuracy {full_ev['accuracy']:.4f}, {full_ev['gmacs']:.4f} GMACs; "
        f"QuestionSummary MACs share {summary['share']:.2e}")

    # 2. targets ---------------------------------------------------------------------------------
    probe = trim(backbone, TrimConfig(**trim_common), adapter="blip")
    calib = calibrate(probe, test_ds, args.ratio, 8)
    targets = _selector_targets(probe, calib["token_target"], calib["head_target"])
    del probe
    log(f"targets for {args.ratio:g}x: strength {calib['strength']:.3f}, forced ratio {calib['forced_ratio']:.2f}: {targets}")

    # 3-4. fine-tunes and measurements -------------------------------------------------------------
    rows = [{"method": "BLIP (full)", "policy": None, "accuracy": full_ev["accuracy"], "gmacs": full_ev["gmacs"],
             "gmacs_full": full_ev["gmacs"], "macs_ratio": 1.0, "per_type": full_types}]
    for policy in args.policies:
        cfg = experiment({"steps": args.finetune_steps, "batch_size": 32, "lr": 1e-4, "trimmer_lr": 1e-2,
                          "warmup_fraction": 0.0}, policy, {**targets, "token_policy": policy}, backbone_dir)
        t0 = time.perf_counter()
        tr = Trainer(cfg, model=build_model(cfg.model, cfg.data, test_ds), train_dataset=train_ds, eval_dataset=test_ds)
        tr.fit(overwrite=True)
        tm = tr.tmodel.eval()
        ev = evaluate(tm, test_ds, batch_size=250, macs_instances=args.macs_instances)
        row = {"method": f"SmartTrim {policy}", "policy": policy, "accuracy": ev["accuracy"], "gmacs": ev["gmacs"],
               "gmacs_full": ev["gmacs_full"], "macs_ratio": ev["gmacs_full"] / ev["gmacs"],
               "keep_tokens": ev["keep_tokens"], "keep_heads": ev["keep_heads"],
               "keep_vision": {k: v for k, v in ev["keep"].items() if k.startswith("vision_model")},
               "per_type": per_type_accuracy(tm, test_ds),
               "question_sensitivity": question_sensitivity(tm, test_ds, args.pairs),
               "asked_cell_kept": asked_cell_kept(tm, test_ds), "digit_cells_kept": digit_cells_kept(tm, test_ds),
               "finetune_s": time.perf_counter() - t0}
        rows.append(row)
        log(f"{policy}: accuracy {row['accuracy']:.4f} at {row['macs_ratio']:.2f}x; per type {row['per_type']}; "
            f"first-layer decisions that change with the question {row['question_sensitivity']['first_layer']:.3f}")

    result = {"command": " ".join(["python", "benchmarks/blip_digit_grid.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
              "args": vars(args), "rows": rows, "calibration": calib, "targets": targets,
              "question_summary_macs": summary, "vision_pretrain_cell_accuracy": cell_acc,
              "backbone_s": backbone_s, "pretrain_s": pretrain_s, "wall_s": time.perf_counter() - t_start,
              "torch_threads": torch.get_num_threads(), "eval_instances": len(test_ds)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(report(result))
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    print(report(result))
    return result


def report(result: dict[str, Any]) -> str:
    a = result["args"]
    types = sorted(result["rows"][0]["per_type"])
    lines = [
        "# BLIP on digit-grid VQA: QuestionSummary (cross-modal) vs Local token trimming",
        "",
        f"Command: `{result['command']}` ({result['torch_threads']} torch thread(s), wall {result['wall_s']:.0f} s).",
        "",
        f"Backbone: `BlipVQAClassifierForTrimming` (vision {a['vision_layers']} x {a['vision_width']}, text "
        f"{a['text_layers']} x {a['text_width']}), 4x4 grid of 16 px cells, 2-5 digits, vision tower pretrained on "
        f"cells ({a['pretrain_steps']} steps, cell accuracy {result['vision_pretrain_cell_accuracy']:.2f} on its last "
        f"batch) then frozen for {a['backbone_steps']} VQA steps. Fine-tunes: {a['finetune_steps']} steps, lr 1e-4, "
        f"trimmer lr 1e-2, sampler `sharpen` (temperature 1 -> 0.05), curriculum 0.5, targets calibrated for "
        f"{a['ratio']:g}x fewer MACs (forced ratio {result['calibration']['forced_ratio']:.2f}). Accuracy on "
        f"{result['eval_instances']} test questions; MACs at batch 1 with tokens and heads removed, mean of "
        f"{a['macs_instances']} instances.",
        "",
        "| method | accuracy | " + " | ".join(types) + " | GMACs | MACs ratio | kept tokens | kept heads | "
        "question sensitivity (vision layer 1) | asked cell kept (digit / empty) |",
        "|---|---|" + "---|" * len(types) + "---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        qs = r.get("question_sensitivity")
        ck = r.get("asked_cell_kept")
        lines.append(
            f"| {r['method']} | {100 * r['accuracy']:.1f} | " + " | ".join(f"{100 * r['per_type'][t]:.1f}" for t in types)
            + f" | {r['gmacs']:.4f} | {r['macs_ratio']:.2f}x | {r.get('keep_tokens', 1.0):.2f} | {r.get('keep_heads', 1.0):.2f} | "
            + (f"{qs['first_layer']:.3f} ({qs['pairs']} pairs)" if qs else "-") + " | "
            + (f"{ck['digit']:.2f} / {ck['empty']:.2f}" if ck else "-") + " |")
    kept = [(r["method"], r["digit_cells_kept"]) for r in result["rows"] if "digit_cells_kept" in r]
    if kept:
        lines += ["", "Digit cells kept after the last vision layer, per question type (all digit cells; cells "
                      "holding the asked digit):", ""]
        for method, k in kept:
            lines.append(f"- {method}: " + ", ".join(
                f"{t} {k['digit_cells'][t]:.2f}" + (f" ({k['asked_digit_cells'][t]:.2f})" if t in k["asked_digit_cells"] else "")
                for t in k["digit_cells"]))
    s = result["question_summary_macs"]
    lines += ["", f"QuestionSummary MACs: {s['summary_macs']} of {s['model_macs']} per instance "
                  f"(share {s['share']:.2e}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
