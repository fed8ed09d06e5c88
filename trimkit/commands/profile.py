"""``trimkit profile``: per-instance MACs and measured speed of the full and the trimmed model.

``trimkit profile --adapter NAME [--size tiny|base] [--batch B] [--device cpu|cuda] [--reduction R]
[--checkpoint DIR] [--json] [--repeats N] [--instances K] [--threads T] [--dtype float32|bfloat16]
[--new-tokens T] [--compile BUCKETS]``

* MACs per instance (``count_macs`` at batch 1 over ``--instances`` inputs), full (mode ``off``) and
  trimmed (mode ``remove``).
* Speed: batch 1 -> median latency over the instances; batch > 1 -> throughput of one batch
  (trimmed = mode ``packed``). The full and the trimmed model are timed interleaved in the same run;
  ``speed_ratio`` is the median over rounds of full time / trimmed time. ``--compile BUCKETS`` (batch
  1) adds the trimmed model compiled (:meth:`trimkit.TrimmedModel.compile`) to the same rounds.
* Keep decisions come from a trained checkpoint (``--checkpoint``, ``trimkit.model.load_trimmed``) or,
  without one, from untrained trimmers set to reach ``--reduction`` (``trimkit.engine.calibrate``:
  random weights, so the kept fraction varies per instance, and final biases found by bisection on
  measured MACs); the output says which.

Decoders (adapters that expose generation, see :func:`generation_of`), with ``--new-tokens T`` >= 1
(default 8), get a ``decoder`` section too, measured with the adapter's own ``prefill`` and
``decode_step`` (the KV cache holds what each layer kept):

* MACs per instance (batch 1) of the prefill, full (``mode="off"``) and trimmed (``"remove"``), and of
  the first decode step on each one's cache (its cost depends on every layer's cache length, which
  trimming shortens); the cache lengths per layer;
* speed, interleaved in the same run: prefill latency (median) and decode tokens/s (``T`` greedy steps
  on a fresh prefill's cache each round, the prefill not timed; batch ``B``: ``B * T`` tokens per
  round, trimmed prefill in mode ``packed``), full vs trimmed, with ratios = median over rounds of
  full time / trimmed time.
"""

from __future__ import annotations

import json
import math
import numbers
import platform
import statistics
from datetime import datetime, timezone
from typing import Any

from trimkit.commands._args import nonneg_int, positive_int, reduction_float


def register(sub) -> None:
    p = sub.add_parser("profile", help="MACs per instance and interleaved latency/throughput, full vs trimmed")
    p.add_argument("--adapter", required=True, help="registered adapter name (see `trimkit plugins`)")
    p.add_argument("--size", default="tiny", help="model size the adapter builds (default: tiny)")
    p.add_argument("--batch", metavar="B", type=positive_int, default=1,
                   help="1: latency; > 1: throughput of packed batches (>= 1, default: 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--reduction", metavar="R", type=reduction_float, default=None,
                   help="MACs reduction to calibrate untrained trimmers to (a finite number >= 1, default: 2; "
                        "ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="a trimkit checkpoint directory (save_pretrained output)")
    p.add_argument("--repeats", metavar="N", type=positive_int, default=5,
                   help="timed rounds, each timing both models (>= 1, default: 5)")
    p.add_argument("--instances", metavar="K", type=positive_int, default=3,
                   help="batch-1 instances for MACs and latency (>= 1, default: 3)")
    p.add_argument("--threads", metavar="T", type=positive_int, default=None,
                   help="torch CPU threads, >= 1 (default: torch's)")
    p.add_argument("--seed", metavar="S", type=nonneg_int, default=0,
                   help="seed of the build and the inputs (>= 0, default: 0)")
    p.add_argument("--new-tokens", metavar="T", type=nonneg_int, default=8,
                   help="decoder adapters (those exposing generation): greedy decode steps timed per round, "
                        "full vs trimmed cache (>= 0, default: 8; 0: no decoder section)")
    p.add_argument("--compile", metavar="BUCKETS", type=positive_int, default=None,
                   help="batch 1: also time the trimmed model compiled (tmodel.compile(buckets=BUCKETS), each "
                        "trimmed layer through inductor per bucket of kept counts), interleaved with the others")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def _to(x: dict[str, Any], device: str, dtype) -> dict[str, Any]:
    import torch

    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in x.items()}


def _check_arguments(**values: Any) -> None:
    """``profile``'s numbers, checked as the CLI checks them (``ValueError`` naming the argument)."""
    for name in ("batch", "repeats", "instances", "threads"):
        v = values[name]
        if v is None and name == "threads":
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"profile: {name} must be an integer >= 1, got {v!r}")
    for name in ("seed", "new_tokens"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"profile: {name} must be an integer >= 0, got {v!r}")
    r = values["reduction"]
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r < 1:
        raise ValueError(f"profile: reduction must be a finite number >= 1, got {r!r}")


def profile(adapter: str, size: str = "tiny", batch: int = 1, device: str = "cpu", reduction: float = 2.0,
            checkpoint: str | None = None, repeats: int = 5, instances: int = 3, seed: int = 0,
            dtype: str | None = None, threads: int | None = None, model: Any = None,
            new_tokens: int = 8, compile_buckets: int | None = None) -> dict[str, Any]:
    """Everything ``trimkit profile`` prints, as a dict (see the module docstring); decoders (adapters
    with :func:`generation_of`) and ``new_tokens >= 1`` add ``out["decoder"]`` (module docstring)."""
    import torch

    from trimkit.config import TrimConfig
    from trimkit.engine.calibrate import calibrate
    from trimkit.engine.timing import interleaved
    from trimkit.macs import count_macs
    from trimkit.model import load_trimmed, trim
    from trimkit.plugins import get_registry

    _check_arguments(batch=batch, reduction=reduction, repeats=repeats, instances=instances, threads=threads,
                     seed=seed, new_tokens=new_tokens)
    if compile_buckets is not None and batch != 1:
        raise ValueError(f"profile: compile (buckets {compile_buckets}) is batch-1 inference; got batch {batch}")
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available on this machine")
    impl = get_registry().adapters.get(adapter)
    if model is None:
        model = impl.build(size=size, seed=seed)
    model = model.eval()
    if checkpoint:
        import sys

        from trimkit.checkpoint import read_meta, resolve_checkpoint

        if read_meta(resolve_checkpoint(checkpoint)).backbone is False:
            print(f"trimkit profile: warning: {checkpoint} holds the trimmers only (saved without its backbone): they "
                  f"run on the model built here ({adapter} size {size!r}, seed {seed}, random weights unless a model "
                  "was passed in), so their decisions, and the MACs and latency measured, are not the trained "
                  "model's; save with include_backbone=True to profile it", file=sys.stderr)
        tmodel = load_trimmed(checkpoint, model).eval()
    else:
        tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5), adapter=adapter).eval()
    singles = [impl.example_inputs(model, batch_size=1, seed=seed + i) for i in range(instances)]

    # MACs per instance (fp32 on CPU: decisions are the ones the model takes there)
    if checkpoint:
        source = f"trained checkpoint {checkpoint}"
        with tmodel.full():
            full = [count_macs(tmodel, **x).total for x in singles]
        with tmodel.mode("remove"):
            trimmed = [count_macs(tmodel, **x).total for x in singles]
        level = None
    else:
        cal = calibrate(tmodel, singles, reduction, seed=seed)
        full, trimmed = [f for f, _ in cal.per_instance], [t for _, t in cal.per_instance]
        source = (f"untrained trimmers calibrated to {reduction:g}x MACs (random weights, per-layer keep level "
                  f"{cal.level:.3f} for tokens and {cal.head_level:.3f} for heads, {cal.steps} MACs evaluations)")
        level = cal.level
    keep = []
    with torch.no_grad(), tmodel.mode("remove"):
        for x in singles:
            tmodel(**x)
            tokens = [r for r in tmodel.records if r.kind == "token"]
            keep.append(statistics.mean(float(r.keep) for r in tokens) if tokens else 1.0)

    gen = generation_of(impl) if new_tokens else None
    decoder_macs = _decoder_macs(gen, tmodel, singles) if gen is not None else None

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype or ("bfloat16" if device == "cuda" else "float32")]
    tmodel.to(device=device, dtype=dt)
    if batch == 1:
        runs = [_to(x, device, dt) for x in singles]
        mode = "remove"
    else:
        runs = [_to(impl.example_inputs(model, batch_size=batch, seed=seed + 1000), device, dt)]
        mode = "packed"

    def full_fn(r: int) -> None:
        with tmodel.full():
            tmodel(**runs[r % len(runs)])

    def trim_fn(r: int) -> None:
        with tmodel.mode(mode):
            tmodel(**runs[r % len(runs)])

    fns = {"full": full_fn, "trimmed": trim_fn}
    compiled = None
    if compile_buckets is not None:
        import time

        t0 = time.perf_counter()
        compiled = tmodel.compile(buckets=compile_buckets).bucketing
        with torch.inference_mode(), tmodel.mode("remove"):
            for x in runs:  # every bucket combination these instances reach, compiled before timing
                tmodel(**x)
        compile_s = time.perf_counter() - t0

        def trim_fn(r: int) -> None:  # noqa: F811  (eager removal, exact counts)
            with tmodel.eager(), tmodel.mode(mode):
                tmodel(**runs[r % len(runs)])

        def compiled_fn(r: int) -> None:
            with tmodel.mode(mode):
                tmodel(**runs[r % len(runs)])

        fns = {"full": full_fn, "trimmed": trim_fn, "compiled": compiled_fn}
    t = interleaved(fns, repeats=repeats * len(runs), warmup=1, device=device)
    macs_full, macs_trimmed = statistics.mean(full), statistics.mean(trimmed)
    out: dict[str, Any] = {
        "adapter": adapter, "size": size, "batch": batch, "device": device, "dtype": str(dt).replace("torch.", ""),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "decisions": "checkpoint" if checkpoint else "calibrated", "source": source, "keep_level": level,
        "macs_full": macs_full, "macs_trimmed": macs_trimmed, "macs_ratio": macs_full / macs_trimmed,
        "macs_full_per_instance": full, "macs_trimmed_per_instance": trimmed,
        "token_keep_per_instance": keep,
        "speed_ratio": t.ratio("full", "trimmed"),
        "engine": mode,
        "repeats": len(t.times["full"]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
                   + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if batch == 1:
        out["latency_full_ms"] = t.median("full") * 1e3
        out["latency_trimmed_ms"] = t.median("trimmed") * 1e3
    if compiled is not None:
        out["compiled"] = {"buckets": compile_buckets, "latency_ms": t.median("compiled") * 1e3,
                           "speed_ratio": t.ratio("full", "compiled"), "vs_eager": t.ratio("trimmed", "compiled"),
                           "compile_s": compile_s, "failures": dict(compiled.failures)}
        tmodel.bucketing = None
    else:
        out["throughput_full"] = batch / t.median("full")
        out["throughput_trimmed"] = batch / t.median("trimmed")
    if gen is not None:
        out["decoder"] = {**decoder_macs, **_decoder_speed(gen, tmodel, runs, mode, new_tokens, repeats, device)}
    return out


# --- decoders -----------------------------------------------------------------------------------

def generation_of(impl: Any) -> Any | None:
    """The generation functions of adapter ``impl``, or ``None`` when it exposes none.

    An adapter exposes generation with an attribute ``generation`` (a module or object), or, failing
    that, with a ``generation`` submodule of the package that defines its class (``trimkit_llava``'s
    adapter -> ``trimkit_llava.generation``). It must have ``prefill(tmodel, <inputs>, mode=...) ->
    (next-token logits (B, V), cache)``, taking the inputs it names from the adapter's
    ``example_inputs`` (modes ``"off"``: untrimmed, ``"remove"``: batch 1, ``"packed"``: a batch), a
    cache with ``lengths`` (per instance, per layer: the keys cached), and
    ``decode_step(tmodel, cache, tokens (B,), step) -> logits (B, V)`` (appends to the cache)."""
    import importlib

    gen = getattr(impl, "generation", None)
    if gen is None:
        module = type(impl).__module__
        package = module.rpartition(".")[0] or module
        try:
            gen = importlib.import_module(f"{package}.generation")
        except ModuleNotFoundError as e:
            if e.name not in (f"{package}.generation", package):
                raise
            return None
    if not (callable(getattr(gen, "prefill", None)) and callable(getattr(gen, "decode_step", None))):
        return None
    return gen


def _prefill_args(gen: Any, x: dict[str, Any]) -> dict[str, Any]:
    """The inputs of ``x`` that ``gen.prefill`` takes by name."""
    import inspect

    names = set(inspect.signature(gen.prefill).parameters) - {"mode"}
    return {k: v for k, v in x.items() if k in names}


def _decoder_macs(gen: Any, tmodel: Any, singles: list[dict[str, Any]]) -> dict[str, Any]:
    """Per instance (batch 1): MACs of the full and the trimmed prefill, of the first decode step on
    each one's cache, and the cache lengths per layer."""
    import torch

    from trimkit.macs import count_macs

    res: dict[str, list] = {k: [] for k in ("prefill_macs_full_per_instance", "prefill_macs_trimmed_per_instance",
                                            "decode_step_macs_full_per_instance",
                                            "decode_step_macs_trimmed_per_instance",
                                            "cache_lengths_full_per_instance", "cache_lengths_trimmed_per_instance")}
    for x in singles:
        args = _prefill_args(gen, x)
        for name, m in (("full", "off"), ("trimmed", "remove")):
            res[f"prefill_macs_{name}_per_instance"].append(count_macs(gen.prefill, tmodel, **args, mode=m).total)
            with torch.no_grad():
                logits, cache = gen.prefill(tmodel, **args, mode=m)
            res[f"cache_lengths_{name}_per_instance"].append([int(n) for n in cache.lengths[0]])
            step = count_macs(gen.decode_step, tmodel, cache, logits.argmax(-1), 0).total
            res[f"decode_step_macs_{name}_per_instance"].append(step)
    out: dict[str, Any] = {}
    for what in ("prefill_macs", "decode_step_macs"):
        full = statistics.mean(res[f"{what}_full_per_instance"])
        trimmed = statistics.mean(res[f"{what}_trimmed_per_instance"])
        out.update({f"{what}_full": full, f"{what}_trimmed": trimmed, f"{what}_ratio": full / trimmed})
    out.update(res)
    return out


def _decoder_speed(gen: Any, tmodel: Any, runs: list[dict[str, Any]], mode: str, new_tokens: int, repeats: int,
                   device: str) -> dict[str, Any]:
    """Prefill latency and decode tokens/s, full (mode off) vs trimmed (mode remove), interleaved.

    Both sides prefill each instance alone (the generation modules' mode ``off`` runs the untrimmed
    model per instance), so the ratios measure trimming, not batching. With ``mode="packed"`` (a
    batch) the trimmed batch in one packed forward is timed as well and reported beside them
    (``*_packed``), without a ratio to the per-instance full prefill."""
    import time

    import torch

    from trimkit.engine.timing import Timings, _sync, interleaved

    args = [_prefill_args(gen, x) for x in runs]
    modes = {"full": "off", "trimmed": "remove"}
    if mode == "packed":
        modes["trimmed_packed"] = "packed"

    def prefill(name: str, r: int):
        return gen.prefill(tmodel, **args[r % len(args)], mode=modes[name])

    pre = interleaved({n: (lambda r, n=n: prefill(n, r)) for n in modes}, repeats=repeats * len(args), warmup=1,
                      device=device)
    # decode: each round each variant prefills (not timed), then new_tokens greedy steps are timed
    times: dict[str, list[float]] = {n: [] for n in modes}
    names = list(modes)
    with torch.inference_mode():
        for r in range(-1, repeats * len(args)):  # round -1: warm-up, not recorded
            for n in (names if r % 2 == 0 else names[::-1]):
                logits, cache = prefill(n, max(r, 0))
                _sync(device)
                t = time.perf_counter()
                token = logits.argmax(-1)
                for step in range(new_tokens):
                    token = gen.decode_step(tmodel, cache, token, step).argmax(-1)
                _sync(device)
                if r >= 0:
                    times[n].append(time.perf_counter() - t)
    dec = Timings(times)
    batch = int(next(iter(args[0].values())).shape[0])
    out = {
        "engine": "remove", "new_tokens": new_tokens, "rounds": len(pre.times["full"]),
        "prefill_latency_full_ms": pre.median("full") * 1e3, "prefill_latency_trimmed_ms": pre.median("trimmed") * 1e3,
        "prefill_speed_ratio": pre.ratio("full", "trimmed"),
        "decode_tokens_per_s_full": batch * new_tokens / dec.median("full"),
        "decode_tokens_per_s_trimmed": batch * new_tokens / dec.median("trimmed"),
        "decode_speed_ratio": dec.ratio("full", "trimmed"),
    }
    if "trimmed_packed" in modes:
        out["prefill_latency_trimmed_packed_ms"] = pre.median("trimmed_packed") * 1e3
        out["decode_tokens_per_s_trimmed_packed"] = batch * new_tokens / dec.median("trimmed_packed")
    return out


def _fmt(n: float) -> str:
    from trimkit.macs import format_macs

    return f"{format_macs(n)}MACs"


def run(args) -> int:
    import sys

    reduction = 2.0 if args.reduction is None else args.reduction
    if args.checkpoint and args.reduction is not None:
        print(f"trimkit profile: note: --reduction {args.reduction:g} ignored: the keep decisions come from "
              f"--checkpoint {args.checkpoint}", file=sys.stderr)
    out = profile(args.adapter, size=args.size, batch=args.batch, device=args.device, reduction=reduction,
                  checkpoint=args.checkpoint, repeats=args.repeats, instances=args.instances, seed=args.seed,
                  dtype=args.dtype, threads=args.threads, new_tokens=args.new_tokens, compile_buckets=args.compile)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"trimkit profile --adapter {out['adapter']} --size {out['size']} --batch {out['batch']} "
          f"--device {out['device']} ({out['dtype']}, {out['machine']}, torch {out['torch']})")
    print(f"  decisions: {out['source']}")
    per = ", ".join(f"{_fmt(f)}->{_fmt(t)}" for f, t in zip(out["macs_full_per_instance"],
                                                                     out["macs_trimmed_per_instance"]))
    print(f"  MACs per instance (full->trimmed): {per}")
    print(f"  MACs: full {_fmt(out['macs_full'])}, trimmed {_fmt(out['macs_trimmed'])} ({out['macs_ratio']:.2f}x fewer)")
    if out["batch"] == 1:
        print(f"  latency (median, batch 1): full {out['latency_full_ms']:.1f} ms, trimmed "
              f"{out['latency_trimmed_ms']:.1f} ms")
    else:
        print(f"  throughput (batch {out['batch']}, engine {out['engine']}): full {out['throughput_full']:.1f}/s, "
              f"trimmed {out['throughput_trimmed']:.1f}/s")
    print(f"  speed ratio (full time / trimmed time, interleaved, {out['repeats']} rounds): {out['speed_ratio']:.2f}x "
          f"(MACs ratio {out['macs_ratio']:.2f}x)")
    if "compiled" in out:
        c = out["compiled"]
        eager = f"; layers run eager: {c['failures']}" if c["failures"] else ""
        print(f"  compiled ({c['buckets']} buckets, {c['compile_s']:.0f} s to compile): {c['latency_ms']:.1f} ms, speed "
              f"ratio {c['speed_ratio']:.2f}x, {c['vs_eager']:.2f}x the eager trimmed model{eager}")
    if "decoder" in out:
        print(_decoder_table(out["decoder"], out["batch"]))
    return 0


def _decoder_table(d: dict[str, Any], batch: int) -> str:
    """The ``decoder`` section as a Markdown table (ratios: full / trimmed)."""
    keys_full = statistics.mean(sum(ls) for ls in d["cache_lengths_full_per_instance"])
    keys_trimmed = statistics.mean(sum(ls) for ls in d["cache_lengths_trimmed_per_instance"])
    rows = [
        ("prefill MACs (batch 1, mean)", _fmt(d["prefill_macs_full"]), _fmt(d["prefill_macs_trimmed"]),
         d["prefill_macs_ratio"]),
        ("decode-step MACs (first step, batch 1, mean)", _fmt(d["decode_step_macs_full"]),
         _fmt(d["decode_step_macs_trimmed"]), d["decode_step_macs_ratio"]),
        ("KV cache keys (sum over layers, mean)", f"{keys_full:.1f}", f"{keys_trimmed:.1f}", keys_full / keys_trimmed),
        (f"prefill latency (median over {batch} instance(s), each alone)", f"{d['prefill_latency_full_ms']:.1f} ms",
         f"{d['prefill_latency_trimmed_ms']:.1f} ms", d["prefill_speed_ratio"]),
        (f"decode tokens/s (batch {batch}, {d['new_tokens']} steps)", f"{d['decode_tokens_per_s_full']:.1f}",
         f"{d['decode_tokens_per_s_trimmed']:.1f}", d["decode_speed_ratio"]),
    ]
    extra = []
    if "prefill_latency_trimmed_packed_ms" in d:
        extra.append(f"  trimmed, the batch of {batch} in one packed forward: prefill "
                     f"{d['prefill_latency_trimmed_packed_ms']:.1f} ms, decode "
                     f"{d['decode_tokens_per_s_trimmed_packed']:.1f} tokens/s (no untrimmed batched prefill to "
                     "compare with: the full side runs each instance alone)")
    lines = [f"  decoder (prefill + greedy decode, interleaved, {d['rounds']} rounds; speed ratio = median of "
             "full time / trimmed time):", "  | | full | trimmed | full/trimmed |", "  |---|---|---|---|"]
    lines += [f"  | {a} | {b} | {c} | {r:.2f}x |" for a, b, c, r in rows]
    return "\n".join(lines + extra)
