"""The adapter conformance suite's helpers: ``trimkit check`` (:func:`trimkit.check.run_check`) over
every registered adapter, plus a few build variants of the built-in ones.

Every adapter the registry holds when the tests are collected (the entry points' adapters and the
tests' ``toy``, see ``conftest._register_toy``) gets its default build; :data:`VARIANTS` adds the
builds whose layout or streams differ (per-token outputs, other tasks). A step may be skipped
only where :data:`EXPECTED_SKIPS` says so: a new skip fails the suite like a failure.
"""

from __future__ import annotations

from typing import Any

import pytest

from trimkit.check import CheckReport, run_check

TRIALS = 2  # random trimmer weights per equivalence check: keeps the suite over all adapters at a few seconds

# adapter -> extra build options to check besides the default build (only where the adapter is registered)
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "blip": [{"task": "itm"}, {"task": "vqa_classifier"}, {"task": "nlvr2"}, {"task": "caption"}],
    "bridgetower": [{"token_outputs": True}],  # per-token outputs: compared on the kept tokens
    "open_clip": [{"part": "clip"}, {"part": "text_guided"}],
}

_PACKED = "packed == masked"
# (adapter, build options as sorted items) -> the steps (name prefixes) allowed to be SKIP, and why
EXPECTED_SKIPS: dict[tuple[str, tuple], set[str]] = {
    ("blip", ()): {_PACKED},  # VQA's answer decoder is causal: the packed engine refuses it
    ("blip", (("task", "caption"),)): {_PACKED},  # the caption decoder is causal
}


# (adapter, build options as sorted items) -> why its check fails for a known trimkit bug (not the
# adapter's): the case is xfail(strict=True), so it fails again once the bug is fixed (then drop it here)
KNOWN_FAILURES: dict[tuple[str, tuple], str] = {}


def adapter_names() -> list[str]:
    """Every registered adapter, the tests' ``toy`` included (call at import time to parametrize)."""
    from conftest import _register_toy

    return sorted(_register_toy().adapters.names())


def _id(name: str, options: dict[str, Any]) -> str:
    return name + "".join(f"[{k}={v}]" for k, v in sorted(options.items()))


def cases(names: list[str] | None = None) -> list:
    """``pytest.param(name, options)`` per adapter build: the default and its :data:`VARIANTS`."""
    names = adapter_names() if names is None else names
    def marks(name: str, options: dict[str, Any]) -> list:
        why = KNOWN_FAILURES.get((name, tuple(sorted(options.items()))))
        return [pytest.mark.xfail(strict=True, reason=why)] if why else []

    return [pytest.param(name, options, id=_id(name, options), marks=marks(name, options))
            for name in names for options in [{}] + VARIANTS.get(name, [])]


def assert_conforms(name: str, options: dict[str, Any] | None = None, trials: int = TRIALS) -> CheckReport:
    """Run ``trimkit check`` on one adapter build; fail with the formatted report on any FAIL or an
    unexpected SKIP (or an expected SKIP that now runs: update :data:`EXPECTED_SKIPS`)."""
    options = dict(options or {})
    report = run_check(name, size="tiny", trials=trials, build_options=options)
    text = report.format()
    assert report.ok, text
    allowed = EXPECTED_SKIPS.get((name, tuple(sorted(options.items()))), set())
    skipped = {prefix for prefix in allowed if any(s.startswith(prefix) for s in report.skipped)}
    unexpected = [s for s in report.skipped if not any(s.startswith(p) for p in allowed)]
    assert not unexpected, f"unexpected SKIP of {unexpected}:\n{text}"
    assert skipped == allowed, f"expected SKIP of {sorted(allowed - skipped)} (now runs? update EXPECTED_SKIPS):\n{text}"
    return report
