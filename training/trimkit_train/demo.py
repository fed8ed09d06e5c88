"""``trimkit demo``: the paper's Fig. 4a / Table 1 in miniature, on CPU, in minutes.

1. **Backbone.** A small METER-architecture model is trained on digit-grid VQA (a grid of 16 px
   cells, a few of which hold a handwritten digit; the question names a cell or a digit, so most
   patches are irrelevant to it). This model plays the fine-tuned backbone. As a real METER starts
   from a pretrained vision tower, the tower is first pretrained on the cells themselves (each
   patch predicts its cell's digit and position: :func:`pretrain_vision`); the text and
   co-attention parts are initialised for training from scratch (:func:`reinit_for_scratch`) and
   learn the VQA task with the tower frozen.
2. **Targets.** For each wanted MACs reduction (1.5x, 2x, 3x) the per-module keep targets are
   *calibrated*: the backbone is run at batch 1 with token and head decisions forced to exactly
   those keep ratios, its MACs counted, and the ratio bisected until the MACs ratio is the wanted
   one. (The trained trimmers decide per instance, so the measured ratios below are what they
   actually achieved, not these.)
3. **SmartTrim.** Copies of the backbone are fine-tuned with the SmartTrim recipe at each target
   (cross-modal token and head trimmers, cost loss, curriculum, self-distillation; once the
   curriculum has reached the targets the temperature decays and the ``sharpen`` sampler's masks
   converge to the decisions inference takes, so short fine-tunes meet their targets); at the 3x
   target the ``local`` and ``random`` token policies (§6.1 baselines) are trained the same way.
4. **Measure.** Accuracy on the test split; mean GMACs per instance counted with
   :func:`trimkit.macs.count_macs` at batch 1 with tokens and heads really removed; CPU batch-1
   latency of full and trimmed, interleaved on the same inputs. Results go to ``results.json``,
   ``results.md`` and ``pareto.png`` (accuracy vs GMACs).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from trimkit.config import TrimConfig
from trimkit.macs import count_macs
from trimkit.model import TrimmedModel, trim
from .trainer import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    RecipeConfig,
    TrainConfig,
    Trainer,
    build_dataset,
    build_model,
    evaluate,
    interleaved_latency,
    model_inputs,
)
from .trainer import collate_of

__all__ = ["Backbone", "DemoPreset", "FULL", "QUICK", "aggregate", "calibrate", "config_backbone", "finetune",
           "main_metric", "measure",
           "per_layer_targets", "prepare_backbone", "preset_for", "pretrain_cells", "pretrain_vision",
           "reinit_for_scratch", "reinit_normal", "run_demo", "targets_for"]


@dataclass(frozen=True)
class DemoPreset:
    """Every size and budget of one demo run."""

    data: dict[str, Any]
    train_size: int
    eval_size: int
    model: dict[str, Any]
    backbone: dict[str, Any]  # TrainConfig fields of the plain backbone stage
    finetune: dict[str, Any]  # TrainConfig fields of each SmartTrim fine-tune
    trim: dict[str, Any] = field(default_factory=dict)  # TrimConfig fields shared by all fine-tunes
    recipe: dict[str, Any] = field(default_factory=dict)  # RecipeConfig fields shared by all fine-tunes
    ratios: tuple[float, ...] = (1.5, 2.0, 3.0)
    baselines: tuple[str, ...] = ("local", "random")
    macs_instances: int = 64
    latency_instances: int = 32
    latency_repeats: int = 3
    calibration_instances: int = 8
    vision_pretrain_steps: int = 0  # stage 0: the vision tower learns each cell's digit and position
    vision_pretrain_lr: float = 1e-3


FULL = DemoPreset(
    data={"variant": "vqa", "grid": 4, "cell": 16, "digits_per_image": [2, 5]},
    train_size=24000,
    eval_size=1000,
    model={"vision_width": 128, "vision_layers": 4, "vision_heads": 4, "text_hidden": 64, "text_layers": 1,
           "text_heads": 2, "text_intermediate": 128, "hidden_size": 128, "cross_layers": 2, "cross_heads": 4,
           "cross_intermediate": 256, "dropout": 0.0},
    vision_pretrain_steps=300,
    backbone={"steps": 1500, "batch_size": 32, "lr": 5e-4, "warmup_fraction": 0.05},
    finetune={"steps": 300, "batch_size": 32, "lr": 1e-4, "trimmer_lr": 1e-2, "warmup_fraction": 0.0},
    # masks sharpen to the inference decision once the targets are in force, so the keep ratios the
    # cost loss meets in 300 steps are those inference takes (with the plain Gumbel-sigmoid they
    # were not: 1.5x and Random ended at 1.0-1.2x; benchmarks/results/demo/README.md)
    trim={"sampler": "sharpen"},
    recipe={"curriculum_fraction": 0.5, "final_temperature": 0.05},
)
"""The default: 530 s on 2 CPU cores (benchmarks/results/demo/)."""

QUICK = DemoPreset(
    data={"variant": "vqa", "grid": 4, "cell": 16, "digits_per_image": [2, 4]},
    train_size=512,
    eval_size=64,
    model={"vision_width": 32, "vision_layers": 2, "vision_heads": 2, "text_hidden": 32, "text_layers": 1,
           "text_heads": 2, "text_intermediate": 64, "hidden_size": 32, "cross_layers": 1, "cross_heads": 2,
           "cross_intermediate": 64, "dropout": 0.0},
    backbone={"steps": 20, "batch_size": 32, "lr": 1e-3},
    finetune={"steps": 8, "batch_size": 16, "lr": 1e-4, "trimmer_lr": 5e-2},
    # eight steps cannot move trimmers from the stable init (logit 5): start them near the decision
    # boundary with the targets in force at once, so the smoke test exercises real trimming
    trim={"init_logit": 0.3, "sampler": "sharpen"},
    recipe={"curriculum_fraction": 0.0, "final_temperature": 0.05},
    macs_instances=4,
    latency_instances=4,
    latency_repeats=1,
    calibration_instances=2,
    vision_pretrain_steps=5,
)
"""Smoke-test sizes (``--quick``): well under 2 minutes, the numbers mean nothing."""


# ------------------------------------------------------------------------------------------------
# Stage 0: what pretraining gives a real backbone's vision tower
# ------------------------------------------------------------------------------------------------
def pretrain_cells(tower: torch.nn.Module, encode: Callable[[torch.Tensor], torch.Tensor], width: int, dataset: Any,
                   steps: int, lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> float:
    """Pretrain a vision tower on digit-grid cells, as CLIP pretraining would have taught it to see.

    ``encode(pixels) -> (B, cells, width)`` runs ``tower`` and returns one token per cell (no [CLS];
    :func:`pretrain_vision` averages a cell's patches when a cell holds several); each predicts its cell's content (digit or empty) and its cell's position
    with two linear heads, thrown away after. Only ``tower``'s parameters (and the heads) are
    trained. Returns the last batch's cell accuracy.
    """
    grid = dataset.grid
    cells = grid * grid
    content, position = torch.nn.Linear(width, 11), torch.nn.Linear(width, cells)
    params = list(tower.parameters()) + list(content.parameters()) + list(position.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    labels = torch.from_numpy(dataset.grids[:, 0].reshape(len(dataset), cells).astype("int64"))
    labels[labels < 0] = 10  # empty
    where = torch.arange(cells)
    gen = torch.Generator().manual_seed(seed)
    was = tower.training
    tower.train()
    acc = 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=gen)
        v = encode(torch.stack([dataset.render(int(i)) for i in idx]))
        if v.shape[1] != cells:
            raise ValueError(f"pretrain_cells: the tower gave {v.shape[1]} cell tokens for {cells} cells "
                             f"(one per cell of {dataset.cell} px is needed)")
        pred = content(v)
        loss = F.cross_entropy(pred.reshape(-1, 11), labels[idx].reshape(-1)) + \
            F.cross_entropy(position(v).reshape(-1, cells), where.repeat(batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        acc = float((pred.argmax(-1) == labels[idx]).float().mean())
    tower.train(was)
    return acc


def pretrain_vision(model: torch.nn.Module, dataset: Any, steps: int, lr: float = 1e-3, batch_size: int = 32,
                    seed: int = 0) -> float:
    """:func:`pretrain_cells` for a METER model's vision tower (``vit_model``).

    A real METER starts from a pretrained CLIP tower; trained from scratch, the VQA loss alone does
    not teach the tower to recognise digits (the model settles on the answer prior).
    """
    vit = model.vit_model
    patch = model.config.patch_size
    if dataset.cell % patch:
        raise ValueError(f"pretrain_vision: cells of {dataset.cell} px must be a whole number of the model's "
                         f"{patch} px patches")
    k, grid = dataset.cell // patch, dataset.grid  # k x k patches per cell (a higher resolution: k > 1)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        v = model.embed_image(pixels)
        for block in vit.transformer.resblocks:
            v = block(v)
        v = vit.ln_post(v)[:, 1:]  # (B, (grid k)^2, W), row-major patches
        if k == 1:
            return v
        B, _, W = v.shape  # a cell's token: the mean of its k x k patches
        return v.view(B, grid, k, grid, k, W).mean(dim=(2, 4)).reshape(B, grid * grid, W)

    return pretrain_cells(vit, encode, model.config.vision_width, dataset, steps, lr, batch_size, seed)


def reinit_normal(modules: Any, std: float) -> None:
    """Every Linear and Embedding weight in ``modules`` ~ N(0, std), biases 0, padding rows 0."""
    for child in modules:
        for m in child.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    torch.nn.init.zeros_(m.bias)
                if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()


def reinit_for_scratch(model: torch.nn.Module) -> None:
    """Re-initialise a METER model's text encoder and co-attention part with std 1/sqrt(width).

    METER's N(0, 0.02) suits fine-tuning pretrained weights; from scratch at these widths every
    sublayer adds ~2% to its residual stream, the text [CLS] carries almost nothing of the question
    and AdamW collapses the image-dependent part of the features within a few dozen steps (measured:
    the share of input-dependent variance at the head fell from 0.03 to 3e-6). Wider weights avoid it.
    """
    for name, child in model.named_children():
        if name == "vit_model":
            continue
        width = model.config.text_hidden if name == "text_transformer" else model.config.hidden_size
        reinit_normal([child], width ** -0.5)


# ------------------------------------------------------------------------------------------------
# Target calibration
# ------------------------------------------------------------------------------------------------
def targets_for(strength: float, tmodel: TrimmedModel) -> tuple[dict[str, float], dict[str, float]]:
    """Token and head keep targets for one knob ``strength`` in (0, 1] (1 = keep everything).

    Vision tokens are trimmed progressively (the paper's Fig. 5): the first vision layer keeps
    ``strength ** 0.5`` of the patches, every later one ``strength``. Text tokens keep
    ``0.5 + 0.5 * strength`` (questions are short and every word may matter), heads
    ``0.5 + 0.5 * strength``. Keys are the trimmers' keys (layer paths; heads ``path.j``).
    """
    s = float(min(1.0, max(1e-3, strength)))
    layer_stream = {layer.path: layer.stream for layer in tmodel.spec.layers}
    tokens: dict[str, float] = {}
    heads: dict[str, float] = {}
    seen_vision: dict[str, int] = {}
    for key in tmodel.final_targets:
        path, _, segment = key.partition(":")  # a segmented stream's token trimmers: "layer:segment"
        if path in layer_stream:
            modality = segment or layer_stream[path]
            if modality in VISION_NAMES:
                tokens[key] = s ** 0.5 if seen_vision.get(modality, 0) == 0 else s
                seen_vision[modality] = seen_vision.get(modality, 0) + 1
            else:
                tokens[key] = 0.5 + 0.5 * s
        else:
            heads[key] = 0.5 + 0.5 * s
    return tokens, heads


#: stream or segment names :func:`targets_for` trims progressively as image tokens
VISION_NAMES = ("vision", "image")


class _Forced(dict):
    """``Runtime.forced`` stand-in: logits that keep exactly a target fraction of the tokens of each
    stream (counted against its original length, as the cost loss does) or of the heads."""

    def __init__(self, targets: dict[str, float], layer_stream: dict[str, str]) -> None:
        super().__init__()
        self.targets = targets
        self.layer_stream = layer_stream
        self.original: dict[str, int] = {}

    def reset(self) -> None:
        self.original.clear()

    def __contains__(self, key: object) -> bool:  # Runtime.remove_step asks for "layer:segment" keys
        return key in self.targets

    def get(self, key: str, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if key not in self.targets:
            return logits
        n = logits.shape[1]
        path, _, segment = key.partition(":")
        if path in self.layer_stream:  # token trimmer: cumulative fraction of the stream's (segment's) tokens
            stream = key if segment else self.layer_stream[path]
            original = self.original.setdefault(stream, n)
            keep = min(n, max(1, math.ceil(self.targets[key] * original - 1e-9)))
        else:
            keep = max(0, round(self.targets[key] * n))
        out = torch.full_like(logits, -1.0)
        out[:, :keep] = 1.0
        return out


@torch.no_grad()
def forced_macs(tmodel: TrimmedModel, dataset: Any, targets: dict[str, float], instances: int) -> float:
    """Mean MACs at batch 1 (removal) with every trimmer forced to its target keep ratio."""
    layer_stream = {layer.path: layer.stream for layer in tmodel.spec.layers}
    forced = _Forced(targets, layer_stream)
    collate = collate_of(dataset)
    tmodel.eval()
    saved = tmodel.runtime.forced
    tmodel.runtime.forced = forced
    total = 0
    try:
        for i in range(instances):
            forced.reset()
            x = model_inputs(tmodel, collate([dataset[i]]))
            total += count_macs(tmodel, **x).total
    finally:
        tmodel.runtime.forced = saved
    return total / instances


def calibrate(tmodel: TrimmedModel, dataset: Any, ratio: float, instances: int = 8,
              iterations: int = 12) -> dict[str, Any]:
    """Bisect the strength knob of :func:`targets_for` until forced MACs are ``full / ratio``.

    MACs fall in steps as the knob moves (whole tokens and heads are kept), so the bisection ends at a
    step's edge and its last midpoint may lie on the far side of it. The strength returned is the one,
    of all those tried, whose forced ratio is nearest ``ratio`` (in log scale).
    """
    collate = collate_of(dataset)
    with tmodel.full():
        full = sum(count_macs(tmodel, **model_inputs(tmodel, collate([dataset[i]]))).total
                   for i in range(instances)) / instances
    lo, hi = 1e-3, 1.0
    tried: list[tuple[float, float, dict[str, float], dict[str, float]]] = []
    for _ in range(iterations):
        mid = (lo + hi) / 2
        tokens, heads = targets_for(mid, tmodel)
        got = full / forced_macs(tmodel, dataset, {**tokens, **heads}, instances)
        tried.append((mid, got, tokens, heads))
        if got < ratio:
            hi = mid
        else:
            lo = mid
    strength, got, tokens, heads = min(tried, key=lambda t: abs(math.log(t[1] / ratio)))
    return {"strength": strength, "forced_ratio": got, "token_target": tokens, "head_target": heads,
            "gmacs_full": full / 1e9}


def _selector_targets(tmodel: TrimmedModel, tokens: dict[str, float], heads: dict[str, float]) -> dict[str, dict]:
    """Trimmer keys -> TrimConfig selector dicts (``stream.site.index`` and ``stream.site.index.kind``)."""
    index: dict[str, str] = {}
    counts: dict[tuple[str, str], int] = {}
    kinds: dict[str, list[str]] = {}
    for layer in tmodel.spec.layers:
        i = counts.get((layer.stream, layer.site), 0)
        counts[(layer.stream, layer.site)] = i + 1
        index[layer.path] = f"{layer.stream}.{layer.site}.{i}"
        kinds[layer.path] = [a.kind for a in layer.attentions]
    tok = {}
    for k, v in tokens.items():
        path, _, segment = k.partition(":")
        if segment:  # a segment's own selector: SEGMENT.SITE.INDEX
            _, site, i = index[path].split(".")
            tok[f"{segment}.{site}.{i}"] = round(v, 4)
        else:
            tok[index[path]] = round(v, 4)
    hd: dict[str, float] = {}
    for key, v in heads.items():
        path, _, j = key.rpartition(".")
        hd[f"{index[path]}.{kinds[path][int(j)]}"] = round(v, 4)
    return {"token_target": tok or 1.0, "head_target": hd or 1.0}  # an empty dict selects nothing (refused)


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------
def _experiment(preset: DemoPreset, train: dict[str, Any], out_dir: Path, trim_cfg: dict[str, Any] | None,
                init: str | None, progress: bool | None, recipe: dict[str, Any] | None = None,
                seed: int = 0, base: ExperimentConfig | None = None) -> ExperimentConfig:
    if base is not None:  # a user's task config (config_backbone): its model, data and training, our overrides
        return ExperimentConfig(
            model=base.model if init is None else base.model.model_copy(update={"init": init}),
            data=base.data,
            train=TrainConfig(**{**base.train.model_dump(), **train, **({"epochs": None} if "steps" in train else {}),
                                 "seed": seed, "out_dir": str(out_dir), "progress": progress, "eval_every": None,
                                 "save_every": None}),
            trim=TrimConfig(**{**preset.trim, **trim_cfg}) if trim_cfg is not None else None,
            recipe=RecipeConfig(**{**preset.recipe, **(recipe or {})}),
        )
    return ExperimentConfig(
        model=ModelConfig(adapter="meter", size="tiny", overrides=dict(preset.model), init=init),
        data=DataConfig(name="digit_grid", options=dict(preset.data), train_size=preset.train_size,
                        eval_size=preset.eval_size, seed=0),
        train=TrainConfig(**{"macs_instances": 0, "eval_batch_size": 256, "seed": seed, **train,
                             "out_dir": str(out_dir), "progress": progress}),
        trim=TrimConfig(**{**preset.trim, **trim_cfg}) if trim_cfg is not None else None,
        recipe=RecipeConfig(**{**preset.recipe, **(recipe or {})}),
    )


def preset_for(quick: bool = False, finetune_steps: int | None = None) -> DemoPreset:
    """:data:`QUICK` or :data:`FULL`, with ``finetune_steps`` overriding every fine-tune's steps."""
    preset = QUICK if quick else FULL
    if finetune_steps is not None:
        if finetune_steps < 1:
            raise ValueError(f"run_demo: finetune_steps must be >= 1, got {finetune_steps}")
        preset = replace(preset, finetune={**preset.finetune, "steps": int(finetune_steps)})
    return preset


@dataclass
class Backbone:
    """Stages 1-2 of the demo, shared by every fine-tune of a run: the trained backbone (the
    "pretrained" model SmartTrim fine-tunes), its datasets, and the calibrated keep targets."""

    preset: DemoPreset
    out: Path
    train_ds: Any
    test_ds: Any
    net: torch.nn.Module
    checkpoint: str
    calibration: dict[float, dict[str, Any]]
    targets: dict[float, dict[str, dict]]  # ratio -> TrimConfig token_target/head_target (cumulative ratios)
    entering_targets: dict[float, dict[str, dict]]  # the same MACs, as per-layer ratios (RecipeConfig.cost_beta)
    progress: bool | None = None
    _full: dict[str, Any] | None = None
    # a user's task config instead of the demo's digit-grid backbone (config_backbone): every fine-tune is
    # that config with the experiment's overrides, "accuracy" is its task's main metric
    base: ExperimentConfig | None = None
    source: str | None = None  # the config file

    @property
    def adapter(self) -> str:
        return self.base.model.adapter if self.base is not None else "meter"

    def full_eval(self) -> dict[str, Any]:
        """The untrimmed backbone's accuracy (the task's main metric) and GMACs (once)."""
        if self._full is None:
            self._full = main_metric(evaluate(self.net, self.test_ds, batch_size=self.eval_batch_size,
                                              macs_instances=self.preset.macs_instances))
        return self._full

    @property
    def eval_batch_size(self) -> int:
        return self.base.train.eval_batch_size if self.base is not None else 256


def main_metric(ev: dict[str, Any]) -> dict[str, Any]:
    """An :func:`evaluate` result with ``accuracy`` set to the task's main metric (what the demo's and
    repro's tables call accuracy; the digit-grid task's main metric is accuracy itself)."""
    name = ev.get("main_metric", "accuracy")
    if name != "accuracy" and name in ev:
        ev = {**ev, "accuracy_metric": name, "accuracy": ev[name]}
    return ev


def prepare_backbone(preset: DemoPreset, out: Path, ratios: tuple[float, ...], progress: bool | None = None,
                     log: Callable[[str], None] = print, stamp: Callable[[], str] = lambda: "",
                     calibration_iterations: int = 12) -> Backbone:
    """Stage 1 (train the backbone, seed 0) and stage 2 (calibrate keep targets for ``ratios``, bisecting
    ``calibration_iterations`` times)."""
    log(f"{stamp()} 1/4 training the backbone: METER (tiny sizes) on digit-grid VQA "
        f"({preset.data['grid']}x{preset.data['grid']} cells of {preset.data['cell']} px)")
    torch.manual_seed(0)
    cfg = _experiment(preset, preset.backbone, out / "runs" / "backbone", None, None, progress)
    train_ds = build_dataset(cfg.data, "train")
    test_ds = build_dataset(cfg.data, "eval")
    net = build_model(cfg.model, cfg.data, train_ds)
    if preset.vision_pretrain_steps:
        t0 = time.perf_counter()
        acc = pretrain_vision(net, train_ds, preset.vision_pretrain_steps, preset.vision_pretrain_lr)
        log(f"{stamp()}     vision tower pretrained on cell contents and positions ({preset.vision_pretrain_steps} "
            f"steps, {time.perf_counter() - t0:.0f}s): cell accuracy {acc:.3f} on its last batch")
        reinit_for_scratch(net)
        net.vit_model.requires_grad_(False)  # the pretrained tower stays as it is while the rest learns VQA
    trainer = Trainer(cfg, model=net, train_dataset=train_ds, eval_dataset=test_ds)
    trainer.fit(overwrite=True)  # the demo owns its output directory: a rerun replaces its runs
    net.vit_model.requires_grad_(True)
    backbone = trainer.net

    if ratios:
        log(f"{stamp()} 2/4 calibrating keep targets for {', '.join(f'{r:g}x' for r in ratios)} fewer MACs")
    probe = trim(backbone, TrimConfig(**preset.trim), adapter="meter")
    calib = {r: calibrate(probe, test_ds, r, preset.calibration_instances, calibration_iterations) for r in ratios}
    for r, c in calib.items():
        log(f"          {r:g}x: strength {c['strength']:.3f} -> forced MACs ratio {c['forced_ratio']:.2f}")
    targets = {r: _selector_targets(probe, c["token_target"], c["head_target"]) for r, c in calib.items()}
    entering = {r: _selector_targets(probe, per_layer_targets(probe, c["token_target"]), c["head_target"])
                for r, c in calib.items()}
    return Backbone(preset, out, train_ds, test_ds, backbone, str(trainer.out_dir / "checkpoint"), calib, targets,
                    entering, progress)


def config_backbone(base: ExperimentConfig, out: Path, ratios: tuple[float, ...], progress: bool | None = None,
                    log: Callable[[str], None] = print, stamp: Callable[[], str] = lambda: "",
                    calibration_iterations: int = 12, finetune_steps: int | None = None,
                    calibration_instances: int = 8, source: str | None = None) -> Backbone:
    """The stages of :func:`prepare_backbone` for a user's task config (``trimkit repro NAME --config``):
    the config's model as it is (``model.pretrained`` / ``model.init``: the task-fine-tuned full model the
    table's reference row is), its datasets, keep targets calibrated on it for ``ratios``. Every fine-tune
    is then ``base`` with the experiment's TrimConfig/RecipeConfig overrides and the calibrated targets
    (``base.trim``'s own targets are replaced); ``finetune_steps`` overrides ``train.steps``."""
    if base.trim is None:
        raise ValueError(f"{source or 'the config'}: `trimkit repro --config` needs a `trim:` section (the SmartTrim "
                         "fine-tune's settings; its keep targets are replaced by the calibrated ones)")
    log(f"{stamp()} 1/4 the backbone of {source or 'the config'}: adapter {base.model.adapter!r}, data "
        f"{base.data.name!r} (no training: the config's model is the full reference)")
    if base.model.pretrained is None and base.model.init is None:
        log(f"          warning: {source or 'the config'} gives neither model.pretrained nor model.init: the "
            "reference and every run start from random weights (seed model.seed); point them at the task-fine-"
            "tuned full model for numbers that mean something")
    train_ds = build_dataset(base.data, "train")
    test_ds = build_dataset(base.data, "eval")
    net = build_model(base.model, base.data, train_ds)
    trim_base = base.trim.model_dump(mode="json", exclude={"token_target", "head_target", "adapter"})
    train = {"steps": int(finetune_steps)} if finetune_steps is not None else {}
    preset = DemoPreset(data=dict(base.data.options), train_size=len(train_ds), eval_size=len(test_ds),
                        model=dict(base.model.overrides), backbone={}, finetune=train, trim=trim_base,
                        recipe=base.recipe.model_dump(mode="json"), ratios=tuple(ratios),
                        macs_instances=max(1, min(base.train.macs_instances or 8, len(test_ds))),
                        calibration_instances=max(1, min(calibration_instances, len(test_ds))))
    probe = trim(net, TrimConfig(**trim_base), adapter=base.model.adapter)
    if ratios:
        log(f"{stamp()} 2/4 calibrating keep targets for {', '.join(f'{r:g}x' for r in ratios)} fewer MACs")
    calib = {r: calibrate(probe, test_ds, r, preset.calibration_instances, calibration_iterations) for r in ratios}
    for r, c in calib.items():
        log(f"          {r:g}x: strength {c['strength']:.3f} -> forced MACs ratio {c['forced_ratio']:.2f}")
        if abs(math.log(c["forced_ratio"] / r)) > 0.1:  # the nearest the targets get; the table shows the rest
            log(f"          warning: {r:g}x is out of reach of this model's trimmers (the nearest forced ratio is "
                f"{c['forced_ratio']:.2f}x: trim more layers or modalities, or read that row as {c['forced_ratio']:.2f}x)")
    targets = {r: _selector_targets(probe, c["token_target"], c["head_target"]) for r, c in calib.items()}
    entering = {r: _selector_targets(probe, per_layer_targets(probe, c["token_target"]), c["head_target"])
                for r, c in calib.items()}
    return Backbone(preset, out, train_ds, test_ds, net, None, calib, targets, entering, progress, base=base,
                    source=source)


def per_layer_targets(tmodel: TrimmedModel, tokens: dict[str, float]) -> dict[str, float]:
    """Cumulative token keep targets (fractions of a stream's original tokens, what ``cost_beta =
    "original"`` measures) -> the same budget as fractions of the tokens entering each layer
    (``cost_beta = "entering"``): each layer's target divided by the previous trimmed layer's of its stream."""
    out: dict[str, float] = {}
    last: dict[str, float] = {}
    for layer in tmodel.spec.layers:
        for key, cum in tokens.items():
            path, _, segment = key.partition(":")  # a segmented stream's: per segment
            if path != layer.path:
                continue
            budget = f"{layer.stream}:{segment}" if segment else layer.stream
            out[key] = min(1.0, cum / last.get(budget, 1.0))
            last[budget] = cum
    return out


def finetune(bb: Backbone, name: str, policy: str, ratio: float, *, seed: int = 0, trim_cfg: dict[str, Any] | None = None,
             recipe: dict[str, Any] | None = None, stable_init: bool = True, steps: int | None = None,
             prepare: Callable[[TrimmedModel], None] | None = None,
             log: Callable[[str], None] = print) -> TrimmedModel:
    """One SmartTrim fine-tune of the backbone at the calibrated ``ratio`` with token policy ``policy``
    (fine-tune seed ``seed``); ``trim_cfg``/``recipe`` override TrimConfig/RecipeConfig fields;
    ``stable_init=False`` re-initialises the trimmers at random (the Table 6 ablation); ``prepare``
    is called on the trimmed model before training (e.g. to install static heads). ``ratio`` 1.0:
    no calibrated targets (``trim_cfg`` gives them)."""
    preset = bb.preset
    rec = {**preset.recipe, **(recipe or {})}
    targets = bb.entering_targets if rec.get("cost_beta", "original") == "entering" else bb.targets
    if ratio not in targets and ratio != 1.0:
        raise KeyError(f"finetune: no keep targets calibrated for {ratio:g}x (calibrated: {sorted(targets)})")
    tcfg = {**targets.get(ratio, {}), "token_policy": policy, **(trim_cfg or {})}
    train = preset.finetune if steps is None else {**preset.finetune, "steps": int(steps)}
    cfg = _experiment(preset, train, bb.out / "runs" / name, tcfg, bb.checkpoint, bb.progress, recipe, seed, bb.base)
    net = build_model(cfg.model, cfg.data, bb.test_ds)
    model: torch.nn.Module = net
    if not stable_init or prepare is not None:
        torch.manual_seed(seed)  # the trimmers are made here, before the Trainer seeds the run
        model = trim(net, cfg.trim, adapter=cfg.model.adapter)
    if not stable_init:
        from trimkit_smarttrim import random_init

        random_init(model, torch.Generator().manual_seed(1000 + seed))
    if prepare is not None:
        prepare(model)
    tr = Trainer(cfg, model=model, train_dataset=bb.train_ds, eval_dataset=bb.test_ds)
    tr.fit(overwrite=True)
    return tr.tmodel


def measure(bb: Backbone, tm: TrimmedModel, method: str, policy: str | None, ratio: float, latency: bool = True,
            name: str | None = None) -> dict[str, Any]:
    """One row: accuracy, GMACs (batch 1, removal), MACs ratio, kept fractions; CPU latency if asked."""
    preset = bb.preset
    full_ev = bb.full_eval()
    ev = main_metric(evaluate(tm, bb.test_ds, batch_size=bb.eval_batch_size, macs_instances=preset.macs_instances))
    row = {"method": method, "policy": policy, "target": ratio, "accuracy": ev["accuracy"],
           "gmacs": ev["gmacs"], "gmacs_full": ev["gmacs_full"],
           "macs_ratio": full_ev["gmacs"] / ev["gmacs"], "latency_ratio": None, "latency_ms": None,
           "latency_full_ms": None, "keep_tokens": ev["keep_tokens"], "keep_heads": ev["keep_heads"],
           "keep_vision": _mean_keep(tm, ev["keep"], "vision"), "keep_text": _mean_keep(tm, ev["keep"], "text")}
    if latency:
        lat = interleaved_latency(tm, bb.test_ds, preset.latency_instances, preset.latency_repeats)
        row.update(latency_ratio=lat["latency_ratio"], latency_ms=lat["latency_ms"],
                   latency_full_ms=lat["latency_full_ms"])
    if name is not None:
        row["checkpoint"] = str(bb.out / "runs" / name / "checkpoint")
    return row


def full_row(bb: Backbone) -> dict[str, Any]:
    full_ev = bb.full_eval()
    return {"method": "METER (full)", "policy": None, "target": 1.0, "accuracy": full_ev["accuracy"],
            "gmacs": full_ev["gmacs"], "macs_ratio": 1.0, "latency_ratio": 1.0, "latency_ms": None,
            "keep_tokens": 1.0, "keep_heads": 1.0}


#: row fields averaged over seeds (mean and std) by :func:`aggregate`
NUMERIC = ("accuracy", "gmacs", "macs_ratio", "latency_ratio", "keep_tokens", "keep_heads", "keep_vision", "keep_text",
           "macs_ratio_own", "full_accuracy_own")


def aggregate(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several seeds (the same rows in the same order) -> one row each with the mean of every
    :data:`NUMERIC` field, its sample standard deviation as ``FIELD_std`` (0 for one seed) and ``seeds``."""
    out = []
    for rows in zip(*per_seed):
        row = dict(rows[0])
        for key in NUMERIC:
            vals = [r.get(key) for r in rows]
            if any(v is None for v in vals):
                continue
            mean = sum(vals) / len(vals)
            row[key] = mean
            row[f"{key}_std"] = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        row["seeds"] = len(rows)
        row.pop("checkpoint", None)
        row["checkpoints"] = [r["checkpoint"] for r in rows if r.get("checkpoint")]
        out.append(row)
    return out


def run_demo(out_dir: str | Path = "trimkit-demo", quick: bool = False, progress: bool | None = None,
             log: Callable[[str], None] = print, finetune_steps: int | None = None, seeds: int = 1) -> dict[str, Any]:
    """Run the whole demo; returns ``{"rows": [...], "wall_s": ..., ...}`` (also in results.json).

    ``finetune_steps`` overrides the preset's steps of every SmartTrim fine-tune (all methods alike).
    ``seeds`` > 1 repeats every fine-tune with fine-tune seeds 0..seeds-1 on the one backbone (as the
    paper's seeds are fine-tuning seeds of one pretrained model): the rows then hold the mean over the
    seeds with ``FIELD_std`` the standard deviation, ``per_seed`` every seed's rows, and the table and
    plot show mean ± std. One seed (the default) runs and reports exactly as before.
    """
    if seeds < 1:
        raise ValueError(f"run_demo: seeds must be >= 1, got {seeds}")
    preset = preset_for(quick, finetune_steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def stamp() -> str:
        return f"[{time.perf_counter() - t_start:6.1f}s]"

    bb = prepare_backbone(preset, out, preset.ratios, progress, log, stamp)

    # 3. fine-tune -------------------------------------------------------------------------------------
    runs = [("SmartTrim", "cross_modal", r) for r in preset.ratios]
    top = max(preset.ratios)
    runs += [(name.capitalize(), name, top) for name in preset.baselines]
    log(f"{stamp()} 3/4 fine-tuning {len(runs)} trimmed copies ({preset.finetune['steps']} steps each"
        f"{f', {seeds} seeds' if seeds > 1 else ''})")
    models: dict[tuple[int, str], TrimmedModel] = {}
    for seed in range(seeds):
        for method, policy, ratio in runs:
            name = f"{policy}-{ratio:g}x" + (f"-seed{seed}" if seeds > 1 else "")
            t0 = time.perf_counter()
            models[(seed, name)] = finetune(bb, name, policy, ratio, seed=seed, log=log)
            log(f"{stamp()}     {method} {ratio:g}x ({policy}{f', seed {seed}' if seeds > 1 else ''}) fine-tuned in "
                f"{time.perf_counter() - t0:.0f}s")

    # 4. measure -------------------------------------------------------------------------------------
    log(f"{stamp()} 4/4 measuring accuracy, GMACs (batch 1, removal) and interleaved CPU latency")
    per_seed = []
    for seed in range(seeds):
        rows = [full_row(bb)]
        names = [n for (s, n) in models if s == seed]
        for (method, policy, ratio), name in zip(runs, names):
            rows.append(measure(bb, models[(seed, name)], method, policy, ratio, name=name))
        per_seed.append(rows)
    rows = per_seed[0] if seeds == 1 else aggregate(per_seed)
    wall = time.perf_counter() - t_start
    result = {"rows": rows, "wall_s": wall, "quick": quick, "preset": asdict(preset), "seeds": seeds,
              "calibration": {f"{r:g}x": {k: v for k, v in c.items()} for r, c in bb.calibration.items()},
              "eval_instances": len(bb.test_ds), "macs_instances": preset.macs_instances,
              "torch_threads": torch.get_num_threads()}
    if seeds > 1:
        result["per_seed"] = per_seed
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = results_markdown(rows)
    (out / "results.md").write_text(_report(table, result))
    plot_pareto(rows, out / "pareto.png")
    log("")
    log(table)
    log(f"\n{stamp()} done; wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}")
    return result


def _mean_keep(tmodel: torch.nn.Module, keep: dict[str, float], stream: str) -> float:
    if not isinstance(tmodel, TrimmedModel):  # a plain model (a static baseline) keeps every token
        return 1.0
    paths = {layer.path for layer in tmodel.spec.layers if layer.stream == stream}
    vals = [v for k, v in keep.items() if k in paths]
    return sum(vals) / len(vals) if vals else 1.0


def cell(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    """``row[key]`` formatted, with `` ± std`` when the row aggregates seeds (``FIELD_std``); '-' when missing."""
    value = row.get(key)
    if value is None:
        return "-"
    text = f"{scale * value:{fmt}}{suffix}"
    if f"{key}_std" in row and row.get("seeds", 1) > 1:
        text += f" ± {scale * row[key + '_std']:{fmt.lstrip('+')}}"
    return text


def results_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | target | accuracy | GMACs / instance | MACs ratio | CPU latency ratio | kept vision tokens | kept heads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tgt = "-" if r["target"] == 1.0 and r["policy"] is None else f"{r['target']:g}x"
        lines.append(f"| {r['method']} | {tgt} | {cell(r, 'accuracy', '.1f', 100)} | {cell(r, 'gmacs', '.4f')} | "
                     f"{cell(r, 'macs_ratio', '.2f', suffix='x')} | {cell(r, 'latency_ratio', '.2f', suffix='x')} | "
                     f"{cell(r, 'keep_vision', '.2f') if 'keep_vision' in r else '1.00'} | {cell(r, 'keep_heads', '.2f')} |")
    return "\n".join(lines)


def _report(table: str, result: dict[str, Any]) -> str:
    p = result["preset"]
    return (f"# trimkit demo results\n\nDigit-grid VQA ({p['data']['grid']}x{p['data']['grid']} cells of "
            f"{p['data']['cell']} px), METER-architecture backbone trained from scratch, SmartTrim fine-tunes of "
            f"{p['finetune']['steps']} steps. Accuracy on {result['eval_instances']} test questions; GMACs are the "
            f"mean per instance over {result['macs_instances']} test instances at batch 1 with tokens and heads "
            f"removed (trimkit.macs.count_macs); the latency ratio is the CPU batch-1 median, full vs trimmed, "
            f"measured interleaved on the same inputs ({result['torch_threads']} threads). Total wall time "
            f"{result['wall_s']:.0f} s." + (f" Mean ± standard deviation over {result['seeds']} fine-tune seeds "
            f"(one backbone)." if result.get("seeds", 1) > 1 else "") + f"\n\n{table}\n" + _latency_note(result["rows"]))


def _latency_note(rows: list[dict[str, Any]]) -> str:
    """Why a CPU latency ratio below 1 is what this model's size gives (said only where one is)."""
    slower = [r for r in rows if r.get("latency_ratio") is not None and r["latency_ratio"] < 1]
    if not slower:
        return ""
    return ("\nLatency ratios below 1 (trimmed slower than full): at this model's size a CPU forward is bound by "
            "the operators it dispatches, not by its MACs, so the trimmers' fixed cost per trimmed layer outweighs "
            "the compute they save. benchmarks/RESULTS.md, \"Trimmer placement\", measures the ceiling of any token "
            "pruning at this size (the full model built for fewer image tokens), the placement that comes closest "
            "(`trimkit repro placement`), and the METER-base size where the same engine is faster than the full "
            "model.\n")


def plot_pareto(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy vs GMACs per instance (the paper's Fig. 3/4a in miniature)."""
    from ._extras import require_extras

    require_extras("matplotlib", feature="the demo's plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    full = next(r for r in rows if r["policy"] is None)
    ax.axhline(100 * full["accuracy"], color="gray", ls="--", lw=1, label="METER (full)")
    st = sorted([r for r in rows if r["policy"] == "cross_modal"], key=lambda r: r["gmacs"])
    xs = [r["gmacs"] for r in st] + [full["gmacs"]]
    ys = [100 * r["accuracy"] for r in st] + [100 * full["accuracy"]]
    ax.plot(xs, ys, "o-", color="C0", label="SmartTrim (cross-modal)")
    if any(r.get("seeds", 1) > 1 for r in rows):  # mean ± std over seeds
        ax.errorbar([r["gmacs"] for r in st], [100 * r["accuracy"] for r in st],
                    xerr=[r.get("gmacs_std", 0.0) for r in st], yerr=[100 * r.get("accuracy_std", 0.0) for r in st],
                    fmt="none", ecolor="C0", capsize=3, lw=1)
    for r in st:
        ax.annotate(f"{r['target']:g}x", (r["gmacs"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    markers = {"local": ("s", "C1", "Local"), "random": ("^", "C3", "Random")}
    for r in rows:
        if r["policy"] in markers:
            m, c, label = markers[r["policy"]]
            ax.plot([r["gmacs"]], [100 * r["accuracy"]], m, color=c, label=f"{label} {r['target']:g}x")
            if r.get("seeds", 1) > 1:
                ax.errorbar([r["gmacs"]], [100 * r["accuracy"]], xerr=[r.get("gmacs_std", 0.0)],
                            yerr=[100 * r.get("accuracy_std", 0.0)], fmt="none", ecolor=c, capsize=3, lw=1)
    ax.plot([full["gmacs"]], [100 * full["accuracy"]], "*", color="k", ms=10)
    ax.set_xlabel("GMACs per instance (batch 1, trimmed tokens/heads removed)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("digit-grid VQA: accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
