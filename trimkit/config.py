"""Typed configuration for trimming and its training recipe (pydantic v2).

Targets are *keep ratios* in (0, 1] (the paper's gamma_p): 0.5 keeps half of the tokens (or heads)
of a module. A target is a float (everywhere) or a dict keyed by selectors, most specific first:
``"vision.cross.3"`` (stream, site, index of that layer among the stream's layers at that site),
``"vision.cross"``, ``"vision"``, ``"cross"``, ``"default"``; head targets may add the attention
kind: ``"text.cross.self"``, ``"cross"`` (cross-attention modules), ``"self"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .plugins import get_registry

Target = float | dict[str, float]


def _check_ratio(value: float, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{where}: expected a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{where}: keep ratio must be in (0, 1], got {value}")
    return float(value)


class TrimConfig(BaseModel):
    """What to trim, how hard, and with which method parts (all names are plugin registry names).

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
    sampler: str = "gumbel"
    objective: str = "smarttrim"
    scheduler: str = "linear"
    trimmer_dim: int | None = Field(None, ge=4, description="D' of the token trimmer; None = max(16, D // 8)")
    init_logit: float = Field(5.0, gt=0, description="stable initialisation: every token and head starts kept")
    temperature: float = Field(1.0, gt=0, description="Gumbel-sigmoid temperature (Eq. 8)")
    final_temperature: float | None = Field(
        None, gt=0, description="temperature at the last step (geometric decay from `temperature`); None = fixed")
    lambda_cost: float = Field(20.0, ge=0, description="weight of the cost loss (Eq. 12)")
    lambda_sd: float = Field(1.0, ge=0, description="weight of self-distillation (Eq. 12)")
    curriculum_fraction: float = Field(0.5, ge=0, le=1, description="fraction of training over which targets go from 1.0 to their value")

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
            ("objective", registry.objectives),
            ("scheduler", registry.schedulers),
            ("adapter", registry.adapters),
        ):
            name = getattr(self, field)
            if name is not None and name not in reg:
                raise ValueError(f"{field}: unknown {reg.kind} {name!r}; registered: {reg.names() or 'none'}")
        return self

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
