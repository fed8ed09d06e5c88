"""How an adapter *describes* a model to the core.

The vocabulary: :class:`StreamSpec` (a token stream, or several modalities as segments (:class:`Segment`)
of one sequence, with boundaries shared by the batch or per instance; its padding from an input or
from a tensor inside the model), :class:`LayerSpec`
(a layer whose input tokens may be trimmed; the stream it updates, the streams it reads, a second
stream it updates in the same call as :class:`StreamUpdate`, and arguments carrying tokens),
:class:`AttentionSpec` (one attention *call* inside a layer with its role, queries from one stream
and keys/values from another, run from declared projections or at the module's own kernel), and
:class:`TokenArg` (token-carrying arguments outside the layers). The core never edits model source:
it traces the model with torch.fx (:mod:`trimkit.trace`), rewrites the graph around the layers
(:mod:`trimkit.rewrite`) and runs them trimmed (:mod:`trimkit.layer`); ``print(tmodel.plan)`` shows
what it decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

ArgRef = int | str
"""A positional index or a keyword name of an argument in a module call."""


@dataclass(frozen=True)
class AttnCall:
    """One attention call in trimkit's terms.

    ``x``: queries' input (B, Nq, D). ``context``: keys/values' input (B, Nk, D), ``None`` for
    self-attention. ``bias``: additive float mask broadcastable to (B, heads, Nq, Nk) or ``None``.
    """

    x: torch.Tensor
    context: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _default_inputs(args: tuple, kwargs: dict) -> AttnCall:
    return AttnCall(args[0], args[1] if len(args) > 1 else kwargs.get("context"), kwargs.get("bias"))


@dataclass(frozen=True)
class AttentionSpec:
    """An attention module inside a layer, and how to compute it with its own weights.

    path: module path relative to the layer module, e.g. ``"attention.self"``.
    kind: ``"self"`` (keys from the layer's own stream) or ``"cross"`` (keys from the context stream).
    num_heads: number of heads. Projections are separate ``nn.Linear`` children (``q``, ``k``,
    ``v``), or one fused ``nn.Linear`` child ``qkv`` (timm) whose rows are [q; k; v], or one fused
    ``in_proj`` weight/bias pair as in ``nn.MultiheadAttention`` (``in_proj="in_proj"`` reads
    ``in_proj_weight`` and ``in_proj_bias``).
    out: name of the output projection child when the module applies it itself (timm, open_clip,
    ``nn.MultiheadAttention``); ``None`` when the module returns per-head contexts concatenated
    (HF BERT-style ``SelfAttention``), in which case the model applies the output projection.
    inputs: maps the module's call ``(args, kwargs)`` to an :class:`AttnCall`.
    output: maps trimkit's result (B, Nq, D) back to what the module's caller expects.
    batch_first: whether the module's tensors are (B, N, D) (else (N, B, D)).
    scale: softmax scale; ``None`` means ``head_dim ** -0.5``.
    via: how trimkit runs the attention. ``"projections"`` (default): recomputed from the declared
    projections (``q``/``k``/``v``, ``qkv`` or ``in_proj``, and ``out``), so dropped heads' projections
    are removed too; only for modules that are exactly "project, attend, project" (no RoPE, qk-norm,
    GQA...). ``"kernel"``: the module runs itself and only its ``softmax(QK^T)V`` call is intercepted
    (:mod:`trimkit.kernels`: ``F.scaled_dot_product_attention`` in its traced code, or transformers'
    ``AttentionInterface``), so whatever it does to q/k/v keeps working; the projection fields are
    then unused and dropped heads save their attention but not their projections (unless ``head_slices``).
    head_slices: route ``"kernel"``, mode ``remove``: the declared ``q``/``k``/``v`` projections (plain
    ``nn.Linear`` children) compute only the kept heads' rows and ``out`` only their columns, so dropped
    heads save their projections too. For modules that shape their projections by head *size* (HF's
    ``view(..., -1, head_dim)``: Llama, Qwen2, CLIP, SigLIP...), with grouped-query keys/values (a
    key/value head is kept while any query head it serves is). A call falls back to the full projections
    (heads then only skip their attention) when a projection is not a plain ``nn.Linear`` (LoRA,
    quantised; on the attention-interface route) or has hooks, when the module has forward pre-hooks or is
    passed a KV cache argument, or when an attention probe reads the call.
    call: which call of the module this describes, counted from 0 in the layer's forward, for a
    module the layer calls more than once in different roles (one cross-attention module used for
    text-to-image and image-to-text); ``None``: every call, all in this role.
    query_stream: the stream of the queries, in a layer that updates several streams
    (:attr:`LayerSpec.updates`); ``None``: the layer's own stream. Keys/values: the query stream
    itself for ``kind="self"``; for ``"cross"`` the ``context_stream`` named here, else the other of
    the layer's two streams.
    context / context_stream: for a cross-attention whose keys are *not* the layer's ``context``:
    the layer argument holding its keys/values and their stream (default: the layer's
    ``context_stream``). This is how a layer with several cross-attentions, one per context, is
    described (BLIP's NLVR2 text layers attend to each of two images). The argument's token state
    is found as the layer context's is (the state of the latest layer of that stream in the
    argument's data flow), so the attention sees exactly its own context's kept tokens; its head
    trimmer reads that context's [CLS]. The layer's token trimmer and ``context_token_args`` use
    the layer's ``context`` only.
    """

    path: str
    kind: str = "self"
    num_heads: int = 1
    q: str = "query"
    k: str = "key"
    v: str = "value"
    qkv: str | None = None
    in_proj: str | None = None
    out: str | None = None
    inputs: Callable[[tuple, dict], AttnCall] = _default_inputs
    output: Callable[[torch.Tensor], Any] = lambda y: y
    batch_first: bool = True
    scale: float | None = None
    context: ArgRef | None = None
    context_stream: str | None = None
    via: str = "projections"
    call: int | None = None
    query_stream: str | None = None
    head_slices: bool = False

    def __post_init__(self) -> None:
        if self.head_slices and self.via != "kernel":
            raise ValueError(f"AttentionSpec({self.path!r}).head_slices applies to via='kernel' only (via='projections' "
                             "already computes only the kept heads' projections)")
        if self.head_slices and (self.qkv is not None or self.in_proj is not None or self.out is None):
            raise ValueError(f"AttentionSpec({self.path!r}).head_slices needs separate q/k/v projections and the "
                             "output projection named (q=, k=, v=, out=); a fused qkv or in_proj cannot be sliced")
        if self.via not in ("projections", "kernel"):
            raise ValueError(f"AttentionSpec({self.path!r}).via must be 'projections' or 'kernel', got {self.via!r}")
        if self.call is not None and (not isinstance(self.call, int) or self.call < 0):
            raise ValueError(f"AttentionSpec({self.path!r}).call must be a call index >= 0 or None, got {self.call!r}")
        if self.kind not in ("self", "cross"):
            raise ValueError(f"AttentionSpec({self.path!r}).kind must be 'self' or 'cross', got {self.kind!r}")
        if self.kind == "self" and (self.context is not None or self.context_stream is not None):
            raise ValueError(f"AttentionSpec({self.path!r}): a self-attention takes no context")
        if self.num_heads < 1:
            raise ValueError(f"AttentionSpec({self.path!r}).num_heads must be >= 1, got {self.num_heads}")


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def _mha_inputs(args: tuple, kwargs: dict) -> AttnCall:
    """``nn.MultiheadAttention(q, k, v, need_weights=..., attn_mask=...)`` -> :class:`AttnCall`.

    A boolean ``attn_mask`` (True = blocked) becomes an additive float mask; ``key_padding_mask``
    and per-head (3-D) masks are refused.
    """
    call = dict(zip(_MHA_ARGS, args)) | kwargs
    if call.get("key_padding_mask") is not None:
        raise NotImplementedError("trimkit: nn.MultiheadAttention key_padding_mask is not supported; "
                                  "pass padding as attn_mask or describe it as a token argument")
    query, key, mask = call["query"], call.get("key"), call.get("attn_mask")
    value = call.get("value")
    if value is not None and value is not key:
        raise NotImplementedError("trimkit: nn.MultiheadAttention called with a value different from its key is not "
                                  "supported (the recomputation projects the key for both)")
    if mask is not None:
        if mask.dim() > 2:
            raise NotImplementedError("trimkit: per-head (3-D) nn.MultiheadAttention masks are not supported")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(mask, float("-inf"))
    return AttnCall(query, None if key is None or key is query else key, mask)


def _mha_output(y: torch.Tensor) -> tuple[torch.Tensor, None]:
    return y, None  # what nn.MultiheadAttention returns with need_weights=False


def multihead_attention(path: str, module: torch.nn.MultiheadAttention, kind: str = "self") -> AttentionSpec:
    """The :class:`AttentionSpec` of an ``nn.MultiheadAttention`` child (fused ``in_proj``, own
    ``out_proj``), recomputed outside its fused kernel so heads can be trimmed."""
    if not module._qkv_same_embed_dim:
        raise NotImplementedError(f"trimkit: {path}: nn.MultiheadAttention with kdim/vdim != embed_dim is not supported")
    return AttentionSpec(path, kind, module.num_heads, in_proj="in_proj", out="out_proj", inputs=_mha_inputs,
                         output=_mha_output, batch_first=module.batch_first)


@dataclass(frozen=True)
class StreamUpdate:
    """Another stream a layer reads and returns updated in the same call (a co-attention layer
    ``forward(v, t, ...) -> (v', t')``).

    stream: its name. hidden: the argument holding its hidden states. output: the index of its new
    states in the layer's output tuple. token_args: its other arguments with a token dimension
    (its attention mask...), gathered with its kept tokens. At every call of the layer the stream gets
    its own token trimmer (reading the layer stream's [CLS]) and its own target, under the
    layer's site, like a layer of that stream.
    """

    stream: str
    hidden: ArgRef
    output: int
    token_args: dict[ArgRef, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSpec:
    """A layer whose input tokens may be trimmed. It may be called several times per forward (e.g.
    a vision layer once per image): each call's token states follow its own data flow.

    path: module path in the model, e.g. ``"cross_image_layers.3"``.
    stream: the token stream this layer updates (``"vision"``, ``"text"``...).
    site: a free label grouping layers for targets (``"uni"``, ``"cross"``...).
    hidden: the argument holding the stream's hidden states (B, N, D) (or (N, B, D) when
    ``batch_first`` is False).
    context / context_stream: the argument holding the other stream's hidden states, for layers
    that read it (co-attention); ``context_source`` instead names a module whose call output is the
    other stream's hidden states, for uni-modal layers whose trimmers still want its [CLS].
    hidden_token_args / context_token_args: other arguments with a token dimension (attention
    masks...), mapped to that dimension; they are created at the stream's *original* length and
    are gathered to the kept tokens in eval mode.
    attentions: the attention modules inside the layer (a cross-attention reads ``context`` unless
    its :class:`AttentionSpec` names its own).
    batch_first: whether the layer's hidden states are (B, N, D) (else (N, B, D)).
    trimmable: ``False`` for a layer that must be rewritten (its attention must see the masks of
    the streams it reads) but never gets trimmers, e.g. BLIP's answer decoder; config selectors
    never match it.
    updates: the other stream this layer updates in the same call (:class:`StreamUpdate`; one at
    most); it is then the layer's context (``context``/``context_stream`` must be left unset), and
    ``output`` says where the layer's own stream is in the output tuple. Each attention call names
    its ``query_stream``.
    output: index of the layer stream's new states in the layer's output tuple (needed with
    ``updates``); ``None``: the output is the new states (or a structure holding them).
    """

    path: str
    stream: str
    site: str = "uni"
    hidden: ArgRef = 0
    context: ArgRef | None = None
    context_stream: str | None = None
    context_source: str | None = None
    hidden_token_args: dict[ArgRef, int] = field(default_factory=dict)
    context_token_args: dict[ArgRef, int] = field(default_factory=dict)
    attentions: Sequence[AttentionSpec] = ()
    batch_first: bool = True
    trimmable: bool = True
    updates: Sequence[StreamUpdate] = ()
    output: int | None = None

    def __post_init__(self) -> None:
        if len(self.updates) > 1:
            raise ValueError(f"LayerSpec({self.path!r}).updates: one other stream at most (got {len(self.updates)})")
        if self.updates:
            u = self.updates[0]
            if self.context not in (None, u.hidden) or self.context_stream not in (None, u.stream) or self.context_source:
                raise ValueError(f"LayerSpec({self.path!r}): with updates, the updated stream {u.stream!r} is the "
                                 "layer's context; leave context/context_stream/context_source unset")
            if u.stream == self.stream:
                raise ValueError(f"LayerSpec({self.path!r}).updates: {u.stream!r} is the layer's own stream")
            if self.output is None or self.output == u.output:
                raise ValueError(f"LayerSpec({self.path!r}): a layer that updates two streams needs distinct output "
                                 f"indices for each (output={self.output}, updates[0].output={u.output})")
            object.__setattr__(self, "context", u.hidden)  # the updated stream is what the layer reads as context
            object.__setattr__(self, "context_stream", u.stream)

    def roles(self) -> list[tuple[str, str]]:
        """Per attention: (query stream, key/value stream)."""
        out = []
        for a in self.attentions:
            q = a.query_stream or self.stream
            if a.kind == "self":
                k = q
            else:
                k = a.context_stream or (self.context_stream if q == self.stream else self.stream)
            out.append((q, k))
        return out


@dataclass(frozen=True)
class TokenArg:
    """An argument of a call of a module *outside* the layers that carries a stream's tokens at
    the stream's original length (e.g. BridgeTower's link towers, which add the uni-modal states of
    the matching layer). In eval mode it is gathered to the tokens still present at that call.

    module: module path of the callee; arg: positional index or keyword name; dim: token dimension.
    """

    module: str
    arg: int | str
    stream: str
    dim: int = 1


SUMMARIES = ("first", "mean", "last")
"""What a stream's or segment's trimmers read as its summary: its first token, the mean of its kept
real tokens, or its last real token."""


@dataclass(frozen=True)
class TokensFrom:
    """Where a segment's tokens come from when they are another stream's tokens, carried into this
    sequence by the model (a decoder VLM's image placeholders filled with its vision tower's
    output): ``stream``'s tokens from position ``skip`` on, one per segment token and in order
    (``skip=1`` when the model crops the tower's [CLS]). A token that stream dropped starts
    dropped in the segment, in every mode, so the trimmed model computes what it would with that
    token gone from both. In modes ``remove`` and ``packed`` the source stream's output holds only
    its kept tokens: the model puts them back at their places with :func:`trimkit.restore_tokens`
    before it fills the segment (zeros where a token was dropped, which the segment then drops).

    When the source stream drops tokens in runs (:attr:`StreamSpec.group`, a patch merger between
    the two), each segment token is one run of its tokens from ``skip`` on (``skip`` a multiple of
    the run length), kept where the source kept that run.

    The segment's first token must never be dropped by the source (it is the segment's summary
    anchor, always kept): the source stream's ``protected`` must cover position ``skip``. The
    segment's keep target counts its original tokens, the source's drops included (set it at or
    below the source's), and its cost gradient reaches the source's masks too.
    """

    stream: str
    skip: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.skip, int) or self.skip < 0:
            raise ValueError(f"TokensFrom({self.stream!r}).skip must be an int >= 0, got {self.skip!r}")


@dataclass(frozen=True)
class Segment:
    """One modality inside a stream that holds several in one sequence (single-stream models: ViLT's
    text tokens then image tokens, each part with its own [CLS]; a decoder's prompt, image tokens and
    question).

    name: the modality's name, used like a stream name for targets and records
    (``token_target={"text": 0.8, "vision": 0.5}``). length: its token count, the same for every
    instance: an int, ``"INPUT:DIM"`` (the size of dimension DIM of model input INPUT, e.g.
    ``"input_ids:1"``), or ``None`` for the last segment (the rest of the sequence). Lengths that
    differ per instance come from a tensor instead (:attr:`StreamSpec.segment_starts`; every
    ``length`` is then left ``None``). summary: what the trimmers read as the segment's summary: its
    first token (``"first"``, its [CLS]), the mean of its kept real tokens (``"mean"``, for a segment
    with no [CLS], such as VisualBERT's visual embeddings or a decoder's image tokens) or its last
    real token (``"last"``, a decoder's question or prompt, whose last token has seen the whole
    segment). The summary token is always kept: the first token for ``"first"`` and ``"mean"``, the
    last real token (per instance: padding excluded) for ``"last"``.
    padding_input: a model input (B, length) with 1 for the segment's real tokens, when the model
    concatenates the segments' masks itself (VisualBERT: ``attention_mask`` for the text,
    ``visual_attention_mask`` for the regions); segments without one count as all real.
    tokens_from: the segment's tokens are another stream's (:class:`TokensFrom`): a token that
    stream dropped starts dropped here (a decoder's image segment after a trimmed vision tower).
    """

    name: str
    length: int | str | None = None
    summary: str = "first"
    padding_input: str | None = None
    tokens_from: TokensFrom | None = None

    def __post_init__(self) -> None:
        ok = self.length is None or (isinstance(self.length, int) and self.length > 0) or (
            isinstance(self.length, str) and self.length.count(":") == 1 and self.length.split(":")[1].lstrip("-").isdigit())
        if not ok:
            raise ValueError(f"Segment({self.name!r}).length must be a positive int, 'INPUT:DIM' or None (the rest), "
                             f"got {self.length!r}")
        if self.summary not in SUMMARIES:
            raise ValueError(f"Segment({self.name!r}).summary must be 'first', 'mean' or 'last', got {self.summary!r}")
        if self.tokens_from is not None:
            if not isinstance(self.tokens_from, TokensFrom):
                raise TypeError(f"Segment({self.name!r}).tokens_from must be a TokensFrom, got "
                                f"{type(self.tokens_from).__name__}")
            if self.summary == "last":
                raise ValueError(f"Segment({self.name!r}): a segment whose tokens come from another stream "
                                 "(tokens_from) cannot be summarised by its last token (the source may drop it); "
                                 "use summary='first' or 'mean'")


@dataclass(frozen=True)
class StreamSpec:
    """A token stream. ``cls_index`` is where its [CLS] token sits (always kept).

    padding_input: name of a model input (B, N) with 1 for real tokens and 0 for padding, used so
    padding never counts as kept in the cost loss and packed batches drop it; ``None`` when the
    stream has no padding. padding_source: the same mask taken from a tensor inside the model
    instead: ``"MODULE"`` (the output of that module's call) or ``"MODULE[i]"`` (its i-th output),
    for masks the model builds itself (ViLT's embeddings return text and image masks concatenated).
    segments: for a stream holding several modalities in one sequence, their layout in order
    (:class:`Segment`); each segment gets its own token trimmer and target at every layer, reading
    its own summary and the others'. Their boundaries are the same for every instance
    (:attr:`Segment.length`) unless ``segment_starts`` gives them per instance.
    segment_starts: segments whose lengths differ per instance (a decoder's [prompt][image][question]
    with prompts of different lengths; text not padded to one length): a (B, K) integer tensor, the
    original position where each of the K segments starts in each instance (column 0 is 0, starts
    increase, the last segment runs to the end of the sequence), taken from a model input (its
    name: ``"segment_starts"``, listed in ``ModelSpec.input_names``) or from a tensor inside the
    model as ``padding_source`` is: ``"MODULE"`` (the output of that module's call) or
    ``"MODULE[i]"`` (its i-th output). A name that is a parameter of the model's forward is that
    input, anything else a module. Every ``Segment.length`` is then left ``None``, and padding is the
    stream's (``padding_input``/``padding_source``; padding inside a segment is excluded from its
    counts and from its ``"last"`` summary). Starts that do not fit the sequence (not 0 first, not
    increasing, past its end) are refused after the forward that got them (mode ``remove``: at
    once), without a host synchronisation in the masked and packed modes.
    protected: how many leading tokens are never dropped: 1 (the [CLS], the default), more for
    register or prefix tokens after it (timm's ``reg_tokens``). (In a segmented stream each
    segment's summary token is protected instead.)
    summary: what the trimmers read as the stream's summary (its own trimmers' ``cls_self``, and
    ``cls_context`` where another stream reads it): ``"first"`` (the [CLS] at 0, the default),
    ``"mean"`` (the mean of the stream's kept real tokens at the layer's input, for streams without a
    [CLS], such as region features; the first token is still never dropped, so no instance is empty)
    or ``"last"`` (its last real token, per instance, for a decoder's sequence; it is always kept, and
    so are the ``protected`` leading tokens).
    group: tokens are kept or dropped in runs of ``group`` consecutive tokens (from position 0),
    for a stream whose tokens the model merges that many at a time after its layers (Qwen2-VL's
    2x2 patch merger, a pixel-shuffle connector): every token of a run gets the mean of the run's
    token logits, so the run is kept or dropped whole in every mode and the merger always finds
    whole runs. ``protected`` must then be a multiple of ``group`` (whole runs kept), every instance's
    length and real-token count a multiple of it (checked at the forward); a
    :class:`TokensFrom` segment reading this stream takes one token per run. Not with ``segments``.
    """

    name: str
    cls_index: int = 0
    padding_input: str | None = None
    padding_source: str | None = None
    segments: Sequence[Segment] = ()
    protected: int = 1
    summary: str = "first"
    segment_starts: str | None = None
    group: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 1:
            raise ValueError(f"StreamSpec({self.name!r}).group must be an int >= 1, got {self.group!r}")
        if self.group > 1:
            if self.segments:
                raise ValueError(f"StreamSpec({self.name!r}): group applies to unsegmented streams")
            if self.summary == "last":
                raise ValueError(f"StreamSpec({self.name!r}): group={self.group} with summary='last' would keep the "
                                 "last real token alone, not its whole run; use summary='first' or 'mean'")
            if isinstance(self.protected, int) and self.protected % self.group:
                raise ValueError(f"StreamSpec({self.name!r}): protected={self.protected} must be a multiple of "
                                 f"group={self.group} (the always-kept tokens are whole runs)")
        if self.cls_index != 0:
            raise ValueError(
                f"StreamSpec({self.name!r}).cls_index={self.cls_index}: trimkit keeps [CLS] first; "
                "put the [CLS] token at position 0 (a wrapper can reorder tokens)."
            )
        if not isinstance(self.protected, int) or self.protected < 1:
            raise ValueError(f"StreamSpec({self.name!r}).protected must be an int >= 1 (the [CLS] is always kept), "
                             f"got {self.protected!r}")
        if self.summary not in SUMMARIES:
            raise ValueError(f"StreamSpec({self.name!r}).summary must be 'first', 'mean' or 'last', got {self.summary!r}")
        if any(g.padding_input for g in self.segments) and (self.padding_input or self.padding_source):
            raise ValueError(f"StreamSpec({self.name!r}): padding per segment (Segment.padding_input) or for the "
                             "whole stream (padding_input/padding_source), not both")
        if self.segments and self.summary != "first":
            raise ValueError(f"StreamSpec({self.name!r}): a segmented stream's summaries are its segments'; set "
                             "Segment(summary=...) per segment")
        if self.segments and self.protected != 1:
            raise ValueError(f"StreamSpec({self.name!r}): protected applies to unsegmented streams; a segmented "
                             "stream protects each segment's first token")
        if self.padding_input and self.padding_source:
            raise ValueError(f"StreamSpec({self.name!r}): give padding_input or padding_source, not both")
        if self.segments:
            names = [g.name for g in self.segments]
            if len(self.segments) < 2 or len(set(names)) != len(names):
                raise ValueError(f"StreamSpec({self.name!r}).segments: give at least two segments with distinct "
                                 f"names, got {names}")
            if self.segment_starts is not None:
                fixed = [g.name for g in self.segments if g.length is not None]
                if fixed:
                    raise ValueError(f"StreamSpec({self.name!r}): segment_starts gives every segment's length per "
                                     f"instance; leave Segment.length unset (given for {fixed})")
                own = [g.name for g in self.segments if g.padding_input]
                if own:
                    raise ValueError(f"StreamSpec({self.name!r}): with segment_starts, give the padding of the whole "
                                     f"sequence (padding_input/padding_source), not per segment (given for {own})")
            elif any(g.length is None for g in self.segments[:-1]):
                raise ValueError(f"StreamSpec({self.name!r}).segments: only the last segment may have length None")
        if self.segment_starts is not None:
            if not self.segments:
                raise ValueError(f"StreamSpec({self.name!r}).segment_starts: only a stream with segments has them")
            if not isinstance(self.segment_starts, str) or not self.segment_starts:
                raise ValueError(f"StreamSpec({self.name!r}).segment_starts must name a model input or 'MODULE' / "
                                 f"'MODULE[i]', got {self.segment_starts!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the core needs to know about a model.

    input_names: the forward's inputs, in order, that the trace keeps symbolic; other inputs are
    fixed by ``concrete_args``. leaf_modules: module paths the tracer must not enter (besides the
    trimmed layers, which are always leaves at the top level). autowrap_functions: functions the
    tracer records as calls instead of tracing into (see DESIGN.md for HF masking utilities).
    token_args: token-carrying arguments of calls outside the layers (see :class:`TokenArg`); their
    modules are traced as leaves.
    """

    streams: Sequence[StreamSpec]
    layers: Sequence[LayerSpec]
    input_names: Sequence[str]
    concrete_args: dict[str, Any] = field(default_factory=dict)
    leaf_modules: Sequence[str] = ()
    autowrap_functions: Sequence[Callable] = ()
    token_args: Sequence[TokenArg] = ()

    def stream(self, name: str) -> StreamSpec:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(f"no stream {name!r}; the adapter declares {[s.name for s in self.streams]}")

    def validate(self) -> None:
        names = {s.name for s in self.streams}
        segment_names = [g.name for s in self.streams for g in s.segments]
        clash = sorted(set(segment_names) & names) or sorted({n for n in segment_names if segment_names.count(n) > 1})
        if clash:
            raise ValueError(f"segment names {clash} are used twice (as streams or segments); targets address them by name")
        for st in self.streams:
            for g in st.segments:
                src = g.tokens_from
                if src is None:
                    continue
                if src.stream not in names or src.stream == st.name:
                    raise ValueError(f"stream {st.name!r}, segment {g.name!r}: tokens_from names stream {src.stream!r}, "
                                     f"which is not another declared stream ({sorted(names - {st.name})})")
                if self.stream(src.stream).protected <= src.skip:
                    raise ValueError(f"stream {st.name!r}, segment {g.name!r}: its first token is {src.stream!r}'s "
                                     f"token {src.skip}, which that stream may drop (protected="
                                     f"{self.stream(src.stream).protected}); a segment's first token is always kept, "
                                     f"so declare StreamSpec({src.stream!r}, protected={src.skip + 1})")
                run = self.stream(src.stream).group
                if src.skip % run:
                    raise ValueError(f"stream {st.name!r}, segment {g.name!r}: tokens_from skip={src.skip} must be a "
                                     f"multiple of stream {src.stream!r}'s group ({run}): each segment token is one "
                                     "run of its tokens")
                if not any(l.stream == src.stream for l in self.layers):
                    raise ValueError(f"stream {st.name!r}, segment {g.name!r}: tokens_from stream {src.stream!r} has "
                                     "no described layer")
        seen: set[str] = set()
        for layer in self.layers:
            if layer.stream not in names:
                raise ValueError(f"layer {layer.path!r}: unknown stream {layer.stream!r} (declared: {sorted(names)})")
            if layer.context_stream is not None and layer.context_stream not in names:
                raise ValueError(f"layer {layer.path!r}: unknown context_stream {layer.context_stream!r}")
            if (layer.context is not None or layer.context_source) and layer.context_stream is None:
                raise ValueError(f"layer {layer.path!r}: context given without context_stream")
            for a in layer.attentions:
                if a.kind == "cross" and a.context is None and layer.context is None:
                    raise ValueError(f"layer {layer.path!r}: cross-attention {a.path!r} needs the layer's `context` "
                                     "argument or its own AttentionSpec.context")
                stream = a.context_stream or layer.context_stream
                if a.context is not None and stream is None:
                    raise ValueError(f"layer {layer.path!r}: attention {a.path!r} has a context without a context_stream")
                if a.context_stream is not None and a.context_stream not in names:
                    raise ValueError(f"layer {layer.path!r}: attention {a.path!r}: unknown context_stream "
                                     f"{a.context_stream!r}")
            streams_here = {layer.stream} | ({layer.updates[0].stream} if layer.updates else set())
            for a, (q, k) in zip(layer.attentions, layer.roles()):
                if q not in streams_here:
                    raise ValueError(f"layer {layer.path!r}: attention {a.path!r} has query_stream {q!r}, but the layer "
                                     f"updates {sorted(streams_here)}")
                if k is not None and k not in names:
                    raise ValueError(f"layer {layer.path!r}: attention {a.path!r} reads keys of unknown stream {k!r}")
            for u in layer.updates:
                if u.stream not in names:
                    raise ValueError(f"layer {layer.path!r}: updates unknown stream {u.stream!r}")
            calls: dict[str, set] = {}
            for a in layer.attentions:
                taken = calls.setdefault(a.path, set())
                if a.call in taken or (a.call is None and taken) or None in taken:
                    raise ValueError(f"layer {layer.path!r}: attention {a.path!r} is described twice for the same call; "
                                     "give each description its own AttentionSpec.call index")
                taken.add(a.call)
            if layer.path in seen:
                raise ValueError(f"layer {layer.path!r} declared twice")
            seen.add(layer.path)
