"""The decoder cross-modal signal against the Local policy (issue 14, point 2).

A tiny random LLaVA (examples/llava_digit_grid.yaml's model) is fine-tuned with SmartTrim on
``digit_grid_decoder`` at one image keep ratio, once with the ``cross_modal`` token policy (each
image token scored from itself plus g(image mean, mean of BOS and the question's last token)) and
once with ``local`` (the token alone), for each seed; an untrimmed fine-tune of the same length is
the reference. Accuracy is the greedy answer's on the held-out split (``trimkit eval``'s metric, hard
masks); the table gives mean ± std over seeds and the image segment's achieved keep ratio.

    nice -n 10 .venv/bin/python benchmarks/decoder_policy.py --seeds 0 1 --steps 400

writes benchmarks/results/decoder_policy.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def config(policy: str | None, seed: int, args) -> dict:
    d = yaml.safe_load((ROOT / "examples" / "llava_digit_grid.yaml").read_text())
    d["model"]["seed"] = seed
    d["data"].update(train_size=args.train_size, eval_size=args.eval_size, seed=0)
    d["data"]["options"].update(grid=args.grid)
    d["train"].update(steps=args.steps, batch_size=args.batch_size, eval_every=None, save_every=None,
                      macs_instances=4, progress=False, seed=seed)
    if policy is None:
        d["trim"] = None
    else:
        d["trim"].update(token_target={"image": args.keep}, token_policy=policy)
    return d


def run(policy: str | None, seed: int, args) -> dict:
    from trimkit_train import ExperimentConfig, Trainer

    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        ev = Trainer(ExperimentConfig.from_dict(config(policy, seed, args)), out_dir=out).fit()
        image = [v for k, v in ev.get("keep", {}).items() if k.endswith(":image")]
        return {"policy": policy or "none (untrimmed)", "seed": seed, "accuracy": ev["accuracy"],
                "keep_image": sum(image) / len(image) if image else 1.0, "macs_ratio": ev.get("macs_ratio"),
                "seconds": time.time() - t0}


def question_prior(args) -> float:
    """Accuracy on the evaluation split of answering each question with its most frequent answer in
    the training split (the question text alone, no image): the level a model reaches without
    reading the image."""
    from collections import Counter, defaultdict

    from trimkit_train.trainer import DataConfig, build_dataset

    d = config("cross_modal", args.seeds[0], args)["data"]
    train, ev = build_dataset(DataConfig(**d), "train"), build_dataset(DataConfig(**d), "eval")
    seen: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for q, y in zip(train.grid_data.questions, train.grid_data.labels):
        seen[q][int(y)] += 1
        overall[int(y)] += 1
    fallback = overall.most_common(1)[0][0]
    hits = [(seen[q].most_common(1)[0][0] if q in seen else fallback) == int(y)
            for q, y in zip(ev.grid_data.questions, ev.grid_data.labels)]
    by_type: dict[str, Counter] = defaultdict(Counter)
    for t, y in zip(train.grid_data.qtypes, train.grid_data.labels):
        by_type[t][int(y)] += 1
    typed = [by_type[t].most_common(1)[0][0] == int(y) for t, y in zip(ev.grid_data.qtypes, ev.grid_data.labels)]
    return sum(hits) / len(hits), sum(typed) / len(typed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.4, help="image tokens' keep ratio (target)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "decoder_policy.md"))
    p.add_argument("--from-json", default=None, help="rebuild the table from a previous run's JSON (no training; "
                                                     "give that run's other arguments too)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = []
        for seed in args.seeds:
            for policy in ("cross_modal", "local"):
                rows.append(run(policy, seed, args))
                print(json.dumps(rows[-1]), flush=True)
        rows.append(run(None, args.seeds[0], args))
        print(json.dumps(rows[-1]), flush=True)
    prior = question_prior(args)

    def stats(name: str, key: str) -> str:
        vals = [r[key] for r in rows if r["policy"] == name]
        if len(vals) == 1:
            return f"{vals[0]:.3f}"
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"

    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--from-json" and (i == 0 or sys.argv[i] != "--from-json")]
    cmd = "nice -n 10 .venv/bin/python benchmarks/decoder_policy.py " + " ".join(argv)
    lines = [
        "# Decoder cross-modal signal vs the Local policy (tiny LLaVA, digit-grid VQA as decoder rows)",
        "",
        f"`{cmd.strip()}`",
        "",
        f"Tiny random LLaVA of examples/llava_digit_grid.yaml (CLIP 2x64, Llama 4x64, trimmers in decoder layers 1-3), "
        f"digit_grid_decoder grid {args.grid} ({args.grid ** 2} image tokens), all question types, {args.steps} steps "
        f"x batch {args.batch_size} from random weights (one stage), SmartTrim recipe (cost 20, SD 1, curriculum 0.5), "
        f"image keep target {args.keep}, heads not trimmed. Accuracy: greedy answer on {args.eval_size} held-out "
        f"questions (hard masks). Seeds: {args.seeds} (model and data order); the untrimmed reference: seed "
        f"{args.seeds[0]} only.",
        "",
        "| token policy | accuracy | image keep (achieved) | MACs ratio | runs |",
        "|---|---|---|---|---|",
    ]
    for name in ("cross_modal", "local", "none (untrimmed)"):
        n = sum(r["policy"] == name for r in rows)
        lines.append(f"| {name} | {stats(name, 'accuracy')} | {stats(name, 'keep_image')} | "
                     f"{stats(name, 'macs_ratio')} | {n} |")
    lines += ["", f"Text-only references (no image, no model): each evaluation question answered with its most "
              f"frequent training answer {prior[0]:.3f}; with its question type's most frequent answer {prior[1]:.3f}.",
              "", "Per run:", "", "| policy | seed | accuracy | image keep | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['seed']} | {r['accuracy']:.3f} | {r['keep_image']:.3f} | {r['seconds']:.0f} |"
              for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
