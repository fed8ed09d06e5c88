"""The adapter conformance check behind ``trimkit check``.

Runs, on a small randomly initialised model built by the adapter (steps in this order):

1. build: the adapter's ``build(size=..., seed=..., **build_options)``;
2. trace and rewrite: the streams and layers found (and the model's plan, when it has one);
3. all masks 1 == the original model (batch 1 and batch 2);
4. hard masks == physical removal at batch 1, on random inputs and random trimmer weights (and
   something really was dropped);
4b. bucketed removal == removal: batch-1 kept counts padded to 3 sizes (:mod:`trimkit.engine.buckets`,
   what ``TrimmedModel.compile`` runs), the same outputs and decisions (and some layer call really
   had slack rows), eager and then compiled (each layer's exported graphs run as they are: the
   export, the signatures and the masks checked without inductor's code generation);
5. packed == masked: a batch with padding (the adapter's ``example_inputs``: rows after the first
   are shorter) run in mode ``packed`` and mode ``padded`` against mode ``hard``, with per-instance
   kept counts that differ (and the same decisions in every mode);
6. MACs fall when tokens and heads are dropped.

A model the packed engine refuses outright (a causal or relative-position attention bias:
``NotImplementedError`` from :mod:`trimkit.engine.packed` or the attention kernel) gets ``SKIP`` for
step 5, with the reason; one that only mode ``padded`` refuses (causal attention over padded rows)
passes on mode ``packed``, and the result says that ``padded`` refused it.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_leaves
from .engine.buckets import Bucketing


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    skipped: bool = False  # not applicable to this model (ok stays True); the detail says why

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"


class Skip(Exception):
    """Raised by a check step that does not apply to the model; reported as ``SKIP``, not a failure."""


@dataclass
class CheckReport:
    adapter: str
    size: str
    results: list[CheckResult] = field(default_factory=list)
    plan: str | None = None  # str(tmodel.plan) when the trimmed model has one
    options: dict[str, Any] = field(default_factory=dict)  # the adapter's build options

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def skipped(self) -> list[str]:
        return [r.name for r in self.results if r.skipped]

    def format(self) -> str:
        opts = "".join(f" --build-option {k}={json.dumps(v) if not isinstance(v, str) else v}"
                       for k, v in self.options.items())
        lines = [f"trimkit check --adapter {self.adapter} --size {self.size}{opts}"]
        if self.plan:
            lines.append("  plan:")
            lines += [f"    {line}" for line in self.plan.splitlines()]
        for r in self.results:
            lines.append(f"  [{r.status}] {r.name}: {r.detail}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def _max_diff(a: Any, b: Any) -> float:
    la = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(la) != len(lb) or not la:
        raise AssertionError(f"outputs differ in structure ({len(la)} vs {len(lb)} tensors)")
    diffs = []
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            raise AssertionError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.is_floating_point():
            diffs.append(float((x - y).abs().max()) if x.numel() else 0.0)
        elif not torch.equal(x, y):
            diffs.append(float("inf"))
    return max(diffs, default=0.0)


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _leaf_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.is_floating_point():
        return float((x - y).abs().max()) if x.numel() else 0.0
    return 0.0 if torch.equal(x, y) else float("inf")


def _leaf_scale(a: Any, b: Any) -> float:
    """Max difference over the floating-point output leaves of the same shape (0 where none)."""
    pairs = [(x, y) for x, y in zip(_tensors(a), _tensors(b)) if x.shape == y.shape and x.is_floating_point()]
    return max((_leaf_diff(x, y) for x, y in pairs), default=0.0)


def _kept_masks(tmodel: Any) -> dict[str, torch.Tensor | None]:
    """stream -> ``tmodel.kept_mask(stream)`` after the last forward."""
    return {s.name: tmodel.kept_mask(s.name) for s in tmodel.spec.streams}


def _token_stream(x: torch.Tensor, y: torch.Tensor, masked: dict, other: dict) -> str | None:
    """The stream whose token layout explains a per-token output leaf: ``x`` (B, N, ...) laid out as
    in the masked batch, ``y`` as the removal or packed engine laid it out (``(1, kept, ...)``,
    ``(B, max kept, ...)``)."""
    if x.dim() < 3 or x.shape[2:] != y.shape[2:]:
        return None
    for name, hm in masked.items():
        pm = other.get(name)
        if hm is not None and pm is not None and tuple(x.shape[:2]) == tuple(hm.shape) \
                and tuple(y.shape[:2]) == tuple(pm.shape):
            return name
    return None


def _layout_diff(masked_out: Any, other_out: Any, masked_keep: dict, other_keep: dict) -> float:
    """Max difference between a masked (mode ``hard``) forward's outputs and a removed/packed/padded one's.

    Outputs of the same shape are compared directly (pooled outputs, logits). A per-token output of
    a stream (``(B, N, ...)`` masked; ``(1, kept, ...)`` removed; ``(B, max kept, ...)`` packed: after
    a stream's last layer the packed engine unpacks its kept tokens first, zeros after) is compared
    on the kept tokens, given by ``kept_mask`` in each mode (what the model computes after the
    layers, a final LayerNorm say, may make the slots after them non-zero: readers go by ``kept_mask``).
    """
    la, lb = _tensors(masked_out), _tensors(other_out)
    if len(la) != len(lb) or not la:
        raise AssertionError(f"outputs differ in structure ({len(la)} vs {len(lb)} tensors)")
    worst = 0.0
    for i, (x, y) in enumerate(zip(la, lb)):
        stream = _token_stream(x, y, masked_keep, other_keep)
        if stream is None:
            if x.shape != y.shape:
                raise AssertionError(
                    f"output {i}: shape {tuple(y.shape)} trimmed vs {tuple(x.shape)} masked, and no "
                    f"stream's kept_mask explains the layout (kept_mask shapes masked "
                    f"{ {k: None if v is None else tuple(v.shape) for k, v in masked_keep.items()} }, trimmed "
                    f"{ {k: None if v is None else tuple(v.shape) for k, v in other_keep.items()} })")
            worst = max(worst, _leaf_diff(x, y))
            continue
        hm, pm = masked_keep[stream].to(x.device), other_keep[stream].to(y.device)
        for b in range(x.shape[0]):
            a, c = x[b][hm[b]], y[b][pm[b]]
            if a.shape != c.shape:
                raise AssertionError(f"output {i} ({stream} tokens), instance {b}: {a.shape[0]} kept tokens "
                                     f"masked vs {c.shape[0]} trimmed")
            worst = max(worst, _leaf_diff(a, c))
    return worst


def _raised_in(err: BaseException, module: str) -> bool:
    """Whether ``err`` was raised by code of ``module`` (its innermost traceback frame)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == module


def _seeded(tmodel: Any, x: dict[str, Any], seed: int) -> Any:
    """``tmodel(**x)`` with torch's generators seeded (and restored after)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return tmodel(**x)


@contextlib.contextmanager
def random_trimmers(tmodel: Any, seed: int) -> Iterator[Callable[[], None]]:
    """For the block: ``draw()`` sets every trimmer weight to N(0, 0.5^2) noise (from ``seed``); the
    trimmers' own weights are back afterwards."""
    g = torch.Generator().manual_seed(seed)
    saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}

    def draw() -> None:
        with torch.no_grad():
            for p in tmodel.trimmers.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    try:
        yield draw
    finally:
        tmodel.trimmers.load_state_dict(saved)


def run_check(adapter: str, size: str = "tiny", seed: int = 0, trials: int = 5, atol: float = 1e-4,
              batch: int = 3, build_options: dict[str, Any] | None = None) -> CheckReport:
    """Run every conformance check; never raises for a failing check (it is reported).

    ``trials``: random trimmer weights (and inputs) per equivalence check; ``batch``: the batch
    size of the packed == masked check (>= 2); ``atol``: the tolerance of every equivalence;
    ``build_options``: keyword arguments for the adapter's ``build`` (e.g. ``{"task": "nlvr2"}``).
    """
    if batch < 2:
        raise ValueError(f"run_check: batch must be >= 2 (packed batches), got {batch}")
    from .config import TrimConfig
    from .macs import count_macs, format_macs
    from .model import MaskedBatchWarning, trim
    from .plugins import get_registry

    report = CheckReport(adapter, size, options=dict(build_options or {}))
    add = report.results.append

    def step(name: str, fn: Callable[[], str]) -> bool:
        try:
            add(CheckResult(name, True, fn()))
            return True
        except Skip as why:
            add(CheckResult(name, True, f"not applicable: {why}", skipped=True))
            return True
        except Exception as err:  # a check failing is a result, not a crash
            add(CheckResult(name, False, f"{type(err).__name__}: {err}"))
            return False

    registry = get_registry()
    state: dict[str, Any] = {}

    def build() -> str:
        impl = registry.adapters.get(adapter)
        torch.manual_seed(seed)
        model = impl.build(size=size, seed=seed, **(build_options or {})).eval()
        state.update(impl=impl, model=model)
        n = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__} with {n / 1e6:.2f} M parameters"

    def trace() -> str:
        tmodel = trim(state["model"], TrimConfig(token_target=0.5, head_target=0.5), adapter=adapter)
        tmodel.eval()
        state["tmodel"] = tmodel
        spec = tmodel.spec
        def summary(s) -> str:
            if s.segments:
                return "segments " + "/".join(g.name for g in s.segments)
            if s.summary == "mean":
                return "summary: mean of kept tokens"
            if s.summary == "last":
                return "summary: last real token"
            return f"[CLS] at {s.cls_index}"

        streams = ", ".join(f"{s.name} ({summary(s)})" for s in spec.streams)
        per = {}
        for layer in spec.layers:  # a two-stream layer counts for both streams
            for name in [layer.stream] + [u.stream for u in layer.updates]:
                per[name] = per.get(name, 0) + 1
        heads = sum(len(v.heads) for v in tmodel.trimmers.values())
        return (f"streams {streams}; layers {per}; {heads} head trimmers; trimmers "
                f"{tmodel.trimmer_parameters() / 1e3:.1f} K params vs backbone {tmodel.backbone_parameters() / 1e6:.2f} M")

    def plan() -> None:
        """``str(tmodel.plan)`` into the report (printed under its header) when the model has a plan."""
        try:
            value = getattr(state["tmodel"], "plan", None)  # TrimmedModel.plan, where the core has it
            if callable(value):
                value = value()
            if value is not None:
                report.plan = str(value)
        except Exception as err:  # reported, and the other steps still run
            add(CheckResult("plan", False, f"tmodel.plan could not be printed: {type(err).__name__}: {err}"))

    def inputs(batch: int, s: int) -> dict[str, Any]:
        return state["impl"].example_inputs(state["model"], batch_size=batch, seed=s)

    def all_ones() -> str:
        tmodel, model = state["tmodel"], state["model"]
        worst = 0.0
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", MaskedBatchWarning)  # batch 2 runs masked on purpose here
            for batch in (1, 2):
                x = inputs(batch, seed)
                worst = max(worst, _max_diff(tmodel(**x), model(**x)))
        dropped = [r.key for r in tmodel.records if float(r.keep.min()) < 1]
        if dropped:
            raise AssertionError(f"fresh trimmers dropped something at {dropped[:3]} (stable init broken)")
        if worst > atol:
            raise AssertionError(f"max |trimmed - original| = {worst:.2e} > {atol:g}")
        return f"max |trimmed - original| = {worst:.1e} (batch 1 removal path and batch 2 masked path)"

    def contract() -> str:
        tmodel = state["tmodel"]
        worst, dropped_tokens, dropped_heads = 0.0, 0, 0
        with random_trimmers(tmodel, seed) as draw:
            for t in range(trials):
                with torch.no_grad():
                    draw()
                    x = inputs(1, seed + 1 + t)
                    with tmodel.mode("hard"):
                        a = tmodel(**x)
                    keep_a = _kept_masks(tmodel)
                    with tmodel.mode("remove"):
                        b = tmodel(**x)
                worst = max(worst, _layout_diff(a, b, keep_a, _kept_masks(tmodel)))
                dropped_tokens += sum(r.kind == "token" and float(r.keep) < 1 for r in tmodel.records)
                dropped_heads += sum(r.kind == "head" and float(r.keep) < 1 for r in tmodel.records)
        if dropped_tokens == 0:
            raise AssertionError("no token was ever dropped: the check would be vacuous")
        if worst > atol:
            raise AssertionError(f"max |masked - removed| = {worst:.2e} > {atol:g} over {trials} random trials")
        return (f"max |masked - removed| = {worst:.1e} over {trials} trials "
                f"({dropped_tokens} token and {dropped_heads} head trimmers dropped something)")

    def bucketed() -> str:
        tmodel = state["tmodel"]
        worst, padded, calls = 0.0, 0, 0
        prev = tmodel.bucketing

        def decisions() -> list:
            return [(r.key, r.index.tolist()) for r in tmodel.records if r.index is not None]

        try:
            with random_trimmers(tmodel, seed + 7) as draw:
                runs = 0
                # the trials asked for, and more (8 at most) while no call has had slack: kept counts that land on
                # bucket sizes pad nothing, and a check without slack would be vacuous
                while runs < trials or (padded == 0 and runs < trials + 8):
                    runs += 1
                    with torch.no_grad(), tmodel.mode("remove"):
                        draw()
                        x = inputs(1, seed + 10 + runs)
                        tmodel.bucketing = None
                        a, kept = _seeded(tmodel, x, seed + runs), decisions()
                        b = tmodel.bucketing = Bucketing(3)
                        out = _seeded(tmodel, x, seed + runs)  # the same draws for a model that samples (ViLT's patches)
                    padded, calls = padded + b.padded, calls + b.calls
                    if decisions() != kept:
                        raise AssertionError(f"bucketed removal kept other tokens or heads: {decisions()} vs {kept}")
                    worst = max(worst, _max_diff(a, out))
        finally:
            tmodel.bucketing = prev
        if padded == 0:
            raise AssertionError(f"no layer call had slack rows in {calls} calls ({runs} random trials): the check would "
                                 "be vacuous")
        if worst > atol:
            raise AssertionError(f"max |bucketed - removed| = {worst:.2e} > {atol:g} over {runs} random trials")
        # compiled as tmodel.compile() runs it: each layer exported per bucket signature (the exported graphs
        # run as they are here, no inductor: the code path and the masks are what is checked, in seconds)
        try:
            with random_trimmers(tmodel, seed + 7) as draw:
                with torch.no_grad(), tmodel.mode("remove"):
                    draw()
                    x = inputs(1, seed + 11)
                    tmodel.bucketing = None
                    a, kept = _seeded(tmodel, x, seed), decisions()
                    with warnings.catch_warnings():  # a layer left eager is reported below, not warned
                        warnings.simplefilter("ignore", RuntimeWarning)
                        c = tmodel.compile(buckets=3, backend=lambda gm, example: gm).bucketing
                        out = _seeded(tmodel, x, seed)
                if decisions() != kept:
                    raise AssertionError("compiled removal kept other tokens or heads than removal")
                compiled = _max_diff(a, out)
        finally:
            tmodel.bucketing = prev
        if compiled > atol:
            raise AssertionError(f"max |compiled - removed| = {compiled:.2e} > {atol:g} (tmodel.compile, exported "
                                 f"graphs run as they are)")
        eager = f", layers left eager: {dict(c.failures)}" if c.failures else ""
        return (f"max |bucketed - removed| = {worst:.1e} over {runs} trials, the same decisions ({padded} of "
                f"{calls} layer calls padded); compiled (exported graphs): {compiled:.1e}, {c.compiled_calls} of "
                f"{c.calls} layer calls compiled{eager}")

    def packed() -> str:
        tmodel = state["tmodel"]
        spec = tmodel.spec
        stream_of = {l.path: l.stream for l in spec.layers}

        def stream(key: str) -> str:
            if ":" in key:  # a segment's record: "layer:segment"
                return key.split(":", 1)[1]
            if "@" in key:  # the other stream's decision in a two-stream layer: "layer@stream"
                return key.split("@", 1)[1]
            return stream_of.get(key) or next((s for p, s in stream_of.items() if key.startswith(p + ".")), key)

        padded_streams = {s.name: s.padding_input for s in spec.streams if s.padding_input}
        sourced = [s.name for s in spec.streams if s.padding_source]  # masks the model makes: read after a forward
        engines = ("packed", "padded")
        worst = dict.fromkeys(engines, 0.0)
        varied, seen, padding_seen, moved = False, [], False, 0.0
        refused: dict[str, str] = {}  # engines other than packed that refuse this model: name -> why
        with random_trimmers(tmodel, seed + 1000) as draw:
            for t in range(trials):
                x = inputs(batch, seed + 100 + t)
                real = {s: x[n].ne(0).sum(-1).tolist() for s, n in padded_streams.items()
                        if isinstance(x.get(n), torch.Tensor)}
                padding_seen |= any(bool((x[padded_streams[s]] == 0).any()) for s in real)
                with torch.no_grad():
                    draw()
                    with tmodel.mode("hard"):
                        ref = tmodel(**x)
                    ref_records, ref_keep = list(tmodel.records), _kept_masks(tmodel)
                    for name in sourced:
                        made = tmodel.runtime.padding.get(name)
                        if made is None:
                            raise AssertionError(f"StreamSpec({name!r}).padding_source recorded no mask in a forward")
                        real[name] = made.ne(0).sum(-1).tolist()
                        padding_seen |= bool((made == 0).any())
                    with tmodel.full():  # how far trimming moves the outputs: the scale atol is read against
                        moved = max(moved, _leaf_scale(tmodel(**x), ref))
                    for engine in engines:
                        if engine in refused:
                            continue
                        try:
                            with tmodel.mode(engine):
                                out = tmodel(**x)
                        except NotImplementedError as err:
                            # the engine (or the attention kernel under it) refuses this model outright
                            if _raised_in(err, "trimkit.engine.packed") or _raised_in(err, "trimkit.kernels"):
                                if engine == "packed":
                                    raise Skip(f"mode {engine!r} refuses this model: {err}") from err
                                refused[engine] = str(err)  # e.g. padded rows with causal attention
                                continue
                            # the core's check after the forward: a bias non-zero on a kept token
                            raise AssertionError(f"mode {engine!r}, trial {t}: {err} (a padded stream without "
                                                 "StreamSpec.padding_input? its padding then counts as real "
                                                 "tokens)") from err
                        records = list(tmodel.records)
                        if [r.key for r in records] != [r.key for r in ref_records]:
                            raise AssertionError(f"mode {engine!r} ran other trimmers than mode 'hard': "
                                                 f"{[r.key for r in records]} vs {[r.key for r in ref_records]}")
                        for r, h in zip(records, ref_records):
                            if r.keep.shape != h.keep.shape or float((r.keep - h.keep).abs().max()) > 1e-6:
                                raise AssertionError(
                                    f"trial {t}: mode {engine!r} decided otherwise than mode 'hard' at {r.key}: kept "
                                    f"fractions {[round(float(k), 3) for k in r.keep]} vs "
                                    f"{[round(float(k), 3) for k in h.keep]} (real tokens {real})")
                        diff = _layout_diff(ref, out, ref_keep, _kept_masks(tmodel))
                        if engine == "packed":
                            tokens = [r for r in records if r.kind == "token" and r.counts is not None]
                            varied |= any(len(set(r.counts)) > 1 and float(r.keep.min()) < 1 for r in tokens)
                            last = {stream(r.key): list(r.counts) for r in tokens}
                            seen.append(" ".join(f"{s} {c}" for s, c in last.items()))
                        if diff > atol:
                            raise AssertionError(
                                f"max |{engine} - masked| = {diff:.2e} > {atol:g} in trial {t} (batch {batch}, kept "
                                f"per instance after each stream's last layer: {seen[-1]}; real tokens {real}): "
                                f"the same decisions give other outputs, so in mode {engine!r} dropped or padding "
                                "tokens leak into what the model computes (or kept ones are lost). Check that every "
                                "tensor carrying a stream's tokens is declared (LayerSpec.hidden_token_args / "
                                "context_token_args, ModelSpec.token_args), that StreamSpec.padding_input names each "
                                "padded stream's mask, and that nothing after the layers reads every token position "
                                "(mean pooling over tokens, say)")
                        worst[engine] = max(worst[engine], diff)
        if not varied:
            raise AssertionError(f"the kept counts never differed across the {batch} instances while dropping tokens "
                                 f"in {trials} trials ({'; '.join(seen)}): the check would be vacuous")
        padded_names = sorted(set(padded_streams) | set(sourced))
        if padded_names and not padding_seen:
            raise AssertionError(f"example_inputs(batch_size={batch}) never padded "
                                 f"{padded_names} in {trials} trials: the padding path was not exercised "
                                 "(rows after the first should be shorter)")
        pad = (f"padding in {padded_names}" if padded_names else "no stream declares padding")
        weak = ": weak, under 10x atol, a leak could pass" if moved < 10 * atol else ""
        padded_part = (f"mode padded refuses this model ({refused['padded'][:120]})" if "padded" in refused
                       else f"max |padded - masked| = {worst['padded']:.1e}")
        return (f"max |packed - masked| = {worst['packed']:.1e}, {padded_part} over "
                f"{trials} trials at batch {batch} (trimming moves the outputs by up to {moved:.1e}{weak}), same "
                f"decisions, {pad}; kept per instance after each stream's last layer: {'; '.join(seen)}")

    def macs() -> str:
        tmodel = state["tmodel"]
        x = inputs(1, seed)
        with tmodel.full():
            full = count_macs(tmodel, **x).total
        with random_trimmers(tmodel, seed + 99) as draw:
            with torch.no_grad():
                draw()
            with tmodel.mode("remove"):
                trimmed = count_macs(tmodel, **x).total
        if not trimmed < full:
            raise AssertionError(f"MACs did not fall: full {format_macs(full)}, trimmed {format_macs(trimmed)}")
        return f"full {format_macs(full)}MACs -> trimmed {format_macs(trimmed)}MACs ({full / trimmed:.2f}x)"

    if step("build", build) and step("trace and rewrite", trace):
        plan()
        step("all masks 1 == original", all_ones)
        step("hard masks == physical removal", contract)
        step("bucketed removal == removal (3 buckets, slack masked; and compiled)", bucketed)
        step(f"packed == masked (batch {batch}, padding, per-instance counts)", packed)
        step("MACs fall when trimming", macs)
    return report
