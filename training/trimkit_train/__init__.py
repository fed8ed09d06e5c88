"""trimkit_train: fine-tuning with the SmartTrim recipe (paper §4.2) and plain backbone fine-tuning,
on accelerate; the shipped tasks (digit-grid) and the demo.

The core package ``trimkit`` describes, trims and runs models; this package trains and evaluates
them. Its dependencies are optional: ``pip install "trimkit[train]"``.

>>> from trimkit_train import ExperimentConfig, Trainer
>>> Trainer(ExperimentConfig.load("examples/digit_grid.yaml")).fit()
"""

from typing import TYPE_CHECKING, Any

from ._extras import MissingExtrasError, require_extras

#: names served lazily from trimkit_train.trainer: the core loads this package's task plugin
#: (trimkit_train.tasks) with every registry, and that must not import the trainer
_TRAINER_NAMES = (
    "CHECKPOINT_DIR", "ConfigError", "DataConfig", "DatasetEntry", "DivergedError", "ExperimentConfig", "ModelConfig",
    "RESUMABLE_FIELDS", "RecipeConfig", "ResumeConfigError", "RunExistsError", "TrainConfig", "Trainer",
    "build_dataset", "build_model", "build_options", "evaluate", "interleaved_latency", "load_backbone",
    "load_checkpoint", "mean_macs", "model_inputs", "register_dataset", "save_backbone", "task_of",
)

__all__ = ["MissingExtrasError", "require_extras", *_TRAINER_NAMES]

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import *  # noqa: F401,F403


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'trimkit_train' has no attribute {name!r}")
