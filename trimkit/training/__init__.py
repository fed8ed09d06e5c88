"""Training: the SmartTrim recipe (paper §4.2) and plain backbone fine-tuning, on accelerate.

>>> from trimkit.training import ExperimentConfig, Trainer
>>> Trainer(ExperimentConfig.load("examples/digit_grid.yaml")).fit()
"""

from .trainer import (
    CHECKPOINT_DIR,
    ConfigError,
    DataConfig,
    DatasetEntry,
    DivergedError,
    ExperimentConfig,
    ModelConfig,
    RESUMABLE_FIELDS,
    ResumeConfigError,
    RunExistsError,
    TrainConfig,
    Trainer,
    build_dataset,
    build_model,
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
    "CHECKPOINT_DIR", "ConfigError", "DataConfig", "DatasetEntry", "DivergedError", "ExperimentConfig", "ModelConfig",
    "RESUMABLE_FIELDS", "ResumeConfigError", "RunExistsError", "TrainConfig", "Trainer", "build_dataset",
    "build_model", "evaluate", "interleaved_latency", "load_backbone", "load_checkpoint", "mean_macs", "model_inputs",
    "register_dataset", "save_backbone",
]
