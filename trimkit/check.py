"""The adapter conformance check behind ``trimkit check``.

Runs, on a small randomly initialised model built by the adapter: tracing and rewriting, the
streams and layers found, all-masks-1 == the original model, hard masks == physical removal on
random inputs and random trimmer weights (and that something really was dropped), and MACs
falling when tokens and heads are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    adapter: str
    size: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def format(self) -> str:
        lines = [f"trimkit check --adapter {self.adapter} --size {self.size}"]
        for r in self.results:
            lines.append(f"  [{'PASS' if r.ok else 'FAIL'}] {r.name}: {r.detail}")
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


def run_check(adapter: str, size: str = "tiny", seed: int = 0, trials: int = 5, atol: float = 1e-4) -> CheckReport:
    """Run every conformance check; never raises for a failing check (it is reported)."""
    from .config import TrimConfig
    from .macs import count_macs, format_macs
    from .model import trim
    from .plugins import get_registry

    report = CheckReport(adapter, size)
    add = report.results.append

    def step(name: str, fn: Callable[[], str]) -> bool:
        try:
            add(CheckResult(name, True, fn()))
            return True
        except Exception as err:  # a check failing is a result, not a crash
            add(CheckResult(name, False, f"{type(err).__name__}: {err}"))
            return False

    registry = get_registry()
    state: dict[str, Any] = {}

    def build() -> str:
        impl = registry.adapters.get(adapter)
        torch.manual_seed(seed)
        model = impl.build(size=size, seed=seed).eval()
        state.update(impl=impl, model=model)
        n = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__} with {n / 1e6:.2f} M parameters"

    def trace() -> str:
        tmodel = trim(state["model"], TrimConfig(token_target=0.5, head_target=0.5), adapter=adapter)
        tmodel.eval()
        state["tmodel"] = tmodel
        spec = tmodel.spec
        streams = ", ".join(f"{s.name} ([CLS] at {s.cls_index})" for s in spec.streams)
        per = {}
        for layer in spec.layers:
            per[layer.stream] = per.get(layer.stream, 0) + 1
        heads = sum(len(v.heads) for v in tmodel.trimmers.values())
        return (f"streams {streams}; layers {per}; {heads} head trimmers; trimmers "
                f"{tmodel.trimmer_parameters() / 1e3:.1f} K params vs backbone {tmodel.backbone_parameters() / 1e6:.2f} M")

    def inputs(batch: int, s: int) -> dict[str, Any]:
        return state["impl"].example_inputs(state["model"], batch_size=batch, seed=s)

    def all_ones() -> str:
        tmodel, model = state["tmodel"], state["model"]
        worst = 0.0
        with torch.no_grad():
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
        g = torch.Generator().manual_seed(seed)
        saved = {k: v.clone() for k, v in tmodel.trimmers.state_dict().items()}
        try:
            for t in range(trials):
                with torch.no_grad():
                    for p in tmodel.trimmers.parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                    x = inputs(1, seed + 1 + t)
                    with tmodel.mode("hard"):
                        a = tmodel(**x)
                    with tmodel.mode("remove"):
                        b = tmodel(**x)
                worst = max(worst, _max_diff(a, b))
                dropped_tokens += sum(r.kind == "token" and float(r.keep) < 1 for r in tmodel.records)
                dropped_heads += sum(r.kind == "head" and float(r.keep) < 1 for r in tmodel.records)
        finally:
            tmodel.trimmers.load_state_dict(saved)
        if dropped_tokens == 0:
            raise AssertionError("no token was ever dropped: the check would be vacuous")
        if worst > atol:
            raise AssertionError(f"max |masked - removed| = {worst:.2e} > {atol:g} over {trials} random trials")
        return (f"max |masked - removed| = {worst:.1e} over {trials} trials "
                f"({dropped_tokens} token and {dropped_heads} head trimmers dropped something)")

    def macs() -> str:
        tmodel = state["tmodel"]
        x = inputs(1, seed)
        with tmodel.full():
            full = count_macs(tmodel, **x).total
        g = torch.Generator().manual_seed(seed + 99)
        with torch.no_grad():
            for p in tmodel.trimmers.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        with tmodel.mode("remove"):
            trimmed = count_macs(tmodel, **x).total
        if not trimmed < full:
            raise AssertionError(f"MACs did not fall: full {format_macs(full)}, trimmed {format_macs(trimmed)}")
        return f"full {format_macs(full)}MACs -> trimmed {format_macs(trimmed)}MACs ({full / trimmed:.2f}x)"

    if step("build", build) and step("trace and rewrite", trace):
        step("all masks 1 == original", all_ones)
        step("hard masks == physical removal", contract)
        step("MACs fall when trimming", macs)
    return report
