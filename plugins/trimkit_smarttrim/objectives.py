"""The SmartTrim objective (paper Eq. 9-12) and its parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _batch_means(means: torch.Tensor) -> torch.Tensor:
    """Per-process means -> the means over the whole batch, when data-parallel processes each hold a
    slice of it (equal slices, as the trainer's split batches are): a differentiable all-reduce, so
    the cost term is the paper's (a square of the batch's keep ratio), not a mean of per-slice squares."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return means
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(means) / dist.get_world_size()


BETAS = ("original", "entering")
SD_TEACHERS = ("detached", "joint")


def _beta(record, beta: str) -> torch.Tensor:
    if beta == "original" or record.kind != "token":
        return record.keep
    if record.entering is None:
        raise ValueError(f"cost_loss(beta='entering'): token record {record.key!r} carries no `entering` fraction "
                         "(only masked training forwards, modes sample/hard, record it)")
    return record.entering


def cost_loss(records: Sequence, beta: str = "original") -> torch.Tensor:
    """Eq. 9-10: mean over trimmed modules p of (beta_p - gamma_p)^2.

    beta_p is the kept fraction of module p (tokens of a layer, or heads of an attention module)
    averaged over the batch (over every process's slice of it, in data-parallel training); gamma_p
    its current target. Records with a target of exactly 1.0 and no trimming wanted still count
    (they hold the module at 'keep everything').

    ``beta`` (``RecipeConfig.cost_beta``) says what a token module's fraction is over: ``"original"``
    the stream's original real tokens ([CLS] included; ``Record.keep``, a cumulative ratio),
    ``"entering"`` the tokens entering the layer (``Record.entering``, the per-layer ratio).
    """
    if beta not in BETAS:
        raise ValueError(f"cost_loss: beta must be one of {BETAS}, got {beta!r}")
    if not records:
        return torch.zeros(())
    means = _batch_means(torch.stack([_beta(r, beta).mean() for r in records]))
    targets = torch.tensor([float(r.target) for r in records], dtype=means.dtype, device=means.device)
    return ((means - targets) ** 2).mean()


def softmax_kl(trimmed_logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(trimmed) || softmax(full)), averaged over the batch: Eq. 11's discrepancy for
    single-label classification."""
    log_p = F.log_softmax(trimmed_logits, dim=-1)
    log_q = F.log_softmax(full_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def self_distillation(trimmed_logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor,
                      task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = softmax_kl,
                      teacher: str = "detached") -> torch.Tensor:
    """Eq. 11: task(full) + D(f(x, P), f(x, empty)), the full pass from the same model; ``D`` is the
    task's discrepancy (the KL of the softmaxes for classification, the paper's case).

    ``teacher`` (``RecipeConfig.sd_teacher``): ``"detached"`` (the default) makes the full pass a fixed
    teacher in D (it still learns from its task term), as the paper's "transfer knowledge from the full
    capacity model to the pruned model" reads and as measured best (docs/reproducing.md); ``"joint"``
    lets D's gradient reach the full pass too (it is pulled toward the trimmed one)."""
    if teacher not in SD_TEACHERS:
        raise ValueError(f"self_distillation: teacher must be one of {SD_TEACHERS}, got {teacher!r}")
    target = full_logits.detach() if teacher == "detached" else full_logits
    return task_loss(full_logits, labels) + distill(trimmed_logits, target, labels)


@dataclass
class SmartTrimObjective:
    """Eq. 12: L = task + lambda_SD * L_SD + lambda_cost * L_cost, around any task: ``task_loss``
    and ``distill`` are a :class:`trimkit.protocols.Task`'s ``loss`` and ``distill`` (by default
    single-label classification: cross-entropy and the KL of the softmaxes)."""

    lambda_cost: float = 20.0
    lambda_sd: float = 1.0
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = softmax_kl
    cost_beta: str = "original"  # RecipeConfig.cost_beta
    sd_teacher: str = "detached"  # RecipeConfig.sd_teacher

    def __post_init__(self) -> None:
        if self.cost_beta not in BETAS:
            raise ValueError(f"SmartTrimObjective: cost_beta must be one of {BETAS}, got {self.cost_beta!r}")
        if self.sd_teacher not in SD_TEACHERS:
            raise ValueError(f"SmartTrimObjective: sd_teacher must be one of {SD_TEACHERS}, got {self.sd_teacher!r}")

    @classmethod
    def for_task(cls, lambda_cost: float, lambda_sd: float, task=None, cost_beta: str = "original",
                 sd_teacher: str = "detached") -> "SmartTrimObjective":
        extra = {"cost_beta": cost_beta, "sd_teacher": sd_teacher}
        if task is None:
            return cls(lambda_cost, lambda_sd, **extra)
        return cls(lambda_cost, lambda_sd, task_loss=task.loss, distill=task.distill, **extra)

    @classmethod
    def from_recipe(cls, config, task=None) -> "SmartTrimObjective":
        """From a ``RecipeConfig`` (a config without the fidelity fields gets their defaults)."""
        return cls.for_task(config.lambda_cost, config.lambda_sd, task, getattr(config, "cost_beta", "original"),
                            getattr(config, "sd_teacher", "detached"))

    @property
    def needs_full_pass(self) -> bool:
        return self.lambda_sd > 0

    def __call__(self, trimmed_logits, labels, records, full_logits=None) -> dict[str, torch.Tensor]:
        task = self.task_loss(trimmed_logits, labels)
        cost = cost_loss(records, self.cost_beta).to(task.device)
        out = {"task": task, "cost": cost}
        total = task + self.lambda_cost * cost
        if self.lambda_sd > 0:
            if full_logits is None:
                raise ValueError("SmartTrimObjective: lambda_sd > 0 needs the full-model logits")
            sd = self_distillation(trimmed_logits, full_logits, labels, self.task_loss, self.distill, self.sd_teacher)
            out["sd"] = sd
            total = total + self.lambda_sd * sd
        out["loss"] = total
        return out
