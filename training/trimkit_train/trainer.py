"""The SmartTrim training recipe (paper §4.2) on top of :class:`accelerate.Accelerator`.

One :class:`Trainer` runs both stages of the usual workflow:

* **plain fine-tuning** of a backbone (``trim: null`` in the config): the untrimmed model, task loss;
* **SmartTrim fine-tuning** (a ``trim`` section): every step the scheduler moves the per-module
  targets from 1.0 toward their final values (linear curriculum over ``curriculum_fraction`` of
  training) and sets the Gumbel temperature; the trimmed forward samples masks (train mode); when the
  objective wants self-distillation the *same* model runs untrimmed (``with tmodel.full():``, with
  gradients, Eq. 11); the objective combines task, cost (Eq. 9-10) and distillation terms (Eq. 12).

Everything a run needs is one :class:`ExperimentConfig` (YAML: sections ``model``, ``data``,
``train``, ``trim``). A run directory holds ``log.jsonl`` (one line per step and per evaluation),
``checkpoint/`` (weights in safetensors via :meth:`TrimmedModel.save_pretrained`, the config, and
``trainer_state.pt`` with optimizer, schedule, step and RNG states for ``--resume``) and
``metrics.json`` (the last evaluation).

Nothing is lost, nothing is silent:

* a directory that holds a run (any of ``log.jsonl``, ``experiment.yaml``, ``metrics.json``,
  ``checkpoint/``) is never replaced by a new run: ``fit(resume=True)`` (``--resume``) continues it,
  ``fit(overwrite=True)`` (``--overwrite``) deletes those entries first; otherwise
  :class:`RunExistsError` names the directory and both flags;
* a non-finite loss term, gradient norm or parameter stops the run with :class:`DivergedError`
  (naming the step and the loss terms) *before* the optimizer applies that step, and no checkpoint
  is written: the last good one stays as it was; the failing step is recorded in the log
  (``{"type": "diverged", ...}``);
* the log is flushed and fsynced before every checkpoint, so the log holds every step the
  checkpoint does; checkpoints (and ``experiment.yaml``, ``metrics.json``, the log rewrite of a
  resume) are written to a temporary name, fsynced and renamed into place: a kill at any moment
  leaves the previous or the new checkpoint, complete (an interrupted swap is finished by the next
  resume, save or load);
* ``--resume`` compares the checkpoint's config with the given one and refuses any difference
  outside :data:`RESUMABLE_FIELDS` (bookkeeping: progress bars, output and evaluation settings,
  checkpoint frequency, data-loader workers) naming every differing field; ``train.steps`` and
  ``train.epochs`` are refused too (the LR schedule and the curriculum are functions of the total
  steps, so a lengthened run is not the run the new config describes).
  ``fit(resume=True, allow_config_change=True)`` (``--allow-config-change``) continues on the new
  config anyway, says so on stderr and records the changes in the log (``{"type": "config_change"}``).

Evaluation (:func:`evaluate`) reports accuracy (batched, hard masks), the achieved keep ratio per
module, and mean per-instance MACs counted at batch 1 in removal mode (what really runs) on a
configurable number of instances, next to the untrimmed model's MACs on the same instances.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from trimkit import ops as _ops
from trimkit.checkpoint import _fsync_dir, atomic_write_bytes, laid_out_like
from trimkit.config import TrimConfig
from trimkit.macs import count_macs
from trimkit.model import TrimmedModel, trim
from trimkit.plugins import get_registry

from ._extras import require_extras

__all__ = [
    "CHECKPOINT_DIR", "ConfigError", "DataConfig", "DatasetEntry", "DivergedError", "ExperimentConfig",
    "ModelConfig", "RESUMABLE_FIELDS", "RecipeConfig", "ResumeConfigError", "RunExistsError", "TrainConfig", "Trainer",
    "build_dataset", "build_model", "build_options", "evaluate", "task_of", "interleaved_latency", "load_backbone", "load_checkpoint",
    "mean_macs", "model_inputs", "register_dataset", "save_backbone",
]

CHECKPOINT_DIR = "checkpoint"
CONFIG_FILE = "experiment.yaml"
STATE_FILE = "trainer_state.pt"
BACKBONE_FILE = "backbone.safetensors"
BUILD_FILE = "build.json"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"

#: Config fields ``--resume`` lets change: bookkeeping that does not change the optimisation (what is
#: shown, measured and written, and how often). With the ``random`` token policy an evaluation draws
#: random numbers, so changing the evaluation settings shifts that run's later noise.
RESUMABLE_FIELDS = frozenset({
    "train.progress", "train.out_dir", "train.eval_every", "train.eval_instances", "train.eval_batch_size",
    "train.macs_instances", "train.save_every", "train.num_workers", "train.find_unused_parameters",
    "train.fsdp",  # checkpoints hold whole tensors either way: a run may continue sharded, or unsharded
})


class ConfigError(ValueError):
    """An experiment config that cannot be used; the message names the file, section and field."""


class ResumeConfigError(ConfigError):
    """``--resume`` with a config that differs from the checkpoint's in fields that change the run."""


class RunExistsError(FileExistsError):
    """The run directory already holds a run and neither ``resume`` nor ``overwrite`` was asked for."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter; the run stopped without a checkpoint."""

    def __init__(self, message: str, step: int, terms: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.terms = dict(terms or {})


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
class ModelConfig(BaseModel):
    """Which backbone to build: ``adapter.build(size=size, seed=seed, **overrides)``.

    ``init``: a directory with ``backbone.safetensors`` (a previous run's ``checkpoint/``, e.g. the
    plain fine-tuned backbone) whose weights are loaded after building. Dataset-implied fields
    (image size, vocabulary, number of labels...) are filled in by the dataset entry unless
    ``overrides`` names them.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    adapter: str = Field("meter", description="registered adapter name (see `trimkit plugins`)")
    size: str | None = Field(None, description="adapter preset, e.g. 'tiny' or 'base' (None: 'tiny'; with "
                                               "`pretrained`, passed to the adapter only when given)")
    seed: int = 0
    overrides: dict[str, Any] = Field(default_factory=dict, description="adapter build options (model sizes)")
    init: str | None = Field(None, description="directory with backbone.safetensors to start from")
    pretrained: str | None = Field(
        None, description="start from pretrained weights, offline: an HF model id (in the local cache) or local "
                          "directory, an official METER checkpoint file, a timm/open_clip model name (with `weights`)")
    revision: str | None = Field(None, description="revision of an HF `pretrained` id (branch, tag or commit)")
    weights: str | None = Field(None, description="weights file of a timm/open_clip `pretrained` name")

    @model_validator(mode="after")
    def _pretrained_fields(self) -> "ModelConfig":
        if self.pretrained is None and (self.revision is not None or self.weights is not None):
            raise ValueError("model.revision / model.weights only apply with model.pretrained")
        return self

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, name: str) -> str:
        reg = get_registry().adapters
        if name not in reg:
            raise ValueError(f"unknown adapter {name!r}; registered: {reg.names() or 'none'}")
        return name


class DataConfig(BaseModel):
    """The task. ``name`` is a registered dataset (``digit_grid``) or ``"package.module:factory"``.

    A factory is called as ``factory(split, size=..., seed=..., **options)`` and returns a
    ``torch.utils.data.Dataset`` whose items a ``collate_fn`` attribute (or
    :func:`trimkit_train.data.collate`) turns into the batch contract of ``docs/datasets.md``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "digit_grid"
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the dataset factory")
    train_split: str = "train"
    eval_split: str = "test"
    train_size: int | None = Field(8000, gt=0, description="examples in the training split (None: the factory's default)")
    eval_size: int | None = Field(1000, gt=0, description="examples in the evaluation split")
    seed: int = Field(0, description="seed of the training split (the evaluation split uses seed + 1)")
    task: str | None = Field(None, description="registered task (loss, distillation, metrics; see `trimkit plugins`); "
                                               "None: the dataset's `task` attribute, else classification")

    @field_validator("task")
    @classmethod
    def _known_task(cls, name: str | None) -> str | None:
        reg = get_registry().tasks
        if name is not None and name not in reg:
            raise ValueError(f"unknown task {name!r}; registered: {reg.names() or 'none'}")
        return name

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        _shipped_datasets()
        if ":" not in name and name not in _DATASETS:
            raise ValueError(f"unknown dataset {name!r}; registered: {sorted(_DATASETS)}, or give 'package.module:factory'")
        return name


class TrainConfig(BaseModel):
    """Optimisation, evaluation and bookkeeping of one run."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int | None = Field(None, gt=0, description="optimizer steps; give this or epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the training split; give this or steps")
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-4, gt=0, description="learning rate of the backbone")
    trimmer_lr: float = Field(1e-3, gt=0, description="learning rate of the trimmers (typically higher)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (matrices only; not biases/norms)")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = Field(0.1, ge=0, le=1, description="linear warmup, as a fraction of the steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the linear decay ends at lr * min_lr_ratio")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    freeze_backbone: bool = Field(False, description="train only the trimmers")
    eval_every: int | None = Field(None, gt=0, description="evaluate every N steps (and always at the end)")
    eval_instances: int | None = Field(None, gt=0, description="evaluate accuracy on the first N examples (None: all)")
    macs_instances: int = Field(16, ge=0, description="instances whose MACs are counted at batch 1 (slow)")
    save_every: int | None = Field(None, gt=0, description="write checkpoint/ every N steps (and always at the end)")
    seed: int = 0
    out_dir: str = "runs/digit_grid"
    progress: bool | None = Field(None, description="tqdm bars; None: only when stderr is a terminal")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    cpu: bool = Field(False, description="force the CPU even when an accelerator is present")
    find_unused_parameters: bool = Field(
        False, description="DDP only: allow parameters a step does not use (e.g. task heads of other tasks); "
                          "False is faster when every parameter gets a gradient each step")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    compile: Literal["no", "inductor", "aot_eager"] = Field(
        "no", description="torch.compile the training step (accelerate's dynamo backend): 'inductor' generates "
                          "fused kernels (minutes of compilation; benchmarks/compile_train.py measures the "
                          "step time), 'aot_eager' traces without code generation (to check that a model "
                          "compiles). Evaluation and inference stay eager (their kept counts vary per input)")
    fsdp: bool = Field(
        False, description="shard the weights, gradients and optimizer state over the processes (FSDP2, the "
                          "whole model one unit; see docs/fine-tuning.md); also set by an accelerate launch "
                          "config with distributed_type FSDP")

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("train: give exactly one of `steps` or `epochs`")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError("train.fsdp with mixed_precision fp16 is not supported (its loss scaler does not "
                             "handle sharded gradients): use bf16")
        return self


class RecipeConfig(BaseModel):
    """How the trimmers are trained (paper §4.2): the objective, the curriculum scheduler, the
    temperature schedule and the loss weights. Names are plugin registry names; the objective and
    scheduler factories are called with this config (they read the fields they need).

    Only used with a ``trim`` section (:class:`trimkit.TrimConfig` says *what* to trim)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    objective: str = Field("smarttrim", description="training objective (registry name)")
    scheduler: str = Field("linear", description="target/temperature scheduler (registry name)")
    lambda_cost: float = Field(20.0, ge=0, description="weight of the cost loss (Eq. 12)")
    lambda_sd: float = Field(1.0, ge=0, description="weight of self-distillation (Eq. 12)")
    curriculum_fraction: float = Field(
        0.5, ge=0, le=1, description="fraction of training over which targets go from 1.0 to their value")
    temperature: float = Field(1.0, gt=0, description="Gumbel-sigmoid temperature (Eq. 8)")
    final_temperature: float | None = Field(
        None, gt=0, description="temperature at the last step (geometric decay from `temperature`); None = fixed")
    cost_beta: Literal["original", "entering"] = Field(
        "original", description="beta_p of Eq. 10 for a token trimmer: 'original' = kept tokens over the stream's "
        "original (real) token count, [CLS] included, so targets are cumulative keep ratios and a uniform target "
        "makes the first trimmed layer do all the pruning; 'entering' = kept tokens over the tokens entering the "
        "layer (the per-layer ratio; targets compound through the layers). Head trimmers: over the module's heads "
        "either way")
    sd_teacher: Literal["detached", "joint"] = Field(
        "detached", description="the full pass in the KL term of self-distillation (Eq. 11): 'detached' = a fixed "
        "teacher (the full pass gets gradients from its task term only; the default since 2026-12-04: +1.2 points "
        "over 'joint' in each of 5 paired seeds, docs/reproducing.md); 'joint' = with gradients, so the KL also pulls "
        "the full model toward the trimmed one")

    @model_validator(mode="after")
    def _names(self) -> "RecipeConfig":
        registry = get_registry()
        for field, reg in (("objective", registry.objectives), ("scheduler", registry.schedulers)):
            name = getattr(self, field)
            if name not in reg:
                raise ValueError(f"{field}: unknown {reg.kind} {name!r}; registered: {reg.names() or 'none'}")
        return self


class ExperimentConfig(BaseModel):
    """A whole run: ``model``, ``data``, ``train`` and, for SmartTrim, ``trim`` (what to trim) and
    ``recipe`` (how to train it) sections.

    ``trim: null`` (or absent) trains the plain, untrimmed backbone (``recipe`` is then unused).
    Configs written before the recipe had its own section (recipe fields under ``trim``) are read
    with those fields moved to ``recipe``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig
    trim: TrimConfig | None = None
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)

    @model_validator(mode="before")
    @classmethod
    def _legacy_recipe(cls, data: Any) -> Any:
        from trimkit.config import RECIPE_FIELDS

        if not isinstance(data, dict) or not isinstance(data.get("trim"), dict):
            return data
        moved = {k: v for k, v in data["trim"].items() if k in RECIPE_FIELDS}
        if not moved:
            return data
        recipe = data.get("recipe") or {}
        if not isinstance(recipe, dict):
            return data
        both = sorted(k for k in moved if k in recipe)
        if both:
            raise ValueError(f"{', '.join(both)}: given under both `trim` and `recipe`; keep them in `recipe`")
        data = dict(data)
        data["trim"] = {k: v for k, v in data["trim"].items() if k not in RECIPE_FIELDS}
        data["recipe"] = {**recipe, **moved}
        return data

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        """Read a YAML (or JSON) file; errors name the file and the offending fields."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a YAML or JSON experiment config was expected)") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory; pass the config file (e.g. its experiment.yaml)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping with sections model/data/train/trim, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>") -> "ExperimentConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            lines = []
            for e in err.errors():
                where = ".".join(str(p) for p in e["loc"]) or "(top level)"
                msg = e["msg"]
                if e["type"] == "extra_forbidden":
                    msg = "unknown field (check the spelling; see docs/datasets.md and examples/digit_grid.yaml)"
                elif e["type"] == "finite_number":
                    msg = f"must be a finite number, got {e.get('input')!r} (inf and nan are not allowed)"
                lines.append(f"  {where}: {msg}")
            raise ConfigError(f"{source}: invalid experiment config:\n" + "\n".join(lines)) from None

    def save(self, path: str | Path) -> Path:
        """Write YAML (atomically: a temporary file renamed into place)."""
        path = Path(path)
        _write_atomic(path, yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
        return path


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
@dataclass
class DatasetEntry:
    """A registered dataset: ``factory(split, size=, seed=, **options)`` and, optionally,
    ``model_defaults(adapter_name, dataset) -> dict`` of build options the data implies for a
    named adapter. Most datasets need none: the adapter maps the dataset's generic facts
    (:class:`trimkit.adapter.DatasetFacts`) to its own options (``dataset_overrides``)."""

    factory: Callable[..., Any]
    model_defaults: Callable[[str, Any], dict[str, Any]] | None = None


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, factory: Callable[..., Any],
                     model_defaults: Callable[[str, Any], dict[str, Any]] | None = None) -> None:
    """Make ``data.name: NAME`` usable in configs."""
    _DATASETS[name] = DatasetEntry(factory, model_defaults)


def _digit_grid(split: str, size: int | None = None, seed: int = 0, **options: Any):
    from .data import DigitGridDataset

    if "digits_per_image" in options:
        options["digits_per_image"] = tuple(options["digits_per_image"])
    return DigitGridDataset(split, size=size or 1000, seed=seed, **options)


register_dataset("digit_grid", _digit_grid)


def _shipped_datasets() -> None:
    """Register the readers of trimkit_train.data (vqa_v2, nlvr2, ...): imported on first use, as
    they import this module."""
    from . import data  # noqa: F401


def task_of(data: DataConfig | None, dataset: Any = None) -> Any:
    """The run's :class:`trimkit.protocols.Task`: ``data.task``, else the dataset's ``task``
    attribute, else ``classification``."""
    from .tasks import get_task

    name = data.task if data is not None and data.task is not None else None
    return get_task(name if name is not None else dataset)


def _entry(name: str) -> DatasetEntry:
    _shipped_datasets()
    if name in _DATASETS:
        return _DATASETS[name]
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"data.name {name!r}: cannot import the factory ({type(err).__name__}: {err})") from None
    return DatasetEntry(factory, getattr(factory, "model_defaults", None))


def build_dataset(data: DataConfig, split: Literal["train", "eval"]):
    """The training or evaluation dataset of ``data`` (the evaluation split uses ``seed + 1``)."""
    entry = _entry(data.name)
    name = data.train_split if split == "train" else data.eval_split
    size = data.train_size if split == "train" else data.eval_size
    seed = data.seed if split == "train" else data.seed + 1
    try:
        return entry.factory(name, size=size, seed=seed, **dict(data.options))
    except TypeError as err:
        raise ConfigError(f"data.options {sorted(data.options)}: the {data.name!r} factory rejected them: {err}") from None


def collate_of(dataset: Any) -> Callable:
    from .data import collate

    return getattr(dataset, "collate_fn", None) or collate


# ------------------------------------------------------------------------------------------------
# Models and weights
# ------------------------------------------------------------------------------------------------
def build_options(model: ModelConfig, data: DataConfig | None = None, dataset: Any = None) -> dict[str, Any]:
    """The options ``adapter.build`` (or ``adapter.from_pretrained``) gets, later ones winning
    (dict-valued options merged key by key): what the adapter makes of the dataset's facts (its
    optional ``dataset_overrides(DatasetFacts)``), the dataset entry's ``model_defaults(adapter_name,
    dataset)`` if it has one, then ``model.overrides``. ``dataset`` is the split the model is built
    for (the training split in a run; else the evaluation split of ``data`` is built).

    With ``model.pretrained`` the pretrained model's own config decides its shapes: only
    ``model.overrides`` are passed (e.g. ``task``, or ``new_head: true`` with ``num_labels`` for a
    task head the checkpoint does not have); the dataset's facts are not (an image size or a
    vocabulary that differs from the checkpoint's would not fit its weights)."""
    from trimkit.adapter import DatasetFacts

    if model.pretrained is not None:
        return dict(model.overrides)
    adapter = get_registry().adapters.get(model.adapter)
    options: dict[str, Any] = {}
    if data is not None:
        entry = _entry(data.name)
        hook = getattr(adapter, "dataset_overrides", None)
        if hook is not None or entry.model_defaults is not None:
            ds = dataset if dataset is not None else build_dataset(data, "eval")
            if hook is not None:
                options = _merge(options, hook(DatasetFacts.of(ds)))
            if entry.model_defaults is not None:
                options = _merge(options, entry.model_defaults(model.adapter, ds))
    return _merge(options, model.overrides)


def build_model(model: ModelConfig, data: DataConfig | None = None, dataset: Any = None, *,
                options: dict[str, Any] | None = None) -> nn.Module:
    """The backbone ``model`` describes: ``adapter.build(size, seed, **options)``, or with
    ``model.pretrained`` the adapter's ``from_pretrained(pretrained, revision=, weights=, **options)``;
    then ``init`` weights if given. ``options`` default to :func:`build_options` of ``data`` and
    ``dataset``; a checkpoint passes the ones its run was built with."""
    if options is None:
        options = build_options(model, data, dataset)
    adapter = get_registry().adapters.get(model.adapter)
    if model.pretrained is not None:
        from trimkit.adapter import load_pretrained

        if model.size is not None:
            options = {"size": model.size, **options}
        loader = getattr(adapter, "from_pretrained", None)
        try:  # model.seed seeds what the pretrained weights do not hold (a new task head), where it can
            takes_seed = loader is not None and "seed" in inspect.signature(loader).parameters
        except (TypeError, ValueError):
            takes_seed = False
        if takes_seed:
            options = {"seed": model.seed, **options}
        net = load_pretrained(model.adapter, model.pretrained, revision=model.revision, weights=model.weights,
                              **options)
    else:
        try:
            net = adapter.build(size=model.size or "tiny", seed=model.seed, **options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: adapter {model.adapter!r} could not build size={model.size!r} with options "
                              f"{options}: {err}") from None
    if model.init:
        load_backbone(net, model.init)
    return net


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base | update``, except that dicts under the same key are merged recursively (so that
    ``overrides: {text_config: {hidden_size: 64}}`` keeps a vocabulary size the dataset implied)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().contiguous()
        out[k] = v.clone() if v.data_ptr() in seen and v.numel() else v  # safetensors refuses shared storage
        seen.add(v.data_ptr())
    return out


def save_backbone(model: nn.Module, directory: str | Path) -> Path:
    """Write ``backbone.safetensors`` (the plain model's weights, the layout TrimmedModel uses)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_dedupe(model.state_dict()), str(directory / BACKBONE_FILE))
    return directory


def load_backbone(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load ``backbone.safetensors`` from ``directory`` (a run directory or its ``checkpoint/``)."""
    from safetensors.torch import load_file

    directory = _checkpoint_dir(directory)
    path = directory / BACKBONE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no backbone weights here (expected a trimkit run or checkpoint directory)")
    try:
        state = load_file(str(path))
    except Exception as err:  # truncated or garbage file: name it
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the checkpoint "
                         "is damaged: restore it or retrain") from None
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if bad or missing or unexpected:
        raise ValueError(f"{path} does not fit the model built from the config: shape mismatches {bad[:3]}, "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(laid_out_like(model, state))  # (sharded weights: their shards)
    return model


def _plain(value: Any) -> Any:
    """NumPy scalars -> Python numbers, tuples -> lists, recursively (what JSON keeps as it is)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    return value


def _jsonable(options: dict[str, Any]) -> dict[str, Any] | None:
    """``options`` as JSON keeps them (NumPy scalars and tuples made plain), or None when they do not
    survive a JSON round trip (a checkpoint then rebuilds its model from the config and the data,
    as before build.json existed)."""
    options = _plain(options)
    try:
        return options if json.loads(json.dumps(options)) == options else None
    except (TypeError, ValueError):
        return None


def _read_build(path: Path, config: "ExperimentConfig") -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        options, adapter = data["options"], data["adapter"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable build options ({type(err).__name__}: {err}); the checkpoint is "
                         f"damaged: restore it or retrain") from None
    if adapter != config.model.adapter or not isinstance(options, dict):
        raise ValueError(f"{path}: built with adapter {adapter!r} but its experiment.yaml names "
                         f"{config.model.adapter!r}: files of two different runs")
    return options


def _checkpoint_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if (directory / CHECKPOINT_DIR / CONFIG_FILE).exists():  # a run directory: its checkpoint/ holds the weights
        return directory / CHECKPOINT_DIR
    for suffix in (".tmp", ".old"):  # a kill between the two renames of a checkpoint swap: both are complete
        candidate = directory / (CHECKPOINT_DIR + suffix)
        if not (directory / CHECKPOINT_DIR).exists() and (candidate / STATE_FILE).exists():
            return candidate
    return directory


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild a run's model from ``checkpoint/``: a :class:`TrimmedModel` or the plain backbone."""
    directory = _checkpoint_dir(directory)
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory}: not a trimkit checkpoint (no {CONFIG_FILE}); pass a run directory "
                                f"or its {CHECKPOINT_DIR}/")
    config = ExperimentConfig.load(directory / CONFIG_FILE)
    model_cfg = config.model.model_copy(update={"init": None})
    built = _read_build(directory / BUILD_FILE, config)
    if built is not None:  # the options the run was built with: no dataset needed, none can disagree
        net = build_model(model_cfg, options=built)
    else:  # a checkpoint written before build.json: rebuilt from the evaluation split's facts
        net = build_model(model_cfg, config.data)
    if config.trim is None:
        return load_backbone(net, directory), config
    tmodel = trim(net, config.trim, adapter=config.model.adapter)
    tmodel.load_trimmers(directory, require_backbone=True)  # the rebuilt net is random: its weights must come from here
    return tmodel, config


def model_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch entries the model's forward takes (``labels`` and extras dropped)."""
    target = model.model if isinstance(model, TrimmedModel) else model
    params = inspect.signature(target.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in batch.items() if k != "labels"}
    return {k: v for k, v in batch.items() if k in params}


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def _instance(dataset: Any, i: int, collate: Callable) -> dict[str, Any]:
    return collate([dataset[i]])


def mean_macs(model: nn.Module, dataset: Any, instances: int, *, full: bool = False, device: torch.device | str = "cpu",
              indices: Sequence[int] | None = None) -> float:
    """Mean MACs per instance, counted at batch 1 in eval mode (a TrimmedModel *removes* tokens and
    heads there). ``full=True`` counts the untrimmed model on the same instances."""
    collate = collate_of(dataset)
    idx = list(indices) if indices is not None else list(range(min(instances, len(dataset))))
    if not idx:
        return float("nan")
    was = model.training
    model.eval()
    total = 0
    try:
        for i in idx:
            x = model_inputs(model, _to(_instance(dataset, i, collate), torch.device(device)))
            if full and isinstance(model, TrimmedModel):
                with model.full():
                    total += count_macs(model, **x).total
            else:
                total += count_macs(model, **x).total
    finally:
        model.train(was)
    return total / len(idx)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, *, batch_size: int = 128, instances: int | None = None,
             macs_instances: int = 16, device: torch.device | str = "cpu", progress: bool = False,
             task: Any = None) -> dict[str, Any]:
    """The task's metrics, achieved keep ratios and mean per-instance MACs (trimmed and full).

    Metrics are the ``task``'s (a :class:`trimkit.protocols.Task`; default: the dataset's ``task``
    attribute, else classification accuracy), updated batch by batch in eval mode (hard masks: by
    the mask contract the same outputs as removal at batch 1); ``main_metric`` names the one that
    ranks runs. ``keep`` is the mean kept fraction per trimmer over the evaluated examples;
    ``keep_tokens``/``keep_heads`` average those over token/head trimmers. ``gmacs`` is the mean
    per-instance GMACs of the first ``macs_instances`` examples at batch 1 with tokens and heads
    removed, ``gmacs_full`` the untrimmed model's on the same examples.

    A task's optional hooks replace the forward: ``task.evaluate_dataset(...)`` evaluates the whole
    split itself (returning its metrics, optionally ``n`` and ``keep``; ``None``: the batch loop), and
    ``task.evaluator(model, dataset)`` gives a per-batch callable whose output ``metric.update``
    receives (it may add entries such as ``batch["generated"]``); its ``macs_dataset`` attribute,
    when set, is what MACs are counted on (items the forward can take, e.g. with answer candidates).
    """
    from tqdm.auto import tqdm

    if task is None:
        task = task_of(None, dataset)
    metric = _metric(task, dataset)
    collate = collate_of(dataset)
    n = len(dataset) if instances is None else min(instances, len(dataset))
    was = model.training
    model.eval()
    keep_sum: dict[str, float] = {}
    keep_kind: dict[str, str] = {}
    keep_n: dict[str, int] = {}
    dev = torch.device(device)
    whole = getattr(task, "evaluate_dataset", None)  # optional Task hooks (trimkit.protocols.Task)
    result, step, macs_data = None, None, dataset
    try:
        if whole is not None:
            result = whole(model, dataset, batch_size=batch_size, instances=instances, device=dev, progress=progress)
        if result is None and getattr(task, "evaluator", None) is not None:
            step = task.evaluator(model, dataset)
            macs_data = getattr(step, "macs_dataset", None) or dataset
        starts = range(0, n, batch_size) if result is None else range(0)  # the task's protocol ran: no batches
        for start in tqdm(starts, desc="eval", disable=not progress, leave=False):
            batch = _to(collate([dataset[i] for i in range(start, min(n, start + batch_size))]), dev)
            logits = step(batch) if step is not None else _logits(model(**model_inputs(model, batch)))
            metric.update(logits, batch)
            if isinstance(model, TrimmedModel):
                for r in model.records:
                    keep_sum[r.key] = keep_sum.get(r.key, 0.0) + float(r.keep.float().sum())
                    keep_n[r.key] = keep_n.get(r.key, 0) + int(r.keep.numel())
                    keep_kind[r.key] = r.kind
    finally:
        model.train(was)
    keep = {k: keep_sum[k] / keep_n[k] for k in keep_sum}
    if result is not None:  # the task's own protocol: its metrics, examples and keep ratios
        result = dict(result)
        n, keep = result.pop("n", n), dict(result.pop("keep", {}))
        keep_kind = {r.key: r.kind for r in model.records} if isinstance(model, TrimmedModel) else {}
    out: dict[str, Any] = {**(metric.compute() if result is None else result), "n": n, "task": task.name,
                           "main_metric": task.main_metric, "keep": keep}
    for kind in ("token", "head"):
        vals = [v for k, v in keep.items() if keep_kind.get(k) == kind]
        out[f"keep_{kind}s"] = sum(vals) / len(vals) if vals else 1.0
    if macs_instances:
        full = mean_macs(model, macs_data, macs_instances, full=True, device=dev)
        trimmed = mean_macs(model, macs_data, macs_instances, device=dev) if isinstance(model, TrimmedModel) else full
        out.update(gmacs=trimmed / 1e9, gmacs_full=full / 1e9, macs_ratio=full / trimmed if trimmed else float("nan"),
                   macs_instances=min(macs_instances, len(dataset)))
    return out


@torch.no_grad()
def interleaved_latency(tmodel: TrimmedModel, dataset: Any, instances: int = 32, repeats: int = 3,
                        warmup: int = 3, indices: Sequence[int] | None = None) -> dict[str, float]:
    """CPU batch-1 latency of the full and the trimmed model, measured *interleaved*.

    For every instance and repeat the same inputs run untrimmed and trimmed back to back (the order
    alternating), so load changes on the machine hit both alike. Returns the median milliseconds of
    each and ``latency_ratio`` = median full / median trimmed.
    """
    collate = collate_of(dataset)
    idx = list(indices) if indices is not None else list(range(min(instances, len(dataset))))
    was = tmodel.training
    tmodel.eval()
    device = next(tmodel.parameters()).device
    xs = [model_inputs(tmodel, _to(_instance(dataset, i, collate), device)) for i in idx]

    def run(x: dict[str, Any], full: bool) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        if full:
            with tmodel.full():
                tmodel(**x)
        else:
            tmodel(**x)
        sync()
        return time.perf_counter() - t0

    try:
        for x in xs[:warmup]:
            run(x, True)
            run(x, False)
        full_t, trim_t = [], []
        for r in range(repeats):
            for j, x in enumerate(xs):
                if (r + j) % 2:
                    trim_t.append(run(x, False))
                    full_t.append(run(x, True))
                else:
                    full_t.append(run(x, True))
                    trim_t.append(run(x, False))
    finally:
        tmodel.train(was)
    f, t = statistics.median(full_t) * 1e3, statistics.median(trim_t) * 1e3
    return {"latency_full_ms": f, "latency_ms": t, "latency_ratio": f / t}


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class _TaskLoss:
    """The plain-training objective: the task loss only."""

    needs_full_pass = False

    def __init__(self, task: Any) -> None:
        self.task = task

    def __call__(self, logits, labels, records, full_logits=None) -> dict[str, torch.Tensor]:
        loss = self.task.loss(logits, labels)
        return {"loss": loss, "task": loss}


def _metric(task: Any, dataset: Any) -> Any:
    """A fresh accumulator of ``task``, given the dataset when its ``metric`` takes one (the
    signature is read once per task type: this runs every training step)."""
    key = type(task)
    takes = _METRIC_TAKES_DATASET.get(key)
    if takes is None:
        try:
            inspect.signature(task.metric).bind(dataset)
            takes = True
        except (TypeError, ValueError):  # no dataset parameter, or no readable signature
            takes = False
        _METRIC_TAKES_DATASET[key] = takes
    return task.metric(dataset) if takes else task.metric()


_METRIC_TAKES_DATASET: dict[type, bool] = {}


def _objective(factory: Callable, recipe: Any, task: Any) -> Any:
    """``factory(recipe, task)``; a factory that takes only the config is called without the task."""
    try:
        inspect.signature(factory).bind(recipe, task)
    except TypeError:
        return factory(recipe)
    except ValueError:
        pass
    return factory(recipe, task)


class _StepModule(nn.Module):
    """The module a training step calls (and DDP wraps): the model's forward and, when the objective
    wants self-distillation, the same model again untrimmed (with gradients, Eq. 11), in *one* call.

    Returns ``(output, records, full_output or None)``; ``records`` are the trimmed pass's."""

    def __init__(self, net: nn.Module, full_pass: bool) -> None:
        super().__init__()
        self.net = net
        self.full_pass = full_pass

    def forward(self, **inputs: Any) -> tuple[Any, list, Any]:
        out = self.net(**inputs)
        if not isinstance(self.net, TrimmedModel):
            return out, [], None
        records = list(self.net.records)
        full = None
        if self.full_pass:
            with self.net.full():
                full = self.net(**inputs)
        return out, records, full


class _EpochBatches(torch.utils.data.Sampler):
    """One epoch's global batches: a permutation drawn from ``generator`` cut into ``count`` batches
    of ``batch_size`` (the incomplete rest dropped). A batch sampler accelerate can shard."""

    def __init__(self, n: int, batch_size: int, count: int, generator: torch.Generator) -> None:
        self.batch_size, self.drop_last = batch_size, True
        perm = torch.randperm(n, generator=generator).tolist()
        self.batches = [perm[i * batch_size:(i + 1) * batch_size] for i in range(count)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def fsdp_settings(accelerator: Any, train: TrainConfig) -> dict[str, Any] | None:
    """The keyword arguments of ``torch.distributed.fsdp.fully_shard`` for this launch, or None when
    the model is not sharded.

    The model is sharded (FSDP2) when ``train.fsdp`` is set on a launch of several processes, or when
    the accelerate launch config selects ``distributed_type: FSDP`` (then its ``fsdp_config`` gives
    the offload, mixed precision and reshard options). The whole model is one FSDP unit, so every
    option that would split it (an auto-wrap policy, activation checkpointing by layer class) or that
    this trainer does not honour is refused with a :class:`ConfigError` naming it."""
    plugin = None
    if accelerator.distributed_type.name == "FSDP":
        plugin = getattr(accelerator.state, "__dict__", {}).get("fsdp_plugin")
    if plugin is None:
        if not train.fsdp:
            return None
        if accelerator.num_processes == 1:
            warnings.warn("train.fsdp on one process: there is nothing to shard over, the model trains unsharded "
                          "(checkpoints are the same either way)", stacklevel=3)
            return None
        if train.mixed_precision == "bf16":  # what accelerate's FSDP2 sets for bf16: bf16 compute, fp32 reduction
            from torch.distributed.fsdp import MixedPrecisionPolicy

            return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
        return {}
    where = "the accelerate launch config (fsdp_config)"
    if train.mixed_precision == "fp16":
        raise ConfigError(f"{where} selects FSDP and train.mixed_precision is fp16, which is not supported (its loss "
                          f"scaler does not handle sharded gradients): use bf16")
    if int(getattr(plugin, "fsdp_version", 1)) != 2:
        raise ConfigError(f"{where} selects FSDP version {plugin.fsdp_version}: the trainer shards with FSDP2; set "
                          f"fsdp_version: 2 (see examples/accelerate/fsdp.yaml)")
    if plugin.auto_wrap_policy is not None:
        raise ConfigError(f"{where} sets an auto-wrap policy ({getattr(plugin.auto_wrap_policy, '__name__', plugin.auto_wrap_policy)}): "
                          f"trimmed layers run traced graphs that call a layer's children, not the layer's forward, "
                          f"so per-layer FSDP units would never be gathered; set fsdp_auto_wrap_policy: NO_WRAP "
                          f"(the whole model is one unit)")
    if plugin.activation_checkpointing:
        raise ConfigError(f"{where} sets fsdp_activation_checkpointing, which wraps layers by class: not supported "
                          f"with trimmed layers; set it to false")
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        raise ConfigError(f"{where} sets fsdp_cpu_ram_efficient_loading: every process builds (or loads) the model "
                          f"here; set it to false")
    settings: dict[str, Any] = {}
    if getattr(plugin, "mixed_precision_policy", None) is not None:
        settings["mp_policy"] = plugin.mixed_precision_policy
    if getattr(plugin, "cpu_offload", None) is not None and type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy":
        settings["offload_policy"] = plugin.cpu_offload
    if isinstance(getattr(plugin, "reshard_after_forward", None), bool):
        settings["reshard_after_forward"] = plugin.reshard_after_forward
    return settings


def _shard(module: nn.Module, accelerator: Any, settings: dict[str, Any]) -> nn.Module:
    """``module`` sharded in place over all processes as one FSDP2 unit, on this process's device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    return fully_shard(module.to(accelerator.device), mesh=mesh, **settings)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _full(value: Any) -> Any:
    """A DTensor's whole value as a plain tensor on every process (a collective); anything else as is."""
    dt = _dtensor_type()
    return value.full_tensor() if dt is not None and isinstance(value, dt) else value


def _local(value: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view); a plain tensor as is."""
    dt = _dtensor_type()
    return value.to_local() if dt is not None and isinstance(value, dt) else value


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` (every process holds all of it) laid out as ``ref``: sharded like it when ``ref`` is a
    DTensor (no communication), else as is."""
    dt = _dtensor_type()
    if dt is None or not isinstance(ref, dt):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def _lr_lambda(total: int, warmup: int, floor: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        rest = max(1, total - warmup)
        return floor + (1.0 - floor) * max(0.0, (total - step) / rest)
    return f


class Trainer:
    """Train a backbone plainly or with SmartTrim, evaluate it, checkpoint and resume.

    Args:
        config: the whole run (see :class:`ExperimentConfig`).
        model: a prebuilt model (else built from ``config.model``); with a ``trim`` section it is
            wrapped with :func:`trimkit.trim` unless it already is a :class:`TrimmedModel`.
        train_dataset / eval_dataset: prebuilt datasets (else built from ``config.data``).
        out_dir: overrides ``config.train.out_dir``.
        objective: the training objective, called ``objective(logits, labels, records,
            full_logits=...)`` and returning loss terms with ``"loss"`` (see
            :class:`trimkit.protocols.Objective`); default: the recipe's (trimmed model) or the
            task loss (plain model).
        teacher: a model run on every training batch without gradients (in eval mode, on the
            training device, in the run's mixed precision, never checkpointed; not sharded: each
            process holds a whole copy, also under ``train.fsdp``) whose logits the objective gets as
            ``full_logits``: distillation from another model (e.g.
            :class:`trimkit_train.static_baselines.FTKDObjective`). Not with an objective that asks for
            the full pass of a trimmed model (``needs_full_pass``): there is one teacher per step.

    ``fit(resume=True)`` continues from ``out_dir/checkpoint`` and is bit-exact: N steps straight and
    k steps, checkpoint, then a new Trainer resumed to N give identical weights (backbone and
    trimmers) and identical log records (but ``time``). The checkpoint holds weights, optimizer
    (every param group, trimmers included), LR schedule, step, the fp16 loss scaler, and the global
    RNG states (torch CPU and CUDA, Python ``random``, NumPy) as they are after that step's
    evaluation, so the Gumbel / random-policy noise continues where it stopped; targets and
    temperature are functions of the step; the data order is a function of seed and step, and each
    epoch's DataLoader takes its own generator (seeded by seed and epoch), not a draw from the
    global RNG. Log records after the checkpoint's step (written by an interrupted run after its last
    save) are dropped from ``log.jsonl`` before training continues.

    Not covered: with ``num_workers > 0`` a dataset that draws random numbers in ``__getitem__``
    (workers' own RNGs) restarts those streams at the resumed batch; on GPUs, kernels that are not
    deterministic (``torch.use_deterministic_algorithms``) differ between any two runs, resumed or not.
    """

    def __init__(self, config: ExperimentConfig, *, model: nn.Module | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, out_dir: str | Path | None = None, objective: Any = None,
                 teacher: nn.Module | None = None) -> None:
        require_extras("accelerate", feature="the Trainer")
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from datetime import timedelta

        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.config = config
        tc = config.train
        self.out_dir = Path(out_dir if out_dir is not None else tc.out_dir)
        set_seed(tc.seed)  # the same on every process: models are built (and trimmers initialised) alike
        # split_batches: train.batch_size is the global batch of one optimizer step, whatever the number
        # of processes; each process gets its slice of every batch (disjoint data, the same schedule)
        self.accelerator = Accelerator(
            cpu=tc.cpu, mixed_precision=tc.mixed_precision,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tc.find_unused_parameters),
                             # the other processes wait while the main one evaluates (retrieval, beam search:
                             # can take longer than the default 10-30 minute collective timeout)
                             InitProcessGroupKwargs(timeout=timedelta(hours=2))])
        acc = self.accelerator
        if acc.distributed_type.name in ("DEEPSPEED", "MEGATRON_LM", "XLA"):
            raise ConfigError(
                f"the accelerate launch config selects {acc.distributed_type.name}, which the trainer does not "
                f"support: launch data-parallel (DDP, examples/accelerate/multi_gpu.yaml), or sharded "
                f"(FSDP2, examples/accelerate/fsdp.yaml or train.fsdp: true)")
        #: keyword arguments of ``fully_shard`` when the model is sharded over the processes (FSDP2), else None
        self.fsdp: dict[str, Any] | None = fsdp_settings(acc, tc)
        if tc.batch_size % acc.num_processes:
            raise ConfigError(f"train.batch_size={tc.batch_size} (the global batch) must be divisible by the number "
                              f"of processes ({acc.num_processes})")
        self.train_dataset = train_dataset if train_dataset is not None else build_dataset(config.data, "train")
        self.eval_dataset = eval_dataset if eval_dataset is not None else build_dataset(config.data, "eval")
        #: the options the backbone was built with (None: a model passed in); saved in checkpoints
        #: (build.json) so that eval rebuilds exactly this model, whatever split it reads
        self.build_options: dict[str, Any] | None = None
        if model is None:
            options = build_options(config.model, config.data, self.train_dataset)
            # recorded (build.json) only when JSON keeps them; the model is built from them either way
            self.build_options = _jsonable(options)
            model = build_model(config.model, options=self.build_options if self.build_options is not None
                                else options)
        if config.trim is not None and not isinstance(model, TrimmedModel):
            model = trim(model, config.trim, adapter=config.model.adapter)
        self.tmodel: TrimmedModel | None = model if isinstance(model, TrimmedModel) else None
        self.net = model
        self.batches_per_epoch = len(self.train_dataset) // tc.batch_size
        if self.batches_per_epoch < 1:
            raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the training split "
                              f"({len(self.train_dataset)} examples)")
        self.total_steps = tc.steps or max(1, math.ceil(tc.epochs * self.batches_per_epoch))
        registry = get_registry()
        #: the task: its loss (wrapped by the objective: cost and self-distillation), distillation
        #: discrepancy and metrics
        self.task = task_of(config.data, self.train_dataset)
        if self.tmodel is not None:
            recipe = config.recipe
            self.objective = _objective(registry.objectives.get(recipe.objective), recipe, self.task)
            self.scheduler = registry.schedulers.get(recipe.scheduler)(recipe)
        else:
            self.objective, self.scheduler = _TaskLoss(self.task), None
        if objective is not None:
            if not callable(objective):
                raise TypeError(f"Trainer: objective must be callable (logits, labels, records, full_logits=None), "
                                f"got {type(objective).__name__}")
            self.objective = objective
        #: run without gradients on every training batch; its logits are the objective's ``full_logits``
        self.teacher: nn.Module | None = None
        if teacher is not None:
            if self.tmodel is not None and getattr(self.objective, "needs_full_pass", False):
                raise ConfigError("Trainer: a teacher model and an objective that needs the trimmed model's own full "
                                  "pass (self-distillation: recipe.lambda_sd > 0) both give full_logits; choose one")
            own = {id(p) for p in self.net.parameters()}
            shared = [n for n, p in teacher.named_parameters() if id(p) in own]
            if shared:  # freezing it would freeze the trained model's weights too
                raise ConfigError(f"Trainer: the teacher shares {len(shared)} parameters with the model being trained "
                                  f"(e.g. {shared[0]!r}); pass a separate copy (copy.deepcopy(model))")
            self.teacher = teacher.to(acc.device).eval().requires_grad_(False)
        if tc.freeze_backbone:  # before sharding: FSDP reads requires_grad when it shards
            if self.tmodel is None:
                raise ConfigError("train.freeze_backbone needs a trim section (nothing else would train)")
            self.tmodel.model.requires_grad_(False)
        # one module call runs the trimmed and (for self-distillation) the full pass: under DDP the two
        # forwards then belong to one graph and one gradient reduction
        want_full = self.tmodel is not None and bool(getattr(self.objective, "needs_full_pass", False))
        self.step_module = _StepModule(self.net, want_full)
        if self.fsdp is not None:
            # the whole step module is one FSDP unit: trimmed layers run traced graphs that call a layer's
            # children, never the layer's own forward, so per-layer units would never be gathered. The
            # optimizer is built on the sharded parameters (each process holds and updates its shard).
            self.step_module = _shard(self.step_module, acc, self.fsdp)
        self.optimizer = torch.optim.AdamW(self._param_groups(), betas=tc.betas)
        warmup = int(round(tc.warmup_fraction * self.total_steps))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(self.total_steps, warmup, tc.min_lr_ratio))
        if self.fsdp is not None and acc.distributed_type.name != "FSDP":
            # train.fsdp on a data-parallel launch: accelerate must not wrap the sharded module in DDP
            self.optimizer, self.lr_schedule = acc.prepare(self.optimizer, self.lr_schedule)
            self.model = self.step_module
        else:  # DDP, one process, or accelerate's FSDP2 (which keeps a module that is already sharded)
            self.model, self.optimizer, self.lr_schedule = acc.prepare(
                self.step_module, self.optimizer, self.lr_schedule)
        if tc.compile != "no":
            # compiled here, after DDP/FSDP wrapping (the order torch.compile wants), not through accelerate's
            # dynamo backend: that one is process-wide state, fixed by the first Accelerator of the process
            self.model = torch.compile(self.model, backend=tc.compile)
        # after the (identical) build, each process draws its own noise (Gumbel, random policy, dropout)
        set_seed(tc.seed, device_specific=True)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_eval: dict[str, Any] | None = None
        self._saved_step: int | None = None  # the step of out_dir/checkpoint, once this trainer wrote or loaded it
        self._saved_total: int | None = None  # total steps of the checkpoint it resumed from

    # --- setup -------------------------------------------------------------------------------------
    def _param_groups(self) -> list[dict[str, Any]]:
        tc = self.config.train
        trimmer_ids: set[int] = set()
        groups = []
        if self.tmodel is not None:
            tparams = [p for p in self.tmodel.trimmers.parameters() if p.requires_grad]
            trimmer_ids = {id(p) for p in tparams}
            groups.append({"params": tparams, "lr": tc.trimmer_lr, "weight_decay": 0.0, "name": "trimmers"})
        backbone = self.tmodel.model if self.tmodel is not None else self.net
        if not tc.freeze_backbone:  # (a frozen backbone was frozen in __init__)
            named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad and id(p) not in trimmer_ids]
            decay = [p for n, p in named if p.ndim >= 2]
            no_decay = [p for n, p in named if p.ndim < 2]
            groups.append({"params": decay, "lr": tc.lr, "weight_decay": tc.weight_decay, "name": "backbone"})
            groups.append({"params": no_decay, "lr": tc.lr, "weight_decay": 0.0, "name": "backbone_no_decay"})
        return [g for g in groups if g["params"]]

    @property
    def progress(self) -> bool:
        p = self.config.train.progress
        return sys.stderr.isatty() if p is None else p

    # --- data order ----------------------------------------------------------------------------------
    def _batches(self, start: int) -> Iterator[dict[str, Any]]:
        """This process's part of the batches for steps ``start, start+1, ...``.

        Epoch e is a permutation of the training split seeded by (seed, e), cut into global batches
        of ``train.batch_size``; accelerate's prepared loader gives each process its slice of every
        batch (``split_batches``), so processes see disjoint data, one epoch is one pass over the
        split whatever the number of processes, and a resumed run skips exactly the batches done."""
        from torch.utils.data import DataLoader

        tc = self.config.train
        acc = self.accelerator
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            g = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch)
            sampler = _EpochBatches(len(self.train_dataset), tc.batch_size, self.batches_per_epoch, g)
            # a generator of its own: without one, every DataLoader iterator draws its base seed from the
            # *global* torch RNG, so a resumed run (a new iterator mid-epoch) shifted the Gumbel/random-policy noise
            loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=collate_of(self.train_dataset),
                                num_workers=tc.num_workers, generator=torch.Generator().manual_seed(epoch))
            loader = acc.prepare_data_loader(loader, device_placement=False)
            if offset:
                loader = acc.skip_first_batches(loader, offset)
            for batch in loader:
                yield _to(batch, acc.device)
            epoch, offset = epoch + 1, 0

    # --- one step ----------------------------------------------------------------------------------
    def _schedule(self) -> dict[str, float]:
        if self.tmodel is None or self.scheduler is None:
            return {}
        targets = self.scheduler.targets(self.step, self.total_steps, self.tmodel.final_targets)
        self.tmodel.set_targets(targets)
        self.tmodel.set_temperature(self.scheduler.temperature_at(self.step, self.total_steps))
        return targets

    def training_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step; returns the log record (loss terms, keep ratios, lrs, targets).

        Raises :class:`DivergedError` (before the optimizer applies anything) when a loss term or the
        gradient norm is not finite, or the trimmed forward saw non-finite trimmer logits."""
        tc = self.config.train
        targets = self._schedule()
        self.model.train()
        inputs = model_inputs(self.net, batch)
        step = self.step + 1
        acc = self.accelerator
        failure: BaseException | None = None
        try:
            out, records, full_out = self.model(**inputs)
            if self.teacher is not None:  # in the run's mixed precision, as the step module runs
                with torch.no_grad(), acc.autocast():
                    full_out = self.teacher(**inputs)
            logits = _logits(out)
            full_logits = _logits(full_out) if full_out is not None else None
        except Exception as err:  # noqa: BLE001 - re-raised below, on every process
            failure = err
        if acc.num_processes > 1:  # a process that failed alone would leave the others waiting in backward
            nonfinite = isinstance(failure, _NONFINITE)
            flags = torch.tensor([float(nonfinite), float(failure is not None and not nonfinite)], device=acc.device)
            seen = acc.reduce(flags, reduction="sum").tolist()
            if failure is None and seen[0] > 0:
                raise self._diverged(step, "non-finite values in the forward pass of another process", {})
            if failure is None and seen[1] > 0:
                raise RuntimeError(f"training step {step} failed on another process (its error is in its own output); "
                                   "this process stopped with it")
        if isinstance(failure, _NONFINITE):  # NaN/inf trimmer logits: the weights (or this batch) are not finite
            raise self._diverged(step, f"the forward pass saw non-finite values ({failure})", {}) from None
        if failure is not None:
            raise failure
        # after the agreement above: the objective may itself reduce over processes (the cost term's keep ratios)
        terms = self.objective(logits, batch["labels"], records, full_logits=full_logits)
        values = {k: float(v.detach()) for k, v in terms.items()}
        self.accelerator.backward(terms["loss"])
        grad_norm = None
        if tc.grad_clip is not None:
            grad_norm = float(_full(self.accelerator.clip_grad_norm_(self.model.parameters(), tc.grad_clip)))
        # fp16: the loss scaler expects overflowing gradients now and then and skips those steps itself
        check_norm = grad_norm if grad_norm is not None or self.accelerator.scaler is not None \
            else _grad_norm(self.model.parameters())
        self._check_step(step, values, None if self.accelerator.scaler is not None else check_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        rec: dict[str, Any] = {"type": "train", "step": self.step, "epoch": self.step / self.batches_per_epoch}
        rec.update(values)
        if getattr(self.task, "metric_on_train_steps", True):  # the task's metrics on this step's batch
            metric = _metric(self.task, self.train_dataset)
            metric.update(logits.detach(), batch)
            rec.update(metric.compute())
        for g in self.optimizer.param_groups:
            rec[f"lr_{g.get('name', 'group')}"] = g["lr"]
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        if records:
            keep: dict[str, list[float]] = {}
            kinds: dict[str, str] = {}
            for r in records:
                keep.setdefault(r.key, []).append(float(r.keep.detach().float().mean()))
                kinds[r.key] = r.kind
            rec["keep"] = {k: sum(v) / len(v) for k, v in keep.items()}
            for kind in ("token", "head"):
                vals = [v for k, v in rec["keep"].items() if kinds[k] == kind]
                if vals:
                    rec[f"keep_{kind}s"] = sum(vals) / len(vals)
            rec["targets"] = targets
            rec["temperature"] = self.tmodel.runtime.temperature
        return rec

    # --- divergence --------------------------------------------------------------------------------
    def _check_step(self, step: int, values: dict[str, float], grad_norm: float | None) -> None:
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
        failed = bool(bad) or bad_grad
        acc = self.accelerator
        if acc.num_processes > 1:  # every process stops together (a lone raise would hang the others)
            flag = torch.tensor([float(failed)], device=acc.device)
            failed_anywhere = bool(acc.reduce(flag, reduction="sum").item() > 0)
        else:
            failed_anywhere = failed
        if not failed_anywhere:
            return
        if bad:
            what = f"non-finite loss ({', '.join(bad)})"
        elif bad_grad:
            what = f"non-finite gradients (grad norm {grad_norm})"
        else:
            what = "a non-finite loss or gradient on another process"
        raise self._diverged(step, what, values, grad_norm)

    def _diverged(self, step: int, what: str, values: dict[str, float], grad_norm: float | None = None,
                  applied: bool = False) -> DivergedError:
        ckpt = self.out_dir / CHECKPOINT_DIR
        terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items()) or "not computed"
        if grad_norm is not None:
            terms += f"; grad_norm={grad_norm:.6g}"
        kept = (f"the last checkpoint, {ckpt} (step {self._saved_step}), is left as it was"
                if self._saved_step is not None else "no checkpoint was written")
        when = "no checkpoint was written for it" if applied else "the run stopped before applying this step"
        msg = (f"training diverged at step {step}: {what} (loss terms: {terms}); {when}, {kept}. Lower train.lr / "
               f"train.trimmer_lr, set train.grad_clip, or check the data for NaN/inf.")
        return DivergedError(msg, step, values)

    def _check_state(self) -> None:
        """Raise :class:`DivergedError` if a parameter or an optimizer state tensor is not finite."""
        named = [(n, p) for n, p in self.net.named_parameters()]
        named += [(f"optimizer state {k} of parameter {i}", v) for i, s in enumerate(self.optimizer.state.values())
                  for k, v in s.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not named:
            return
        # sharded (FSDP): each process checks its shards, and the flags are summed over the processes
        flags_t = torch.stack([~torch.isfinite(_local(t.detach())).all() for _, t in named]).float()
        if self.fsdp is not None:
            flags_t = self.accelerator.reduce(flags_t.to(self.accelerator.device), reduction="sum")
        flags = (flags_t > 0).tolist()
        bad = [n for (n, _), f in zip(named, flags) if f]
        if bad:
            last = self.history[-1] if self.history else {}
            values = {k: v for k, v in last.items() if k in ("loss", "task", "cost", "sd")}
            raise self._diverged(self.step, f"non-finite weights {bad[:3]}{' ...' if len(bad) > 3 else ''} "
                                 f"({len(bad)} tensors)", values, applied=True)

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None, *, overwrite: bool = False,
            allow_config_change: bool = False) -> dict[str, Any]:
        """Train to ``total_steps`` (evaluating and checkpointing on the way); returns the last evaluation.

        ``resume`` continues from ``out_dir/checkpoint`` (refusing a config that differs from the
        checkpoint's outside :data:`RESUMABLE_FIELDS` unless ``allow_config_change``); without it a
        directory that already holds a run raises :class:`RunExistsError` unless ``overwrite``
        (which deletes that run's files first). ``stop_after`` stops (with a checkpoint) once that
        step is reached, as an interrupted run would, without changing the schedules. A diverging
        run raises :class:`DivergedError` and writes no checkpoint."""
        from tqdm.auto import tqdm

        tc = self.config.train
        acc = self.accelerator
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other (--resume continues the run in "
                             f"{self.out_dir}, --overwrite replaces it)")
        ckpt = self.out_dir / CHECKPOINT_DIR
        log_path = self.out_dir / LOG_FILE
        first: list[dict[str, Any]] = []  # records that open this session's part of the log
        if resume:
            if acc.is_main_process:
                _recover_checkpoint(ckpt)
            acc.wait_for_everyone()
            if not (ckpt / STATE_FILE).exists():
                hint = (" (the run stopped before its first checkpoint: start it again with --overwrite)"
                        if _run_entries(self.out_dir) else "")
                raise FileNotFoundError(f"--resume: no {ckpt / STATE_FILE} to resume from{hint}")
            changes = self._config_changes(ckpt, allow_config_change)
            self.load_state(ckpt)
            if self._saved_total is not None and self._saved_total != self.total_steps:
                change = {"total steps": (self._saved_total, self.total_steps)}
                if not allow_config_change:
                    raise ResumeConfigError(_changes_message(ckpt / CONFIG_FILE, change))
                changes.update(change)
            if changes and acc.is_main_process:
                print(f"trimkit train: --allow-config-change: resuming {self.out_dir} at step {self.step} on a "
                      f"changed config:\n" + _format_changes(changes), file=sys.stderr)
            if changes:
                first.append({"type": "config_change", "step": self.step,
                              "changes": {k: {"run": a, "given": b} for k, (a, b) in changes.items()}})
            if acc.is_main_process:
                _truncate_log(log_path, self.step)
                top = self.out_dir / CONFIG_FILE  # the config the run continues on
                if not top.exists() or ExperimentConfig.load(top) != self.config:
                    self.config.save(top)
        else:
            present = _run_entries(self.out_dir)
            acc.wait_for_everyone()  # every process looked before the main one changes anything
            if present and not overwrite:
                raise RunExistsError(
                    f"{self.out_dir} already holds a training run ({', '.join(present)}); pass --resume to continue "
                    f"it, or --overwrite to delete it and start over (or choose another --out directory)")
            if acc.is_main_process:
                for name in present:
                    path = self.out_dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.config.save(self.out_dir / CONFIG_FILE)
            acc.wait_for_everyone()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="smarttrim" if self.tmodel else "train",
                   disable=not self.progress or not acc.is_main_process, dynamic_ncols=True)
        t0 = time.perf_counter()
        # only the main process writes the log (and the run's files); the others hold no handle
        with (open(log_path, "a") if acc.is_main_process else contextlib.nullcontext()) as log:
            def write(rec: dict[str, Any], sync: bool = False) -> None:
                if acc.is_main_process:
                    log.write(json.dumps(rec) + "\n")
                    if sync:
                        _sync(log)

            for rec in first:
                write(rec, sync=True)
            try:
                batches = self._batches(self.step)
                end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
                while self.step < end:
                    rec = self.training_step(next(batches))
                    rec["time"] = time.perf_counter() - t0
                    self.history.append(rec)
                    write(rec)
                    bar.update(1)
                    post = {"loss": f"{rec['loss']:.3f}"}
                    if "keep_tokens" in rec:
                        post["keep_t"] = f"{rec['keep_tokens']:.2f}"
                    bar.set_postfix(post)
                    last = self.step == self.total_steps
                    if last or (tc.eval_every and self.step % tc.eval_every == 0):
                        with self.full_weights():  # sharded (FSDP): every process gathers, the main evaluates
                            if acc.is_main_process:  # on the unwrapped model, once; the others wait
                                ev = self.evaluate()
                                ev.update(type="eval", step=self.step, time=time.perf_counter() - t0)
                                write(ev)
                                log.flush()
                                bar.write(_eval_line(ev))
                            acc.wait_for_everyone()
                    if last or self.step == end or (tc.save_every and self.step % tc.save_every == 0):
                        if acc.is_main_process:
                            _sync(log)  # the log holds every step the checkpoint does
                        self.save_checkpoint()
            except DivergedError as err:
                write({"type": "diverged", "step": err.step, "error": str(err),
                       "terms": {k: v if math.isfinite(v) else str(v) for k, v in err.terms.items()}}, sync=True)
                raise
            finally:
                bar.close()
        if acc.is_main_process and self.last_eval is not None:
            _write_atomic(self.out_dir / METRICS_FILE, json.dumps(self.last_eval, indent=2))
        return self.last_eval or {}

    def _config_changes(self, ckpt: Path, allow: bool) -> dict[str, tuple[Any, Any]]:
        """Fields (dotted) where this trainer's config differs from the checkpoint's, outside
        :data:`RESUMABLE_FIELDS`; raises :class:`ResumeConfigError` if there are any and not ``allow``."""
        path = ckpt / CONFIG_FILE
        try:
            saved = ExperimentConfig.load(path)
        except ConfigError as err:
            if allow:
                return {"(the checkpoint's config)": (f"unreadable: {err}", "the given config")}
            raise ResumeConfigError(f"--resume: cannot compare with the run's config: {err}\n(pass "
                                    f"--allow-config-change to resume on the given config anyway)") from None
        diff = _config_diff(saved.model_dump(mode="json"), self.config.model_dump(mode="json"))
        changes = {k: v for k, v in diff.items() if k not in RESUMABLE_FIELDS}
        if changes and not allow:
            raise ResumeConfigError(_changes_message(path, changes))
        return changes

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Within this block the model holds its whole weights (full precision) on every process.

        Sharded training (FSDP) keeps only a shard of every parameter on each process outside the
        training step; this gathers them (a collective: every process must enter the block) and puts
        the shards back at its end. Writes to the weights inside the block are lost at its end
        (load checkpoints outside it: loading cuts whole tensors into shards itself). Without
        sharding it does nothing. :meth:`evaluate` and reading :attr:`net` outside a training step
        need it under FSDP; :meth:`model_state_dict` and checkpoints use it.

        Gathered from the full-precision shards (``DTensor.full_tensor``) rather than with FSDP's
        ``unshard``, which follows the mixed precision policy and would give bf16 weights to
        checkpoints and evaluation."""
        if self.fsdp is None:
            yield
            return
        owners = [(m, n, p) for m in self.step_module.modules() for n, p in m._parameters.items() if p is not None]
        whole: dict[int, nn.Parameter] = {}
        with torch.no_grad():
            for _, _, p in owners:  # the same order on every process: each gather is a collective
                if id(p) not in whole:
                    whole[id(p)] = nn.Parameter(_full(p.detach()), requires_grad=p.requires_grad)
        for m, n, p in owners:  # between steps FSDP registers the shards; registered again on exit
            m._parameters[n] = whole[id(p)]
        try:
            yield
        finally:
            for m, n, p in owners:
                m._parameters[n] = p

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state (backbone and trimmers, plain tensors on the CPU) on every process,
        sharded or not (under FSDP a collective: call it on every process)."""
        with self.full_weights():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict with every sharded (FSDP) state tensor gathered whole: the same
        layout as unsharded training's, so checkpoints do not depend on sharding. A collective under FSDP."""
        sd = self.optimizer.state_dict()
        if self.fsdp is None:
            return sd
        # new dicts (state_dict() shares the per-parameter dicts with the live optimizer); the same order on
        # every process, since each gather is a collective
        state = {i: {k: _full(v) for k, v in sorted(sd["state"][i].items())} for i in sorted(sd["state"])}
        return {**sd, "state": state}

    def _load_optimizer_state(self, saved: dict[str, Any]) -> None:
        if self.fsdp is not None:  # whole tensors in the checkpoint: each process keeps its shards
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            state = {}
            for i, st in saved["state"].items():
                if not 0 <= int(i) < len(params):
                    raise ValueError(f"the checkpoint's optimizer state names parameter {i}, but the optimizer has "
                                     f"{len(params)}: the checkpoint is of another model")
                ref = params[int(i)]
                state[i] = {}
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:  # per-element state (exp_avg, ...), not `step`
                        if tuple(v.shape) != tuple(ref.shape):
                            raise ValueError(f"the checkpoint's optimizer state {k!r} of parameter {i} has shape "
                                             f"{tuple(v.shape)}, the parameter {tuple(ref.shape)}: the checkpoint "
                                             f"is of another model")
                        v = _like(v, ref)
                    state[i][k] = v
            saved = {**saved, "state": state}
        self.optimizer.load_state_dict(saved)

    def _load_weights(self, directory: Path) -> None:
        # (sharded weights, FSDP: the loaders cut the checkpoint's whole tensors into this process's shards)
        if self.tmodel is not None:
            self.tmodel.load_trimmers(directory)
        else:
            load_backbone(self.net, directory)

    def evaluate(self, dataset: Any = None, instances: int | None = None, macs_instances: int | None = None) -> dict[str, Any]:
        """The task's metrics, keep ratios and MACs of the current model on ``dataset`` (default: the
        eval split). Under FSDP call it inside :meth:`full_weights` (which every process enters)."""
        tc = self.config.train
        ev = evaluate(self.net, dataset if dataset is not None else self.eval_dataset, batch_size=tc.eval_batch_size,
                      instances=instances if instances is not None else tc.eval_instances,
                      macs_instances=tc.macs_instances if macs_instances is None else macs_instances,
                      device=self.accelerator.device, progress=self.progress, task=self.task)
        self.last_eval = ev
        return ev

    # --- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Weights (safetensors), the config and ``trainer_state.pt``, atomically.

        Everything is written (and fsynced) into ``checkpoint.tmp/``, ``trainer_state.pt`` last
        (through a temporary name: its presence marks the directory complete); then the old
        directory is renamed to ``checkpoint.old/``, the new one into place, and the old one
        deleted. A kill at any point leaves the old or the new checkpoint complete; the next
        resume, save or load finishes an interrupted swap (:func:`_recover_checkpoint`). Refuses
        (:class:`DivergedError`) to write non-finite weights or optimizer state."""
        acc = self.accelerator
        directory = Path(directory) if directory is not None else self.out_dir / CHECKPOINT_DIR
        acc.wait_for_everyone()
        self._check_state()
        optimizer_state = self._optimizer_state()  # gathered whole on every process under FSDP
        with self.full_weights():
            return self._write_checkpoint(directory, optimizer_state)

    def _write_checkpoint(self, directory: Path, optimizer_state: dict[str, Any]) -> Path:
        acc = self.accelerator
        tmp, old = _sibling(directory, ".tmp"), _sibling(directory, ".old")
        if acc.is_main_process:
            directory.parent.mkdir(parents=True, exist_ok=True)
            _recover_checkpoint(directory)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if acc.num_processes > 1:  # every other process's RNG states (the main's go into the state file)
            acc.wait_for_everyone()
            if not acc.is_main_process:
                part = tmp / (_rng_file(acc.process_index) + ".part")
                torch.save(_rng_state(), part)
                with open(part, "rb") as f:
                    _sync(f)
                os.replace(part, tmp / _rng_file(acc.process_index))
            acc.wait_for_everyone()
        if not acc.is_main_process:
            return directory
        if self.tmodel is not None:
            mc = self.config.model
            card = None  # what adapter.build (or from_pretrained) takes to make this backbone again
            if self.build_options is not None:
                # a pretrained base is rebuilt by the adapter's from_pretrained, not by build(**options): the
                # card then names the base model and says to load it, rather than a build call that would be wrong
                card = None if mc.pretrained else {"size": mc.size or "tiny", "seed": mc.seed, **self.build_options}
            self.tmodel.save_pretrained(tmp, include_backbone=True, build_options=card,
                                        base_model=mc.pretrained, base_revision=mc.revision if mc.pretrained else None)
        else:
            save_backbone(self.net, tmp)
        if self.build_options is not None:
            _write_atomic(tmp / BUILD_FILE, json.dumps({"adapter": self.config.model.adapter,
                                                         "options": self.build_options}, indent=2))
        self.config.save(tmp / CONFIG_FILE)
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "num_processes": acc.num_processes,
            "optimizer": optimizer_state,
            "lr_schedule": self.lr_schedule.state_dict(),
            "rng": _rng_state(),
        }
        if acc.scaler is not None:  # fp16 loss scale: it decides which steps are skipped
            state["scaler"] = acc.scaler.state_dict()
        part = tmp / (STATE_FILE + ".part")
        torch.save(state, part)
        _fsync_tree(tmp)
        os.replace(part, tmp / STATE_FILE)
        _fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        _fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
        if directory == self.out_dir / CHECKPOINT_DIR:
            self._saved_step = self.step
        return directory

    def load_state(self, directory: str | Path) -> None:
        """Restore weights, optimizer, schedule, step and RNG from a checkpoint directory."""
        directory = Path(directory)
        self._load_weights(directory)
        try:
            state = torch.load(directory / STATE_FILE, weights_only=False)
        except Exception as err:  # truncated or garbage file: name it
            raise ValueError(f"{directory / STATE_FILE}: the trainer state cannot be read ({type(err).__name__}: "
                             f"{err}); the checkpoint is damaged: resume from another run or start over with "
                             "--overwrite") from None
        self._load_optimizer_state(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step = int(state["step"])
        self._saved_step = self.step
        self._saved_total = int(state["total_steps"]) if state.get("total_steps") is not None else None
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        saved_procs = int(state.get("num_processes", 1))
        acc = self.accelerator
        if saved_procs != acc.num_processes:
            raise ResumeConfigError(
                f"{directory / STATE_FILE}: the run was trained on {saved_procs} process(es), this launch has "
                f"{acc.num_processes}: resume with the same number of processes (the data split and every "
                f"process's random streams depend on it)")
        if acc.is_main_process:
            _set_rng_state(state["rng"])
        else:
            path = directory / _rng_file(acc.process_index)
            try:
                _set_rng_state(torch.load(path, weights_only=False))
            except Exception as err:
                raise ValueError(f"{path}: process {acc.process_index}'s RNG state cannot be read "
                                 f"({type(err).__name__}: {err}); the checkpoint is damaged") from None


def _rng_file(process_index: int) -> str:
    return f"rng_state_{process_index}.pt"


# raised by a trimmed forward whose trimmer logits are NaN/inf (an empty tuple catches nothing)
_NONFINITE: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(_ops, "NonFiniteError", None),) if e is not None)

RUN_ENTRIES = (LOG_FILE, CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, CHECKPOINT_DIR + ".tmp", CHECKPOINT_DIR + ".old")


def _run_entries(directory: Path) -> list[str]:
    """The entries of ``directory`` that belong to a training run (empty: no run there)."""
    if not directory.is_dir():
        return []
    return [name for name in RUN_ENTRIES if (directory / name).exists()]


def _grad_norm(params: Iterable[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(_full(torch.nn.utils.get_total_norm(grads)))  # sharded (FSDP) gradients: over all shards


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (a's value, b's value) where two config dumps differ (sections recursively)."""
    absent = "<absent>"
    out: dict[str, tuple[Any, Any]] = {}
    for k in list(a) + [k for k in b if k not in a]:
        x, y = a.get(k, absent), b.get(k, absent)
        key = f"{prefix}{k}"
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_config_diff(x, y, key + "."))
        elif x != y:
            out[key] = (x, y)
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = value if value == "<absent>" else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {k}: {_short(a)} (run) -> {_short(b)} (given)" for k, (a, b) in changes.items())


def _changes_message(path: Path, changes: dict[str, tuple[Any, Any]]) -> str:
    return (f"--resume: the given config differs from the run's ({path}) in {len(changes)} field(s) that change the "
            f"run:\n{_format_changes(changes)}\nResume with the run's config (--config {path}), start a new run (another "
            f"--out, or --overwrite), or pass --allow-config-change to continue on the given config anyway. Fields "
            f"that may change on resume: {', '.join(sorted(RESUMABLE_FIELDS))}.")


# --- durable files -------------------------------------------------------------------------------
def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsynced and renamed."""
    atomic_write_bytes(path, text.encode())


def _recover_checkpoint(directory: Path) -> None:
    """Finish a checkpoint swap that a kill interrupted: if ``checkpoint/`` is missing, the complete
    ``checkpoint.tmp/`` (the newer) or ``checkpoint.old/`` takes its place; leftovers are deleted."""
    tmp, old = _sibling(directory, ".tmp"), _sibling(directory, ".old")
    if not directory.exists():
        for candidate in (tmp, old):
            if (candidate / STATE_FILE).exists():
                candidate.rename(directory)
                _fsync_dir(directory.parent)
                break
    for leftover in (tmp, old):
        if leftover.exists() and (directory.exists() or not (leftover / STATE_FILE).exists()):
            shutil.rmtree(leftover, ignore_errors=True)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (the checkpoint's): an interrupted run may have logged
    steps after its last save, which the resumed run is about to log again. Rewritten atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if rec.get("step", 0) <= step:
            keep.append(line + "\n")
    _write_atomic(path, "".join(keep))


def _rng_state() -> dict[str, Any]:
    """Every global RNG a step may draw from: torch (CPU: Gumbel noise, the random token policy,
    dropout), CUDA, Python's ``random`` and NumPy's legacy global state (datasets/plugins)."""
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(rng: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("numpy") is not None:  # checkpoints written before it was saved lack it
        np.random.set_state(rng["numpy"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _eval_line(ev: dict[str, Any]) -> str:
    main = ev.get("main_metric", "accuracy")
    parts = [f"step {ev.get('step', '?')}", f"{main} {ev[main]:.4f}"]
    if "gmacs" in ev:
        parts.append(f"GMACs {ev['gmacs']:.4f} (full {ev['gmacs_full']:.4f}, {ev['macs_ratio']:.2f}x)")
    if ev.get("keep"):
        parts.append(f"keep tokens {ev['keep_tokens']:.2f} heads {ev['keep_heads']:.2f}")
    return " | ".join(parts)
