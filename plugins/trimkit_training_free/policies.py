"""Training-free token policies: ``fastv`` (Chen et al. 2024) and ``visionzip`` (Yang et al. 2024).

Both have no parameters. They read a :class:`trimkit.probe.TokenContext` (``uses_context = True``):
which tokens they decide on, the trimmer's keep ratio and the attention weights of the previous
layer, and return logits of +/- :data:`LOGIT` (kept / dropped) so that every mode of trimkit,
training's sampled masks included (up to float eps), takes their decision.

Budget: a trimmer with keep ratio ``r`` over a segment (or stream) of ``n`` real tokens keeps
``floor(r * n + 0.5)`` of them, the tokens the core always keeps (a [CLS], a segment's summary
token) included; with ``r = 1`` it keeps every token and reads no attention. Ties are broken by
position (the earlier token first), the same in masked and removed forwards.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FastVTokenPolicy", "VisionZipTokenPolicy", "LOGIT", "top_budget"]

LOGIT = 100.0
"""The logit magnitude of a decision: beyond a sampler's noise, so training's sampled masks are the
decision up to the sampler's own clamping (the gumbel sampler clamps probabilities to float eps)."""


def top_budget(scores: torch.Tensor, context, budget: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) bool: the protected present tokens plus the best-scored other present tokens, ``budget``
    (B,) tokens in all (default ``context.budget()``): :meth:`trimkit.probe.TokenContext.top`."""
    return context.top(scores, budget)


class _TrainingFree(nn.Module):
    """Base: no parameters; ``forward(hidden, cls_self, cls_context, context)`` -> logits (B, n)."""

    uses_context = True

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()

    def keep(self, hidden: torch.Tensor, context) -> torch.Tensor:  # pragma: no cover - subclasses
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, cls_self: torch.Tensor, cls_context: torch.Tensor | None,
                context=None) -> torch.Tensor:
        if context is None:
            raise RuntimeError(f"{type(self).__name__} is a training-free policy that needs trimkit's TokenContext "
                               "(the core passes it to policies with uses_context = True, in modes sample, hard "
                               "and remove)")
        B, n = hidden.shape[:2]
        if context.target >= 1.0:
            return hidden.new_full((B, n), LOGIT)
        kept = self.keep(hidden, context)
        return torch.where(kept, LOGIT, -LOGIT).to(hidden.dtype)


class FastVTokenPolicy(_TrainingFree):
    """FastV (Chen et al. 2024, "An image is worth 1/2 tokens after layer 2"): at the layer it trims
    (FastV's K), keep the tokens that received the most attention from the **last real token** of the
    sequence in the layer before (K - 1), averaged over all heads, and drop the others from layer K on.

    The query is the last token, as FastV's code does (in LLaVA's ``[prompt][image][question]`` it is the
    question's last token, which has read the whole prompt and predicts the answer), not the mean over
    the question's tokens: one row of attention weights per instance, computed from that layer's own
    q/k (:class:`trimkit.probe.AttentionProbe`); the layer's attention runs on SDPA as before.
    FastV is placed with ``token_layers`` (the layer K: ``"seq.uni.2"``) and sized with ``token_target``
    (``{"image": 0.5}`` keeps half of the image tokens; text segments at 1.0 keep all).
    """

    query = "last"

    def keep(self, hidden: torch.Tensor, context) -> torch.Tensor:
        return top_budget(context.received(self.query), context)


class VisionZipTokenPolicy(_TrainingFree):
    """VisionZip-style (Yang et al. 2024) **dominant-token selection**: keep the tokens that received the
    most attention from the stream's **[CLS]** (its first token) in the layer before, averaged over
    heads, plus a few *context* tokens spread evenly over the remaining ones.

    Of a budget of ``k`` tokens, ``round(k * CONTEXT_SHARE)`` (VisionZip's default 10 of 64) are context
    tokens: VisionZip takes every ``step``-th remaining token (``step = remaining // count``) as a
    target and **merges** every other remaining token into its most similar target (averaging
    their keys/hidden states). The merge is left out here: trimkit's mask contract is that a dropped
    token is neither key nor value, and a kept token's hidden state is the model's own, so a policy
    only chooses tokens (it returns logits), it cannot rewrite the kept ones; merging would change
    the kept tokens' values, and masked and removed forwards would no longer compute the same model.
    The targets are kept as they are (unmerged). Streams without a [CLS] (VisionZip's variant ranking
    by the attention every token received) are not supported: that needs the full attention matrix.
    """

    query = "first"
    CONTEXT_SHARE = 10 / 64

    def keep(self, hidden: torch.Tensor, context) -> torch.Tensor:
        budget = context.budget()
        n_context = torch.floor(budget.double() * self.CONTEXT_SHARE + 0.5).long()
        dominant = top_budget(context.received(self.query), context, budget - n_context)
        rest = context.present & ~dominant
        order = rest.long().cumsum(1) - 1  # index of each remaining token among its instance's remaining ones
        count = (budget - dominant.sum(1)).clamp_min(0)  # context tokens to keep (fewer if few remain)
        step = (rest.sum(1) // count.clamp_min(1)).clamp_min(1)
        picked = rest & (order % step[:, None] == 0) & (order // step[:, None] < count[:, None])
        return dominant | picked
