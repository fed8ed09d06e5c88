"""Token and head policies: SmartTrim's cross-modal trimmers (paper Eq. 3-7) and baselines.

All final layers start at zero weight and bias ``config.init_logit`` > 0: the stable
initialisation of §4.2 (every token and head is kept at step 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _hidden(dim: int, config) -> int:
    return config.trimmer_dim or max(16, dim // 8)


def _run(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)`` for a Sequential of Linear/GELU layers, calling the functional ops directly.

    A trimmer runs at every trimmed layer on a handful of vectors, where the time is dispatch and
    not arithmetic: skipping the module calls (hooks, ``__call__``) of its small layers is a
    measured part of the per-layer fixed cost (benchmarks/RESULTS.md, "Fixed cost per trimmed
    layer"). Other layer types are called as modules."""
    for layer in layers:
        if type(layer) is nn.Linear:
            x = F.linear(x, layer.weight, layer.bias)
        elif type(layer) is nn.GELU:
            x = F.gelu(x, approximate=layer.approximate)
        else:
            x = layer(x)
    return x


def _stable(linear: nn.Linear, config) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.constant_(linear.bias, config.init_logit)
    linear._trimkit_stable = True  # found again by random_init
    return linear


@torch.no_grad()
def random_init(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Undo the stable initialisation (the "- Stable Initialization" ablation of the paper's Table 6):
    every policy layer that :func:`_stable` set to "keep everything" gets PyTorch's default random
    ``nn.Linear`` initialisation instead (Kaiming-uniform weights, uniform bias over +-1/sqrt(fan_in)),
    the Random policy's keep bias goes to 0 (keep each token with probability 1/2), and W_k of the
    cross-modal token policy gets the default initialisation too, so decisions at step 0 are random.
    Works on a :class:`trimkit.TrimmedModel` or any module holding these policies; returns how many
    layers were re-initialised."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and getattr(m, "_trimkit_stable", False):
            bound = 1.0 / max(1, m.in_features) ** 0.5
            nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=generator)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            count += 1
        elif isinstance(m, CrossModalTokenPolicy):
            nn.init.kaiming_uniform_(m.bilinear.weight, a=5 ** 0.5, generator=generator)
            count += 1
        elif isinstance(m, RandomTokenPolicy):
            m.bias.zero_()
            count += 1
    return count


class CrossModalTokenPolicy(nn.Module):
    """pi_t = MLP(H') + g W_k H'^T with H' = Linear(H) and g = MLP([cls_self, cls_context]) (Eq. 3-6)."""

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.proj = nn.Linear(dim, d)
        self.local = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), _stable(nn.Linear(d // 2, 1), config))
        self.context_dim = context_dim or 0
        self.glob = nn.Sequential(nn.Linear(dim + self.context_dim, d), nn.GELU(), nn.Linear(d, d))
        self.bilinear = nn.Linear(d, d, bias=False)  # W_k
        nn.init.zeros_(self.bilinear.weight)

    def forward(self, hidden: torch.Tensor, cls_self: torch.Tensor, cls_context: torch.Tensor | None) -> torch.Tensor:
        h = F.linear(hidden, self.proj.weight, self.proj.bias)  # (B, N, D')
        local = _run(self.local, h).squeeze(-1)
        if self.context_dim:
            ctx = cls_context if cls_context is not None else cls_self.new_zeros(cls_self.shape[0], self.context_dim)
            g = _run(self.glob, torch.cat([cls_self, ctx], dim=-1))  # (B, D')
        else:
            g = _run(self.glob, cls_self)
        wg = F.linear(g, self.bilinear.weight)  # (B, D')
        return torch.baddbmm(local.unsqueeze(-1), h, wg.unsqueeze(-1)).squeeze(-1)  # local + <W_k g, h_n>

    def fuse(self, heads: dict[str, nn.Module]) -> "FusedTrimmers | None":
        """This layer's trimmers (this policy and its head policies ``heads``, by attention index) as one
        :class:`FusedTrimmers` for inference with the current weights; None if they do not fit it."""
        return _fuse(self, heads)


class LocalTokenPolicy(nn.Module):
    """The Local baseline (§6.1): pi_t = MLP(Linear(H)), no [CLS] of either stream."""

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.proj = nn.Linear(dim, d)
        self.local = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), _stable(nn.Linear(d // 2, 1), config))

    def forward(self, hidden, cls_self, cls_context):
        return _run(self.local, F.linear(hidden, self.proj.weight, self.proj.bias)).squeeze(-1)

    def fuse(self, heads: dict[str, nn.Module]) -> "FusedTrimmers | None":
        """See :meth:`CrossModalTokenPolicy.fuse`."""
        return _fuse(self, heads)


class RandomTokenPolicy(nn.Module):
    """The Random baseline (§6.1): each token kept at random; a learned bias sets how many.

    The bias is stored divided by :attr:`SCALE`: Adam moves a parameter by about the learning rate
    per step, so a bare scalar started at ``init_logit`` could not reach its target within a short
    fine-tune (measured: 300 steps at 1e-2 left the demo's Random run keeping 95% of the tokens),
    while the learned policies' logits move through many weights at once.
    """

    SCALE = 5.0

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(config.init_logit) / self.SCALE))

    def forward(self, hidden, cls_self, cls_context):
        u = torch.rand(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype).clamp(1e-6, 1 - 1e-6)
        return self.SCALE * self.bias + torch.log(u) - torch.log1p(-u)  # bias + logistic noise


class TripsTokenPolicy(nn.Module):
    """A TRIPS-style static baseline (Jiang et al. 2022, "text-relevant image patch selection"; the
    paper's Table 1 runs it with task fine-tuning only): every instance keeps the same share of its
    tokens, the trimmer's keep ratio, chosen by a learned text-guided attention score.

    The score of token ``n`` is ``<q, k_n> / sqrt(D')`` with ``q = W_q [cls_self; cls_context]`` (the
    stream's [CLS] as query, shifted by the other stream's [CLS]: TRIPS's text-aware query) and
    ``k_n = W_k h_n``. Of the present tokens the protected ones plus the best-scored others are
    kept, ``floor(ratio * tokens + 0.5)`` in all (:meth:`trimkit.probe.TokenContext.top`): a fixed
    count per layer, where SmartTrim's count varies per instance.

    The logits are each token's margin to the cut (the midpoint between the lowest kept and the
    highest dropped score, held constant), at least ``MARGIN`` on the right side: decisions
    (``logit > 0``) are exactly the top-k, while training's sampled masks are sigmoids of those
    clamped margins, so the task loss trains ``W_q``/``W_k`` (TRIPS trains them through its fused token,
    which trimkit's mask contract leaves out: a dropped token is neither key nor value). With a
    temperature decaying to ~0 (sampler ``sharpen``) the training masks converge to the decision.
    Where a row has no cut (its budget keeps every token it decides on, as at a later layer whose
    share an earlier layer already met, or keeps none) its logits are +-100: nothing to learn there,
    and a sampled mask then equals the decision.
    """

    uses_context = True  # for TokenContext.top (present, protected, budget) ...
    reads_attention = False  # ... not for the previous layer's attention: any layer may be trimmed
    MARGIN = 1e-3

    def __init__(self, dim: int, context_dim: int | None, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.context_dim = context_dim or 0
        self.query = nn.Linear(dim + self.context_dim, d)
        self.key = nn.Linear(dim, d)
        self.scale = d ** -0.5

    def forward(self, hidden: torch.Tensor, cls_self: torch.Tensor, cls_context: torch.Tensor | None,
                context=None) -> torch.Tensor:
        if context is None:
            raise RuntimeError("TripsTokenPolicy keeps a fixed share of the tokens and needs trimkit's TokenContext "
                               "(the core passes it to policies with uses_context = True, in modes sample, hard and "
                               "remove)")
        if self.context_dim:
            ctx = cls_context if cls_context is not None else cls_self.new_zeros(cls_self.shape[0], self.context_dim)
            cls_self = torch.cat([cls_self, ctx], dim=-1)
        q = F.linear(cls_self, self.query.weight, self.query.bias)  # (B, D')
        k = F.linear(hidden, self.key.weight, self.key.bias)  # (B, N, D')
        scores = torch.bmm(k, q.unsqueeze(-1)).squeeze(-1) * self.scale  # (B, N)
        big = torch.finfo(scores.dtype).max
        if context.target >= 1.0:
            return torch.full_like(scores, 100.0)
        keep = context.top(scores.detach(), None)
        free = context.present & ~context.protected
        with torch.no_grad():
            low = scores.masked_fill(~(keep & free), big).amin(1)  # lowest kept free score
            high = scores.masked_fill(~(free & ~keep), -big).amax(1)  # highest dropped score
            cut = torch.where(low >= big, high, torch.where(high <= -big, low, (low + high) / 2))
        margin = scores - cut[:, None]
        logits = torch.where(keep, margin.clamp_min(self.MARGIN), margin.clamp_max(-self.MARGIN))
        no_cut = ~((keep & free).any(1) & (free & ~keep).any(1))  # every free token kept, or none
        logits = torch.where(no_cut[:, None], torch.where(keep, 100.0, -100.0).to(logits.dtype), logits)
        return logits.masked_fill(context.protected, 100.0)


class CrossModalHeadPolicy(nn.Module):
    """pi_h = P(cls_self) for self-attention, P([cls_self, cls_context]) for cross-attention (Eq. 7)."""

    def __init__(self, dim: int, context_dim: int | None, num_heads: int, config) -> None:
        super().__init__()
        d = _hidden(dim, config)
        self.context_dim = context_dim or 0
        self.net = nn.Sequential(nn.Linear(dim + self.context_dim, d), nn.GELU(), _stable(nn.Linear(d, num_heads), config))

    def forward(self, cls_self: torch.Tensor, cls_context: torch.Tensor | None) -> torch.Tensor:
        x = cls_self if not self.context_dim else torch.cat([cls_self, cls_context], dim=-1)
        return _run(self.net, x)


class StaticHeadPolicy(nn.Module):
    """Fixed heads, the same for every instance: the static head-pruning baselines of §6.1 / Fig. 4b
    (Random, Grad-Layer, Grad-All). Which heads are kept is the boolean buffer ``keep``
    ``(num_heads,)`` (all kept at construction), set with :meth:`set_heads` by whoever picks them
    (``trimkit_train.head_baselines``); it is saved with the trimmers. The logits are
    ``±LOGIT``, far beyond any sampler's noise, so training masks are exactly 0 or 1 as inference's
    are with samplers ``sharpen`` and ``hard_st``; ``gumbel`` (``RelaxedBernoulli``) clamps its
    probabilities to float eps, which leaves up to ~1e-6 of a dropped head. No parameters: the cost
    loss cannot move it (its target is met by construction)."""

    LOGIT = 1.0e4

    def __init__(self, dim: int, context_dim: int | None, num_heads: int, config) -> None:
        super().__init__()
        self.register_buffer("keep", torch.ones(num_heads, dtype=torch.bool))

    def set_heads(self, keep: torch.Tensor) -> None:
        """Keep the heads where ``keep`` (``(num_heads,)`` bool) is true."""
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if keep.shape != self.keep.shape:
            raise ValueError(f"StaticHeadPolicy.set_heads: expected {tuple(self.keep.shape)} heads, got {tuple(keep.shape)}")
        self.keep.copy_(keep.to(self.keep.device))

    def forward(self, cls_self: torch.Tensor, cls_context: torch.Tensor | None) -> torch.Tensor:
        logits = torch.where(self.keep, self.LOGIT, -self.LOGIT).to(cls_self.dtype)
        return logits.expand(cls_self.shape[0], -1)


# --- inference: one layer's trimmers as one fused computation ---------------------------------------------


def _mlp_parts(layers: nn.Sequential) -> tuple[nn.Linear, str, nn.Linear] | None:
    """(first linear, GELU approximation, second linear) of a Linear-GELU-Linear stack, else None."""
    if (len(layers) == 3 and type(layers[0]) is nn.Linear and type(layers[1]) is nn.GELU
            and type(layers[2]) is nn.Linear):
        return layers[0], layers[1].approximate, layers[2]
    return None


class FusedTrimmers:
    """The inference form of one layer's trimmers: a :class:`CrossModalTokenPolicy` (or
    :class:`LocalTokenPolicy`) and its :class:`CrossModalHeadPolicy` heads, computed with a few
    operators instead of one small MLP each (made by :meth:`CrossModalTokenPolicy.fuse`; trimkit
    calls it instead of the policies when no gradient is needed, see
    :meth:`trimkit.layer.LayerTrimmers.fused`).

    At batch 1 a trimmer's cost is the number of operators it dispatches, not its arithmetic
    (benchmarks/RESULTS.md, "Fixed cost per trimmed layer"). Folded here, with the weights frozen:

    * the summary side: every MLP that reads [CLS] vectors (the token policy's ``g``, each head
      policy) is one matmul over the distinct [CLS] inputs, one GELU, and one block-diagonal matmul;
      ``W_k`` and the token projection's transpose are folded into the token policy's block, so it
      outputs ``u = W_p^T W_k g`` and ``c = b_p . W_k g`` directly;
    * the token side: ``MLP(W_p h + b_p)`` with its first layer folded into ``W_p`` (one matmul of
      ``D -> D'/2`` instead of two) and ``<W_k g, W_p h + b_p> = h . u + c``, one batched matmul.

    The result equals the policies' up to float rounding (the products are formed in float64 once);
    it is rebuilt whenever a weight changes.
    """

    def __init__(self, token: nn.Module, heads: dict[str, "CrossModalHeadPolicy"]) -> None:
        with torch.no_grad():
            wp, bp = token.proj.weight.double(), token.proj.bias.double()
            l1, self.token_act, l2 = _mlp_parts(token.local)
            dtype = token.proj.weight.dtype
            self.A = (l1.weight.double() @ wp).to(dtype)  # (D'/2, D): local MLP's first layer after W_p
            self.a = (l1.weight.double() @ bp + l1.bias.double()).to(dtype)
            self.w2, self.b2 = l2.weight.detach().clone(), l2.bias.detach().clone()  # (1, D'/2), (1,)
            self.w2t = self.w2.t().unsqueeze(0).contiguous()  # (1, D'/2, 1), for baddbmm
            self.cross = isinstance(token, CrossModalTokenPolicy)
            self.token_reads_context = False  # the cross-modal policy's g reads the context's [CLS]
            # summary-side MLPs: (first weight split by input, first bias, second weight, second bias), token's first
            self.blocks: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []
            self.head_keys = sorted(heads, key=int)
            act = None
            if self.cross:
                g1, act, g2 = _mlp_parts(token.glob)
                wk = token.bilinear.weight.double()
                w1, cd = g1.weight.detach(), token.context_dim
                split = [w1] if not cd else [w1[:, : w1.shape[1] - cd], w1[:, w1.shape[1] - cd:]]
                self.token_reads_context = bool(cd)
                # rows: u (D) then c (1); b2 of the local MLP folded into c's bias
                m = wk @ g2.weight.double()  # (D', D')
                mb = wk @ g2.bias.double()
                w_out = torch.cat([wp.t() @ m, (bp @ m)[None]], 0).to(dtype)
                b_out = torch.cat([wp.t() @ mb, (bp @ mb + l2.bias.double()).reshape(1)], 0).to(dtype)
                self.blocks.append((split, g1.bias.detach(), w_out, b_out))
            self.head_dims: list[int] = []
            for k in self.head_keys:
                h1, h_act, h2 = _mlp_parts(heads[k].net)
                if act is not None and h_act != act:
                    raise ValueError("summary MLPs with different GELU approximations")
                act = h_act
                w1 = h1.weight.detach()
                cd = heads[k].context_dim
                split = [w1] if not cd else [w1[:, : w1.shape[1] - cd], w1[:, w1.shape[1] - cd:]]
                self.blocks.append((split, h1.bias.detach(), h2.weight.detach(), h2.bias.detach()))
                self.head_dims.append(h2.weight.shape[0])
            self.summary_act = act or "none"
            self.out_sizes = ([wp.shape[1], 1] if self.cross else []) + self.head_dims
            hidden = [b[1].numel() for b in self.blocks]
            if self.blocks:
                self.b1 = torch.cat([b[1] for b in self.blocks])
                self.b_out = torch.cat([b[3] for b in self.blocks])
                w2 = torch.zeros(sum(self.out_sizes), sum(hidden), dtype=dtype, device=wp.device)
                r = c = 0
                for (_, _, wo, _), n in zip(self.blocks, hidden):
                    w2[r:r + wo.shape[0], c:c + n] = wo
                    r, c = r + wo.shape[0], c + n
                self.W2 = w2
            self._first: dict[tuple, torch.Tensor] = {}  # input layout -> first summary matmul's weight

    def _first_weight(self, layout: tuple, dims: list[int]) -> torch.Tensor:
        """The first summary matmul's weight for one assignment of MLP inputs to distinct [CLS] tensors:
        ``layout[j]`` lists, per MLP, the source index of each of its inputs."""
        w = self._first.get(layout)
        if w is None:
            offs = [sum(dims[:i]) for i in range(len(dims))]
            rows = []
            for (split, _, _, _), srcs in zip(self.blocks, layout):
                row = split[0].new_zeros(split[0].shape[0], sum(dims))
                for part, s in zip(split, srcs):
                    if s is not None:
                        row[:, offs[s]:offs[s] + dims[s]] += part
                rows.append(row)
            w = self._first[layout] = torch.cat(rows, 0)
        return w

    def __call__(self, hidden: torch.Tensor, cls_self: torch.Tensor, cls_context: torch.Tensor | None,
                 head_inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Token logits (B, N) and head logits by attention key, as the policies would give them; None
        when the inputs do not fit this fused form (the caller then runs the policies)."""
        if sorted(head_inputs, key=int) != self.head_keys:
            return None
        sources = [cls_self] + ([cls_context] if cls_context is not None else [])

        def src(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            for i, s in enumerate(sources):
                if s is t:
                    return i
            sources.append(t)
            return len(sources) - 1

        layout = []
        if self.cross:  # a missing context reads as zeros; a policy without context_dim ignores it
            layout.append((0, 1 if cls_context is not None else None) if self.token_reads_context else (0,))
        for k, block in zip(self.head_keys, self.blocks[1:] if self.cross else self.blocks):
            q, other = head_inputs[k]
            if (other is None) != (len(block[0]) == 1):
                return None  # a cross-attention's head policy without its context (or the reverse)
            layout.append((src(q), src(other)))
        B = hidden.shape[0]
        head_out: dict[str, torch.Tensor] = {}
        if self.blocks:
            dims = [s.shape[-1] for s in sources]
            z = sources[0] if len(sources) == 1 else torch.cat(sources, -1)
            w1 = self._first_weight(tuple(layout), dims)
            g = F.gelu(F.linear(z, w1, self.b1), approximate=self.summary_act)
            parts = F.linear(g, self.W2, self.b_out).split(self.out_sizes, -1)
            for k, p in zip(self.head_keys, parts[2:] if self.cross else parts):
                head_out[k] = p
        t = F.gelu(F.linear(hidden, self.A, self.a), approximate=self.token_act)  # (B, N, D'/2)
        if self.cross:
            u, c = parts[0], parts[1]
            z = torch.baddbmm(c.unsqueeze(-1), hidden, u.unsqueeze(-1))  # h . u + c + b2: (B, N, 1)
            w2t = self.w2t if B == 1 else self.w2t.expand(B, -1, -1)
            logits = torch.baddbmm(z, t, w2t)
        else:
            logits = F.linear(t, self.w2, self.b2)
        return logits.squeeze(-1), head_out


def _fusable_heads(heads: dict[str, nn.Module]) -> bool:
    return all(type(h) is CrossModalHeadPolicy and _mlp_parts(h.net) is not None for h in heads.values())


def _fuse(token: nn.Module, heads: dict[str, nn.Module]) -> FusedTrimmers | None:
    if _mlp_parts(token.local) is None or not _fusable_heads(heads):
        return None
    if isinstance(token, CrossModalTokenPolicy) and _mlp_parts(token.glob) is None:
        return None
    try:
        return FusedTrimmers(token, heads)
    except ValueError:  # e.g. summary MLPs with different activations
        return None

