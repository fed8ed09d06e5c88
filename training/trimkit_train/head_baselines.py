"""Static head pruning, the baselines of the paper's Fig. 4b (§6.1, Appendix C).

* :func:`head_importance`: Michel et al. (2019)'s importance of each attention head,
  ``I_h = E_x |A_h^T dL(x)/dA_h|`` with ``A_h`` the head's context (its slice of the attention
  output before the output projection) and ``L`` the loss on *pseudo-labels* (the model's own
  predictions), computed as the gradient of a gate ``xi_h = 1`` multiplying ``A_h``, per instance.
* :func:`static_head_masks`: which heads to keep for a retention ratio ``p``: ``random`` (p of the
  heads of each attention module, at random), ``grad_layer`` (the top p of each module by
  importance) or ``grad_all`` (the top p of all the modules together, importance normalised per
  module by its L2 norm so modules of different scales compare; Michel et al. normalise per layer,
  which differs where a layer has several attention modules, as METER's co-attention layers do).
* :func:`install_static_heads`: writes them into a trimmed model whose head policy is ``static``
  (:class:`trimkit_smarttrim.StaticHeadPolicy`), which then drops those heads for every instance.

Gating needs the module's output to be its heads' contexts side by side ``(B, N, H * d)``, i.e. an
attention whose output projection is outside the module (``AttentionSpec.out is None``: METER,
BERT-style ``.self`` modules); other modules are refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["head_importance", "install_static_heads", "static_head_masks"]

METHODS = ("random", "grad_layer", "grad_all")


def _modules(spec: Any, layers: set[str] | None) -> list[tuple[str, int, str, int]]:
    """(layer path, attention index, module path, heads) of the attentions of the chosen layers."""
    out = []
    for layer in spec.layers:
        if layers is not None and layer.path not in layers:
            continue
        for j, a in enumerate(layer.attentions):
            if not (layer.batch_first and a.batch_first):
                raise ValueError(f"head_importance: attention {layer.path}.{a.path} is not batch-first; its output "
                                 "must be (B, N, heads * head_dim) to gate each instance's heads")
            if a.out is not None:
                raise ValueError(f"head_importance: attention {layer.path}.{a.path} applies its output projection itself "
                                 f"(AttentionSpec.out={a.out!r}), so its heads' contexts cannot be gated at its output")
            out.append((layer.path, j, f"{layer.path}.{a.path}", a.num_heads))
    return out


def head_importance(model: nn.Module, spec: Any, dataset: Any, *, layers: set[str] | None = None,
                    instances: int = 512, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Michel et al.'s head importance, ``{"LAYER.ATTENTION_INDEX": (heads,)}`` (the keys of trimkit's
    head trimmers), over the first ``instances`` items of ``dataset``, for the attentions of
    ``layers`` (layer paths; default every described layer). ``model`` is the untrimmed model (eval
    mode, its weights untouched)."""
    from .trainer import _logits, collate_of, model_inputs

    chosen = _modules(spec, layers)
    if not chosen:
        raise ValueError(f"head_importance: the layers {sorted(layers) if layers is not None else 'all'} have no "
                         "described attention")
    gates: dict[str, torch.Tensor] = {}
    sums = {f"{lp}.{j}": torch.zeros(h, dtype=torch.float64) for lp, j, _, h in chosen}

    def gate(key: str, heads: int):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[-1] % heads:
                raise TypeError(f"head_importance: {key}'s attention module returned "
                                f"{type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}; "
                                f"expected its {heads} heads' contexts side by side, (B, N, {heads} * head_dim)")
            B, N, D = out.shape
            g = torch.ones(B, heads, dtype=out.dtype, device=out.device, requires_grad=True)
            gates[key] = g
            return (out.view(B, N, heads, D // heads) * g[:, None, :, None]).view(B, N, D)
        return hook

    handles = [model.get_submodule(mp).register_forward_hook(gate(f"{lp}.{j}", h)) for lp, j, mp, h in chosen]
    was = model.training
    model.eval()
    collate = collate_of(dataset)
    n = min(instances, len(dataset))
    try:
        for start in range(0, n, batch_size):
            batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
            gates.clear()
            logits = _logits(model(**model_inputs(model, batch)))
            pseudo = logits.detach().argmax(-1)
            loss = F.cross_entropy(logits, pseudo, reduction="sum")  # a sum: each gate's grad is its instance's
            grads = torch.autograd.grad(loss, [gates[k] for k in sums], allow_unused=True)
            for key, g in zip(sums, grads):
                if g is not None:
                    sums[key] += g.detach().abs().double().sum(0).cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: (v / n).float() for k, v in sums.items()}


def static_head_masks(importance: dict[str, torch.Tensor], ratio: float, method: str,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Which heads to keep (``{key: (heads,) bool}``) at retention ``ratio`` in (0, 1] by ``method``
    (module docstring). Per-module methods keep ``round(ratio * heads)`` heads, at least one;
    ``grad_all`` may keep none of a module (a static head policy then drops all of its heads)."""
    if method not in METHODS:
        raise ValueError(f"static_head_masks: method must be one of {METHODS}, got {method!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"static_head_masks: ratio must be in (0, 1], got {ratio}")
    out: dict[str, torch.Tensor] = {}
    if method == "grad_all":
        normed = {k: v / v.norm().clamp_min(1e-12) for k, v in importance.items()}
        flat = torch.cat([normed[k] for k in normed])
        keep_n = max(1, round(ratio * flat.numel()))
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[flat.argsort(descending=True, stable=True)[:keep_n]] = True
        at = 0
        for k, v in normed.items():
            out[k] = kept[at:at + v.numel()].clone()
            at += v.numel()
        return out
    for k, v in importance.items():
        n = max(1, round(ratio * v.numel()))
        order = torch.randperm(v.numel(), generator=generator) if method == "random" else \
            v.argsort(descending=True, stable=True)
        keep = torch.zeros(v.numel(), dtype=torch.bool)
        keep[order[:n]] = True
        out[k] = keep
    return out


def install_static_heads(tmodel: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Write ``masks`` (:func:`static_head_masks`) into ``tmodel``'s static head policies; every head
    trimmer of ``tmodel`` must be one and every mask must name one."""
    from trimkit.model import _safe
    from trimkit_smarttrim import StaticHeadPolicy

    policies: dict[str, nn.Module] = {}
    for layer in tmodel.spec.layers:
        if _safe(layer.path) not in tmodel.trimmers:
            continue
        trimmers = tmodel.trimmers[_safe(layer.path)]
        for j, policy in trimmers.heads.items():
            policies[f"{layer.path}.{j}"] = policy
    unknown = sorted(set(masks) - set(policies))
    if unknown:
        raise KeyError(f"install_static_heads: no head trimmer {unknown[:3]} in this model (it has {sorted(policies)[:6]})")
    for key, policy in policies.items():
        if not isinstance(policy, StaticHeadPolicy):
            raise TypeError(f"install_static_heads: head trimmer {key!r} is a {type(policy).__name__}; trim with "
                            "head_policy='static'")
        if key in masks:
            policy.set_heads(masks[key])
