"""Packed batches: the kept tokens of a whole batch in one row matrix (mode ``packed``).

Layout. A stream is packed at its first described layer: its real tokens (padding dropped) and,
from then on, the tokens its trimmers keep sit in one (R, D) row matrix, instance after instance,
[CLS] first within each instance. The model sees it as a (1, R, D) tensor ((R, 1, D) for
sequence-first layers), so its own Linear, LayerNorm and FFN code runs unchanged on rows, with no
padding to the batch maximum. A :class:`Packing` describes the rows (per-instance counts on the
host, cumulative sequence lengths, instance and original position of each row). Attention runs
per instance by cumulative sequence lengths (:func:`varlen_attention`).

After the stream's last described layer its rows are unpacked to (B, max kept, D): [CLS] at 0,
each instance's kept tokens in order, zeros after them (:func:`unpack`, and
:attr:`Packing.padded` marks that layout), so the model's code after the layers (poolers reading
token 0) runs unchanged.

Assumption: attention biases are padding-only (0 on every real token, large negative on padding).
Packed attention drops padding tokens instead of masking them, so it takes only key biases
(broadcastable to (B, 1, 1, Nk)) gathered to the packed keys, and checks that they are 0 on every
kept key (:func:`key_bias_flag`); a causal, relative-position or per-head bias is refused.

Token trimmers (policies) run on rows through an optional method
``policy.packed_logits(rows (R, D), cls_self (B, D), cls_context (B, Dc) | None, batch_index (R,))
-> (R,)``; a policy without it is called on a (B, max, D) zero-padded copy of the rows (only the
trimmer's input is padded; correct for policies that score each token from itself and the [CLS]
tokens, which is what SmartTrim's are).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Packing", "PackedCall", "fetch", "packing_of", "pack_tokens", "select_rows", "unpack", "repack", "gather",
           "varlen_attention", "key_bias_flag", "key_padding_bias", "token_logits", "nonzero"]


@dataclass(eq=False)
class Packing:
    """Where a stream's kept tokens sit in the row matrix of a batch.

    counts: kept tokens per instance (host). real: the instance's real (non-padding) tokens, for
    kept fractions. cu: (B + 1,) int32 cumulative counts (device). pos: (R,) original position of
    each row. bidx: (R,) instance of each row. length: the stream's original token count.
    padded: the tensor is (B, max, D) (after the stream's last layer) instead of rows.
    """

    counts: list[int]
    real: list[int]
    cu: torch.Tensor
    pos: torch.Tensor
    bidx: torch.Tensor
    length: int
    padded: bool = False
    offsets: list[int] = field(init=False, repr=False)
    _cache: dict[str, torch.Tensor] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        off = [0]
        for c in self.counts:
            off.append(off[-1] + c)
        self.offsets = off

    @property
    def batch(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @property
    def max(self) -> int:
        return max(self.counts)

    @property
    def starts(self) -> torch.Tensor:
        """(B,) row of each instance's [CLS]."""
        if "starts" not in self._cache:
            self._cache["starts"] = self.cu[:-1].long()
        return self._cache["starts"]

    @property
    def flat(self) -> torch.Tensor:
        """(R,) index of each row in the (B * length) original tokens."""
        if "flat" not in self._cache:
            self._cache["flat"] = self.bidx * self.length + self.pos
        return self._cache["flat"]

    @property
    def slots(self) -> torch.Tensor:
        """(R,) index of each row in the unpacked (B * max) layout."""
        if "slots" not in self._cache:
            within = torch.arange(self.total, device=self.bidx.device) - self.starts.index_select(0, self.bidx)
            self._cache["slots"] = self.bidx * self.max + within
        return self._cache["slots"]

    def as_padded(self, padded: bool = True) -> "Packing":
        out = replace(self, padded=padded)
        out._cache = self._cache  # same rows, same indices
        return out


@dataclass(eq=False)
class PackedCall:
    """What a packed :class:`~trimkit.ops.TrimAttention` needs: the queries' and keys' packings and
    the runtime's list of deferred bias checks."""

    q: Packing
    k: Packing
    checks: list


def nonzero(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D mask whose count the host already knows (no sync on GPU)."""
    if mask.device.type == "cpu":
        return mask.nonzero().squeeze(1)
    return torch.nonzero_static(mask, size=count).squeeze(1)


def fetch(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Copy several small integer/bool tensors to the host in one transfer (one synchronisation)."""
    if not tensors:
        return []
    # one cat (bool and integer parts promote to one integer dtype) and one copy: no per-part casts
    flat = [t if t.dim() == 1 else t.reshape(-1) for t in tensors]
    flat = (flat[0] if len(flat) == 1 else torch.cat(flat)).tolist()
    out, i = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[i:i + n])
        i += n
    return out


def fetch_row(tensors: list[torch.Tensor]) -> list[list[float]]:
    """:func:`fetch` for (1, n_i) tensors (a batch-1 layer's logits, as the trimmers give them): one
    cat along the last dimension and one copy, no reshape per part. Half-precision floats are widened
    to float32 first, so integer parts (positions) cat into values that stay exact."""
    if not tensors:
        return []
    parts = [t.float() if t.is_floating_point() and t.element_size() < 4 else t for t in tensors]
    flat = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).tolist()[0]
    out, i = [], 0
    for t in tensors:
        n = t.shape[-1]
        out.append(flat[i:i + n])
        i += n
    return out


def _cu(counts_dev: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(counts_dev.numel() + 1, dtype=torch.int32, device=counts_dev.device)
    cu[1:] = counts_dev.cumsum(0)
    return cu


def packing_of(keep: torch.Tensor, counts: list[int], counts_dev: torch.Tensor, real: list[int]) -> tuple[torch.Tensor, Packing]:
    """The packing of the True entries of ``keep`` (B, N); also returns their flat indices (B * N)."""
    B, N = keep.shape
    sel = nonzero(keep.reshape(-1), sum(counts))
    bidx = torch.div(sel, N, rounding_mode="floor")
    return sel, Packing(counts, real, _cu(counts_dev), sel - bidx * N, bidx, N)


def pack_tokens(hidden: torch.Tensor, keep: torch.Tensor, counts: list[int], counts_dev: torch.Tensor,
                real: list[int]) -> tuple[torch.Tensor, Packing]:
    """Pack a (B, N, D) stream: the rows where ``keep`` (B, N) is True -> ((R, D) rows, packing)."""
    B, N = keep.shape
    sel, pack = packing_of(keep, counts, counts_dev, real)
    return hidden.reshape(B * N, *hidden.shape[2:]).index_select(0, sel), pack


def select_rows(rows: torch.Tensor, pack: Packing, keep: torch.Tensor, counts: list[int],
                counts_dev: torch.Tensor) -> tuple[torch.Tensor, Packing]:
    """Keep the rows where ``keep`` (R,) is True -> (rows, packing)."""
    sel = nonzero(keep, sum(counts))
    new = Packing(counts, pack.real, _cu(counts_dev), pack.pos.index_select(0, sel), pack.bidx.index_select(0, sel),
                  pack.length)
    return rows.index_select(0, sel), new


def unpack(rows: torch.Tensor, pack: Packing) -> torch.Tensor:
    """(R, ...) rows -> (B, max, ...): each instance's rows first, zeros after them."""
    out = rows.new_zeros((pack.batch * pack.max, *rows.shape[1:]))
    out.index_copy_(0, pack.slots, rows)
    return out.view(pack.batch, pack.max, *rows.shape[1:])


def repack(padded: torch.Tensor, pack: Packing) -> torch.Tensor:
    """(B, max, ...) unpacked layout -> (R, ...) rows."""
    return padded.reshape(pack.batch * pack.max, *padded.shape[2:]).index_select(0, pack.slots)


def gather(tensor: Any, pack: Packing, dim: int) -> Any:
    """Gather a tensor made at the stream's original length (token dimension ``dim``; batch
    dimension 0, or 1 when ``dim`` is 0) to the packed rows, or to the unpacked (B, max) layout
    when ``pack.padded``. Size-1 batch or token dimensions broadcast."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    dim = dim % tensor.dim()
    bdim = 1 if dim == 0 else 0
    nb, nt = tensor.shape[bdim], tensor.shape[dim]
    if nt not in (pack.length, 1) or nb not in (pack.batch, 1):
        raise ValueError(
            f"trimkit packed mode: a tensor of shape {tuple(tensor.shape)} declared with a token dimension {dim} "
            f"is not at the stream's original length {pack.length} for batch {pack.batch} (declare only tensors "
            "made at the original length in hidden_token_args/context_token_args/TokenArg)")
    if nb == 1 and nt == 1:
        return tensor
    x = tensor.movedim((bdim, dim), (0, 1))
    rest = x.shape[2:]
    if nt == 1:
        g = x[:, 0].index_select(0, pack.bidx)
    elif nb == 1:
        g = x[0].index_select(0, pack.pos)
    else:
        g = x.reshape(nb * nt, *rest).index_select(0, pack.flat)
    g = unpack(g, pack) if pack.padded else g.unsqueeze(0)
    return g.movedim((0, 1), (bdim, dim))


def key_bias_flag(bias: torch.Tensor | None, k: Packing) -> torch.Tensor | None:
    """Validate an attention bias for packed attention; returns a device flag that is True if the bias
    is non-zero on a kept key (checked once at the end of the forward, no sync here)."""
    if bias is None:
        return None
    shape = tuple(bias.shape)
    keys = k.max if k.padded else k.total
    batches = (1, k.batch) if k.padded else (1,)
    if bias.dim() and shape[-1] in (keys, 1) and all(s == 1 for s in shape[1:-1]) and (
            bias.dim() == 1 or shape[0] in batches):
        return bias.ne(0).any()  # padded layout: slots beyond each count are 0 (gathered by unpack)
    if bias.dim() and shape[0] == k.batch and all(s == 1 for s in shape[1:-1]) and shape[-1] == k.length:
        raise RuntimeError(
            f"trimkit packed mode: an attention bias of shape {shape} is still at the keys' original length: "
            "the adapter must declare it in LayerSpec.hidden_token_args/context_token_args (StreamUpdate.token_args for "
            "the other stream of a two-stream layer) so it is gathered")
    raise NotImplementedError(
        f"trimkit packed mode supports only key-padding attention biases (broadcastable to (B, 1, 1, Nk), 0 on real "
        f"tokens); got shape {shape}. Causal, relative-position or per-head biases need masked batches: use "
        "tmodel.inference = 'remove' (batch 1 physically trimmed, larger batches masked)")


def key_padding_bias(k: Packing, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, max) additive mask of the unpacked layout: 0 on each instance's rows, -inf after them."""
    name = f"kpb_{dtype}"
    if name not in k._cache:
        counts = k.cu[1:] - k.cu[:-1]
        slots = torch.arange(k.max, device=k.cu.device)
        bias = torch.zeros(k.batch, k.max, dtype=dtype, device=k.cu.device)
        k._cache[name] = bias.masked_fill(slots[None, :] >= counts[:, None], float("-inf"))[:, None, None, :]
    return k._cache[name]


def token_logits(policy: Any, rows: torch.Tensor, pack: Packing, cls_self: torch.Tensor,
                 cls_context: torch.Tensor | None) -> torch.Tensor:
    """A token trimmer's logits (R,) for packed rows (see the module docstring)."""
    fn = getattr(policy, "packed_logits", None)
    if fn is not None:
        return fn(rows, cls_self, cls_context, pack.bidx)
    logits = policy(unpack(rows, pack), cls_self, cls_context)  # (B, max)
    return logits.reshape(-1).index_select(0, pack.slots)


def _varlen_flash_ok(q: torch.Tensor) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8 or q.shape[-1] > 256:
        return False
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: Packing, kp: Packing,
                     scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T) v per instance for packed rows: q (Rq, H, d), k/v (Rk, H, d) -> (Rq, H, dv).

    CUDA half/bfloat16: one ``torch.nn.attention.varlen.varlen_attn`` (flash) call over the whole
    batch. Otherwise (CPU, float32): one SDPA call per instance on its slices (host-known counts);
    measured on 2 CPU threads faster than padding inside attention, and exact (no padded keys).
    ``causal``: each instance's rows causally, aligned as sdpa's ``is_causal`` (top left) also when an
    instance keeps different numbers of queries and keys; always the per-instance path (flash
    kernels align a causal mask bottom right).
    """
    if not causal and _varlen_flash_ok(q):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, qp.cu, kp.cu, qp.max, kp.max, scale=scale)
    outs = []
    qo, ko = qp.offsets, kp.offsets
    for b in range(qp.batch):
        qb = q[qo[b]:qo[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[ko[b]:ko[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ko[b]:ko[b + 1]].transpose(0, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale, is_causal=causal)[0].transpose(0, 1))
    return torch.cat(outs, 0)
