"""The mask semantics: where tokens and heads are masked (training) or really dropped (inference).

One rewritten graph serves every mode; only these operations change behaviour:

* :meth:`Runtime.token_step` turns a layer's token logits into the stream's new
  :class:`TokenState` in the masked modes (``sample``, ``hard``): a mask multiplied into the
  previous one, so a dropped token stays dropped.
* :meth:`Runtime.remove_step` (mode ``remove``, batch 1) takes a layer's token decision and all its
  head decisions with one host synchronisation; the kept tokens are gathered
  (``hidden.index_select``) and the state remembers their original positions.
* Mode ``packed`` (batches): the kept tokens of the whole batch are one row matrix, see
  :mod:`trimkit.engine.packed`; :class:`trimkit.executors.PackedExecutor` takes a layer's
  decisions (one host synchronisation) and selects the kept rows.
* :class:`TrimAttention` recomputes an attention module with its own weights: a masked token is
  neither key nor value (``log(mask)`` added to the scores), a masked head's output is scaled by its
  mask; in mode ``remove`` only the kept heads are computed; in mode ``packed`` attention runs per
  instance by cumulative sequence lengths and heads are masked per instance.
* :func:`align` gathers tensors created at a stream's original length (padding masks, states
  that skip layers) to the kept tokens.

The contract (tested with hypothesis): with the same hard masks, the masked forward, the physically
trimmed forward and the packed forward agree on every kept token; with every mask 1 they equal the
model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .engine import packed as P
from .headcache import KeptHeadCache
from .refs import Borrowed, borrowed
from .engine.packed import Packing, PackedCall
from .spec import AttentionSpec

MODES = ("off", "sample", "hard", "remove", "packed", "padded")
"""off: trimmers bypassed (the full model). sample: training masks from the sampler. hard: binary
masks (pi > 0) applied as masks, nothing removed. remove: binary masks, tokens/heads removed
(batch 1). packed: binary masks, the kept tokens of a batch packed into rows (any batch).
padded: as packed, but each layer runs on (B, max kept, D) with key-padding masks (the baseline
packing is measured against)."""


class NonFiniteError(ValueError):
    """A trimmer's logits were NaN or inf: the input (or the trimmers) is not finite."""


@dataclass
class TokenState:
    """What has been trimmed from one stream so far.

    ``mask`` (B, N) in [0, 1] over the stream's original tokens (modes sample/hard), or ``index``
    (N_kept,) the original positions of the tokens still present (mode remove), or ``packing``
    (mode packed, :class:`~trimkit.engine.packed.Packing`). All ``None``: nothing trimmed yet.
    """

    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    length: int = 0  # the stream's original token count (mode remove)
    packing: Packing | None = None


@dataclass(frozen=True)
class SlicedHeads:
    """A kernel-route call whose projections computed the kept heads only
    (``AttentionSpec.head_slices``): what the kernel checks the queries and keys against.

    ``path``: the attention module (for errors). ``heads``: the kept query heads (H_kept,) long.
    ``total``: the module's query heads. ``head_dim``: their size. ``kv_heads``: the kept key/value
    heads' count. ``kv_index``: per kept query head, its key/value head among the kept ones
    (``None``: one each, in order)."""

    path: str
    heads: torch.Tensor
    total: int
    head_dim: int
    kv_heads: int
    kv_index: torch.Tensor | None


@dataclass
class AttnTrim:
    """Per-call instructions for one :class:`TrimAttention`."""

    key_mask: torch.Tensor | None = None  # (B, Nk) float, modes sample/hard
    head_mask: torch.Tensor | None = None  # (B, H) float, modes sample/hard/packed
    head_index: torch.Tensor | None = None  # (H_kept,) long, mode remove
    head_runs: list[tuple[int, int]] | None = None  # kept heads as [start, end) runs (host), mode remove
    packed: PackedCall | None = None  # mode packed
    sliced: SlicedHeads | None = None  # mode remove, route via="kernel" with head_slices: q/k/v are the kept heads'
    # attention dropout in train mode (TrimConfig.attention_dropout): "kernel_only" = as the module's own
    # kernel call passes it (route via="kernel"), none where trimkit recomputes attention; "model" = the
    # module's own probability on every route; "none" = never
    dropout: str = "kernel_only"
    # called as capture(query, key, mask, scale, is_causal, trim) by the kernel before it attends (route
    # via="kernel"): how an attention probe (trimkit.probe) reads this call's queries and keys
    capture: Any = None


class Record:
    """One trimmer's decision in the last forward (for the cost loss, MACs and visualisation).

    ``keep``: (B,) kept fraction per instance (differentiable in mode sample); ``mask``: (B, N) or
    (B, H) current mask (modes sample/hard/packed heads); ``index``: kept original indices (mode
    remove); ``total``: N or H before this layer's trimming (original count); ``counts``: kept
    tokens per instance (mode packed); ``entering``: (B,) kept fraction of the tokens that *entered*
    this layer (token records of modes sample/hard; ``keep`` is over the original count). In mode remove ``keep`` and ``index`` are given as host
    numbers and become tensors when first read: a batch-1 forward makes a dozen records that
    inference never reads, and each tensor built costs several operator dispatches."""

    __slots__ = ("key", "kind", "target", "_keep", "mask", "_index", "total", "counts", "entering")

    def __init__(self, key: str, kind: str, target: float, keep: "torch.Tensor | list[float]",
                 mask: torch.Tensor | None = None, index: "torch.Tensor | list[int] | None" = None, total: int = 0,
                 counts: list[int] | None = None, entering: torch.Tensor | None = None) -> None:
        self.key, self.kind, self.target = key, kind, target
        self._keep, self.mask, self._index, self.total, self.counts = keep, mask, index, total, counts
        self.entering = entering

    @property
    def keep(self) -> torch.Tensor:
        if not isinstance(self._keep, torch.Tensor):
            self._keep = torch.tensor(self._keep, dtype=torch.float32)
        return self._keep

    @keep.setter
    def keep(self, value: torch.Tensor) -> None:
        self._keep = value

    @property
    def index(self) -> torch.Tensor | None:
        if self._index is not None and not isinstance(self._index, torch.Tensor):
            self._index = torch.tensor(self._index, dtype=torch.long)
        return self._index

    @index.setter
    def index(self, value: torch.Tensor | None) -> None:
        self._index = value

    def __repr__(self) -> str:
        return (f"Record(key={self.key!r}, kind={self.kind!r}, target={self.target}, keep={self._keep}, "
                f"total={self.total})")


def _runs(index: list[int]) -> list[tuple[int, int]]:
    """Sorted head indices -> maximal [start, end) runs of consecutive heads."""
    runs: list[tuple[int, int]] = []
    for i in index:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def group_logits(logits: torch.Tensor, group: int, where: str) -> torch.Tensor:
    """A stream that drops tokens in runs (:attr:`~trimkit.spec.StreamSpec.group`): token logits
    ``(..., N)`` with each run of ``group`` consecutive tokens given the mean of its logits, so every
    decision taken from them (a threshold, a sample per run) keeps or drops the run whole. ``where``
    names the trimmer in the error for a length that is not whole runs."""
    if group == 1:
        return logits
    n = logits.shape[-1]
    if n % group:
        raise ValueError(f"{where}: {n} tokens are not whole runs of {group} (StreamSpec.group): every instance's "
                         f"tokens (and real tokens) must come in runs of {group}")
    return logits.unflatten(-1, (n // group, group)).mean(-1).repeat_interleave(group, dim=-1)


@dataclass
class Runtime:
    """State shared by every trimmed layer during one forward of a :class:`TrimmedModel`."""

    mode: str = "off"
    sampler: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    temperature: float = 1.0
    padding: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> (B, N) 1 = real
    records: list[Record] = field(default_factory=list)
    # key -> logits override (tests, profiling, calibration); "layer:segment" keys apply to that segment in mode remove
    forced: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)  # key -> current (scheduled) target
    real: dict[str, list[int]] = field(default_factory=dict)  # stream -> real tokens per instance (mode packed)
    checks: list[torch.Tensor] = field(default_factory=list)  # deferred device flags (mode packed)
    context_packings: dict[tuple, Packing] = field(default_factory=dict)  # packings of unpacked contexts
    streams: dict[str, TokenState | None] = field(default_factory=dict)  # stream -> state after its latest layer call
    sizes: dict[str, int] = field(default_factory=dict)  # "INPUT:DIM" -> size, for segment lengths (per forward)
    segment_real: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> (B, K) real tokens per segment
    nonfinite: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (trimmer key, its logits), per forward
    segment_padding: dict[str, list] = field(default_factory=dict)  # stream -> per segment (B, n_k) mask or None
    segment_starts: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> (B, K) starts (per forward)
    layouts: dict[str, Any] = field(default_factory=dict)  # stream -> its SegmentLayout (per forward)
    specs: dict[str, Any] = field(default_factory=dict)  # stream -> its StreamSpec (set by the rewrite)
    deferred: list[tuple[str, torch.Tensor, Any]] = field(default_factory=list)  # (message, device flag, values)
    attention_dropout: str = "kernel_only"  # TrimConfig.attention_dropout, handed to each masked attention call
    fuse_trimmers: bool = True  # inference: a layer's trimmers in their fused form (LayerTrimmers.fused), if any
    # mode remove: kept counts padded to buckets, layer bodies maybe compiled (trimkit.engine.buckets.Bucketing)
    bucketing: Any = None

    def begin(self, mode: str) -> None:
        """Reset the per-forward state."""
        self.mode = mode
        self.records = []
        self.padding = {}
        self.real = {}
        self.checks = []
        self.context_packings = {}
        self.streams = {}
        self.segment_real = {}
        self.nonfinite = []
        self.segment_padding = {}
        self.segment_starts = {}
        self.layouts = {}
        self.deferred = []

    def defer(self, message: str, flag: torch.Tensor, values: Any = None) -> None:
        """A check of an input's values left on the device (no host sync in the forward): ``flag`` True
        means bad; :meth:`check_finite` raises ``ValueError(message)`` after the forward."""
        self.deferred.append((message, flag, values))

    def watch(self, key: str, logits: torch.Tensor) -> None:
        """Note a trimmer's logits, to check them for NaN/inf once, after the forward
        (:meth:`check_finite`): a NaN logit would silently count as "drop" and the trimmed model
        would answer where the model gives NaN."""
        self.nonfinite.append((key, logits))

    def _watch_host(self, key: str, logits: torch.Tensor, values: list[float]) -> None:
        """:meth:`watch` for logits already on the host (mode remove): noted only if one is not finite."""
        if not math.isfinite(sum(values)):  # a NaN or inf anywhere makes the sum non-finite
            self.nonfinite.append((key, logits))

    def check_finite(self) -> None:
        """After a forward: raise ``ValueError`` for an input a deferred check refused (:meth:`defer`),
        then :class:`NonFiniteError` if a trimmer saw non-finite logits (one sync each, when there are any)."""
        if self.deferred and bool(torch.stack([f.reshape(()) for _, f, _ in self.deferred]).any()):
            for message, flag, values in self.deferred:
                if bool(flag):
                    got = f"; got {values.tolist()}" if isinstance(values, torch.Tensor) else ""
                    raise ValueError(message + got)
        if not self.nonfinite:
            return
        with torch.no_grad():  # one isfinite over every trimmer's logits and one sync; per trimmer only if bad
            try:
                ok = bool(torch.isfinite(torch.cat([t.reshape(-1) for _, t in self.nonfinite])).all())
            except RuntimeError:  # logits on several devices
                ok = all(bool(torch.isfinite(t).all()) for _, t in self.nonfinite)
            if ok:
                return
            bad = [k for k, t in self.nonfinite if not bool(torch.isfinite(t).all())]
        raise NonFiniteError(
            f"trimkit: non-finite trimmer logits (NaN or inf) at {bad[:4]}{' ...' if len(bad) > 4 else ''}: the "
            "input holds NaN/inf values (the untrimmed model gives NaN on it too) or the trimmers' weights "
            "diverged; check the input (e.g. torch.isfinite(pixel_values).all()) or the checkpoint")

    def _binary(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits > 0).to(logits.dtype)

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mode == "sample":
            if self.sampler is None:
                raise RuntimeError("trimkit: mode 'sample' needs a sampler")
            # non-finite logits are reported after the forward (watch/check_finite), with the trimmer's name,
            # instead of inside the sampler's own argument validation
            return self.sampler(torch.nan_to_num(logits), self.temperature)
        return self._binary(logits)

    # --- masked modes (sample, hard) -------------------------------------------------------
    def token_step(
        self, key: str, stream: str, logits: torch.Tensor, hidden: torch.Tensor, state: TokenState | None, token_dim: int,
        protected: list[int] | torch.Tensor | None = None, segments: tuple[list[str], torch.Tensor] | None = None,
        group: int = 1,
    ) -> tuple[TokenState, torch.Tensor]:
        """Apply a token trimmer's logits (B, N_cur) to a stream; returns (new state, new hidden).

        ``protected``: positions always kept (default: the [CLS] at 0), the same for every instance
        (a list) or per instance (a (B, P) tensor: a segmented stream's summary tokens). ``segments``:
        (names, segment of each position, (N,) or per instance (B, N)) of a segmented stream: one
        record per segment, keyed ``"{key}:{name}"``, with that segment's kept fraction. ``group``: the
        stream drops tokens in runs of that many (:func:`group_logits`; one sample per run)."""
        if self.mode == "remove":  # one token trimmer alone (the layer path uses remove_step)
            kept = None if protected is None else (protected[0] if isinstance(protected, torch.Tensor) else
                                                   torch.tensor(list(protected), dtype=torch.long))
            state, hidden, _ = self.remove_step(key, logits, [], hidden, state, token_dim, kept, group=group,
                                                stream=stream)
            return state, hidden
        logits = self.forced.get(key, logits)
        self.watch(key, logits)
        if group > 1:
            pad = self.padding.get(stream)
            if pad is not None and tuple(pad.shape) == tuple(logits.shape):  # each instance's real tokens whole runs
                real = (pad != 0).sum(1)
                self.defer(f"token trimmer {key!r}: stream {stream!r} drops tokens in runs of {group} "
                           "(StreamSpec.group), but an instance's real tokens are not whole runs (pad each instance "
                           "to whole runs); real tokens per instance", (real % group != 0).any(), real)
            logits = group_logits(logits, group, f"token trimmer {key!r}")
            m = self._mask(logits[..., ::group]).repeat_interleave(group, dim=-1)  # one sample per run
        else:
            m = self._mask(logits)
        if protected is None:
            ones = torch.ones_like(m[:, :1])
            m = torch.cat([ones, m[:, 1:]], dim=1)  # [CLS] always kept (no in-place write on a graph tensor)
        elif isinstance(protected, torch.Tensor):  # per instance
            keep_always = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
            keep_always.scatter_(1, protected.to(m.device), True)
            m = torch.where(keep_always, torch.ones_like(m), m)
        else:
            keep_always = torch.zeros(m.shape[1], dtype=torch.bool, device=m.device)
            keep_always[protected] = True
            m = torch.where(keep_always, torch.ones_like(m), m)
        prev = state.mask if state is not None and state.mask is not None else None
        mask = m if prev is None else prev * m
        pad = self.padding.get(stream)
        if pad is not None and tuple(pad.shape) != tuple(mask.shape):
            raise ValueError(f"stream {stream!r}: its padding mask has shape {tuple(pad.shape)} but the stream's tokens are "
                             f"{tuple(mask.shape)} at {key!r}: the padding input (StreamSpec.padding_input / "
                             "padding_source / Segment.padding_input) must be the stream's own (B, N) mask")
        pad = pad.to(mask.dtype) if pad is not None else torch.ones_like(mask)
        tiny = torch.finfo(mask.dtype).tiny
        if segments is None:
            keep = (mask * pad).sum(1) / pad.sum(1).clamp_min(1)
            entering = keep if prev is None else (mask * pad).sum(1) / (prev * pad).sum(1).clamp_min(tiny)
            self.records.append(Record(key, "token", self.targets.get(key, 1.0), keep, mask=mask, total=mask.shape[1],
                                       entering=entering))
        else:
            names, member = segments
            for k, name in enumerate(names):
                sel = pad * (member == k).to(mask.dtype)
                keep = (mask * sel).sum(1) / sel.sum(1).clamp_min(1)
                entering = keep if prev is None else (mask * sel).sum(1) / (prev * sel).sum(1).clamp_min(tiny)
                seg_key = f"{key}:{name}"
                self.records.append(Record(seg_key, "token", self.targets.get(seg_key, 1.0), keep, mask=mask,
                                           total=mask.shape[1], entering=entering))
        return TokenState(mask=mask), hidden

    def head_step(self, key: str, logits: torch.Tensor) -> AttnTrim:
        """Apply a head trimmer's logits (B, H) (masked modes; mode remove takes heads in remove_step)."""
        logits = self.forced.get(key, logits)
        self.watch(key, logits)
        target = self.targets.get(key, 1.0)
        heads = logits.shape[1]
        if self.mode == "remove":
            index = (logits[0] > 0).nonzero().squeeze(1)
            kept = torch.tensor([index.numel() / heads], dtype=torch.float32)
            self.records.append(Record(key, "head", target, kept, index=index, total=heads))
            return AttnTrim(head_index=index, head_runs=_runs(index.tolist()))
        m = self._mask(logits)
        self.records.append(Record(key, "head", target, m.mean(1), mask=m, total=heads))
        return AttnTrim(head_mask=m)

    # --- mode remove (batch 1) ---------------------------------------------------------------
    def remove_step(
        self, key: str, token_logits: torch.Tensor | None, head_logits: list[torch.Tensor | None],
        hidden: torch.Tensor, state: TokenState | None, token_dim: int,
        protected: torch.Tensor | None = None, segments: tuple[list[str], torch.Tensor, list[int]] | None = None,
        stream: str | None = None, group: int = 1,
    ) -> tuple[TokenState | None, torch.Tensor, list[AttnTrim | None]]:
        """Mode remove (batch 1): a layer's token decision and all its head decisions, taken with one
        host synchronisation. Returns (new token state, hidden with the kept tokens gathered, per
        attention an :class:`AttnTrim` with the kept heads' runs, or ``None`` without a head trimmer)."""
        # every logit goes to the host as it is (no comparison or finiteness op per trimmer on the device):
        # the decisions, the kept index and the NaN check are taken there, from one transfer
        parts: list[torch.Tensor] = []
        pad = None
        if token_logits is not None:
            token_logits = self.forced.get(key, token_logits)
            if token_logits.shape[0] != 1:
                raise RuntimeError("trimkit: physical token removal runs at batch 1 (use mode 'packed' for batches)")
            if segments is not None:
                token_logits = self._forced_segments(key, token_logits, segments)
            # runs kept or dropped whole: their means taken on the device as the masked and packed modes take
            # them (the same arithmetic, so the decisions agree to the bit)
            raw_logits, token_logits = token_logits, group_logits(token_logits, group, f"token trimmer {key!r}")
            parts.append(token_logits)
            if protected is not None:
                parts.append(protected.view(1, -1))  # the always-kept positions (segment summaries, a last token)
            if segments is not None:
                parts.append(segments[1].reshape(1, -1))  # each token's segment, fetched in the same synchronisation
            pad = self.padding.get(stream) if stream is not None else None
            prev_index = state.index if state is not None and state.index is not None else None
            length0 = state.length if prev_index is not None else token_logits.shape[1]
            if pad is not None and tuple(pad.shape) == (1, length0):  # padding counts neither as kept nor as total
                real0 = pad[0] != 0 if pad.device == token_logits.device else pad[0].to(token_logits.device) != 0
                parts.append((real0.index_select(0, prev_index) if prev_index is not None else real0).view(1, -1))
                parts.append(real0.view(1, -1))
            else:
                pad = None
        heads = []
        for i, h in enumerate(head_logits):
            if h is not None:
                h = self.forced.get(f"{key}.{i}", h)
                parts.append(h)
            heads.append(h)
        host = P.fetch_row(parts)  # the one host synchronisation of this layer
        if token_logits is not None:
            values = host.pop(0)
            self._watch_host(key, raw_logits, values)
            flags = [v > 0 for v in values]  # NaN: dropped (and reported after the forward)
            for j in (host.pop(0) if protected is not None else (0,)):  # [CLS] / the summaries: always kept
                flags[int(j)] = True
            seg_of = host.pop(0) if segments is not None else None
            real_cur = host.pop(0) if pad is not None else [1] * len(flags)
            real_all = host.pop(0) if pad is not None else None
            if group > 1 and real_all is not None and sum(real_all) % group:
                raise ValueError(f"token trimmer {key!r}: the stream drops tokens in runs of {group} (StreamSpec.group), "
                                 f"but this instance has {sum(real_all)} real tokens: pad each instance to whole runs")
            n_cur = len(flags)
            kept_at = [j for j, f in enumerate(flags) if f]
            n_kept = len(kept_at)
            prev = state.index if state is not None and state.index is not None else None
            length = state.length if prev is not None else n_cur
            if n_kept < n_cur:
                local = torch.tensor(kept_at, dtype=torch.long, device=hidden.device)
                hidden = hidden.index_select(token_dim, local)  # a contiguous copy of the kept tokens
                index = prev.index_select(0, local) if prev is not None else local
            else:
                index = prev if prev is not None else torch.arange(n_cur, device=hidden.device)
            n_real = sum(real_all) if real_all is not None else length
            if segments is None:
                kept_real = sum(r for f, r in zip(flags, real_cur) if f)
                self.records.append(Record(key, "token", self.targets.get(key, 1.0), [kept_real / max(n_real, 1)],
                                           index=index, total=length))
            else:
                names, _, bounds = segments
                for k, name in enumerate(names):
                    n_k = sum(r for f, g, r in zip(flags, seg_of, real_cur) if f and g == k)
                    total_k = (sum(real_all[bounds[k]:bounds[k + 1]]) if real_all is not None
                               else bounds[k + 1] - bounds[k])
                    seg_key = f"{key}:{name}"
                    self.records.append(Record(seg_key, "token", self.targets.get(seg_key, 1.0),
                                               [n_k / max(total_k, 1)],
                                               index=index, total=length))
            state = TokenState(index=index, length=length)
        trims: list[AttnTrim | None] = []
        for i, h in enumerate(heads):
            if h is None:
                trims.append(None)
                continue
            values = host.pop(0)
            k = f"{key}.{i}"
            self._watch_host(k, h, values)
            flags = [v > 0 for v in values]
            index = [j for j, f in enumerate(flags) if f]
            self.records.append(Record(k, "head", self.targets.get(k, 1.0), [len(index) / len(flags)],
                                       index=index, total=len(flags)))
            # every head kept: the plain dense path (no slicing at all)
            trims.append(AttnTrim() if len(index) == len(flags) else AttnTrim(head_runs=_runs(index)))
        return state, hidden, trims

    def _forced_segments(self, key: str, logits: torch.Tensor, segments: tuple) -> torch.Tensor:
        """Mode remove: :attr:`forced` logits given per segment (``"layer:segment"`` keys, what calibrating
        a segmented stream's per-segment targets forces) applied to that segment's current tokens."""
        if type(self.forced) is dict and not self.forced:  # the usual inference: nothing forced (a mapping
            return logits                                     # that computes its logits may look empty)
        names, member = segments[0], segments[1]
        hits = [(k, f"{key}:{name}") for k, name in enumerate(names) if f"{key}:{name}" in self.forced]
        if not hits:
            return logits
        logits = logits.clone()
        member = member.reshape(-1).to(logits.device)
        for k, seg_key in hits:
            at = torch.nonzero(member == k).flatten()
            if at.numel():
                sub = logits[:, at]
                got = self.forced.get(seg_key, sub)
                if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(sub.shape):
                    raise ValueError(f"Runtime.forced[{seg_key!r}]: expected logits of the segment's current tokens "
                                     f"{tuple(sub.shape)}, got {tuple(getattr(got, 'shape', ()))} (segment keys take "
                                     "a callable mapping such as trimkit_train.demo's, per call)")
                logits[:, at] = got.to(logits.dtype)
        return logits

    # --- mode packed (batches) ----------------------------------------------------------------
    def real_tokens(self, stream: str, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor | None, list[int]]:
        """Mode packed: the stream's real-token mask (B, N) (``None``: no padding) and real counts (host)."""
        pad = self.padding.get(stream)
        if pad is not None and tuple(pad.shape) == (batch, length) and stream in self.real:
            empty = [b for b, n in enumerate(self.real[stream]) if n == 0]
            if empty:
                raise ValueError(f"trimkit packed mode: instance(s) {empty} of the batch have no real token in stream "
                                 f"{stream!r} (their padding mask is all 0): every instance needs at least its [CLS]; "
                                 "drop them from the batch, or run them masked (tmodel.inference = 'remove')")
            return pad.to(device=device).bool(), self.real[stream]
        if pad is not None and pad.shape[-1] != length:
            raise ValueError(f"stream {stream!r}: its padding mask has {pad.shape[-1]} positions but the stream has "
                             f"{length} tokens: the padding input (StreamSpec.padding_input / padding_source) must be "
                             "the stream's own (B, N) mask")
        return None, [length] * batch

    def context_packing(self, stream: str, context: torch.Tensor) -> Packing:
        """Mode packed: the packing of a context stream read before its own first layer (its real
        tokens); built once per forward and stream."""
        B, N = context.shape[:2]
        key = (stream, B, N, context.device)
        if key not in self.context_packings:
            mask, real = self.real_tokens(stream, B, N, context.device)
            keep = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=context.device)
            self.context_packings[key] = P.packing_of(keep, list(real), keep.sum(1), list(real))[1]
        return self.context_packings[key]

    def packed_record_tokens(self, key: str, pack: Packing) -> None:
        real = torch.tensor(pack.real, dtype=torch.float32).clamp_min(1)
        keep = torch.tensor(pack.counts, dtype=torch.float32) / real
        self.records.append(Record(key, "token", self.targets.get(key, 1.0), keep, index=pack.pos,
                                   total=pack.length, counts=list(pack.counts)))

    def packed_record_segments(self, key: str, stream: str, pack: Packing, names: list[str], member: torch.Tensor,
                               counts: list[list[int]] | None = None) -> None:
        """Mode packed, segmented stream: one record per segment (kept / real tokens of the segment)."""
        kept = torch.zeros(pack.batch, len(names), dtype=torch.float32, device=member.device)
        kept.index_put_((pack.bidx, member), torch.ones_like(member, dtype=torch.float32), accumulate=True)
        frac = kept / self.segment_real[stream].to(kept.device).clamp_min(1)
        for k, name in enumerate(names):
            seg_key = f"{key}:{name}"
            self.records.append(Record(seg_key, "token", self.targets.get(seg_key, 1.0), frac[:, k], index=pack.pos,
                                       total=pack.length, counts=list(counts[k]) if counts else list(pack.counts)))

    def packed_head_mask(self, key: str, logits: torch.Tensor) -> torch.Tensor:
        """A head trimmer's per-instance binary mask (B, H) in mode packed (no host sync)."""
        logits = self.forced.get(key, logits)
        self.watch(key, logits)
        m = self._binary(logits)
        self.records.append(Record(key, "head", self.targets.get(key, 1.0), m.mean(1), mask=m, total=m.shape[1]))
        return m


def align(tensor: Any, state: TokenState | None, dim: int) -> Any:
    """Gather a tensor made at the stream's original length to the tokens still present.

    A tuple or list (e.g. rotary ``(cos, sin)``) is gathered element by element."""
    if isinstance(tensor, (tuple, list)):
        return type(tensor)(align(t, state, dim) for t in tensor)
    if state is None or not isinstance(tensor, torch.Tensor):
        return tensor
    if state.packing is not None:
        return P.gather(tensor, state.packing, dim)
    if state.index is None:
        return tensor
    if tensor.shape[dim] == 1:  # broadcast dimension: nothing to gather
        return tensor
    if state.index.numel() == tensor.shape[dim] == state.length:  # nothing dropped yet
        return tensor
    index = state.index
    return tensor.index_select(dim, index if index.device == tensor.device else index.to(tensor.device))


def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Nk) keep mask -> additive (B, 1, 1, Nk) bias: log(mask), -inf where the mask is 0."""
    tiny = torch.finfo(mask.dtype).tiny
    bias = torch.where(mask > 0, mask.clamp_min(tiny).log(), torch.full_like(mask, float("-inf")))
    return bias.to(dtype)[:, None, None, :]


_NO_TRIM = AttnTrim()


class TrimAttention(nn.Module):
    """An attention module recomputed with its own weights, honouring token and head masks.

    It holds a reference to the original module (not a copy): parameters stay shared.
    """

    module = borrowed("module", "The model's attention module (registered in the model).")

    def __init__(self, module: nn.Module, spec: AttentionSpec) -> None:
        super().__init__()
        self.spec = spec
        self._borrowed = Borrowed(module=module)  # the model's own module: parameters stay shared
        self.head_cache = KeptHeadCache()  # small attentions: kept-head weights gathered once per kept set

    def _fused(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused [q; k; v] projection (timm ``qkv``, ``nn.MultiheadAttention`` ``in_proj``), if any."""
        m, s = self.module, self.spec
        if s.qkv is not None:
            fused = m.get_submodule(s.qkv)
            return fused.weight, fused.bias
        if s.in_proj is not None:
            return getattr(m, f"{s.in_proj}_weight"), getattr(m, f"{s.in_proj}_bias", None)
        return None

    def _sources(self) -> tuple[torch.Tensor | None, ...]:
        """The parameters the q/k/v projections are made of, as stored (no chunking): what the
        kept-head cache stamps."""
        fused = self._fused()
        if fused is not None:
            return fused
        m, s = self.module, self.spec
        q, k, v = (m.get_submodule(n) for n in (s.q, s.k, s.v))
        return q.weight, q.bias, k.weight, k.bias, v.weight, v.bias

    def _weights(self) -> tuple[torch.Tensor, ...]:
        fused = self._fused()
        if fused is not None:
            w, b = fused
            wq, wk, wv = w.chunk(3, 0)
            bq, bk, bv = b.chunk(3, 0) if b is not None else (None, None, None)
            return wq, bq, wk, bk, wv, bv
        m, s = self.module, self.spec
        q, k, v = (m.get_submodule(n) for n in (s.q, s.k, s.v))
        return q.weight, q.bias, k.weight, k.bias, v.weight, v.bias

    def _batch_first(self, x: torch.Tensor, ctx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A call's queries' and keys' inputs as (B, N, D), ``ctx`` None for a self-attention."""
        if ctx is x:
            ctx = None
        if not self.spec.batch_first:
            x = x.transpose(0, 1)
            ctx = ctx.transpose(0, 1) if ctx is not None else None
        return x, ctx

    def heads_qk(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One call's queries and keys per head, recomputed from the declared projections: q (B, H, Nq, d),
        k (B, H, Nk, d), and the call's additive bias (what an attention probe and FTKD's attention-map
        loss read)."""
        s = self.spec
        call = s.inputs(args, kwargs)
        x, ctx = call.x, call.context
        x, ctx = self._batch_first(x, ctx)
        q, k, _ = self._qkv(x, ctx)
        B, Nq = x.shape[:2]
        d = q.shape[-1] // s.num_heads
        q = q.view(B, Nq, s.num_heads, d).transpose(1, 2)
        k = k.view(B, k.shape[1], s.num_heads, d).transpose(1, 2)
        return q, k, call.bias

    def _qkv(self, x: torch.Tensor, ctx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of x (..., D) (keys from ctx, or x when None): (..., width) each.
        Self-attention with a fused projection is one matmul."""
        fused = self._fused() if ctx is None else None
        if fused is not None:
            q, k, v = F.linear(x, *fused).chunk(3, -1)
            return q, k, v
        wq, bq, wk, bk, wv, bv = self._weights()
        src = x if ctx is None else ctx
        return F.linear(x, wq, bq), F.linear(src, wk, bk), F.linear(src, wv, bv)

    def forward(self, *args: Any, trimkit_trim: AttnTrim | None = None, **kwargs: Any) -> Any:
        s = self.spec
        call = s.inputs(args, kwargs)
        trim = trimkit_trim or _NO_TRIM
        if trim.packed is not None:
            return s.output(self._packed(call.x, call.context, call.bias, trim))
        x, ctx, bias = call.x, call.context, call.bias
        x, ctx = self._batch_first(x, ctx)
        runs = trim.head_runs
        if runs is None and trim.head_index is not None:
            runs = _runs(trim.head_index.tolist())
        if runs is not None and trim.key_mask is not None:  # kept heads of keys with slack rows (mode remove, buckets)
            kb = key_bias(trim.key_mask, x.dtype)
            bias = kb if bias is None else bias.to(x.dtype) + kb
        y = self._dense(x, ctx, bias, trim) if runs is None else self._kept_heads(x, ctx, bias, runs)
        if not s.batch_first:
            y = y.transpose(0, 1)
        return s.output(y)

    def _dense(self, x: torch.Tensor, ctx: torch.Tensor | None, bias: torch.Tensor | None, trim: AttnTrim) -> torch.Tensor:
        """Every head computed; key and head masks applied (modes sample/hard/padded, and remove with
        every head kept). ``ctx`` None: self-attention."""
        s = self.spec
        heads = s.num_heads
        B, Nq, _ = x.shape
        Nk = Nq if ctx is None else ctx.shape[1]
        q, k, v = self._qkv(x, ctx)
        d = q.shape[-1] // heads
        q = q.view(B, Nq, heads, d).transpose(1, 2)
        k = k.view(B, Nk, heads, d).transpose(1, 2)
        v = v.view(B, Nk, heads, d).transpose(1, 2)
        mask = None if bias is None else (bias if bias.dtype == q.dtype else bias.to(q.dtype))
        if trim.key_mask is not None:
            kb = key_bias(trim.key_mask, q.dtype)
            mask = kb if mask is None else mask + kb
        p = 0.0
        if trim.dropout == "model" and self.module.training:
            from .kernels import module_dropout  # (kernels imports this module)

            p = module_dropout(self.module)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=s.scale)
        if trim.head_mask is not None:
            y = y * trim.head_mask.to(y.dtype)[:, :, None, None]
        y = y.transpose(1, 2).reshape(B, Nq, heads * d)
        if s.out is not None:
            out = self.module.get_submodule(s.out)
            y = F.linear(y, out.weight, out.bias)
        return y

    def _kept_heads(self, x: torch.Tensor, ctx: torch.Tensor | None, bias: torch.Tensor | None,
                    runs: list[tuple[int, int]]) -> torch.Tensor:
        """Mode remove: only the kept heads are computed.

        Kept heads are grouped into runs of consecutive heads; a run's q/k/v projection rows (and
        output-projection columns) are *views* of the weights, so nothing is copied: each run is one
        matmul per projection on views, its own attention call, and one accumulating matmul into the
        output projection. Measured on METER-base attention shapes (``benchmarks/heads_strategy.py``,
        D = 768, 12 heads, 24-325 tokens, 3-9 heads kept): 1.2-3.5x faster than computing every head
        and masking (which pays for the dropped heads' matmuls), and as fast as gathering the kept
        rows of the weights with ``index_select`` at 1 thread (within 5%), faster at 2 threads when
        few tokens are left (the gather copies ~3-4 x D x D_kept floats per attention and forward,
        as much memory traffic as the matmuls it saves).
        """
        s = self.spec
        heads = s.num_heads
        d = self._width() // heads
        if ctx is None:
            ctx = x
        B, Nq, _ = x.shape
        Nk = ctx.shape[1]
        mask = None if bias is None else (bias if bias.dtype == x.dtype else bias.to(x.dtype))
        out = self.module.get_submodule(s.out) if s.out is not None else None
        kept = sum(e - a for a, e in runs)
        if kept and self.head_cache.usable(d, kept, max(x.shape[-1], ctx.shape[-1]),
                                                    out.weight.shape[0] if out is not None else None):
            # small attention: one run on a gathered copy (cached per kept set) beats several runs on views
            # (and even one run: slicing six weight views is six dispatches per call)
            heads_kept = tuple(h for a, e in runs for h in range(a, e))
            wq, bq, wk, bk, wv, bv, wo, rows, wqkv, bqkv, wkv, bkv = self.head_cache.get(
                heads_kept, d, self._sources(), self._weights, out.weight if out is not None else None)
            if wqkv is not None and ctx is x:  # self-attention: q, k and v in one matmul
                q, k, v = F.linear(x, wqkv, bqkv).view(B, Nq, 3, kept, d).permute(2, 0, 3, 1, 4).unbind(0)
            elif wqkv is not None:  # cross-attention: keys and values in one matmul
                q = F.linear(x, wq, bq).view(B, Nq, kept, d).transpose(1, 2)
                k, v = F.linear(ctx, wkv, bkv).view(B, Nk, 2, kept, d).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q = F.linear(x, wq, bq).view(B, Nq, kept, d).transpose(1, 2)
                k = F.linear(ctx, wk, bk).view(B, Nk, kept, d).transpose(1, 2)
                v = F.linear(ctx, wv, bv).view(B, Nk, kept, d).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scale).transpose(1, 2)
            y = y.reshape(B, Nq, kept * d)
            if out is not None:
                return F.linear(y, wo, out.bias)
            # the model applies the output projection itself: every head's slot, zeros where dropped
            y = y if y.dtype == x.dtype else y.to(x.dtype)  # autocast: y may be lower
            return x.new_zeros(B, Nq, heads * d).index_copy_(2, rows, y)
        wq, bq, wk, bk, wv, bv = self._weights()
        if out is not None:
            acc = None
        else:  # the model applies the output projection itself: give it every head's slot (zeros when dropped)
            acc = x.new_zeros(B, Nq, heads * d)
        for a, e in runs:
            r0, r1 = a * d, e * d
            h = e - a
            q = F.linear(x, wq[r0:r1], None if bq is None else bq[r0:r1]).view(B, Nq, h, d).transpose(1, 2)
            k = F.linear(ctx, wk[r0:r1], None if bk is None else bk[r0:r1]).view(B, Nk, h, d).transpose(1, 2)
            v = F.linear(ctx, wv[r0:r1], None if bv is None else bv[r0:r1]).view(B, Nk, h, d).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scale).transpose(1, 2).reshape(B, Nq, h * d)
            if out is None:
                acc[..., r0:r1] = y
            elif acc is None:
                acc = F.linear(y, out.weight[:, r0:r1], out.bias)
            else:
                acc.view(B * Nq, -1).addmm_(y.view(B * Nq, h * d), out.weight[:, r0:r1].t())
        if acc is None:  # every head dropped: the attention contributes only the output bias
            acc = x.new_zeros(B, Nq, out.weight.shape[0])
            if out.bias is not None:
                acc = acc + out.bias
        return acc

    def _packed(self, x: torch.Tensor, ctx: torch.Tensor | None, bias: torch.Tensor | None, trim: AttnTrim) -> torch.Tensor:
        """Mode packed: x (1, Rq, D) rows of a batch, ctx (1, Rk, D) or None; attention per instance
        (:func:`~trimkit.engine.packed.varlen_attention`); per-instance head masks scale each row's
        heads (slicing weights per instance would not batch: every instance keeps other heads)."""
        s, pc = self.spec, trim.packed
        if pc.q.padded:
            return self._padded(x, ctx, bias, trim)
        bf = s.batch_first
        xr = _rows(x, bf, pc.q.total, "queries")
        cr = None if ctx is None or ctx is x else _rows(ctx, bf, pc.k.total, "keys")
        flag = P.key_bias_flag(bias, pc.k)
        if flag is not None:
            pc.checks.append(flag)
        heads = s.num_heads
        q, k, v = self._qkv(xr, cr)
        d = q.shape[-1] // heads
        q, k, v = q.view(-1, heads, d), k.view(-1, heads, d), v.view(-1, heads, d)
        y = P.varlen_attention(q, k, v, pc.q, pc.k, s.scale)
        if trim.head_mask is not None:
            y = y * trim.head_mask.to(y.dtype).index_select(0, pc.q.bidx)[:, :, None]
        y = y.reshape(xr.shape[0], heads * d)
        if s.out is not None:
            out = self.module.get_submodule(s.out)
            y = F.linear(y, out.weight, out.bias)
        return y.unsqueeze(0) if bf else y.unsqueeze(1)

    def _padded(self, x: torch.Tensor, ctx: torch.Tensor | None, bias: torch.Tensor | None, trim: AttnTrim) -> torch.Tensor:
        """Mode padded: (B, max kept, D) inputs, keys beyond each instance's count masked."""
        s, pc = self.spec, trim.packed
        x, ctx = self._batch_first(x, ctx)
        flag = P.key_bias_flag(bias, pc.k)
        if flag is not None:
            pc.checks.append(flag)
        mask = P.key_padding_bias(pc.k, x.dtype)
        if bias is not None:
            mask = mask + bias.to(x.dtype)
        y = self._dense(x, ctx, mask, AttnTrim(head_mask=trim.head_mask))
        return y if s.batch_first else y.transpose(0, 1)

    def _width(self) -> int:
        """The q projection's output width (all heads)."""
        s = self.spec
        if s.qkv is not None:
            return self.module.get_submodule(s.qkv).weight.shape[0] // 3
        if s.in_proj is not None:
            return getattr(self.module, f"{s.in_proj}_weight").shape[0] // 3
        return self.module.get_submodule(s.q).weight.shape[0]


def _rows(x: torch.Tensor, batch_first: bool, total: int, what: str) -> torch.Tensor:
    rows = x[0] if batch_first else x[:, 0]
    if x.shape[0 if batch_first else 1] != 1 or rows.shape[0] != total:
        raise RuntimeError(f"trimkit packed mode: the attention's {what} have shape {tuple(x.shape)}, expected "
                           f"packed rows of {total} tokens: the model changed the token layout between layers")
    return rows
