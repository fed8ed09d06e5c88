"""Typed configuration of what to trim (pydantic v2); the training recipe is trimkit_train's.

Targets are *keep ratios* in (0, 1] (the paper's gamma_p): 0.5 keeps half of the tokens (or heads)
of a module. A target is a float (everywhere) or a dict keyed by selectors, most specific first:
``"vision.cross.3"`` (stream, site, index of that layer among the stream's layers at that site),
``"vision.cross"``, ``"vision"``, ``"cross"``, ``"default"``; head targets may add the attention
kind: ``"text.cross.self"``, ``"cross"`` (cross-attention modules), ``"self"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .plugins import get_registry

Target = float | dict[str, float]

#: Training-recipe fields that TrimConfig held before 0.2 (now trimkit_train.RecipeConfig). Checkpoints
#: of that time still load: :meth:`TrimConfig.from_saved` drops them.
RECIPE_FIELDS = frozenset({"objective", "scheduler", "temperature", "final_temperature", "lambda_cost", "lambda_sd",
                           "curriculum_fraction"})


def _check_ratio(value: float, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{where}: expected a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{where}: keep ratio must be in (0, 1], got {value}")
    return float(value)


class TrimConfig(BaseModel):
    """What to trim, how hard, and with which method parts (all names are plugin registry names).

    How to *train* the trimmers (objective, curriculum scheduler, temperatures, loss weights) is not
    here: it is the recipe of the training package (``trimkit_train.RecipeConfig``).

    Every number must be finite: ``inf``/``nan`` (YAML ``.inf``/``.nan``) are rejected, naming the field
    (``lambda_cost: .inf`` would otherwise train to an all-NaN model)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    adapter: str | None = Field(None, description="adapter name; None picks it from the model via plugins")
    token_target: Target = Field(1.0, description="keep ratio of tokens per trimmed layer")
    head_target: Target = Field(1.0, description="keep ratio of heads per attention module")
    token_layers: list[str] | None = Field(None, description="selectors of layers that get token trimmers; None = all")
    head_layers: list[str] | None = Field(None, description="selectors of layers whose heads are trimmed; None = all")
    trim_tokens: bool = True
    trim_heads: bool = True
    token_policy: str = "cross_modal"
    head_policy: str = "cross_modal"
    sampler: str = Field("gumbel", description="how train-mode forwards draw masks from the trimmers' logits")
    trimmer_dim: int | None = Field(None, ge=4, description="D' of the token trimmer; None = max(16, D // 8)")
    init_logit: float = Field(5.0, gt=0, description="stable initialisation: every token and head starts kept")
    attention_dropout: Literal["kernel_only", "model", "none"] = Field(
        "kernel_only", description=(
            "attention dropout inside trimmed attention in train mode. 'kernel_only' (the behaviour before this "
            "field): where only the module's softmax(QK^T)V call is intercepted (AttentionSpec via='kernel') the "
            "module's own dropout_p is applied, where trimkit recomputes attention from the projections "
            "(via='projections', e.g. METER) none is; 'model': the module's own probability on every route "
            "(trimkit.kernels.module_dropout reads it), so trimmed training sees the dropout the untrimmed model "
            "does; 'none': no attention dropout in trimmed attention on any route"))

    @model_validator(mode="before")
    @classmethod
    def _recipe_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = sorted(k for k in data if k in RECIPE_FIELDS)
            if moved:
                raise ValueError(
                    f"{', '.join(moved)}: how to train is not part of TrimConfig (what to trim): these fields are "
                    f"in the `recipe` section of an experiment config (trimkit_train.RecipeConfig)")
        return data

    @field_validator("token_target", "head_target")
    @classmethod
    def _targets(cls, value: Target, info) -> Target:
        if isinstance(value, dict):
            if not value:
                raise ValueError(f"{info.field_name}: an empty dict selects nothing; give a float or selectors")
            return {str(k): _check_ratio(v, f"{info.field_name}[{k!r}]") for k, v in value.items()}
        return _check_ratio(value, info.field_name)

    @model_validator(mode="after")
    def _names(self) -> "TrimConfig":
        registry = get_registry()
        for field, reg in (
            ("token_policy", registry.token_policies),
            ("head_policy", registry.head_policies),
            ("sampler", registry.samplers),
            ("adapter", registry.adapters),
        ):
            name = getattr(self, field)
            if name is not None and name not in reg:
                raise ValueError(f"{field}: unknown {reg.kind} {name!r}; registered: {reg.names() or 'none'}")
        return self

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "TrimConfig":
        """A config from a saved dump; dumps written before the recipe fields moved out
        (:data:`RECIPE_FIELDS`) load with those fields dropped (they did not change the model)."""
        return cls.model_validate({k: v for k, v in data.items() if k not in RECIPE_FIELDS})

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        data = self.model_dump(mode="json")
        text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrimConfig":
        """Read a YAML or JSON file written by :meth:`save` (or by hand)."""
        path = Path(path)
        try:
            data: Any = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"trim config file not found: {path}") from None
        except UnicodeDecodeError:
            raise TrimConfigError(f"{path}: not a text file (a YAML or JSON TrimConfig was expected)") from None
        except yaml.YAMLError as err:
            raise TrimConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of TrimConfig fields, got {type(data).__name__}")
        return cls.model_validate(data)


def selector_keys(stream: str, site: str, index: int, kind: str | None = None) -> list[str]:
    """Selector keys that address one module, most specific first."""
    base = [f"{stream}.{site}.{index}", f"{stream}.{site}", stream, site]
    if kind is None:
        return base + ["default"]
    keys = [f"{stream}.{site}.{index}.{kind}", base[0], f"{stream}.{site}.{kind}", base[1], f"{stream}.{kind}", stream,
            f"{site}.{kind}", site, kind, "default"]
    return keys


def resolve_target(target: Target, keys: list[str]) -> float:
    """The keep ratio for a module with selector ``keys`` (1.0 when a dict names none of them)."""
    if not isinstance(target, dict):
        return float(target)
    for key in keys:
        if key in target:
            return target[key]
    return 1.0


class TrimConfigError(ValueError):
    """A config value that does not fit the model it is applied to (names the field)."""
