"""``trimkit repro``: experiments listed in --help, tables with mean ± std over seeds and their command
line, plots; ``trimkit demo --seeds`` aggregation (quick sizes: the numbers mean nothing)."""

from __future__ import annotations

import json
import math
import re

import pytest

from trimkit.cli import build_parser, main

pytestmark = pytest.mark.slow

MEAN_STD = re.compile(r"-?\d+\.\d+ ± \d+\.\d+")


def test_help_lists_the_experiments(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["repro", "--help"])
    text = capsys.readouterr().out
    for name in ("table6", "table5", "static", "fig4a", "fig7", "fig2", "fig5", "fig6", "switches", "placement"):
        assert name in text
    with pytest.raises(SystemExit) as err:
        main(["repro", "nonsense"])
    assert err.value.code == 2


@pytest.fixture(scope="module")
def table6(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "table6"
    assert main(["repro", "table6", "--quick", "--seeds", "2", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_table6_writes_mean_std_and_the_command(table6):
    md = (table6 / "table6.md").read_text()
    command = f"trimkit repro table6 --seeds 2 --out {table6} --quick --steps 2 --no-progress"
    assert command in md
    assert (table6 / "command.txt").read_text().strip() == command
    rows = [line for line in md.splitlines() if line.startswith("| ") and "x |" in line and "METER" not in line]
    assert len(rows) == 12  # 3 ratios x (SmartTrim, - stable init, - curriculum, - SD)
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert MEAN_STD.fullmatch(cells[2]), line  # accuracy: mean ± std
        assert MEAN_STD.fullmatch(cells[5].replace("x", "")), line  # MACs ratio
    labels = {line.split("|")[1].strip() for line in rows}
    assert labels == {"SmartTrim", "- Stable Initialization", "- Curriculum Scheduler", "- Self-Distillation"}


def test_table6_numbers_are_the_measured_seeds(table6):
    data = json.loads((table6 / "results.json").read_text())
    assert data["seeds"] == 2 and len(data["per_seed"]) == 2
    assert data["preset"]["finetune"]["steps"] == 2
    for i, row in enumerate(data["rows"]):
        accs = [seed[i]["accuracy"] for seed in data["per_seed"]]
        assert row["accuracy"] == pytest.approx(sum(accs) / 2)
        assert row["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        ratios = [seed[i]["macs_ratio"] for seed in data["per_seed"]]
        assert row["macs_ratio"] == pytest.approx(sum(ratios) / 2)
        assert all(seed[i]["gmacs"] < data["full"]["gmacs"] for seed in data["per_seed"])
    # the ablations are what they say
    by = {(r["method"], r["target"]): r for r in data["rows"]}
    assert by[("- Self-Distillation", 2.0)]["recipe_overrides"] == {"lambda_sd": 0.0}
    assert by[("- Curriculum Scheduler", 2.0)]["recipe_overrides"] == {"scheduler": "constant"}
    assert by[("- Stable Initialization", 2.0)]["stable_init"] is False
    # the runs differ by seed (the seed reached the fine-tunes)
    assert any(data["per_seed"][0][i]["keep_vision"] != data["per_seed"][1][i]["keep_vision"]
               for i in range(len(data["rows"])))


def test_fig4a_and_fig7_write_their_plots(tmp_path, monkeypatch):
    from trimkit_train import repro

    monkeypatch.setattr(repro, "FIG4A_RATIOS", (2.0, 3.0))  # two MACs levels keep the test short
    data = repro.run_experiment("fig4a", tmp_path / "fig4a", seeds=2, quick=True, steps=2, log=lambda s: None)
    assert {(r["policy"], r["target"]) for r in data["rows"]} == {(p, t) for p in ("cross_modal", "local", "random")
                                                                  for t in (2.0, 3.0)}
    assert (tmp_path / "fig4a" / "fig4a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "± " in (tmp_path / "fig4a" / "fig4a.md").read_text()

    data = repro.run_experiment("fig7", tmp_path / "fig7", seeds=1, quick=True, steps=2, log=lambda s: None)
    f7 = data["fig7"]
    g = f7["per_seed_gmacs"]["0"] if "0" in f7["per_seed_gmacs"] else f7["per_seed_gmacs"][0]
    assert len(g) == f7["instances"] > 0
    assert g[f7["cheapest"][0]] == min(g) and g[f7["dearest"][0]] == max(g)
    md = (tmp_path / "fig7" / "fig7.md").read_text()
    assert "Cheapest" in md and "Dearest" in md and "question" in md
    assert (tmp_path / "fig7" / "fig7.png").stat().st_size > 0
    # hardness measured on the full model for the same instances, and its correlation with compute tabled
    hard = f7["full_model"]
    assert len(hard["loss"]) == len(hard["right"]) == len(g)
    assert "Spearman rho" in md and "wrong / right" in md


def test_full_model_difficulty_is_the_full_models_loss_per_instance():
    """A model that is sure and right on even items and sure and wrong on odd ones: hardness must say so, and
    a compute that follows it must correlate positively."""
    import torch
    from trimkit_train.repro import full_model_difficulty, spearman

    class Net(torch.nn.Module):
        def forward(self, x):
            right = (x[:, 0] % 2 == 0).float()
            return torch.stack([10 * right - 5, 5 - 10 * right], dim=1)  # label 0 is the right answer

    class Data:
        collate_fn = staticmethod(lambda items: {"x": torch.stack([i["x"] for i in items]),
                                                 "labels": torch.stack([i["labels"] for i in items])})

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)]), "labels": torch.tensor(0)}

    hard = full_model_difficulty(Net(), Data(), 5, batch_size=2)
    assert hard["right"] == [True, False, True, False, True]
    assert all(hard["loss"][i] < 0.01 for i in (0, 2, 4)) and all(hard["loss"][i] > 9 for i in (1, 3))
    assert spearman([0.1, 0.3, 0.1, 0.3, 0.1], hard["loss"]) > 0.9
    assert spearman([0.1, 0.3, float("nan"), 0.2], [1.0, 3.0, 2.0, 2.0]) == pytest.approx(1.0)  # nan pair left out

    class Ignored(Data):  # ignore-index labels: not one class per item
        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)]), "labels": torch.tensor(-100 if i == 3 else 0)}

    class Float(Data):  # regression-style targets
        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)]), "labels": torch.tensor(0.5)}

    class Tuple(Data):
        collate_fn = staticmethod(lambda items: (torch.stack([i["x"] for i in items]),))

    for data in (Ignored(), Float(), Tuple()):
        assert full_model_difficulty(Net(), data, 5, batch_size=4) is None, type(data).__name__


def test_fig4b_static_head_baselines_keep_what_they_chose(tmp_path, monkeypatch):
    """fig4b at one retention: every method fine-tuned; each static baseline's model keeps exactly the
    heads results.json says were chosen for it."""
    from trimkit_train import repro

    monkeypatch.setattr(repro, "FIG4B_RETENTION", (0.5,))
    data = repro.run_experiment("fig4b", tmp_path / "fig4b", seeds=1, quick=True, steps=2, log=lambda s: None)
    assert [r["heads_baseline"] for r in data["rows"]] == [None, "random", "grad_layer", "grad_all"]
    assert data["importance"] and set(data["static_heads"]) == {f"{r['run']}-seed0" for r in data["rows"][1:]}
    for r in data["rows"][1:]:
        chosen = data["static_heads"][f"{r['run']}-seed0"]
        kept = sum(map(sum, chosen.values())) / sum(map(len, chosen.values()))
        assert r["keep_heads"] == pytest.approx(kept)  # measured retention == the installed heads
    assert "retention target" in (tmp_path / "fig4b" / "fig4b.md").read_text()
    assert (tmp_path / "fig4b" / "fig4b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_baselines_run_and_are_what_they_say(tmp_path, monkeypatch):
    """static at one ratio: SmartTrim, TRIPS-style (fixed share of the ViT's vision tokens, no heads, no
    cost loss) and FTKD (a plain shallower model: every token and head, fewer MACs by depth)."""
    from trimkit_train import repro

    monkeypatch.setattr(repro, "STATIC_RATIOS", (2.0,))
    data = repro.run_experiment("static", tmp_path / "static", seeds=1, quick=True, steps=2, log=lambda s: None)
    by = {r["method"]: r for r in data["rows"]}
    assert set(by) == {"SmartTrim", "TRIPS-style", "FTKD"}
    ftkd, trips = by["FTKD"], by["TRIPS-style"]
    depth = data["ftkd_depths"]["2x"]
    assert ftkd["keep_tokens"] == 1.0 and ftkd["keep_heads"] == 1.0
    assert ftkd["macs_ratio"] == pytest.approx(depth["macs_ratio"], rel=0.05) and ftkd["macs_ratio"] > 1.2
    assert trips["keep_heads"] == 1.0 and trips["keep_text"] == 1.0 and trips["keep_vision"] < 1.0
    assert trips["recipe_overrides"] == repro.TRIPS_RECIPE and trips["macs_ratio"] > 1.2
    (own,) = data["own_calibration"].values()
    assert set(own["token_target"]) == {f"vision.uni.{i}" for i in range(len(own["token_target"]))}
    md = (tmp_path / "static" / "static.md").read_text()
    assert "FTKD 2x | layers kept" in md and (tmp_path / "static" / "static.png").stat().st_size > 0


def test_table5_trims_the_higher_resolution_to_the_lower_ones_macs(tmp_path):
    """table5: a second backbone on images of twice the resolution (4x the patches; the vision pretraining
    pools each cell's 2x2 patches), measured untrimmed and SmartTrim-trimmed with targets calibrated to
    the default backbone's MACs; ratios reported against the default backbone."""
    from trimkit_train import repro

    data = repro.run_experiment("table5", tmp_path / "t5", seeds=1, quick=True, steps=2, log=lambda s: None)
    by = {r["method"]: r for r in data["rows"]}
    full_hi, trimmed = by["METER (full), higher resolution"], by["SmartTrim, higher resolution"]
    assert full_hi["data"] == trimmed["data"] == {"cell": 32}
    assert full_hi["keep_tokens"] == 1.0 and full_hi["macs_ratio_own"] == pytest.approx(1.0)
    # 65 vision tokens instead of 17: the untrimmed higher resolution costs well over the default
    assert full_hi["gmacs"] > 2.5 * data["full"]["gmacs"] and full_hi["macs_ratio"] < 0.4
    (calib,) = data["own_calibration"].values()
    assert calib["ratio"] == pytest.approx(full_hi["gmacs"] / data["full"]["gmacs"], rel=0.02)
    # the quick model's floors (text and heads keep at least half) stop short of the goal; it still cuts a lot
    assert calib["data"] == {"cell": 32} and calib["forced_ratio"] > 2.0
    assert trimmed["gmacs"] < full_hi["gmacs"] and trimmed["macs_ratio_own"] > 1.0
    md = (tmp_path / "t5" / "table5.md").read_text()
    assert "| METER (full) | 64 px |" in md and "| SmartTrim | 128 px |" in md


def test_analysis_figures_write_what_they_measured(tmp_path):
    """fig2 (no fine-tune: the backbone's similarities), fig5 (cross-modal vs Local, question pairs)
    and fig6 (head retention per module): tables, plots, and results.json holding the measurements."""
    from trimkit_train import repro

    data = repro.run_experiment("fig2", tmp_path / "fig2", seeds=1, quick=True, steps=2, log=lambda s: None)
    f2 = data["fig2"]
    assert data["rows"] == [] and f2["instances"] > 0
    assert all(len(v) == f2["instances"] and all(-1 <= x <= 1 for x in v) for v in f2["tokens"].values())
    assert {k.rsplit(".", 2)[0] for k in f2["heads"]} >= {"cross_modal_image_layers.0", "cross_modal_text_layers.0"}
    md = (tmp_path / "fig2" / "fig2.md").read_text()
    assert MEAN_STD.search(md) and "rises with depth" in md
    assert (tmp_path / "fig2" / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = repro.run_experiment("fig5", tmp_path / "fig5", seeds=2, quick=True, steps=2, log=lambda s: None)
    f5 = data["fig5"]
    assert set(f5["aggregate"]) == {"cross_modal", "local"} and f5["images"] > 0
    assert all(len(v) == 2 for v in f5["per_seed"].values())
    assert all(0 <= s["question_sensitivity"] <= 1 for v in f5["per_seed"].values() for s in v)
    md = (tmp_path / "fig5" / "fig5.md").read_text()
    assert "relevance lift" in md and "Local" in md and (tmp_path / "fig5" / "fig5.png").stat().st_size > 0

    data = repro.run_experiment("fig6", tmp_path / "fig6", seeds=1, quick=True, steps=2, log=lambda s: None)
    f6 = data["fig6"]
    seed0 = f6["per_seed"]["0"] if "0" in f6["per_seed"] else f6["per_seed"][0]
    assert seed0 and all(len(v) == f6["instances"] for v in seed0.values())
    for key, s in f6["summary"].items():
        assert s["mean"] == pytest.approx(sum(seed0[key]) / len(seed0[key]))
    assert data["rows"][0]["trim_overrides"] == {"head_target": 0.5}
    assert "attention module" in (tmp_path / "fig6" / "fig6.md").read_text()


def test_demo_seeds_aggregate(tmp_path):
    from trimkit_train.demo import aggregate, results_markdown

    per_seed = [[{"method": "SmartTrim", "policy": "cross_modal", "target": 2.0, "accuracy": a, "gmacs": 1.0,
                  "macs_ratio": 2.0, "latency_ratio": 1.5, "keep_tokens": 0.5, "keep_heads": 0.8, "keep_vision": 0.4,
                  "checkpoint": f"c{i}"}] for i, a in enumerate((0.5, 0.7, 0.6))]
    (row,) = aggregate(per_seed)
    assert row["accuracy"] == pytest.approx(0.6) and row["accuracy_std"] == pytest.approx(0.1)
    assert row["seeds"] == 3 and row["checkpoints"] == ["c0", "c1", "c2"]
    assert "60.0 ± 10.0" in results_markdown([row])
    (one,) = aggregate(per_seed[:1])
    assert "± " not in results_markdown([one])  # one seed: the table as before


def test_demo_seeds_option(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "2", "--finetune-steps", "2", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == 2 and len(result["per_seed"]) == 2
    md = (out / "results.md").read_text()
    assert "2 fine-tune seeds" in md
    assert sum(1 for line in md.splitlines() if line.startswith("| SmartTrim") and MEAN_STD.search(line)) == 3
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_experiment_runs_on_a_task_config(vqa_files, tmp_path):
    """``--config``: the experiment on a task's files and model instead of digit-grid. The table's full row
    is the config's model as it is, scored with the task's main metric (VQA score), and every run is the
    config's fine-tune with the experiment's overrides and keep targets calibrated on that model."""
    import yaml

    import trimkit
    from trimkit_train import ExperimentConfig
    from trimkit_train.repro import run_experiment
    from trimkit_train.trainer import build_dataset, build_model, evaluate

    root, tok = vqa_files
    answers = ["white", "gray", "2", "3", "yes", "no", "laptop"]
    config = {
        "model": {"adapter": "meter", "size": "tiny", "overrides": {"patch_size": 8}},
        "data": {"name": "vqa_v2", "options": {"root": str(root), "answers": answers, "tokenizer": str(tok),
                                               "image_size": 32},
                 "train_split": "train", "eval_split": "val", "train_size": None, "eval_size": None},
        "train": {"epochs": 1, "batch_size": 2, "eval_batch_size": 2, "macs_instances": 1, "progress": False,
                  "out_dir": str(tmp_path / "unused")},
        "trim": {"token_target": 0.9, "init_logit": 0.3, "sampler": "sharpen"},
        "recipe": {"curriculum_fraction": 0.0},
    }
    path = tmp_path / "vqa.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "switches"
    assert main(["repro", "switches", "--config", str(path), "--seeds", "1", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    md = (out / "switches.md").read_text()
    assert f"Task config `{path}`: adapter 'meter', dataset 'vqa_v2'" in md and "| setting | target | vqa_score |" in md
    assert f"--config {path}" in (out / "command.txt").read_text()
    data = json.loads((out / "results.json").read_text())
    cfg = ExperimentConfig.load(path)
    train_ds = build_dataset(cfg.data, "train")
    full = evaluate(build_model(cfg.model, cfg.data, train_ds), build_dataset(cfg.data, "eval"), batch_size=2,
                    macs_instances=1)
    assert data["full"]["accuracy"] == pytest.approx(full["vqa_score"]) and data["full"]["metric"] == "vqa_score"
    assert f"| meter (full) | - | {100 * full['vqa_score']:.1f} |" in md
    assert len(data["rows"]) == 5 and {r["run"] for r in data["rows"]} == {r["run"] for r in data["per_seed"][0]}
    calibrated = {"token_target", "head_target"}
    for row in data["per_seed"][0]:  # each run: the config's fine-tune (2 steps), the calibrated 2x targets
        run_cfg = yaml.safe_load((out / "runs" / f"{row['run']}-seed0" / "experiment.yaml").read_text())
        assert (run_cfg["train"]["steps"], run_cfg["train"]["epochs"]) == (2, None)  # --steps replaces epochs
        assert run_cfg["data"]["name"] == "vqa_v2"
        assert isinstance(run_cfg["trim"]["token_target"], dict) and calibrated <= set(run_cfg["trim"])
        assert run_cfg["trim"]["init_logit"] == 0.3  # the config's own trim settings are the base
        assert 0.0 <= row["accuracy"] <= 1.0
        if row["run"].startswith("defaults"):  # the calibrated keep targets, by selector
            want = sorted(round(v, 4) for v in data["calibration"]["2x"]["token_target"].values())
            assert sorted(run_cfg["trim"]["token_target"].values()) == want and min(want) < 1
    fig2 = tmp_path / "fig2"  # the analysis of the config's model itself (no fine-tune)
    assert main(["repro", "fig2", "--config", str(path), "--seeds", "1", "--out", str(fig2), "--no-progress"]) == 0
    profile = json.loads((fig2 / "results.json").read_text())["fig2"]
    assert set(profile["tokens"]) == {layer.path for layer in trimkit.trim(build_model(cfg.model, cfg.data, train_ds)).spec.layers}
    with pytest.raises(ValueError, match="also give --high-config FILE"):  # a second model, at the higher resolution
        run_experiment("table5", tmp_path / "table5", config=path)
    fig5 = tmp_path / "fig5"  # two questions about one image: the val split's image 3 is asked two
    assert main(["repro", "fig5", "--config", str(path), "--seeds", "1", "--steps", "1", "--out", str(fig5),
                 "--no-progress"]) == 0
    text = (fig5 / "fig5.md").read_text()
    assert "| policy | vqa_score |" in text and "Over 1 test images asked two different questions" in text
    assert "| SmartTrim (cross-modal) |" in text and "| n/a |" in text and (fig5 / "fig5.png").exists()
    shown = json.loads((fig5 / "results.json").read_text())["fig5"]
    assert shown["images"] == 1 and len(set(shown["shown"]["questions"])) == 2
    sens = shown["aggregate"]["cross_modal"]["question_sensitivity"]
    assert 0.0 <= sens <= 1.0


def _vqa_config(vqa_files, tmp_path, trim: dict, image_size: int = 32, name: str = "vqa.yaml"):
    """A task config on the VQA v2 sample files with a tiny METER, written to ``tmp_path``: its path."""
    import yaml

    root, tok = vqa_files
    config = {
        "model": {"adapter": "meter", "size": "tiny", "overrides": {"patch_size": 8}},
        "data": {"name": "vqa_v2", "options": {"root": str(root), "answers": ["white", "gray", "2", "3", "yes", "no"],
                                               "tokenizer": str(tok), "image_size": image_size},
                 "train_split": "train", "eval_split": "val", "train_size": None, "eval_size": None},
        "train": {"epochs": 1, "batch_size": 2, "eval_batch_size": 2, "macs_instances": 1, "progress": False,
                  "out_dir": str(tmp_path / "unused")},
        "trim": trim,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_table5_runs_on_a_pair_of_task_configs(vqa_files, tmp_path):
    """Table 5 on a task: --high-config's model (the same task at 64 px) full and SmartTrim-trimmed to the
    MACs of --config's model (32 px), against that one untrimmed; every MACs ratio against the 32 px model."""
    import yaml

    low = _vqa_config(vqa_files, tmp_path, {"token_target": 0.9})
    high = _vqa_config(vqa_files, tmp_path, {"token_target": 0.9}, image_size=64, name="vqa-64.yaml")
    out = tmp_path / "table5"
    assert main(["repro", "table5", "--config", str(low), "--high-config", str(high), "--seeds", "1", "--steps", "1",
                 "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    full_hi, trimmed = data["rows"]
    assert full_hi["image_side"] == trimmed["image_side"] == 64
    assert full_hi["macs_ratio"] < 0.5  # 4x the patches: far more MACs than the 32 px model
    # its keep targets calibrated to the 32 px model's MACs (one fine-tune step leaves the trimmers as they start)
    (goal,) = data["own_calibration"].values()
    assert goal["ratio"] == pytest.approx(1 / full_hi["macs_ratio"], rel=1e-6)
    assert abs(math.log(goal["forced_ratio"] / goal["ratio"])) < 0.1 and goal["data"] == {"high_config": "vqa-64"}
    (saved,) = out.glob(f"runs/data-high-config-vqa-64/runs/{trimmed['run']}-seed0/experiment.yaml")
    run_cfg = yaml.safe_load(saved.read_text())
    assert run_cfg["data"]["options"]["image_size"] == 64 and run_cfg["train"]["steps"] == 1
    md = (out / "table5.md").read_text()
    assert "| meter (full) | 32 px |" in md and "| meter (full) | 64 px |" in md and "| SmartTrim | 64 px |" in md
    assert "--high-config" in (out / "command.txt").read_text()


def test_high_config_is_for_paired_experiments_on_a_task(vqa_files, tmp_path):
    from trimkit_train.repro import run_experiment

    low = _vqa_config(vqa_files, tmp_path, {"token_target": 0.9})
    with pytest.raises(ValueError, match="--high-config goes with --config, for table5 only"):
        run_experiment("fig4b", tmp_path / "f4", seeds=1, steps=1, config=low, high_config=low)
    with pytest.raises(ValueError, match="--high-config goes with --config, for table5 only"):
        run_experiment("table5", tmp_path / "t5", seeds=1, steps=1, high_config=low)


def test_static_baselines_run_on_a_task_config(vqa_files, tmp_path):
    """Table 1's static baselines on a task: FTKD's stacks come from the model's description (the
    co-attention streams cut alike, as on digit-grid), and its student trains on the task's data."""
    import yaml

    from trimkit.plugins import get_registry
    from trimkit_train.repro import FTKD_GROUPS
    from trimkit_train.static_baselines import layer_groups
    from trimkit_meter import build_meter

    meter = build_meter("tiny")
    assert layer_groups(meter, get_registry().adapters.get("meter").describe(meter)) == FTKD_GROUPS
    path = _vqa_config(vqa_files, tmp_path, {"token_target": 0.9})
    out = tmp_path / "static"
    assert main(["repro", "static", "--config", str(path), "--seeds", "1", "--steps", "1", "--out", str(out),
                 "--only", "FTKD", "TRIPS-style", "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["TRIPS-style", "FTKD"] * 3
    depths = data["ftkd_depths"]
    assert set(depths) == {"1.5x", "2x", "3x"}
    for d in depths.values():  # the two cross stacks keep the same layers; every stack keeps at least one
        assert d["layers"]["cross_modal_image_layers"] == d["layers"]["cross_modal_text_layers"]
        assert all(len(v) >= 1 for v in d["layers"].values())
    ftkd = next(r for r in data["per_seed"][0] if r["method"] == "FTKD")
    run_cfg = yaml.safe_load((out / "runs" / f"{ftkd['run']}-seed0" / "experiment.yaml").read_text())
    assert run_cfg["data"]["name"] == "vqa_v2" and run_cfg["train"]["steps"] == 1  # the task's fine-tune
    md = (out / "static.md").read_text()
    assert "| method | target | vqa_score |" in md and "| meter (full) | - |" in md and "| FTKD 2x | layers kept: " in md


def test_fig4b_runs_on_a_task_config(vqa_files, tmp_path):
    """Fig. 4b on a task: heads trimmed in the layers the config's trim.head_layers selects, Grad Layer's
    importance taken on the task's train split, its static heads at exactly the retention asked."""
    import yaml

    path = _vqa_config(vqa_files, tmp_path, {"head_layers": ["text.cross"]})  # the text side of the co-attention layers
    out = tmp_path / "fig4b"
    assert main(["repro", "fig4b", "--config", str(path), "--seeds", "1", "--steps", "1", "--out", str(out),
                 "--only", "SmartTrim (adaptive) 0.5", "Grad Layer 0.5", "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["SmartTrim (adaptive) 0.5", "Grad Layer 0.5"]
    md = (out / "fig4b.md").read_text()
    assert "| method | retention target | vqa_score |" in md and "| meter (full) | 1.0 |" in md
    assert "head_layers text.cross" in md
    for row in data["per_seed"][0]:
        run_cfg = yaml.safe_load((out / "runs" / f"{row['run']}-seed0" / "experiment.yaml").read_text())
        assert run_cfg["trim"]["head_layers"] == ["text.cross"] and run_cfg["trim"]["trim_tokens"] is False
    importance = data["importance"]  # Michel et al. over the task's train instances, for the selected layers only
    assert sorted(importance) == ["cross_modal_text_layers.0.0", "cross_modal_text_layers.0.1",
                                  "cross_modal_text_layers.1.0", "cross_modal_text_layers.1.1"]
    masks = data["static_heads"]["grad-layer-0.5-seed0"] if "grad-layer-0.5-seed0" in data["static_heads"] else \
        next(iter(data["static_heads"].values()))
    assert sorted(masks) == sorted(importance)
    assert all(sum(m) == len(m) // 2 for m in masks.values())  # half of each module's heads, exactly


def test_placement_trims_only_where_placed_and_measures_latency(tmp_path):
    from trimkit_train.repro import run_experiment

    data = run_experiment("placement", tmp_path / "placement", seeds=1, quick=True, steps=1, log=lambda s: None)
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["every layer (paper)", "first vision layer", "first vision + first text layer"]
    for r in rows.values():  # each row is timed against the full model, interleaved
        assert r["latency_ratio"] > 0 and r["latency_ms"] > 0 and r["latency_full_ms"] > 0
    assert rows["first vision layer"]["keep_heads"] == 1.0 and rows["every layer (paper)"]["keep_heads"] < 1.0
    # the placement's own calibration, on its one trimmer: the forced reduction is reached from there
    own = data["own_calibration"]
    assert {json.dumps(c["calibrate"], sort_keys=True) for c in own.values()} == {
        json.dumps({"token_layers": ["vision.uni.0"], "trim_heads": False}, sort_keys=True),
        json.dumps({"token_layers": ["vision.uni.0", "text.cross.0"], "trim_heads": False}, sort_keys=True)}
    assert all(c["forced_ratio"] > 1.5 for c in own.values())
    md = (tmp_path / "placement" / "placement.md").read_text()
    assert "| first vision layer | 2x |" in md and "CPU latency ratio" in md


def test_only_runs_the_chosen_rows(tmp_path):
    from trimkit_train.repro import run_experiment

    out = tmp_path / "switches"
    assert main(["repro", "switches", "--quick", "--seeds", "1", "--steps", "1", "--only", "sampler=gumbel",
                 "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["sampler=gumbel"]
    assert data["command"].endswith("--only sampler=gumbel") and "| sampler=gumbel | 2x |" in (out / "switches.md").read_text()
    with pytest.raises(ValueError, match=r"no configuration labelled \['nonsense'\]; its labels are \['defaults', "):
        run_experiment("switches", tmp_path / "x", only=["nonsense"])
    with pytest.raises(ValueError, match="needs all its configurations; --only works with table6, static, fig4a, fig4b, switches, placement"):
        run_experiment("fig5", tmp_path / "y", only=["Local"])


def test_a_segmented_decoder_task_config_is_calibrated_per_segment(tmp_path, capsys):
    """``--config`` with a model whose modalities are segments of one stream (a tiny LLaVA on
    digit-grid rows): the calibration forces each segment's own keep ratio (``"layer:segment"`` keys of
    ``Runtime.forced`` in mode remove) and reaches the MACs goal, and the runs get per-segment targets
    (``image.uni.N`` selectors) that trim the image tokens progressively and keep the text more."""
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "examples" / "llava_digit_grid.yaml").read_text())
    config["data"].update(train_size=16, eval_size=8)
    config["data"]["options"].update(grid=3)
    config["train"].update(steps=1, batch_size=4, eval_every=None, save_every=None, macs_instances=2,
                           out_dir=str(tmp_path / "unused"))
    path = tmp_path / "llava.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "switches"
    assert main(["repro", "switches", "--config", str(path), "--seeds", "1", "--steps", "1", "--only", "defaults",
                 "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    cal = data["calibration"]["2x"]
    # forcing per segment moves the MACs (without it every forced ratio is the trimmers' overhead, < 1); 2x is
    # beyond this model (9 of ~20 tokens are image tokens, 3 of 4 layers trimmed, text kept at >= 0.5): said so
    assert 1.3 < cal["forced_ratio"] < 2.0, cal["forced_ratio"]
    assert "warning: 2x is out of reach of this model's trimmers" in capsys.readouterr().out
    image = {k: v for k, v in cal["token_target"].items() if k.endswith(":image")}
    text = {k: v for k, v in cal["token_target"].items() if not k.endswith(":image")}
    assert len(image) == 3 and text and max(image.values()) < min(text.values())
    run_cfg = yaml.safe_load((out / "runs" / "defaults-cross_modal-2x-seed0" / "experiment.yaml").read_text())
    assert {f"image.uni.{i}" for i in (1, 2, 3)} <= set(run_cfg["trim"]["token_target"])  # decoder layers 1-3
