"""``trimkit demo --quick`` end to end: the files it writes, the row fields, and real MACs savings."""

from __future__ import annotations

import json
import math

import pytest

from trimkit.cli import main

ROW_FIELDS = ("method", "target", "accuracy", "gmacs", "macs_ratio", "latency_ratio")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--finetune-steps", "6"]) == 0
    printed = capsys.readouterr().out
    for name in ("results.json", "results.md", "pareto.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = json.loads((out / "results.json").read_text())
    assert result["preset"]["finetune"]["steps"] == 6  # --finetune-steps reached every fine-tune
    rows = result["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "METER (full)"
    assert methods.count("SmartTrim") == 3 and "Local" in methods and "Random" in methods
    for r in rows:
        for key in ROW_FIELDS:
            assert key in r, (r["method"], key)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["gmacs"] > 0 and math.isfinite(r["latency_ratio"]) and r["latency_ratio"] > 0
    full = rows[0]
    assert full["macs_ratio"] == 1.0 and full["latency_ratio"] == 1.0
    for r in rows[1:]:
        assert r["gmacs"] < full["gmacs"], r  # tokens and heads really removed at batch 1
        assert r["macs_ratio"] == pytest.approx(full["gmacs"] / r["gmacs"])
    smarttrim = sorted((r for r in rows if r["method"] == "SmartTrim"), key=lambda r: r["target"])
    assert [r["target"] for r in smarttrim] == [1.5, 2.0, 3.0]
    assert {r["target"] for r in rows if r["method"] in ("Local", "Random")} == {3.0}

    table = (out / "results.md").read_text()
    assert "| method |" in table and "SmartTrim" in table and "Random" in table
    assert "| method |" in printed  # the table is printed too
    # each fine-tune left an evaluable checkpoint
    assert main(["eval", "--checkpoint", rows[1]["checkpoint"], "--json", "--macs-instances", "1",
                 "--instances", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["trimmed"] is True


def test_calibrate_returns_the_nearest_tried_strength(monkeypatch):
    """MACs fall in steps as the strength knob moves, so bisection ends at a step's edge with its last
    midpoint possibly beyond it: calibrate must return the tried strength whose ratio is nearest the
    goal, not the last midpoint. Here the knob keeps ceil(8 s) / 8 of the MACs: a goal of 1.5x is
    best met by s in (0.5, 0.625] (1.6x); the bisection's last midpoint lies just above 0.625 (1.33x)."""
    import contextlib
    from types import SimpleNamespace

    from trimkit_train import demo

    full_macs = 1000.0

    class Stub:
        @contextlib.contextmanager
        def full(self):
            yield

    monkeypatch.setattr(demo, "collate_of", lambda ds: lambda items: items)
    monkeypatch.setattr(demo, "model_inputs", lambda tm, batch: {})
    monkeypatch.setattr(demo, "count_macs", lambda tm, **x: SimpleNamespace(total=full_macs))
    monkeypatch.setattr(demo, "targets_for", lambda s, tm: ({"knob": s}, {}))
    monkeypatch.setattr(demo, "forced_macs",
                        lambda tm, ds, targets, n: full_macs * math.ceil(8 * targets["knob"]) / 8)
    out = demo.calibrate(Stub(), [None] * 4, 1.5, instances=2, iterations=12)
    assert out["forced_ratio"] == pytest.approx(1.6)
    assert 0.5 < out["strength"] <= 0.625


def test_results_explain_a_latency_ratio_below_one_only_where_there_is_one():
    from trimkit_train.demo import _latency_note

    assert "bound by the operators it dispatches" in _latency_note([{"latency_ratio": 1.0}, {"latency_ratio": 0.7}])
    assert _latency_note([{"latency_ratio": 1.0}, {"latency_ratio": 1.3}, {"latency_ratio": None}]) == ""
