"""The trim plan: what the rewrite decided, once, and what every forward will do.

``print(tmodel.plan)`` shows the streams, each trimmed layer in forward order with the stream it
updates and the streams it reads, its trimmers and their final targets, and every attention call
it intercepts: its role (queries from which stream, keys/values from which) and how it runs
(``projections``: recomputed from the declared weights, heads removable; ``kernel/fx`` or
``kernel/attention_interface``: the module runs itself, trimkit at its softmax(QK^T)V call). It is
plain data: the runtime reads the same description the plan is printed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AttentionPlan", "LayerPlan", "StreamPlan", "TrimPlan", "stream_plan"]


@dataclass(frozen=True)
class StreamPlan:
    name: str
    cls_index: int
    padding: str | None  # "input 'NAME'" or the module output it is taken from
    segments: tuple[tuple[str, str], ...] = ()  # (name, length rule; "" when the starts are per instance)
    protected: int = 1  # leading tokens never dropped
    summary: str = "first"  # what the trimmers read: the first token, the mean of the kept tokens, the last token
    starts: str | None = None  # per-instance segment starts: "input 'NAME'" or the module output they come from
    segment_summaries: tuple[str, ...] = ()  # per segment: "first" | "mean" | "last"
    group: int = 1  # tokens kept or dropped in runs of this many (StreamSpec.group)


_SEGMENT_SUMMARY = {"mean": "summary = mean of its kept tokens", "last": "summary = its last real token"}


def stream_plan(s, input_names=()) -> StreamPlan:
    """The :class:`StreamPlan` of a :class:`~trimkit.spec.StreamSpec` (``input_names``: the model's,
    to tell an input from a module output in ``segment_starts``)."""
    padding = f"input {s.padding_input!r}" if s.padding_input else f"{s.padding_source!r}" if s.padding_source else None
    per_instance = s.segment_starts is not None
    rules = []
    for g in s.segments:
        parts = [] if per_instance else ["rest" if g.length is None else str(g.length)]
        parts += [_SEGMENT_SUMMARY[g.summary]] if g.summary in _SEGMENT_SUMMARY else []
        src = getattr(g, "tokens_from", None)
        if src is not None:
            parts.append(f"tokens from stream {src.stream!r} from its token {src.skip}, dropped where it dropped them")
            # one token per run of a source that drops tokens in runs (its merger): said on the source's line
        rules.append((g.name, ", ".join(parts)))
    starts = None
    if per_instance:
        starts = f"input {s.segment_starts!r}" if s.segment_starts in input_names else repr(s.segment_starts)
    return StreamPlan(s.name, s.cls_index, padding, tuple(rules), s.protected, s.summary, starts,
                      tuple(g.summary for g in s.segments), getattr(s, "group", 1))


@dataclass(frozen=True)
class AttentionPlan:
    index: int
    path: str
    call: int | None
    kind: str  # "self" | "cross"
    queries: str  # stream of the queries
    keys: str  # stream of the keys/values
    route: str  # "projections" | "kernel/fx" | "kernel/attention_interface", + " (head slices)" with head_slices
    head_target: float | None  # None: no head trimmer


@dataclass(frozen=True)
class LayerPlan:
    path: str
    stream: str
    site: str
    calls: int  # how many times the layer is called per forward
    reads: tuple[str, ...]  # context streams the layer's trimmers or attentions read
    token_target: float | dict[str, float] | None  # None: no token trimmer; per segment for a segmented stream
    token_args: tuple[str, ...]  # arguments gathered with the stream's (or context's) kept tokens
    attentions: tuple[AttentionPlan, ...]
    trimmable: bool = True
    updates: tuple[tuple[str, float | None], ...] = ()  # another stream updated in the same call, its target


@dataclass(frozen=True)
class TrimPlan:
    adapter: str
    token_policy: str
    head_policy: str
    streams: tuple[StreamPlan, ...]
    layers: tuple[LayerPlan, ...]
    outside_token_args: tuple[str, ...] = field(default=())

    def layer(self, path: str) -> LayerPlan:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(f"no trimmed layer {path!r} in the plan; layers: {[l.path for l in self.layers]}")

    def __str__(self) -> str:
        def pct(t: float | None) -> str:
            return "-" if t is None else f"keep {t:.2f}"

        tokens = sum(len(l.token_target) if isinstance(l.token_target, dict) else l.token_target is not None
                     for l in self.layers)
        tokens += sum(t is not None for l in self.layers for _, t in l.updates)
        heads = sum(a.head_target is not None for l in self.layers for a in l.attentions)
        lines = [f"TrimPlan (adapter {self.adapter!r}; token policy {self.token_policy!r}, head policy "
                 f"{self.head_policy!r}; {len(self.layers)} layers, {tokens} token trimmers, {heads} head trimmers)"]
        lines.append("streams:")
        for s in self.streams:
            pad = f", padding from {s.padding}" if s.padding else ", no padding"
            if s.segments:
                parts = ", ".join(f"{n} ({rule})" if rule else n for n, rule in s.segments)
                starts = f"; starts per instance from {s.starts}" if s.starts else ""
                kept = "each segment's first token always kept"
                if "last" in s.segment_summaries:
                    kept += " (its last real token where the summary is its last)"
                lines.append(f"  {s.name}: segments {parts}{starts}; {kept}{pad}")
            else:
                if s.group > 1:
                    pad += f"; tokens kept or dropped in runs of {s.group} (one token of a stream it enters per run)"
                first = "first token" if s.protected == 1 else f"first {s.protected} tokens"
                if s.summary == "mean":
                    lines.append(f"  {s.name}: summary = mean of its kept tokens ({first} always kept){pad}")
                elif s.summary == "last":
                    lines.append(f"  {s.name}: summary = its last real token (it and the {first} always kept){pad}")
                else:
                    kept = "always kept" if s.protected == 1 else f"summary; the first {s.protected} tokens always kept"
                    lines.append(f"  {s.name}: [CLS] at {s.cls_index} ({kept}){pad}")
        lines.append("layers, in forward order:")
        for l in self.layers:
            reads = f" reads {', '.join(l.reads)}" if l.reads else ""
            times = f" x{l.calls}" if l.calls > 1 else ""
            frozen = "" if l.trimmable else " [not trimmable: rewritten so masks reach it]"
            tokens = (", ".join(f"{g} {pct(t)}" for g, t in l.token_target.items()) if isinstance(l.token_target, dict)
                      else pct(l.token_target))
            lines.append(f"  {l.path}{times}: updates {l.stream} ({l.site}){reads}; tokens {tokens}{frozen}")
            for stream, target in l.updates:
                lines.append(f"    and updates {stream} in the same call; its tokens {pct(target)}")
            if l.token_args:
                lines.append(f"    gathered with the kept tokens: {', '.join(l.token_args)}")
            for a in l.attentions:
                which = "" if a.call is None else f" call {a.call}"
                lines.append(f"    attention {a.index} {a.path}{which}: {a.kind}, queries {a.queries} -> keys {a.keys}, "
                             f"{a.route}, heads {pct(a.head_target)}")
        if self.outside_token_args:
            lines.append("outside the layers, gathered with the kept tokens: " + ", ".join(self.outside_token_args))
        return "\n".join(lines)
