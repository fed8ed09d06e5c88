"""``trimkit repro NAME``: the paper's experiments, each one command, mean ± std over seeds.

Every experiment runs on the demo's setting (:mod:`trimkit_train.demo`: digit-grid VQA, a METER-
architecture backbone trained once, keep targets calibrated per MACs reduction) and reuses its
stages: :func:`~trimkit_train.demo.prepare_backbone`, :func:`~trimkit_train.demo.finetune` and
:func:`~trimkit_train.demo.measure`. An experiment is a list of *runs* (method, token policy, MACs
target, and what differs from the recipe); the one runner here fine-tunes each run once per seed
(fine-tune seeds ``0..seeds-1`` on the one backbone, as the paper's seeds are fine-tuning seeds of one
pretrained model), measures it, and aggregates mean ± std. Each experiment writes into its output
directory ``NAME.md`` (the table, what was run, and the exact command line), ``results.json`` (every
seed's rows and the aggregate), ``command.txt`` and, where the paper has a figure, ``NAME.png``.

Experiments (:data:`EXPERIMENTS`):

* ``table6``: SmartTrim at 1.5x/2x/2.5x, and each without stable initialisation (trimmers initialised
  at random: :func:`trimkit_smarttrim.random_init`), without the curriculum (scheduler ``constant``: the
  targets in force from step 0) and without self-distillation (``lambda_sd = 0``).
* ``fig4a``: token policies cross_modal, local and random at 1.5x/2x/2.5x/3x, accuracy vs GMACs curves.
* ``fig7``: SmartTrim 2x, the distribution of per-instance GMACs over the test split (batch 1, tokens
  and heads removed) with the cheapest and dearest instances shown.
* ``switches``: SmartTrim 2x with each fidelity switch flipped from its default (issue 12.2):
  ``cost_beta``, ``sd_teacher``, ``attention_dropout`` and the sampler, to measure what each changes.

``quick=True`` uses the demo's smoke-test sizes (seconds per run: the numbers mean nothing);
``steps`` overrides every fine-tune's steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .demo import Backbone

# torch and the training stack are imported where used: `trimkit --help` lists these experiments
# without importing them

__all__ = ["EXPERIMENTS", "Experiment", "Run", "run_experiment"]


@dataclass(frozen=True)
class Run:
    """One configuration of an experiment (fine-tuned once per seed)."""

    method: str  # the row's label
    policy: str  # token policy (registry name)
    ratio: float  # MACs reduction the keep targets are calibrated for
    trim: dict[str, Any] = field(default_factory=dict)  # TrimConfig fields over the preset's
    recipe: dict[str, Any] = field(default_factory=dict)  # RecipeConfig fields over the preset's
    stable_init: bool = True

    @property
    def name(self) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in self.method.lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        return f"{slug}-{self.policy}-{self.ratio:g}x"


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    help: str
    runs: Callable[[], list[Run]]
    write: Callable[["Result"], list[Path]]


@dataclass
class Result:
    experiment: Experiment
    out: Path
    command: str
    seeds: int
    full: dict[str, Any]
    rows: list[dict[str, Any]]  # aggregated, one per run
    per_seed: list[list[dict[str, Any]]]
    models: dict[tuple[int, str], Any]
    backbone: Backbone
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------
def run_experiment(name: str, out_dir: str | Path | None = None, seeds: int = 3, quick: bool = False,
                   steps: int | None = None, command: str | None = None, progress: bool | None = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run experiment ``name`` (:data:`EXPERIMENTS`) over ``seeds`` fine-tune seeds; write its files into
    ``out_dir`` (default ``trimkit-repro/NAME``). Returns the content of ``results.json``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; one of {', '.join(EXPERIMENTS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    from .demo import aggregate, finetune, measure, prepare_backbone, preset_for

    exp = EXPERIMENTS[name]
    out = Path(out_dir if out_dir is not None else Path("trimkit-repro") / name)
    out.mkdir(parents=True, exist_ok=True)
    command = command or f"trimkit repro {name} --seeds {seeds} --out {out}" + (" --quick" if quick else "") + (
        f" --steps {steps}" if steps is not None else "")
    preset = preset_for(quick, steps)
    runs = exp.runs()
    ratios = tuple(sorted({r.ratio for r in runs}))
    t0 = time.perf_counter()

    def stamp() -> str:
        return f"[{time.perf_counter() - t0:6.1f}s]"

    log(f"{stamp()} repro {name}: {len(runs)} configurations x {seeds} seed(s), "
        f"{preset.finetune['steps']} fine-tune steps each")
    # --quick: a coarser bisection of the targets (its numbers mean nothing anyway)
    bb = prepare_backbone(preset, out, ratios, progress, log, stamp, calibration_iterations=6 if quick else 12)
    models: dict[tuple[int, str], Any] = {}
    per_seed: list[list[dict[str, Any]]] = []
    for seed in range(seeds):
        rows = []
        for run in runs:
            t = time.perf_counter()
            key = f"{run.name}-seed{seed}"
            tm = finetune(bb, key, run.policy, run.ratio, seed=seed, trim_cfg=run.trim, recipe=run.recipe,
                          stable_init=run.stable_init, log=log)
            row = measure(bb, tm, run.method, run.policy, run.ratio, latency=False, name=key)
            row.update(run=run.name, trim_overrides=run.trim, recipe_overrides=run.recipe, stable_init=run.stable_init)
            rows.append(row)
            models[(seed, run.name)] = tm
            log(f"{stamp()}     seed {seed}: {run.method} {run.ratio:g}x ({run.policy}) in {time.perf_counter() - t:.0f}s: "
                f"accuracy {100 * row['accuracy']:.1f}, {row['macs_ratio']:.2f}x fewer MACs")
        per_seed.append(rows)
    result = Result(exp, out, command, seeds, _full(bb), aggregate(per_seed), per_seed, models, bb)
    files = exp.write(result)
    result.wall_s = time.perf_counter() - t0
    data = {"experiment": name, "command": command, "seeds": seeds, "quick": quick, "wall_s": result.wall_s,
            "full": result.full, "rows": result.rows, "per_seed": per_seed, "preset": asdict(preset),
            "calibration": {f"{r:g}x": c for r, c in bb.calibration.items()}, **result.extra}
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "command.txt").write_text(command + "\n")
    log(f"\n{stamp()} done; wrote {', '.join(str(f) for f in [*files, out / 'results.json', out / 'command.txt'])}")
    return data


def _full(bb: Backbone) -> dict[str, Any]:
    ev = bb.full_eval()
    return {"accuracy": ev["accuracy"], "gmacs": ev["gmacs"]}


def _header(res: Result, what: str) -> str:
    p = res.backbone.preset
    return (f"# {res.experiment.title}\n\n{what}\n\nDigit-grid VQA ({p.data['grid']}x{p.data['grid']} cells of "
            f"{p.data['cell']} px), METER-architecture backbone (trained once, seed 0) at accuracy "
            f"{100 * res.full['accuracy']:.1f} and {res.full['gmacs']:.4f} GMACs per instance; SmartTrim fine-tunes of "
            f"{p.finetune['steps']} steps. Cells are mean ± standard deviation over {res.seeds} fine-tune seed(s) "
            f"(0..{res.seeds - 1}); accuracy on {len(res.backbone.test_ds)} test questions, GMACs the mean over "
            f"{p.macs_instances} test instances at batch 1 with tokens and heads removed.\n\n"
            f"Command:\n\n```\n{res.command}\n```\n\n")


def _table(rows: list[dict[str, Any]], full: dict[str, Any], first: str = "method") -> str:
    from .demo import cell

    lines = [f"| {first} | target | accuracy | Δ vs full | GMACs / instance | MACs ratio | kept vision tokens | kept heads |",
             "|---|---|---|---|---|---|---|---|",
             f"| METER (full) | - | {100 * full['accuracy']:.1f} | - | {full['gmacs']:.4f} | 1.00x | 1.00 | 1.00 |"]
    for r in rows:
        delta = dict(r, delta=r["accuracy"] - full["accuracy"])
        if "accuracy_std" in r:
            delta["delta_std"] = r["accuracy_std"]
        lines.append(f"| {r['method']} | {r['target']:g}x | {cell(r, 'accuracy', '.1f', 100)} | "
                     f"{cell(delta, 'delta', '+.1f', 100)} | {cell(r, 'gmacs', '.4f')} | "
                     f"{cell(r, 'macs_ratio', '.2f', suffix='x')} | {cell(r, 'keep_vision', '.2f')} | "
                     f"{cell(r, 'keep_heads', '.2f')} |")
    return "\n".join(lines)


def _plt():
    from ._extras import require_extras

    require_extras("matplotlib", feature="the repro plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------
# Table 6
# ------------------------------------------------------------------------------------------------
def _table6_runs() -> list[Run]:
    runs = []
    for ratio in (1.5, 2.0, 2.5):
        runs += [Run("SmartTrim", "cross_modal", ratio),
                 Run("- Stable Initialization", "cross_modal", ratio, stable_init=False),
                 Run("- Curriculum Scheduler", "cross_modal", ratio, recipe={"scheduler": "constant"}),
                 Run("- Self-Distillation", "cross_modal", ratio, recipe={"lambda_sd": 0.0})]
    return runs


def _table6_write(res: Result) -> list[Path]:
    what = ("The paper's Table 6: SmartTrim at three MACs reductions, and each training strategy removed in turn "
            "(stable initialisation: trimmers initialised at random instead of keeping everything at step 0; "
            "curriculum: the targets in force from step 0; self-distillation: lambda_SD = 0).")
    if res.backbone.preset.recipe.get("curriculum_fraction", 0.5) == 0:
        what += (" With this preset the curriculum fraction is 0 (targets in force from step 0), so the "
                 "'- Curriculum Scheduler' rows train exactly as the SmartTrim rows.")
    path = res.out / "table6.md"
    path.write_text(_header(res, what) + _table(res.rows, res.full) + "\n")
    return [path]


# ------------------------------------------------------------------------------------------------
# Figure 4a
# ------------------------------------------------------------------------------------------------
FIG4A_POLICIES = (("cross_modal", "SmartTrim (cross-modal)"), ("local", "Local"), ("random", "Random"))
FIG4A_RATIOS = (1.5, 2.0, 2.5, 3.0)


def _fig4a_runs() -> list[Run]:
    return [Run(label, policy, ratio) for policy, label in FIG4A_POLICIES for ratio in FIG4A_RATIOS]


def _fig4a_write(res: Result) -> list[Path]:
    what = ("The paper's Fig. 4a: token trimming policies at the same calibrated MACs targets and the same "
            "recipe: cross-modal (SmartTrim), Local (no [CLS] of either stream) and Random (a learned keep rate).")
    md = res.out / "fig4a.md"
    md.write_text(_header(res, what) + _table(res.rows, res.full) + "\n\n![fig4a](fig4a.png)\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.axhline(100 * res.full["accuracy"], color="gray", ls="--", lw=1, label="METER (full)")
    for i, (policy, label) in enumerate(FIG4A_POLICIES):
        rs = sorted((r for r in res.rows if r["policy"] == policy), key=lambda r: r["gmacs"])
        ax.errorbar([r["gmacs"] for r in rs], [100 * r["accuracy"] for r in rs],
                    xerr=[r.get("gmacs_std", 0.0) for r in rs], yerr=[100 * r.get("accuracy_std", 0.0) for r in rs],
                    fmt="o-", color=f"C{i}", capsize=3, lw=1.2, label=label)
    ax.set_xlabel("GMACs per instance (batch 1, trimmed tokens/heads removed)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"token policies (mean ± std, {res.seeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png = res.out / "fig4a.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, png]


# ------------------------------------------------------------------------------------------------
# Figure 7
# ------------------------------------------------------------------------------------------------
FIG7_SHOW = 4  # cheapest and dearest instances shown


def per_instance_gmacs(tmodel: Any, dataset: Any, instances: int) -> list[float]:
    """GMACs of each of the first ``instances`` items at batch 1 (eval mode: tokens and heads removed)."""
    import torch

    from trimkit.macs import count_macs

    from .trainer import collate_of, model_inputs

    collate = collate_of(dataset)
    tmodel.eval()
    with torch.no_grad():
        return [count_macs(tmodel, **model_inputs(tmodel, collate([dataset[i]]))).total / 1e9
                for i in range(min(instances, len(dataset)))]


def _fig7_runs() -> list[Run]:
    return [Run("SmartTrim", "cross_modal", 2.0)]


def _fig7_write(res: Result) -> list[Path]:
    import torch

    from .demo import cell

    bb, ds = res.backbone, res.backbone.test_ds
    n = min(len(ds), max(bb.preset.macs_instances, 4 * bb.preset.macs_instances))
    run = _fig7_runs()[0].name
    per_seed = {s: per_instance_gmacs(res.models[(s, run)], ds, n) for s in range(res.seeds)}
    stats = []
    for s, g in per_seed.items():
        mean = sum(g) / len(g)
        std = (sum((x - mean) ** 2 for x in g) / max(1, len(g) - 1)) ** 0.5
        stats.append({"seed": s, "mean": mean, "std": std, "min": min(g), "max": max(g), "spread": max(g) / min(g)})
    agg: dict[str, Any] = {"seeds": res.seeds}
    for key in ("mean", "std", "spread"):
        vals = [st[key] for st in stats]
        m = sum(vals) / len(vals)
        agg[key] = m
        agg[f"{key}_std"] = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    g0 = per_seed[0]
    order = sorted(range(len(g0)), key=lambda i: g0[i])
    cheap, dear = order[:FIG7_SHOW], order[-FIG7_SHOW:][::-1]
    res.extra["fig7"] = {"instances": n, "per_seed_gmacs": per_seed, "stats": stats, "cheapest": cheap, "dearest": dear}

    def describe(i: int) -> str:
        d = ds.describe(i) if hasattr(ds, "describe") else {}
        digits = int((d["grid"] >= 0).sum()) if "grid" in d else None
        return (f"instance {i}: {g0[i]:.5f} GMACs" + (f", question {d['question']!r}" if "question" in d else "") +
                (f" (answer {d['answer']!r}, {d.get('qtype')})" if "answer" in d else "") +
                (f", {digits} digits in the grid" if digits is not None else ""))

    what = ("The paper's Fig. 7: how much compute SmartTrim 2x gives each instance, per-instance GMACs at batch 1 "
            f"over the first {n} test instances (the histogram is seed 0's; the table's spread is per seed).")
    table = ("| statistic | value |\n|---|---|\n"
             f"| mean GMACs / instance | {cell(agg, 'mean', '.5f')} |\n"
             f"| std of GMACs over instances | {cell(agg, 'std', '.5f')} |\n"
             f"| dearest / cheapest instance | {cell(agg, 'spread', '.2f', suffix='x')} |\n")
    lists = ("\n**Cheapest (seed 0):**\n\n" + "\n".join(f"- {describe(i)}" for i in cheap) +
             "\n\n**Dearest (seed 0):**\n\n" + "\n".join(f"- {describe(i)}" for i in dear) + "\n")
    md = res.out / "fig7.md"
    md.write_text(_header(res, what) + table + lists + "\n![fig7](fig7.png)\n")
    plt = _plt()
    fig = plt.figure(figsize=(8, 5))
    grid = fig.add_gridspec(2, FIG7_SHOW, height_ratios=[2.2, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.hist(g0, bins=min(30, max(5, n // 4)), color="C0", alpha=0.8)
    ax.set_xlabel("GMACs per instance (batch 1, removal)")
    ax.set_ylabel("instances")
    ax.set_title("SmartTrim 2x: compute per instance")
    shown = cheap[: FIG7_SHOW // 2] + dear[: FIG7_SHOW - FIG7_SHOW // 2]
    for j, i in enumerate(shown):
        sub = fig.add_subplot(grid[1, j])
        item = ds[i]
        img = item.get("pixel_values") if isinstance(item, dict) else None
        if isinstance(img, torch.Tensor) and img.dim() == 3:
            x = img.float()
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
            sub.imshow(x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x[0].numpy(), cmap="gray")
        q = ds.describe(i).get("question", "") if hasattr(ds, "describe") else ""
        sub.set_title(f"{'cheapest' if i in cheap else 'dearest'}: {g0[i]:.4f} G\n{q}", fontsize=6)
        sub.axis("off")
    fig.tight_layout()
    png = res.out / "fig7.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, png]


# ------------------------------------------------------------------------------------------------
# The fidelity switches
# ------------------------------------------------------------------------------------------------
def _switches_runs() -> list[Run]:
    return [Run("defaults", "cross_modal", 2.0),
            Run("cost_beta=entering", "cross_modal", 2.0, recipe={"cost_beta": "entering"}),
            Run("sd_teacher=detached", "cross_modal", 2.0, recipe={"sd_teacher": "detached"}),
            Run("attention_dropout=model", "cross_modal", 2.0, trim={"attention_dropout": "model"}),
            Run("sampler=gumbel", "cross_modal", 2.0, trim={"sampler": "gumbel"})]


def _switches_write(res: Result) -> list[Path]:
    what = ("Issue 12.2: SmartTrim 2x with one fidelity switch flipped from the demo's setting per row (RecipeConfig."
            "cost_beta, RecipeConfig.sd_teacher, TrimConfig.attention_dropout, TrimConfig.sampler; the demo uses "
            "sampler 'sharpen'). Note: the demo's backbone has dropout 0.0, so attention_dropout=model changes "
            "nothing here; with cost_beta=entering the calibrated targets are converted to per-layer ratios of "
            "the same MACs.")
    path = res.out / "switches.md"
    path.write_text(_header(res, what) + _table(res.rows, res.full, "setting") + "\n")
    return [path]


EXPERIMENTS: dict[str, Experiment] = {
    "table6": Experiment("table6", "Table 6: ablations of SmartTrim's training strategies",
                         "SmartTrim at 1.5x/2x/2.5x, minus stable init, minus curriculum, minus self-distillation",
                         _table6_runs, _table6_write),
    "fig4a": Experiment("fig4a", "Fig. 4a: token trimming policies",
                        "token policies cross_modal/local/random at 1.5x/2x/2.5x/3x fewer MACs, as curves",
                        _fig4a_runs, _fig4a_write),
    "fig7": Experiment("fig7", "Fig. 7: compute per instance",
                       "SmartTrim 2x: histogram of per-instance GMACs, cheapest and dearest instances",
                       _fig7_runs, _fig7_write),
    "switches": Experiment("switches", "Fidelity switches at 2x",
                           "SmartTrim 2x with each fidelity switch (cost_beta, sd_teacher, attention_dropout, "
                           "sampler) flipped", _switches_runs, _switches_write),
}
