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
* ``table5``: Table 5, a higher resolution trimmed against a lower one untrimmed: a second backbone on
  images of twice the resolution (the same grids and questions), SmartTrim's targets calibrated to
  the MACs of the default backbone's full model.
* ``static``: the static baselines of Table 1 at 1.5x/2x/3x next to SmartTrim: FTKD (a shallower
  copy of the backbone's layers distilled from it: :mod:`trimkit_train.static_baselines`) and
  TRIPS-style (token policy ``trips``: a fixed share of the ViT's vision tokens by a text-guided
  score, task loss only).
* ``fig4a``: token policies cross_modal, local and random at 1.5x/2x/2.5x/3x, accuracy vs GMACs curves.
* ``fig7``: SmartTrim 2x, the distribution of per-instance GMACs over the test split (batch 1, tokens
  and heads removed) with the cheapest and dearest instances shown.
* ``fig4b``: head trimming alone in the co-attention layers at retention 0.7/0.5/0.3 without
  self-distillation: adaptive head trimmers vs static heads (Random, Grad Layer, Grad All with Michel
  et al.'s importance; :mod:`trimkit_train.head_baselines`).
* ``fig2``: token and head similarity per layer of the untrimmed backbone (Appendix A; no fine-tune).
* ``fig5``: kept patches through the layers for one image asked two questions, cross-modal vs Local,
  with two measures over many images (relevance lift, question sensitivity).
* ``fig6``: head retention per attention module over instances at head target 0.5.
* ``switches``: SmartTrim 2x with each fidelity switch flipped from its default (issue 12.2):
  ``cost_beta``, ``sd_teacher``, ``attention_dropout`` and the sampler, to measure what each changes.
* ``placement`` (not in the paper): SmartTrim 2x with trimmers in every layer against one token trimmer
  at the first vision block (and one on the text stream at the first co-attention layer), with CPU
  batch-1 latency: fewer trimmed layers pay less fixed cost per forward (issue 13).

``quick=True`` uses the demo's smoke-test sizes (seconds per run: the numbers mean nothing);
``steps`` overrides every fine-tune's steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
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
    heads: str | None = None  # a static head baseline (head_baselines.METHODS) installed before fine-tuning
    # "trim": a trimmed fine-tune; "ftkd": a shallower copy distilled from the backbone; "full": the backbone
    # itself, measured as it is (no fine-tune)
    kind: str = "trim"
    # digit-grid options over the preset's (e.g. {"cell": 32}: a higher resolution): the run uses a backbone
    # trained on that data (once per distinct options, like the default one); its MACs ratio is reported
    # against the default backbone's full model
    data: dict[str, Any] = field(default_factory=dict)
    # keep targets calibrated so that the run's MACs equal the default backbone's full model (ratio: its own
    # backbone's MACs over those), instead of ``ratio`` (Table 5: a higher resolution at the MACs of a lower)
    match_default_macs: bool = False
    # TrimConfig fields of the model the run's own keep targets are calibrated on (None: the backbone's
    # calibration); the run trims with them too (e.g. TRIPS-style: vision tokens of the ViT only, no heads)
    calibrate: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in RUN_KINDS:
            raise ValueError(f"Run({self.method!r}).kind must be one of {RUN_KINDS}, got {self.kind!r}")

    @property
    def name(self) -> str:
        """The run's directory name (``runs/NAME-seedN``); unique within an experiment (checked)."""
        data = f"-{_slug(self.data)}" if self.data else ""
        return f"{_slug(self.method)}-{self.policy}-{self.ratio:g}x{data}"


RUN_KINDS = ("trim", "ftkd", "full")


def _slug(value: Any) -> str:
    """A path-safe lower-case slug of a label or of data options (``{"cell": 32}`` -> ``cell-32``)."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in text.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    help: str
    runs: Callable[[], list[Run]]
    write: Callable[["Result"], list[Path]]
    # runs on a user's task config too (``--config``): it needs nothing digit-grid or METER specific
    any_task: bool = False
    # its writer takes any subset of its configurations (``--only``): a table of rows, no figure that pairs them
    subsets: bool = False
    # on a task it compares the config's model with a second one (``--high-config``: the same task at a
    # higher input resolution, Table 5); runs with ``data`` use that model
    paired: bool = False
    # each run's CPU batch-1 latency against the full model is measured too (interleaved; slower)
    latency: bool = False


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
                   log: Callable[[str], None] = print, config: str | Path | None = None,
                   only: list[str] | None = None, high_config: str | Path | None = None) -> dict[str, Any]:
    """Run experiment ``name`` (:data:`EXPERIMENTS`) over ``seeds`` fine-tune seeds; write its files into
    ``out_dir`` (default ``trimkit-repro/NAME``). Returns the content of ``results.json``.

    ``config``: a task's experiment config (YAML, as ``trimkit train`` takes) to run on instead of the
    digit-grid demo: its model, loaded as the config says (``model.pretrained`` / ``model.init``), is the
    full reference and the backbone every run fine-tunes; its ``trim`` and ``recipe`` are the base every run
    overrides, with keep targets calibrated on that model; its ``train`` settings are each fine-tune's
    (``steps`` overrides ``train.steps``). Only experiments with ``any_task`` run this way (the others need
    the digit-grid setting); "accuracy" in the table is the task's main metric.

    ``only``: run just the configurations with these row labels (``Run.method``, e.g. ``["defaults",
    "sd_teacher=joint"]``), to measure some rows with more seeds; an unknown label is an error
    listing the experiment's.

    ``high_config``: with ``config``, for a paired experiment (``table5``): the same task's config at the
    higher input resolution (its model fine-tuned at that resolution, its data sections producing those
    images); its model is the higher-resolution full row and the backbone SmartTrim fine-tunes there."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; one of {', '.join(EXPERIMENTS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    from .demo import aggregate, config_backbone, finetune, measure, prepare_backbone, preset_for

    exp = EXPERIMENTS[name]
    base = high = None
    if high_config is not None and (config is None or not exp.paired):
        raise ValueError(f"trimkit repro {name}: --high-config goes with --config, for "
                         f"{', '.join(n for n, e in EXPERIMENTS.items() if e.paired)} only")
    if config is not None and exp.paired:
        if high_config is None:
            raise ValueError(f"trimkit repro {name} --config: also give --high-config FILE, the same task's config at "
                             "the higher resolution (its model fine-tuned at that resolution, its data producing those "
                             "images): trimkit cannot resize a task model's position embeddings and retrain it for you")
        from .trainer import ExperimentConfig

        high = ExperimentConfig.load(high_config)
    if config is not None:
        if not (exp.any_task or exp.paired):
            raise ValueError(f"trimkit repro {name}: runs on the digit-grid setting only (it needs its backbone "
                             f"training, data or questions); with --config run one of "
                             f"{', '.join(n for n, e in EXPERIMENTS.items() if e.any_task)}")
        from .trainer import ExperimentConfig

        base = ExperimentConfig.load(config)
    out = Path(out_dir if out_dir is not None else Path("trimkit-repro") / name)
    out.mkdir(parents=True, exist_ok=True)
    runs = exp.runs()
    if only:
        if not exp.subsets:
            raise ValueError(f"trimkit repro {name} --only: this experiment's table or figure needs all its "
                             f"configurations; --only works with "
                             f"{', '.join(n for n, e in EXPERIMENTS.items() if e.subsets)}")
        labels = list(dict.fromkeys(r.method for r in runs))
        unknown = [o for o in only if o not in labels]
        if unknown:
            raise ValueError(f"trimkit repro {name} --only: no configuration labelled {unknown}; its labels are "
                             f"{labels}")
        runs = [r for r in runs if r.method in only]
    if high is not None:  # the runs on the second model: named after its config, not digit-grid's data options
        runs = [replace(r, data={"high_config": Path(high_config).stem}) if r.data else r for r in runs]
    own_heads = getattr(base.trim, "head_layers", None) if base is not None else None  # a config may have no trim
    if own_heads:  # the config knows its model's layers: its head selection wins
        runs = [replace(r, trim={**r.trim, "head_layers": list(own_heads)}) if "head_layers" in r.trim else r
                for r in runs]
    command = command or f"trimkit repro {name} --seeds {seeds} --out {out}" + (" --quick" if quick else "") + (
        f" --steps {steps}" if steps is not None else "") + (f" --config {config}" if config is not None else "") + (
        f" --high-config {high_config}" if high_config is not None else "") + (" --only " + " ".join(only) if only else "")
    preset = preset_for(quick, steps)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # two runs in one directory: the second would overwrite the first
        raise ValueError(f"experiment {name!r}: runs share a name: {sorted({n for n in names if names.count(n) > 1})}")
    t0 = time.perf_counter()

    def stamp() -> str:
        return f"[{time.perf_counter() - t0:6.1f}s]"

    length = (f"{steps} fine-tune steps" if steps is not None else f"{preset.finetune['steps']} fine-tune steps"
              if base is None or quick else "the config's training length")
    log(f"{stamp()} repro {name}: {len(runs)} configurations x {seeds} seed(s), {length} each")
    iterations = 6 if quick else 12  # --quick: a coarser bisection of the targets (its numbers mean nothing anyway)
    default_ratios = tuple(sorted({r.ratio for r in runs if not r.data} - {1.0}))  # 1.0: the run gives its own
    if base is not None:
        bb = config_backbone(base, out, default_ratios, progress, log, stamp, calibration_iterations=iterations,
                             finetune_steps=steps if steps is not None else (preset.finetune["steps"] if quick else None),
                             calibration_instances=preset.calibration_instances, source=str(config))
        preset = bb.preset
    else:
        bb = prepare_backbone(preset, out, default_ratios, progress, log, stamp, calibration_iterations=iterations)
    models: dict[tuple[int, str], Any] = {}
    per_seed: list[list[dict[str, Any]]] = []
    extra: dict[str, Any] = {}
    backbones: dict[str, Backbone] = {"": bb}
    if high is not None:
        extra["high_config"] = str(high_config)

    def backbone_of(run: Run) -> Backbone:
        """The default backbone, or one trained on the run's data options (once per options)."""
        key = _slug(run.data) if run.data else ""
        if key not in backbones:
            own = tuple(sorted({r.ratio for r in runs if _slug(r.data) == key} - {1.0}))
            if high is not None:  # a task: the second model is the one --high-config describes
                log(f"{stamp()}     the higher-resolution model of {high_config}")
                backbones[key] = config_backbone(high, out / "runs" / f"data-{key}", own, progress, log, stamp,
                                                 calibration_iterations=iterations,
                                                 finetune_steps=steps if steps is not None else None,
                                                 calibration_instances=preset.calibration_instances,
                                                 source=str(high_config))
                return backbones[key]
            log(f"{stamp()}     a second backbone for data options {run.data}")
            backbones[key] = prepare_backbone(replace(preset, data={**preset.data, **run.data}),
                                              out / "runs" / f"data-{key}", own, progress, log, stamp,
                                              calibration_iterations=iterations)
        return backbones[key]

    for seed in range(seeds):
        rows = []
        for run in runs:
            t = time.perf_counter()
            key = f"{run.name}-seed{seed}"
            rb = backbone_of(run)
            if run.kind == "full":
                tm = rb.net
            elif run.kind == "ftkd":
                tm = _ftkd(rb, run, key, seed, extra, log, stamp)
            else:
                prepare = _static_heads(rb, run, seed, extra, log, stamp) if run.heads else None
                trim_cfg, ratio = run.trim, run.ratio
                if run.calibrate is not None or run.match_default_macs:  # its own targets (ratio 1.0: none calibrated)
                    goal = rb.full_eval()["gmacs"] / bb.full_eval()["gmacs"] if run.match_default_macs else run.ratio
                    trim_cfg, ratio = {**_own_targets(rb, run, extra, log, goal), **run.trim}, 1.0
                tm = finetune(rb, key, run.policy, ratio, seed=seed, trim_cfg=trim_cfg, recipe=run.recipe,
                              stable_init=run.stable_init, prepare=prepare, log=log)
            # a checkpoint only where trimkit eval can rebuild it (not the backbone itself, nor FTKD's cut model)
            row = measure(rb, tm, run.method, run.policy, run.ratio, latency=exp.latency,
                          name=key if run.kind == "trim" else None)
            if rb is not bb:  # MACs against the default backbone's full model, the table's reference row
                row.update(macs_ratio_own=row["macs_ratio"], macs_ratio=bb.full_eval()["gmacs"] / row["gmacs"],
                           data=run.data, full_accuracy_own=rb.full_eval()["accuracy"])
                if high is not None:
                    row["image_side"] = _image_side(rb.test_ds)
            row.update(run=run.name, trim_overrides=run.trim, recipe_overrides=run.recipe, stable_init=run.stable_init,
                       heads_baseline=run.heads)
            rows.append(row)
            models[(seed, run.name)] = tm
            log(f"{stamp()}     seed {seed}: {run.method} {run.ratio:g}x ({run.policy}) in {time.perf_counter() - t:.0f}s: "
                f"accuracy {100 * row['accuracy']:.1f}, {row['macs_ratio']:.2f}x fewer MACs")
        per_seed.append(rows)
    result = Result(exp, out, command, seeds, _full(bb), aggregate(per_seed), per_seed, models, bb, extra=extra)
    files = exp.write(result)
    result.wall_s = time.perf_counter() - t0
    data = {"experiment": name, "command": command, "seeds": seeds, "quick": quick, "wall_s": result.wall_s,
            "full": result.full, "rows": result.rows, "per_seed": per_seed, "preset": asdict(preset),
            "calibration": {f"{r:g}x": c for r, c in bb.calibration.items()}, **result.extra}
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "command.txt").write_text(command + "\n")
    log(f"\n{stamp()} done; wrote {', '.join(str(f) for f in [*files, out / 'results.json', out / 'command.txt'])}")
    return data


def _static_heads(bb: Backbone, run: Run, seed: int, extra: dict[str, Any], log: Callable[[str], None],
                  stamp: Callable[[], str]) -> Callable[[Any], None]:
    """The ``prepare`` of a static head baseline: Michel et al.'s importance (once per backbone, on
    the train split with pseudo-labels, for the layers the run trims heads in), then the run's masks
    (``random``: drawn with the fine-tune seed)."""
    import torch

    from trimkit.plugins import get_registry

    from .head_baselines import head_importance, install_static_heads, static_head_masks

    from trimkit.model import _layer_index, _selected

    spec = get_registry().adapters.get(bb.adapter).describe(bb.net)
    # the layers TrimConfig.head_layers selects, by the same selectors (path, stream, site, stream.site...)
    chosen = _selected(run.trim.get("head_layers"), "head_layers", _layer_index(spec))
    layers = {key.split("@")[0] for key in chosen}
    where = f"importance-{_slug(run.data)}" if run.data else "importance"  # once per backbone
    if where not in extra:
        t = time.perf_counter()
        n = min(len(bb.train_ds), 8 * bb.preset.macs_instances)
        imp = head_importance(bb.net, spec, bb.train_ds, layers=layers, instances=n)
        extra[where] = {k: v.tolist() for k, v in imp.items()}
        extra[f"{where}_instances"] = n
        log(f"{stamp()}     head importance (Michel et al.) over {n} train instances in {time.perf_counter() - t:.0f}s")
    imp = {k: torch.tensor(v) for k, v in extra[where].items()}
    masks = static_head_masks(imp, float(run.trim["head_target"]), run.heads, torch.Generator().manual_seed(seed))
    extra.setdefault("static_heads", {})[f"{run.name}-seed{seed}"] = {k: v.int().tolist() for k, v in masks.items()}
    return lambda tm: install_static_heads(tm, masks)


def _own_targets(bb: Backbone, run: Run, extra: dict[str, Any], log: Callable[[str], None],
                 ratio: float) -> dict[str, Any]:
    """TrimConfig fields of a run with its own calibration: the backbone trimmed with ``run.calibrate``'s
    fields (none: the preset's), its keep targets bisected to ``ratio`` fewer MACs (once per backbone
    and ratio, kept in ``extra``)."""
    from trimkit import TrimConfig, trim

    from .demo import _selector_targets, calibrate

    fields = run.calibrate or {}
    cache = extra.setdefault("own_calibration", {})
    data = f" {_slug(run.data)}" if run.data else ""
    key = f"{json.dumps(fields, sort_keys=True)} {ratio:.4g}x{data}"
    if key not in cache:
        preset = bb.preset
        probe = trim(bb.net, TrimConfig(**{**preset.trim, **fields}), adapter=bb.adapter)
        c = calibrate(probe, bb.test_ds, ratio, preset.calibration_instances)
        cache[key] = {"calibrate": fields, "data": run.data, "ratio": ratio, "forced_ratio": c["forced_ratio"],
                      **_selector_targets(probe, c["token_target"], c["head_target"])}
        log(f"          {run.method}: own targets for {ratio:.2f}x ({fields or 'the preset'}{data}) -> forced MACs "
            f"ratio {c['forced_ratio']:.2f}")
    c = cache[key]
    return {**fields, "token_target": c["token_target"], "head_target": c["head_target"] or 1.0}


#: FTKD's layer stacks of the demo's METER, as groups that keep the same layers (the co-attention
#: model's two streams are cut alike); the text encoder (one layer in the demo) is kept whole
FTKD_GROUPS = (("vit_model.transformer.resblocks",), ("cross_modal_image_layers", "cross_modal_text_layers"))


def _ftkd(bb: Backbone, run: Run, name: str, seed: int, extra: dict[str, Any], log: Callable[[str], None],
          stamp: Callable[[], str]) -> Any:
    """FTKD (the paper's Table 1): the layer counts whose MACs are nearest ``run.ratio`` fewer
    (:func:`~trimkit_train.static_baselines.choose_depths`, once per backbone), those layers copied from
    the backbone (TinyBERT's uniform mapping) and fine-tuned with the task loss plus distillation from
    the backbone (logits and each kept layer's output); returns the fine-tuned student."""
    import copy

    import torch

    from trimkit.macs import count_macs

    from .demo import _experiment
    from trimkit.plugins import get_registry

    from .static_baselines import (FTKDObjective, attention_pairs, choose_depths, layer_groups, layer_pairs,
                                   select_layers)
    from .trainer import Trainer, collate_of, model_inputs, task_of

    preset = bb.preset
    cache = extra.setdefault("ftkd_depths", {})
    key = f"{run.ratio:g}x" + (f" {_slug(run.data)}" if run.data else "")  # once per backbone and ratio
    if key not in cache:
        collate = collate_of(bb.test_ds)
        xs = [model_inputs(bb.net, collate([bb.test_ds[i]])) for i in range(preset.calibration_instances)]

        def macs(model: torch.nn.Module) -> float:
            model.eval()
            with torch.no_grad():
                return sum(count_macs(model, **x).total for x in xs) / len(xs)

        groups = FTKD_GROUPS if bb.base is None else layer_groups(  # a task's model: its stacks, from its description
            bb.net, get_registry().adapters.get(bb.adapter).describe(bb.net))
        cache[key] = choose_depths(bb.net, groups, run.ratio, macs)
        log(f"{stamp()}     FTKD {run.ratio:g}x: layers {cache[key]['layers']} -> {cache[key]['macs_ratio']:.2f}x "
            "fewer MACs")
    layers = cache[key]["layers"]
    teacher = copy.deepcopy(bb.net)  # frozen by the Trainer; the backbone itself stays as it is
    student = select_layers(bb.net, layers)
    cfg = _experiment(preset, preset.finetune, bb.out / "runs" / name, None, None, bb.progress, run.recipe, seed,
                      bb.base)
    spec = get_registry().adapters.get(bb.adapter).describe(bb.net)
    objective = FTKDObjective(task_of(cfg.data, bb.train_ds), student, teacher, layer_pairs(layers),
                              attentions=attention_pairs(spec, layers))  # TinyBERT's attention-map loss too
    try:
        tr = Trainer(cfg, model=student, train_dataset=bb.train_ds, eval_dataset=bb.test_ds, objective=objective,
                     teacher=teacher)
        tr.fit(overwrite=True)
    finally:
        objective.remove()
    return tr.net


def _full(bb: Backbone) -> dict[str, Any]:
    ev = bb.full_eval()
    return {"accuracy": ev["accuracy"], "gmacs": ev["gmacs"], "metric": ev.get("accuracy_metric", "accuracy"),
            "label": "METER (full)" if bb.base is None else f"{bb.adapter} (full)"}


def _full_label(res: Result) -> str:
    """The full model's row label: ``METER (full)`` on digit-grid, ``ADAPTER (full)`` on a task config."""
    return res.full.get("label", "METER (full)")


def _metric(res: Result) -> str:
    return res.full.get("metric", "accuracy")


def _delta(row: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``delta`` (its accuracy minus the full model's) and ``delta_std`` (its seed spread)."""
    return dict(row, delta=row["accuracy"] - full["accuracy"], delta_std=row.get("accuracy_std", 0.0))


def _header(res: Result, what: str, finetuned: bool = True) -> str:
    p = res.backbone.preset
    bb = res.backbone
    if bb.base is not None:
        metric = _metric(res)
        setting = (f"# {res.experiment.title}\n\n{what}\n\nTask config `{bb.source}`: adapter {bb.adapter!r}, dataset "
                   f"{bb.base.data.name!r}; its model untrimmed (the full reference) at {metric} "
                   f"{100 * res.full['accuracy']:.1f} and {res.full['gmacs']:.4f} GMACs per instance"
                   + (f" (the 'accuracy' columns are {metric}, the task's main metric)" if metric != "accuracy" else ""))
    else:
        setting = (f"# {res.experiment.title}\n\n{what}\n\nDigit-grid VQA ({p.data['grid']}x{p.data['grid']} cells of "
                   f"{p.data['cell']} px), METER-architecture backbone (trained once, seed 0) at accuracy "
                   f"{100 * res.full['accuracy']:.1f} and {res.full['gmacs']:.4f} GMACs per instance")
    if finetuned:
        steps = p.finetune.get("steps", bb.base.train.steps if bb.base is not None else None)
        length = f"{steps} steps" if steps is not None else f"{bb.base.train.epochs:g} epochs"
        setting += (f"; SmartTrim fine-tunes of {length}. Cells are mean ± standard deviation over "
                    f"{res.seeds} fine-tune seed(s) (0..{res.seeds - 1}); accuracy on {len(res.backbone.test_ds)} test "
                    f"questions, GMACs the mean over {p.macs_instances} test instances at batch 1 with tokens and heads "
                    "removed")
    else:
        setting += "; no fine-tune (the measurement is of the backbone itself, so --seeds changes nothing)"
    return setting + f".\n\nCommand:\n\n```\n{res.command}\n```\n\n"


def _table(rows: list[dict[str, Any]], full: dict[str, Any], first: str = "method") -> str:
    from .demo import cell

    metric = full.get("metric", "accuracy")
    lines = [f"| {first} | target | {metric} | Δ vs full | GMACs / instance | MACs ratio | kept vision tokens | kept heads |",
             "|---|---|---|---|---|---|---|---|",
             f"| {full.get('label', 'METER (full)')} | - | {100 * full['accuracy']:.1f} | - | {full['gmacs']:.4f} | 1.00x | "
             "1.00 | 1.00 |"]
    for r in rows:
        delta = dict(r, delta=r["accuracy"] - full["accuracy"])
        if "accuracy_std" in r:
            delta["delta_std"] = r["accuracy_std"]
        lines.append(f"| {r['method']} | {r['target']:g}x | {cell(r, 'accuracy', '.1f', 100)} | "
                     f"{cell(delta, 'delta', '+.1f', 100)} | {cell(r, 'gmacs', '.4f')} | "
                     f"{cell(r, 'macs_ratio', '.2f', suffix='x')} | {cell(r, 'keep_vision', '.2f')} | "
                     f"{cell(r, 'keep_heads', '.2f')} |")
    return "\n".join(lines)


def _save(plt, fig, res: Result, name: str) -> Path:
    """Write ``fig`` as ``NAME.png`` into the experiment's directory and close it."""
    fig.tight_layout()
    png = res.out / f"{name}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


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
# Table 5: a higher resolution, trimmed, at the MACs of a lower one
# ------------------------------------------------------------------------------------------------
#: the higher resolution: cells of twice the pixels (2 x 2 patches per cell, 4x the vision tokens); the
#: same grids, digits and questions (the datasets draw them from the same seeds)
TABLE5_SCALE = 2


def _table5_runs() -> list[Run]:
    from .demo import FULL

    hi = {"cell": FULL.data["cell"] * TABLE5_SCALE}
    return [Run("METER (full), higher resolution", "none", 1.0, kind="full", data=hi),
            Run("SmartTrim, higher resolution", "cross_modal", 1.0, data=hi, match_default_macs=True)]


def _image_side(ds: Any) -> int | None:
    """The width in pixels of a dataset's first image (its first (C, H, W) tensor), ``None`` without one."""
    import torch

    item = ds[0]
    for value in (item.values() if isinstance(item, dict) else item):
        if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[0] in (1, 3, 4):
            return int(value.shape[-1])
    return None


def _table5_write(res: Result) -> list[Path]:
    from .demo import cell

    p = res.backbone.preset
    task = res.backbone.base is not None

    def pixels(row: dict[str, Any] | None) -> int:  # image side of a row's data (None: the default backbone's)
        if task:  # a task: the side its own test images have
            return (row or {}).get("image_side") or _image_side(res.backbone.test_ds)
        return {**p.data, **((row or {}).get("data") or {})}["cell"] * p.data["grid"]

    lo = pixels(None)
    hi = max([pixels(r) for r in res.rows] + [lo])
    if task:
        what = (f"The paper's Table 5 on a task: the model of `{res.extra.get('high_config')}` at a higher input "
                f"resolution ({hi} px), untrimmed and SmartTrim-trimmed with keep targets calibrated so that its MACs "
                f"equal the lower-resolution full model's (`{res.backbone.source}`, {lo} px), against that model "
                "untrimmed. MACs ratios are against the lower-resolution full model (below 1: more MACs).")
    else:
        patch = res.backbone.test_ds.patch_size
        what = (f"The paper's Table 5: a model at a higher input resolution, trimmed to the MACs of the model at a "
                f"lower resolution, against that lower-resolution model untrimmed. Lower resolution: the default "
                f"backbone ({lo} px images, {p.data['cell'] // patch}x{p.data['cell'] // patch} {patch} px patch(es) per "
                f"cell). Higher resolution: a second backbone trained the same way on {hi} px images of the same grids "
                f"and questions ({hi // lo}x{hi // lo} times the patches); SmartTrim's keep targets are calibrated so "
                f"that its MACs equal the lower-resolution full model's. MACs ratios are against the lower-resolution "
                f"full model (below 1: more MACs).")
    lines = ["| model | resolution | accuracy | Δ vs lower-resolution full | GMACs / instance | MACs ratio | "
             "kept vision tokens | kept heads |", "|---|---|---|---|---|---|---|---|",
             f"| {_full_label(res)} | {lo} px | {100 * res.full['accuracy']:.1f} | - | {res.full['gmacs']:.4f} | "
             "1.00x | 1.00 | 1.00 |"]
    for r in res.rows:
        d = _delta(r, res.full)
        label = r['method'].split(',')[0]
        if task and label == "METER (full)":
            label = _full_label(res)
        lines.append(f"| {label} | {pixels(r)} px | {cell(r, 'accuracy', '.1f', 100)} | "
                     f"{cell(d, 'delta', '+.1f', 100)} | {cell(r, 'gmacs', '.4f')} | "
                     f"{cell(r, 'macs_ratio', '.2f', suffix='x')} | {cell(r, 'keep_vision', '.2f')} | "
                     f"{cell(r, 'keep_heads', '.2f')} |")
    calib = [f"| {c['ratio']:.2f}x fewer MACs than its own full model | {c['forced_ratio']:.2f}x (forced) |"
             for c in res.extra.get("own_calibration", {}).values()]
    md = res.out / "table5.md"
    md.write_text(_header(res, what) + "\n".join(lines) + "\n\n| SmartTrim's calibration goal | reached by the "
                  "calibrated targets |\n|---|---|\n" + "\n".join(calib) + "\n")
    return [md]


# ------------------------------------------------------------------------------------------------
# Table 1's static baselines
# ------------------------------------------------------------------------------------------------
STATIC_RATIOS = (1.5, 2.0, 3.0)
#: TRIPS-style: vision tokens trimmed in the ViT only (TRIPS selects patches during image encoding), no
#: heads, a fixed share per layer, task fine-tuning only (no cost loss: the share is fixed by
#: construction; no self-distillation), the targets in force from step 0
TRIPS_CALIBRATE = {"token_layers": ["vision.uni"], "trim_heads": False}
TRIPS_RECIPE = {"lambda_cost": 0.0, "lambda_sd": 0.0, "scheduler": "constant"}
STATIC_METHODS = (("SmartTrim", "#1f77b4"), ("TRIPS-style", "#ff7f0e"), ("FTKD", "#2ca02c"))


def _static_runs() -> list[Run]:
    runs = []
    for ratio in STATIC_RATIOS:
        runs += [Run("SmartTrim", "cross_modal", ratio),
                 Run("TRIPS-style", "trips", ratio, recipe=TRIPS_RECIPE, calibrate=TRIPS_CALIBRATE),
                 Run("FTKD", "none", ratio, kind="ftkd")]
    return runs


def _static_write(res: Result) -> list[Path]:
    depths = res.extra.get("ftkd_depths", {})
    own = res.extra.get("own_calibration", {})
    what = ("The paper's Table 1 baselines that need only task fine-tuning, at the same MACs reductions: "
            "SmartTrim (adaptive tokens and heads, the full recipe); **TRIPS-style** (token policy `trips`: a learned "
            "text-guided score, the ViT's vision tokens only, the same share kept for every instance, task loss "
            "only); **FTKD** (a shallower model of layers copied from the backbone, TinyBERT's uniform mapping, "
            "fine-tuned with the task loss plus distillation of the backbone's logits, of each kept layer's "
            "output and of its attention scores, TinyBERT's three terms). FTKD's depth is chosen by counted "
            "MACs, so its MACs ratio is the nearest a whole number of layers gives.")
    lines = ["", "| run | what was calibrated | MACs ratio of that choice |", "|---|---|---|"]
    for k, d in depths.items():
        lines.append(f"| FTKD {k} | layers kept: {d['layers']} | {d['macs_ratio']:.2f}x |")
    for k, c in own.items():
        lines.append(f"| TRIPS-style {c['ratio']:g}x | token targets {c['token_target']} | {c['forced_ratio']:.2f}x "
                     "(forced) |")
    md = res.out / "static.md"
    md.write_text(_header(res, what) + _table(res.rows, res.full) + "\n" + "\n".join(lines)
                  + "\n\n![static](static.png)\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.axhline(100 * res.full["accuracy"], color="gray", ls="--", lw=1, label=_full_label(res))
    for method, color in STATIC_METHODS:
        rs = sorted((r for r in res.rows if r["method"] == method), key=lambda r: r["gmacs"])
        ax.errorbar([r["gmacs"] for r in rs], [100 * r["accuracy"] for r in rs],
                    xerr=[r.get("gmacs_std", 0.0) for r in rs], yerr=[100 * r.get("accuracy_std", 0.0) for r in rs],
                    fmt="o-", color=color, capsize=3, lw=1.2, label=method)
    ax.set_xlabel("GMACs per instance (batch 1)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylabel(f"{_metric(res)} (%)")
    ax.set_title(f"static baselines vs SmartTrim (mean ± std, {res.seeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return [md, _save(plt, fig, res, "static")]


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
    ax.axhline(100 * res.full["accuracy"], color="gray", ls="--", lw=1, label=_full_label(res))
    for i, (policy, label) in enumerate(FIG4A_POLICIES):
        rs = sorted((r for r in res.rows if r["policy"] == policy), key=lambda r: r["gmacs"])
        ax.errorbar([r["gmacs"] for r in rs], [100 * r["accuracy"] for r in rs],
                    xerr=[r.get("gmacs_std", 0.0) for r in rs], yerr=[100 * r.get("accuracy_std", 0.0) for r in rs],
                    fmt="o-", color=f"C{i}", capsize=3, lw=1.2, label=label)
    ax.set_xlabel("GMACs per instance (batch 1, trimmed tokens/heads removed)")
    ax.set_ylabel(f"{_metric(res)} (%)")
    ax.set_title(f"token policies (mean ± std, {res.seeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return [md, _save(plt, fig, res, "fig4a")]


# ------------------------------------------------------------------------------------------------
# Figure 4b
# ------------------------------------------------------------------------------------------------
FIG4B_METHODS = ((None, "SmartTrim (adaptive)"), ("random", "Random"), ("grad_layer", "Grad Layer"),
                 ("grad_all", "Grad All"))
FIG4B_RETENTION = (0.7, 0.5, 0.3)


def _fig4b_runs() -> list[Run]:
    runs = []
    for heads, label in FIG4B_METHODS:
        for p in FIG4B_RETENTION:
            trim = {"trim_tokens": False, "token_target": 1.0, "head_layers": ["cross"], "head_target": p,
                    "head_policy": "cross_modal" if heads is None else "static"}
            runs.append(Run(f"{label} {p:g}", "cross_modal", 1.0, trim=trim, recipe={"lambda_sd": 0.0}, heads=heads))
    return runs


def _fig4b_write(res: Result) -> list[Path]:
    from .demo import cell

    layers = sorted({tuple(r["trim_overrides"].get("head_layers") or ()) for r in res.rows})
    where = ", ".join("/".join(l) for l in layers) or "every described layer"
    what = (f"The paper's Fig. 4b: head trimming alone (no token trimming) in the layers selected by head_layers "
            f"{where} (the co-attention layers on digit-grid; a task config's own trim.head_layers when it sets them), at head "
            f"retention ratios {', '.join(f'{p:g}' for p in FIG4B_RETENTION)}, fine-tuned without self-distillation: "
            "SmartTrim's adaptive head trimmers (the cost loss aims at the ratio) against static heads fine-tuned the "
            "same way: Random (that share of each module's heads at random, per seed), Grad Layer (the top share of "
            "each module by Michel et al.'s importance on pseudo-labels) and Grad All (the top share of all modules "
            "together, importance L2-normalised per module). 'kept heads' is the measured mean retention over the "
            "co-attention modules (static: exactly the ratio up to rounding per module).")
    lines = [f"| method | retention target | {_metric(res)} | Δ vs full | kept heads | GMACs / instance | MACs ratio |",
             "|---|---|---|---|---|---|---|",
             f"| {_full_label(res)} | 1.0 | {100 * res.full['accuracy']:.1f} | - | 1.00 | {res.full['gmacs']:.4f} | "
             "1.00x |"]
    for r in res.rows:
        delta = _delta(r, res.full)
        lines.append(f"| {r['method'].rsplit(' ', 1)[0]} | {r['trim_overrides']['head_target']:g} | "
                     f"{cell(r, 'accuracy', '.1f', 100)} | {cell(delta, 'delta', '+.1f', 100)} | "
                     f"{cell(r, 'keep_heads', '.2f')} | {cell(r, 'gmacs', '.4f')} | "
                     f"{cell(r, 'macs_ratio', '.2f', suffix='x')} |")
    md = res.out / "fig4b.md"
    md.write_text(_header(res, what) + "\n".join(lines) + "\n\n![fig4b](fig4b.png)\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.axhline(100 * res.full["accuracy"], color="gray", ls="--", lw=1, label=_full_label(res))
    for i, (heads, label) in enumerate(FIG4B_METHODS):
        rs = sorted((r for r in res.rows if r.get("heads_baseline") == heads), key=lambda r: r["trim_overrides"]["head_target"])
        ax.errorbar([r["trim_overrides"]["head_target"] for r in rs], [100 * r["accuracy"] for r in rs],
                    yerr=[100 * r.get("accuracy_std", 0.0) for r in rs], fmt="o-", color=f"C{i}", capsize=3, lw=1.2,
                    label=label)
    ax.set_xlabel("head retention ratio (co-attention layers)")
    ax.set_ylabel("accuracy (%)")
    ax.invert_xaxis()
    ax.set_title(f"head trimming (mean ± std, {res.seeds} seeds, no SD)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return [md, _save(plt, fig, res, "fig4b")]


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


def full_model_difficulty(net: Any, dataset: Any, instances: int, batch_size: int = 64) -> dict[str, list] | None:
    """How hard each of the first ``instances`` items is for the untrimmed model: its cross-entropy on the
    item's label and whether its top answer is right. ``None`` where the task is not single-label
    classification (no integer ``labels`` of one per item in ``[0, classes)``, or logits that are not
    (B, classes)). A non-finite loss (the model's logits) is given as is; :func:`spearman` leaves it out."""
    import torch
    import torch.nn.functional as F

    from .trainer import _logits, collate_of, model_inputs

    collate, n = collate_of(dataset), min(instances, len(dataset))
    loss, right = [], []
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
                labels = batch.get("labels") if isinstance(batch, dict) else None
                if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.long:
                    return None
                logits = _logits(net(**model_inputs(net, batch)))
                if (logits.dim() != 2 or logits.shape[0] != labels.shape[0]
                        or int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
                    return None  # not one class per item among the logits (e.g. ignore-index labels, a 1-logit head)
                loss += F.cross_entropy(logits.float(), labels, reduction="none").tolist()
                right += (logits.argmax(-1) == labels).tolist()
    finally:
        net.train(was)
    return {"loss": loss, "right": right}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists, over the pairs where both are finite (nan where
    fewer than 3 are, or either side is constant)."""
    import math
    import warnings

    from scipy.stats import spearmanr  # scikit-learn's dependency (the train extra)

    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: nan
        return float(spearmanr([x for x, _ in pairs], [y for _, y in pairs])[0])


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
    # harder instances get more compute? hardness = the untrimmed model's loss on the item (and whether it is wrong)
    hard = full_model_difficulty(bb.net, ds, n)
    if hard is not None:
        for st, g in zip(stats, per_seed.values()):
            wrong = [x for x, ok in zip(g, hard["right"]) if not ok]
            ok = [x for x, r in zip(g, hard["right"]) if r]
            st.update(rho=spearman(g, hard["loss"]),
                      wrong_over_right=(sum(wrong) / len(wrong)) / (sum(ok) / len(ok)) if wrong and ok else float("nan"))
    for key in ("mean", "std", "spread") + (("rho", "wrong_over_right") if hard is not None else ()):
        vals = [st[key] for st in stats]
        m = sum(vals) / len(vals)
        agg[key] = m
        agg[f"{key}_std"] = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    g0 = per_seed[0]
    order = sorted(range(len(g0)), key=lambda i: g0[i])
    cheap, dear = order[:FIG7_SHOW], order[-FIG7_SHOW:][::-1]
    res.extra["fig7"] = {"instances": n, "per_seed_gmacs": per_seed, "stats": stats, "cheapest": cheap, "dearest": dear,
                         "full_model": hard}

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
    if hard is not None:
        # nan: every instance's compute, or every loss, the same (or the full model all right / all wrong below)
        table += (f"| Spearman rho, GMACs vs the full model's loss on the instance | {cell(agg, 'rho', '+.2f')} |\n"
                  f"| mean GMACs, instances the full model gets wrong / right "
                  f"({len(hard['right']) - sum(hard['right'])} / {sum(hard['right'])}) | "
                  f"{cell(agg, 'wrong_over_right', '.3f', suffix='x')} |\n")
        what += (" Harder instances get more compute? Hardness is measured on the untrimmed backbone: its "
                 "cross-entropy on each instance (a positive rank correlation: the instances it finds harder "
                 "are given more GMACs) and whether its answer is wrong.")
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
    return [md, _save(plt, fig, res, "fig7")]


# ------------------------------------------------------------------------------------------------
# The fidelity switches
# ------------------------------------------------------------------------------------------------
def _switches_runs() -> list[Run]:
    return [Run("defaults", "cross_modal", 2.0),
            Run("cost_beta=entering", "cross_modal", 2.0, recipe={"cost_beta": "entering"}),
            Run("sd_teacher=joint", "cross_modal", 2.0, recipe={"sd_teacher": "joint"}),
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


# ------------------------------------------------------------------------------------------------
# Trimmer placement (not in the paper: what sparser placements cost in accuracy and gain in latency)
# ------------------------------------------------------------------------------------------------
#: the placements compared against the paper's (trimmers in every layer), as TrimConfig fields; their keep
#: targets are calibrated on the placement itself (Run.calibrate) to the same MACs reduction
PLACEMENTS = {"first vision layer": {"token_layers": ["vision.uni.0"], "trim_heads": False},
              "first vision + first text layer": {"token_layers": ["vision.uni.0", "text.cross.0"],
                                                  "trim_heads": False}}


def _placement_runs() -> list[Run]:
    return [Run("every layer (paper)", "cross_modal", 2.0)] + [
        Run(label, "cross_modal", 2.0, calibrate=fields) for label, fields in PLACEMENTS.items()]


def _placement_write(res: Result) -> list[Path]:
    from .demo import cell

    what = ("Where the trimmers sit, at 2x fewer MACs: the paper's placement (token and head trimmers in every "
            "layer) against one token trimmer at the first vision block (`TrimConfig(token_layers=[\"vision.uni.0\"], "
            "trim_heads=False)`; every later layer runs on the tokens it keeps) and that plus one on the text stream at "
            "the first co-attention layer (`\"text.cross.0\"`), each placement's keep targets calibrated on itself. "
            "On CPU at this model's size a forward is bound by the operators it dispatches, not its MACs "
            "(benchmarks/RESULTS.md, layer overhead): fewer trimmed layers pay fewer trimmer calls, host "
            "synchronisations and gathers. 'CPU latency ratio': median full / median trimmed, batch 1, interleaved "
            "(above 1: faster than the full model).")
    lines = ["| placement | MACs target | accuracy | Δ vs full | MACs ratio | CPU latency ratio | kept vision tokens | "
             "kept heads |", "|---|---|---|---|---|---|---|---|",
             f"| {_full_label(res)} | - | {100 * res.full['accuracy']:.1f} | - | 1.00x | 1.00x | 1.00 | 1.00 |"]
    for r in res.rows:
        d = _delta(r, res.full)
        lines.append(f"| {r['method']} | {r['target']:g}x | {cell(r, 'accuracy', '.1f', 100)} | "
                     f"{cell(d, 'delta', '+.1f', 100)} | {cell(r, 'macs_ratio', '.2f', suffix='x')} | "
                     f"{cell(r, 'latency_ratio', '.2f', suffix='x')} | {cell(r, 'keep_vision', '.2f')} | "
                     f"{cell(r, 'keep_heads', '.2f')} |")
    path = res.out / "placement.md"
    path.write_text(_header(res, what) + "\n".join(lines) + "\n")
    return [path]


# ------------------------------------------------------------------------------------------------
# Figure 2: token and head similarity per layer (Appendix A), on the untrimmed backbone
# ------------------------------------------------------------------------------------------------
def _fig2_runs() -> list[Run]:
    return []  # no fine-tune: the measurement is of the trained backbone itself


def _label(path: str) -> str:
    """Short layer/module names for tables and axes: ``cross_modal_image_layers.1.attention.self`` ->
    ``image.1 self``."""
    for long, short in (("cross_modal_image_layers.", "image."), ("cross_modal_text_layers.", "text."),
                        ("vit_model.transformer.resblocks.", "vit.")):
        path = path.replace(long, short)
    return path.replace(".crossattention.self", " cross").replace(".attention.self", " self").replace(".attn", " self")


def _fig2_write(res: Result) -> list[Path]:
    from trimkit.plugins import get_registry

    from .analysis import mean_std, similarity_profile

    bb = res.backbone
    n = min(len(bb.test_ds), 4 * bb.preset.macs_instances)
    spec = get_registry().adapters.get(bb.adapter).describe(bb.net)
    prof = similarity_profile(bb.net, spec, bb.test_ds, instances=n)
    res.extra["fig2"] = {"instances": n, **prof}
    rows = ["| layer | stream | token similarity S_T | head similarity S_A (self-attention) | "
            "head similarity S_A (cross-attention) |", "|---|---|---|---|---|"]

    def fmt(vals: list[float] | None) -> str:
        if not vals:
            return "-"
        m, sd = mean_std(vals)
        return f"{m:.3f} ± {sd:.3f}"

    trend: dict[str, list[float]] = {}
    for layer in spec.layers:
        atts = {a.kind: prof["heads"].get(f"{layer.path}.{a.path}") for a in layer.attentions}
        rows.append(f"| {_label(layer.path)} | {layer.stream} | {fmt(prof['tokens'][layer.path])} | "
                    f"{fmt(atts.get('self'))} | {fmt(atts.get('cross'))} |")
        if layer.site == "cross":
            trend.setdefault(layer.stream, []).append(mean_std(prof["tokens"][layer.path])[0])
    rising = {s: all(b >= a for a, b in zip(v, v[1:])) for s, v in trend.items()}
    res.extra["fig2"]["token_similarity_rises_with_depth"] = rising
    what = ("The paper's Fig. 2 (Appendix A): on the trained, untrimmed backbone, the mean pairwise cosine "
            "similarity of each layer's output tokens (S_T; text padding left out) and of each attention module's "
            "heads' attention distributions per query row (S_A; text padding rows left out), for every described "
            f"layer. Cells are mean ± standard deviation over {n} test instances (no fine-tune seeds: one backbone); "
            "the spread over instances is the paper's third observation.\n\n"
            "Token similarity in the co-attention layers rises with depth: " +
            ", ".join(f"{s}: {'yes' if r else 'no'} ({' -> '.join(f'{v:.3f}' for v in trend[s])})"
                      for s, r in rising.items()) + ".")
    md = res.out / "fig2.md"
    md.write_text(_header(res, what, finetuned=False) + "\n".join(rows) + "\n\n![fig2](fig2.png)\n")
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.75 * len(spec.layers) + 2), 6.5))
    labels = [_label(layer.path) for layer in spec.layers]
    axes[0].boxplot([prof["tokens"][layer.path] for layer in spec.layers], showfliers=False)
    axes[0].set_xticks(range(1, len(labels) + 1), labels, rotation=30, fontsize=7)
    axes[0].set_ylabel("token similarity S_T")
    keys = list(prof["heads"])
    axes[1].boxplot([prof["heads"][k] for k in keys], showfliers=False)
    axes[1].set_xticks(range(1, len(keys) + 1), [_label(k) for k in keys], rotation=30, fontsize=7)
    axes[1].set_ylabel("head similarity S_A")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_title(f"similarity per layer over {n} test instances (boxes: quartiles)")
    return [md, _save(plt, fig, res, "fig2")]


# ------------------------------------------------------------------------------------------------
# Figure 5: which patches are kept, for two questions about one image; cross-modal vs Local
# ------------------------------------------------------------------------------------------------
FIG5_RATIO = 3.0
FIG5_POLICIES = (("cross_modal", "SmartTrim (cross-modal)"), ("local", "Local"))
FIG5_IMAGES = 64


def _fig5_runs() -> list[Run]:
    return [Run(label, policy, FIG5_RATIO) for policy, label in FIG5_POLICIES]


def question_pairs(ds: Any, images: int) -> list[dict[str, Any]]:
    """Test images whose question asks for the digit in one cell, each with a second question of the
    same form about another cell holding a digit: ``{"index", "items": [item q1, item q2], "questions",
    "patches": [relevant patch indices per question]}``."""
    import torch

    from .data.digit_grid import VQA_TEMPLATES

    out = []
    for i in range(len(ds)):
        if len(out) >= images:
            break
        d = ds.describe(i)
        if d["qtype"] != "position" or not d["relevant_cells"]:
            continue
        (r, c), = d["relevant_cells"]
        others = [(int(a), int(b)) for a, b in zip(*(d["grid"] >= 0).nonzero()) if (a, b) != (r, c)]
        if not others:
            continue
        r2, c2 = others[len(out) % len(others)]
        q2 = VQA_TEMPLATES["position"].format(row=r2 + 1, col=c2 + 1)
        item = ds[i]
        second = {**item, "input_ids": torch.tensor(ds.tokenizer.encode(q2), dtype=torch.long)}
        out.append({"index": i, "items": [item, second], "questions": [d["question"], q2],
                    "patches": [ds.cell_patches([(r, c)]), ds.cell_patches([(r2, c2)])]})
    return out


def image_pairs(ds: Any, images: int, scan: int = 2000) -> list[dict[str, Any]]:
    """A task's test images asked two different questions (``trimkit repro fig5 --config``): the
    same dict as :func:`question_pairs`, with ``"patches": None`` (a task has no annotation of the
    patches a question is about). Images are told apart by the dataset's ``image_ids`` when it has
    them, else by their pixels, over its first ``scan`` items."""
    import torch

    ids = getattr(ds, "image_ids", None)
    questions = getattr(ds, "questions", None)
    groups: dict[Any, list[int]] = {}
    for i in range(min(len(ds), scan)):
        key = int(ids[i]) if ids is not None else hash(ds[i]["pixel_values"].numpy().tobytes())
        groups.setdefault(key, []).append(i)
    out = []
    for idx in groups.values():
        if len(out) >= images:
            break
        items = [ds[i] for i in idx]
        second = next((j for j in range(1, len(items)) if not torch.equal(items[j]["input_ids"], items[0]["input_ids"])),
                      None)
        if second is None:
            continue
        pair = [idx[0], idx[second]]
        out.append({"index": pair[0], "items": [items[0], items[second]], "patches": None,
                    "questions": [str(questions[i]) for i in pair] if questions is not None else
                    [f"question of item {i}" for i in pair]})
    return out


def _kept_sets(tm: Any, pairs: list[dict[str, Any]], ds: Any) -> list[list[dict[str, Any]]]:
    """Per pair, per question: the vision keep masks of every trimmed vision layer ((N,) bool, [CLS] first)."""
    from .analysis import vision_keep_masks
    from .trainer import collate_of

    collate = collate_of(ds)
    items = [it for p in pairs for it in p["items"]]
    masks = vision_keep_masks(tm, collate(items))
    out = []
    for j in range(len(pairs)):
        out.append([{k: m[2 * j + q] > 0.5 for k, m in masks.items()} for q in (0, 1)])
    return out


def _fig5_metrics(kept: list[list[dict[str, Any]]], pairs: list[dict[str, Any]]) -> dict[str, float]:
    """At the last trimmed vision layer: relevance lift (kept rate of the asked cell's patches over the
    kept rate of all patches) and question sensitivity (1 - IoU of the kept patches of the two questions)."""
    lifts, sens = [], []
    for k, p in zip(kept, pairs):
        last = list(k[0])[-1]
        for q in (0, 1):
            m = k[q][last][1:].float()  # patches, [CLS] left out
            if m.sum() > 0 and p["patches"] is not None:  # nothing kept (or no relevant patches known): no lift
                lifts.append(float(m[p["patches"][q]].mean() / m.mean()))
        a, b = k[0][last][1:], k[1][last][1:]
        union = int((a | b).sum())
        sens.append(1.0 - int((a & b).sum()) / union if union else 0.0)  # both empty: the same patches
    return {"relevance_lift": sum(lifts) / len(lifts) if lifts else float("nan"),
            "question_sensitivity": sum(sens) / len(sens)}


def _fig5_write(res: Result) -> list[Path]:
    import torch

    from .analysis import mean_std
    from .demo import cell

    ds = res.backbone.test_ds
    task = res.backbone.base is not None  # a task config: no relevant-patch annotation, pairs by image
    pairs = image_pairs(ds, FIG5_IMAGES) if task else question_pairs(ds, FIG5_IMAGES)
    if not pairs:
        raise RuntimeError("fig5: no test image is asked two different questions" if task else
                           "fig5: no test image has a position question and a second digit to ask about")
    if not any(layer.stream == "vision" for layer in res.models[(0, _fig5_runs()[0].name)].spec.layers):
        raise RuntimeError(f"fig5: adapter {res.backbone.adapter!r} has no stream named 'vision' (the kept patches "
                           "are read from it)")
    per_policy: dict[str, list[dict[str, float]]] = {}
    shown: dict[str, list[dict[str, Any]]] = {}
    for seed in range(res.seeds):
        for run in _fig5_runs():
            kept = _kept_sets(res.models[(seed, run.name)], pairs, ds)
            per_policy.setdefault(run.policy, []).append(_fig5_metrics(kept, pairs))
            if seed == 0:
                shown[run.policy] = kept[0]
    agg: dict[str, dict[str, float]] = {}
    for policy, vals in per_policy.items():
        a: dict[str, float] = {"seeds": len(vals)}
        for key in ("relevance_lift", "question_sensitivity"):
            a[key], a[f"{key}_std"] = mean_std([v[key] for v in vals])
        agg[policy] = a
    res.extra["fig5"] = {"images": len(pairs), "per_seed": per_policy, "aggregate": agg,
                         "shown": {"index": pairs[0]["index"], "questions": pairs[0]["questions"]}}
    rows = [f"| policy | {_metric(res)} | MACs ratio | kept vision tokens | relevance lift | question sensitivity |",
            "|---|---|---|---|---|---|"]
    by = {r["policy"]: r for r in res.rows}
    for policy, label in FIG5_POLICIES:
        r, a = by[policy], agg[policy]
        rows.append(f"| {label} | {cell(r, 'accuracy', '.1f', 100)} | {cell(r, 'macs_ratio', '.2f', suffix='x')} | "
                    f"{cell(r, 'keep_vision', '.2f')} | "
                    f"{'n/a' if task else cell(a, 'relevance_lift', '.2f', suffix='x')} | "
                    f"{cell(a, 'question_sensitivity', '.3f')} |")
    what = (f"The paper's Fig. 5: which image patches the trimmed model keeps through its layers, for one image asked "
            f"two questions, cross-modal (SmartTrim) vs Local, both fine-tuned at the {FIG5_RATIO:g}x target. Over "
            f"{len(pairs)} test images whose question asks for the digit in one cell (each also asked about another "
            "cell holding a digit), at the last trimmed vision layer: *relevance lift* = kept rate of the asked cell's "
            "patches / kept rate of all patches (1 = the question does not steer which patches are kept); *question "
            "sensitivity* = 1 - IoU of the patches kept for the two questions (0 = the same patches whatever the "
            "question). Mean ± std over the seeds. The figure shows seed 0 on the first such image: kept patches "
            "bright, dropped ones dark, the asked cell outlined.")
    if task:
        what = (f"The paper's Fig. 5 on a task: which image patches the trimmed model keeps through its layers for one "
                f"image asked two questions, cross-modal (SmartTrim) vs Local, both fine-tuned at the {FIG5_RATIO:g}x "
                f"target. Over {len(pairs)} test images asked two different questions, at the last trimmed vision "
                "layer: *question sensitivity* = 1 - IoU of the patches kept for the two questions (0 = the same "
                "patches whatever the question). *Relevance lift* needs the patches each question is about, which the "
                "task does not annotate: n/a. Mean ± std over the seeds; the figure shows seed 0 on the first image.")
    first = pairs[0]
    layers = list(shown[FIG5_POLICIES[0][0]][0])
    img = first["items"][0]["pixel_values"].float()
    n_patches = shown[FIG5_POLICIES[0][0]][0][layers[0]].numel() - 1
    side = ds.image_size // ds.patch_size if not task else math.isqrt(n_patches)
    patch = ds.patch_size if not task else img.shape[-1] // max(side, 1)
    drawable = side * side == n_patches and patch * side == img.shape[-1] == img.shape[-2]
    md = res.out / "fig5.md"
    figure = "![fig5](fig5.png)" if drawable else (f"(no figure: the {n_patches} vision tokens after [CLS] are not a "
                                                    "square grid over the square image)")
    md.write_text(_header(res, what) + "\n".join(rows) + f"\n\n{figure}\n")
    if not drawable:
        return [md]
    plt = _plt()
    panels = [(p, q) for p, _ in FIG5_POLICIES for q in (0, 1)]
    fig, axes = plt.subplots(len(panels), len(layers) + 1, figsize=(1.9 * (len(layers) + 1), 2.0 * len(panels)),
                             squeeze=False)
    img = ((img - img.min()) / (img.max() - img.min()).clamp_min(1e-6))
    img = img.permute(1, 2, 0).numpy() if task and img.shape[0] == 3 else img[0].numpy()  # RGB, or one channel
    labels = dict(FIG5_POLICIES)
    for row, (policy, q) in enumerate(panels):
        axes[row, 0].imshow(img, cmap="gray")
        axes[row, 0].set_title(f"{labels[policy]}\n{first['questions'][q]}", fontsize=6)
        for col, layer in enumerate(layers, start=1):
            keep = shown[policy][q][layer][1:].float().view(side, side)
            shade = torch.kron(keep, torch.ones(patch, patch)).numpy()
            if img.ndim == 3:
                shade = shade[..., None]
            axes[row, col].imshow(img * (0.25 + 0.75 * shade), cmap="gray", vmin=0, vmax=1)
            for pidx in first["patches"][q] if first["patches"] is not None else ():
                y, x = divmod(pidx, side)
                axes[row, col].add_patch(plt.Rectangle((x * patch - 0.5, y * patch - 0.5), patch, patch, fill=False,
                                                       color="red", lw=1))
            axes[row, col].set_title(f"{_label(layer)}: {int(keep.sum())}/{keep.numel()}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    return [md, _save(plt, fig, res, "fig5")]


# ------------------------------------------------------------------------------------------------
# Figure 6: head retention per attention module, over instances
# ------------------------------------------------------------------------------------------------
FIG6_HEAD_TARGET = 0.5


def _fig6_runs() -> list[Run]:
    return [Run("SmartTrim heads 0.5", "cross_modal", 2.0, trim={"head_target": FIG6_HEAD_TARGET})]


def _head_label(tm: Any, key: str) -> str:
    layer, idx = key.rsplit(".", 1)
    spec = next(layer_spec for layer_spec in tm.spec.layers if layer_spec.path == layer)
    return _label(f"{layer}.{spec.attentions[int(idx)].path}")


def _fig6_write(res: Result) -> list[Path]:
    from .analysis import head_retention, mean_std

    bb = res.backbone
    n = min(len(bb.test_ds), 4 * bb.preset.macs_instances)
    run = _fig6_runs()[0].name
    per_seed = {s: head_retention(res.models[(s, run)], bb.test_ds, instances=n) for s in range(res.seeds)}
    keys = list(per_seed[0])
    tm0 = res.models[(0, run)]
    rows = ["| attention module | heads kept (mean over instances) | std over instances | min - max over instances |",
            "|---|---|---|---|"]
    summary = {}
    for key in keys:
        means = [mean_std(per_seed[s][key])[0] for s in range(res.seeds)]
        spreads = [mean_std(per_seed[s][key])[1] for s in range(res.seeds)]
        m, sd = mean_std(means)
        sp, sp_sd = mean_std(spreads)
        lo = min(min(per_seed[s][key]) for s in range(res.seeds))
        hi = max(max(per_seed[s][key]) for s in range(res.seeds))
        summary[key] = {"mean": m, "mean_std": sd, "instance_std": sp, "instance_std_std": sp_sd, "min": lo, "max": hi}
        rows.append(f"| {_head_label(tm0, key)} | {m:.3f} ± {sd:.3f} | {sp:.3f} ± {sp_sd:.3f} | {lo:.2f} - {hi:.2f} |")
    res.extra["fig6"] = {"instances": n, "per_seed": per_seed, "summary": summary}
    what = (f"The paper's Fig. 6: with a head retention target of {FIG6_HEAD_TARGET:g} (token targets of the 2x "
            f"calibration), the fraction of heads each attention module keeps per instance over {n} test instances "
            "(eval mode). Columns: mean over instances (mean ± std over seeds), the standard deviation over instances "
            "(how much the retention varies between instances; mean ± std over seeds) and the range over every seed's "
            "instances. The figure shows seed 0's distributions.")
    md = res.out / "fig6.md"
    md.write_text(_header(res, what) + _table(res.rows, res.full) + "\n\n" + "\n".join(rows) + "\n\n![fig6](fig6.png)\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(keys) + 2), 4.2))
    ax.violinplot([per_seed[0][k] for k in keys], showmeans=True)
    ax.axhline(FIG6_HEAD_TARGET, color="gray", ls="--", lw=1, label=f"target {FIG6_HEAD_TARGET:g}")
    ax.set_xticks(range(1, len(keys) + 1), [_head_label(tm0, k) for k in keys], rotation=30, fontsize=7)
    ax.set_ylabel("fraction of heads kept")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("head retention per attention module, over instances (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [md, _save(plt, fig, res, "fig6")]


EXPERIMENTS: dict[str, Experiment] = {
    "table6": Experiment("table6", "Table 6: ablations of SmartTrim's training strategies",
                         "SmartTrim at 1.5x/2x/2.5x, minus stable init, minus curriculum, minus self-distillation",
                         _table6_runs, _table6_write, any_task=True, subsets=True),
    "table5": Experiment("table5", "Table 5: higher resolution trimmed vs lower resolution full",
                         "a backbone at twice the image resolution, SmartTrim-trimmed to the MACs of the default "
                         "backbone, vs that backbone untrimmed (on a task: --config and --high-config)",
                         _table5_runs, _table5_write, paired=True),
    "static": Experiment("static", "Table 1: static baselines FTKD and TRIPS-style",
                         "FTKD (layers of the backbone + distillation) and TRIPS-style (text-guided fixed-share patch "
                         "selection, task loss only) vs SmartTrim at 1.5x/2x/3x", _static_runs, _static_write,
                         any_task=True, subsets=True),
    "fig4a": Experiment("fig4a", "Fig. 4a: token trimming policies",
                        "token policies cross_modal/local/random at 1.5x/2x/2.5x/3x fewer MACs, as curves",
                        _fig4a_runs, _fig4a_write, any_task=True, subsets=True),
    "fig4b": Experiment("fig4b", "Fig. 4b: head trimming, adaptive vs static",
                        "head trimming alone at retention 0.7/0.5/0.3: adaptive vs Random, Grad Layer, Grad All "
                        "(Michel et al.), no self-distillation", _fig4b_runs, _fig4b_write, any_task=True,
                        subsets=True),
    "fig7": Experiment("fig7", "Fig. 7: compute per instance",
                       "SmartTrim 2x: histogram of per-instance GMACs, cheapest and dearest instances",
                       _fig7_runs, _fig7_write, any_task=True),
    "fig2": Experiment("fig2", "Fig. 2: token and head similarity per layer",
                       "token and head similarity per layer of the untrimmed backbone (Appendix A)",
                       _fig2_runs, _fig2_write, any_task=True),
    "fig5": Experiment("fig5", "Fig. 5: kept patches for two questions about one image",
                       "kept patches through the layers for two questions about one image, cross-modal vs Local at "
                       "3x, with relevance lift and question sensitivity", _fig5_runs, _fig5_write, any_task=True),
    "fig6": Experiment("fig6", "Fig. 6: head retention per attention module",
                       "head retention per attention module over instances, head target 0.5", _fig6_runs,
                       _fig6_write, any_task=True),
    "switches": Experiment("switches", "Fidelity switches at 2x",
                           "SmartTrim 2x with each fidelity switch (cost_beta, sd_teacher, attention_dropout, "
                           "sampler) flipped", _switches_runs, _switches_write, any_task=True, subsets=True),
    "placement": Experiment("placement", "Trimmer placement at 2x: accuracy and CPU latency",
                            "SmartTrim 2x with trimmers in every layer (the paper's) vs one token trimmer at the "
                            "first vision block (and one at the first text co-attention layer), accuracy and CPU "
                            "batch-1 latency against the full model", _placement_runs, _placement_write,
                            subsets=True, latency=True),
}
