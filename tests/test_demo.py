"""`trimkit demo --quick` end to end: the files it writes and the rows it reports."""

import json

from trimkit.cli import main


def test_demo_quick_writes_results(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    for name in ("results.json", "results.md", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "results.json").read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "METER (full)" and "Local" in methods and "Random" in methods
    assert sum(m == "SmartTrim" for m in methods) == 3
    for r in rows:
        assert {"method", "target", "accuracy", "gmacs", "macs_ratio", "latency_ratio"} <= set(r), r
        assert 0 <= r["accuracy"] <= 1 and r["gmacs"] > 0
    full = rows[0]["gmacs"]
    trimmed = [r for r in rows[1:]]
    assert all(r["gmacs"] < full for r in trimmed), [(r["method"], r["gmacs"], full) for r in trimmed]
