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


def cost_loss(records: Sequence) -> torch.Tensor:
    """Eq. 9-10: mean over trimmed modules p of (beta_p - gamma_p)^2.

    beta_p is the kept fraction of module p (tokens of a layer, or heads of an attention module)
    averaged over the batch (over every process's slice of it, in data-parallel training); gamma_p
    its current target. Records with a target of exactly 1.0 and no trimming wanted still count
    (they hold the module at 'keep everything').
    """
    if not records:
        return torch.zeros(())
    means = _batch_means(torch.stack([r.keep.mean() for r in records]))
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
                      distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = softmax_kl
                      ) -> torch.Tensor:
    """Eq. 11: task(full) + D(f(x, P), f(x, empty)), the full pass from the same model; ``D`` is the
    task's discrepancy (the KL of the softmaxes for classification, the paper's case)."""
    return task_loss(full_logits, labels) + distill(trimmed_logits, full_logits, labels)


@dataclass
class SmartTrimObjective:
    """Eq. 12: L = task + lambda_SD * L_SD + lambda_cost * L_cost, around any task: ``task_loss``
    and ``distill`` are a :class:`trimkit.protocols.Task`'s ``loss`` and ``distill`` (by default
    single-label classification: cross-entropy and the KL of the softmaxes)."""

    lambda_cost: float = 20.0
    lambda_sd: float = 1.0
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = softmax_kl

    @classmethod
    def for_task(cls, lambda_cost: float, lambda_sd: float, task=None) -> "SmartTrimObjective":
        if task is None:
            return cls(lambda_cost, lambda_sd)
        return cls(lambda_cost, lambda_sd, task_loss=task.loss, distill=task.distill)

    @property
    def needs_full_pass(self) -> bool:
        return self.lambda_sd > 0

    def __call__(self, trimmed_logits, labels, records, full_logits=None) -> dict[str, torch.Tensor]:
        task = self.task_loss(trimmed_logits, labels)
        cost = cost_loss(records).to(task.device)
        out = {"task": task, "cost": cost}
        total = task + self.lambda_cost * cost
        if self.lambda_sd > 0:
            if full_logits is None:
                raise ValueError("SmartTrimObjective: lambda_sd > 0 needs the full-model logits")
            sd = self_distillation(trimmed_logits, full_logits, labels, self.task_loss, self.distill)
            out["sd"] = sd
            total = total + self.lambda_sd * sd
        out["loss"] = total
        return out
