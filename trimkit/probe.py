"""What a *context-reading* token policy sees besides the hidden states: :class:`TokenContext`, and
:class:`AttentionProbe`, the attention weights of the layer before it for a few query rows.

Training-free token policies (FastV, VisionZip) do not score each token on its own: they keep a
budget of tokens (the trimmer's keep ratio times the segment's real tokens) ranked by the attention
the tokens received in the previous layer. A policy with the attribute ``uses_context = True`` is
called ``policy(hidden, cls_self, cls_context, context)`` with a :class:`TokenContext` (see
:class:`trimkit.protocols.TokenPolicy`); the core builds it in the masked and removed modes so that
both describe the same tokens (masked == removed holds for such policies too).

The probe is backbone-agnostic: at trim time a forward pre-hook is put on trimkit's own attention
wrapper of the previous layer (the stream's first self-attention of that layer, in its rewritten
graph), recording that call. Attention at the kernel (transformers' ``AttentionInterface``, or an
``F.scaled_dot_product_attention`` call that fx intercepts inside the module): trimkit's kernel
hands the call's queries and keys (after RoPE or qk-norm, grouped-query heads as they are, the
model's own mask) to the probe as it attends, so nothing runs twice and no hook of the module fires
again (a module with several such calls: its first).
Attention recomputed from its projections: the queries and keys are recomputed from
:class:`trimkit.ops.TrimAttention`'s projections when a policy asks (one more q/k projection of that
layer). Only the asked rows of ``softmax(q k^T * scale + mask)`` are formed, with the call's own
token mask; the layer's attention itself stays on SDPA. What a probe holds is dropped after every
forward. Not supported: mode ``packed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["AttentionProbe", "TokenContext", "row_attention"]

def _rank(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, n) rank of each candidate by descending score (0 = best; ties: the earlier token first);
    non-candidates rank after every candidate."""
    s = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(s.shape[1], device=s.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


class _Call:
    """One attention call's queries and keys (after RoPE) and how it masks them."""

    def __init__(self, query, key, mask, scale, causal, trim) -> None:
        self.query, self.key, self.mask, self.scale, self.causal, self.trim = query, key, mask, scale, causal, trim


def row_attention(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float | None = None,
                  mask: torch.Tensor | None = None, causal: bool = False,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention weights of one query row per instance, averaged over heads: q (B, H, Nq, d), k
    (B, Hkv, Nk, d) (Hkv dividing H), ``rows`` (B,) -> (B, Nk), i.e. ``softmax(q_r k^T * scale +
    mask_r)`` with ``mask`` an sdpa mask (bool: True = may attend, or additive, broadcastable to
    (B, H, Nq, Nk)), ``causal`` top-left aligned as sdpa's ``is_causal``, ``key_mask`` (B, Nk) trimkit's
    keep mask (0: neither key nor value). Computed in float32."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    b = torch.arange(B, device=q.device)
    rows = rows.to(q.device)
    qr = q[b, :, rows].float()  # (B, H, d)
    s = torch.einsum("bhd,bhnd->bhn", qr, k.float()) * (scale if scale is not None else d ** -0.5)
    if mask is not None:
        m = mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.float().expand(B, m.shape[1], Nq, Nk)[b, :, rows]  # (B, H or 1, Nk)
        s = s + m
    if causal:
        s = s.masked_fill(torch.arange(Nk, device=q.device)[None, None, :] > rows[:, None, None], float("-inf"))
    if key_mask is not None:
        from .ops import key_bias

        s = s + key_bias(key_mask.float(), torch.float32)[:, 0]  # (B, 1, Nk)
    return torch.softmax(s, dim=-1).mean(1)


class AttentionProbe:
    """Records the inputs of one attention call (``module``: trimkit's wrapper of it in a rewritten
    layer, :class:`~trimkit.ops.TrimAttention` or :class:`~trimkit.kernels.KernelAttention`) and gives
    that call's attention weights for asked query rows (:meth:`received`). ``where``: the layer path,
    for messages."""

    def __init__(self, module: nn.Module, where: str) -> None:
        route = getattr(module, "route", "projections")
        self.module, self.where, self.route = module, where, route
        self.kernel = route in ("attention_interface", "fx")  # the kernel hands over q/k as it attends
        self._call: tuple[tuple, dict] | None = None
        self._got: _Call | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._call, self._got, self._cache = (args, kwargs), None, {}
        if not self.kernel:
            return None
        from .ops import AttnTrim

        trim = kwargs.get("trimkit_trim")
        if trim is None:  # (the kernel's shared default must not carry a capture)
            trim = AttnTrim()
            kwargs = {**kwargs, "trimkit_trim": trim}
        trim.capture = self._store
        return args, kwargs

    def _store(self, query, key, mask, scale, causal, trim) -> None:
        trim.capture = None
        self._got = _Call(query.detach(), key.detach(), mask, scale, causal, trim)

    def clear(self) -> None:
        """Forget the recorded call (its tensors); :class:`~trimkit.model.TrimmedModel` does it after
        every forward."""
        self._call, self._got, self._cache = None, None, {}

    def _qk(self) -> _Call:
        if self._call is None:
            raise RuntimeError(f"trimkit attention probe: the attention of layer {self.where!r} did not run before "
                               "the policy that reads it (it must be an earlier layer of the same forward)")
        args, kwargs = self._call
        trim = kwargs.get("trimkit_trim")
        if getattr(trim, "packed", None) is not None:
            raise NotImplementedError("trimkit: context-reading token policies (fastv, visionzip) do not run in mode "
                                      "'packed'; use tmodel.inference = 'remove' (batch 1) or 'hard'")
        if self.kernel:
            if self._got is None:
                raise RuntimeError(f"trimkit attention probe: the attention module of layer {self.where!r} returned "
                                   "without calling its attention function")
            return self._got
        q, k, bias = self.module.heads_qk(args, {k: v for k, v in kwargs.items() if k != "trimkit_trim"})
        return _Call(q, k, bias, self.module.spec.scale, False, trim)

    def received(self, query: str, rows: torch.Tensor) -> torch.Tensor:
        """(B, Nk) the mean over heads of the attention each key received from query row ``rows[b]``
        (``query`` names the row choice, for caching within a forward)."""
        if query not in self._cache:
            with torch.no_grad():
                got = self._qk()
                key_mask = getattr(got.trim, "key_mask", None)
                self._cache[query] = row_attention(got.query, got.key, rows, got.scale, got.mask, got.causal, key_mask)
        return self._cache[query]


@dataclass
class TokenContext:
    """One token trimmer's view of the tokens it decides on, in the layout of ``hidden`` (B, n).

    * ``key``: the trimmer's record key (``"layer"`` or ``"layer:segment"``); ``target``: its current
      keep ratio (the configured target, or the scheduled one while training);
    * ``present`` (B, n) bool: the tokens this trimmer decides on: real (not padding), not dropped by
      an earlier layer, and of its segment; every other token's logit is ignored;
    * ``protected`` (B, n) bool: present tokens the core keeps whatever the logits say (a [CLS], a
      segment's summary token);
    * ``total`` (B,) long: the segment's (or stream's) real tokens before any trimming, the base of
      ``target``; :meth:`budget` = ``floor(target * total + 0.5)`` tokens to keep, protected included;
    * ``last`` (B,) long: the row of the stream's last real token;
    * :meth:`received`: the attention weights of the previous layer (see :class:`AttentionProbe`).
    """

    key: str
    target: float
    present: torch.Tensor
    protected: torch.Tensor
    total: torch.Tensor
    last: torch.Tensor
    probe: AttentionProbe | None = field(default=None, repr=False)

    def budget(self) -> torch.Tensor:
        """(B,) tokens to keep, protected ones included."""
        return torch.floor(self.target * self.total.double() + 0.5).long()

    def top(self, scores: torch.Tensor, budget: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) bool: the protected present tokens plus the best-``scores`` other present tokens,
        ``budget`` (B,) tokens in all (default :meth:`budget`); ties go to the earlier token, so masked
        and removed forwards (which see the same tokens in the same order) pick the same ones."""
        budget = self.budget() if budget is None else budget
        candidates = self.present & ~self.protected
        free = (budget - self.protected.sum(1)).clamp_min(0)
        return self.protected | (candidates & (_rank(scores, candidates) < free[:, None]))

    def received(self, query: str = "last") -> torch.Tensor:
        """(B, n) mean over heads of the attention each token received, in the layer before this one,
        from the stream's first token (``"first"``, its [CLS]) or its last real token (``"last"``)."""
        if query not in ("first", "last"):
            raise ValueError(f"TokenContext.received: query must be 'first' or 'last', got {query!r}")
        if self.probe is None:
            raise RuntimeError(f"trimkit: trimmer {self.key!r} has no attention probe (its policy does not declare "
                               "uses_context, or the layer has no previous layer)")
        rows = torch.zeros_like(self.last) if query == "first" else self.last
        return self.probe.received(query, rows)
