"""trimkit_train: fine-tuning with the SmartTrim recipe (paper §4.2) and plain backbone fine-tuning,
on accelerate; the shipped tasks (digit-grid) and the demo.

The core package ``trimkit`` describes, trims and runs models; this package trains and evaluates
them. Its dependencies are optional: ``pip install "trimkit[train]"``.

>>> from trimkit_train import ExperimentConfig, Trainer
>>> Trainer(ExperimentConfig.load("examples/digit_grid.yaml")).fit()
"""

from ._extras import MissingExtrasError, require_extras
from .trainer import (
    CHECKPOINT_DIR,
    ConfigError,
    DataConfig,
    DatasetEntry,
    DivergedError,
    ExperimentConfig,
    ModelConfig,
    RESUMABLE_FIELDS,
    RecipeConfig,
    ResumeConfigError,
    RunExistsError,
    TrainConfig,
    Trainer,
    build_dataset,
    build_model,
    build_options,
    evaluate,
    interleaved_latency,
    load_backbone,
    load_checkpoint,
    mean_macs,
    model_inputs,
    register_dataset,
    save_backbone,
)

__all__ = [
    "MissingExtrasError", "require_extras", "CHECKPOINT_DIR", "ConfigError", "DataConfig", "DatasetEntry", "DivergedError", "ExperimentConfig", "ModelConfig",
    "RESUMABLE_FIELDS", "RecipeConfig", "ResumeConfigError", "RunExistsError", "TrainConfig", "Trainer", "build_dataset",
    "build_model", "build_options", "evaluate", "interleaved_latency", "load_backbone", "load_checkpoint", "mean_macs", "model_inputs",
    "register_dataset", "save_backbone",
]
