"""``trimkit check``: the CLI, the plan, and failing readably on wrong descriptions.

That it passes on every registered adapter (the toy included) is tests/test_conformance.py.
"""

import dataclasses

import pytest
import torch
from toyvlm import ToyAdapter, ToyVLM

from trimkit.check import CheckReport, CheckResult
from trimkit.cli import main
from trimkit.model import TrimmedModel
from trimkit.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


class ForgetfulAdapter(ToyAdapter):
    """Describes ToyVLM but forgets that the cross layers' ``context_bias`` carries text tokens."""

    def describe(self, model):
        spec = super().describe(model)
        layers = [dataclasses.replace(l, context_token_args={}) if l.site == "cross" else l for l in spec.layers]
        return dataclasses.replace(spec, layers=layers)


class NoPaddingAdapter(ToyAdapter):
    """Forgets ``StreamSpec.padding_input``: batch 1 is right, padded batches are not (packed keeps padding)."""

    def describe(self, model):
        spec = super().describe(model)
        return dataclasses.replace(spec, streams=[dataclasses.replace(s, padding_input=None) for s in spec.streams])


class MeanPooledToy(ToyVLM):
    """Pools the vision tokens by their mean over every position: it reads the dropped tokens."""

    def forward(self, pixel_values, input_ids, attention_mask):
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)
        v = torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1) + self.pos
        t = self.embed(input_ids)
        t_bias = (1.0 - attention_mask[:, None, None, :].to(t.dtype)) * -1e9
        for layer in self.text:
            t = layer(t, bias=t_bias)
        for layer in self.vision:
            v = layer(v)
        for lv, lt in zip(self.cross_v, self.cross_t):
            v, t = lv(v, t, None, t_bias), lt(t, v, t_bias, None)
        return self.head(torch.cat([v.mean(1), t[:, 0]], -1))


class SeqToyVLM(ToyVLM):
    """Returns both streams' final token states (per-token outputs, compared on the kept tokens)."""

    def forward(self, pixel_values, input_ids, attention_mask):
        v = self.patch(pixel_values).flatten(2).transpose(1, 2)
        v = torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1) + self.pos
        t = self.embed(input_ids)
        t_bias = (1.0 - attention_mask[:, None, None, :].to(t.dtype)) * -1e9
        for layer in self.text:
            t = layer(t, bias=t_bias)
        for layer in self.vision:
            v = layer(v)
        for lv, lt in zip(self.cross_v, self.cross_t):
            v, t = lv(v, t, None, t_bias), lt(t, v, t_bias, None)
        return {"vision": v, "text": t, "score": (v[:, 0] * t[:, 0]).sum(-1)}


def _builds(cls):
    class Adapter(ToyAdapter):
        def matches(self, model):
            return type(model) is cls

        def build(self, size="tiny", seed=0, **options):
            torch.manual_seed(seed)
            return cls(**options)

    return Adapter()


def test_check_prints_the_plan_and_every_step(toy_registry, capsys):
    assert main(["check", "--adapter", "toy", "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("[PASS]") == 7 and out.rstrip().endswith("OK"), out
    assert "[PASS] bucketed removal == removal (3 buckets, slack masked; and compiled): max |bucketed - removed| = " in out
    assert "; compiled (exported graphs): " in out and "layers left eager" not in out
    lines = out.splitlines()
    assert lines[1] == "  plan:" and lines[2].startswith("    TrimPlan (adapter 'toy'; "), out
    assert "    streams:" in lines and "      text: [CLS] at 0 (always kept), padding from input 'attention_mask'" in lines
    assert "      cross_t.1: updates text (cross) reads vision; tokens keep 0.50" in lines, out
    assert "        attention 1 cross: cross, queries text -> keys vision, projections, heads keep 0.50" in lines, out
    assert "[PASS] packed == masked (batch 3, padding, per-instance counts): max |packed - masked| = " in out
    assert "max |padded - masked|" in out and "padding in ['text']" in out and "kept per instance" in out


def test_a_plan_that_raises_is_a_failure(toy_registry, capsys, monkeypatch):
    def broken(self):
        raise RuntimeError("no plan yet")

    monkeypatch.setattr(TrimmedModel, "plan", property(broken), raising=False)
    assert main(["check", "--adapter", "toy", "--trials", "1"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] plan: tmodel.plan could not be printed: RuntimeError: no plan yet" in out
    assert "[PASS] MACs fall" in out  # the other steps still ran


def test_check_fails_on_wrong_description(capsys):
    get_registry().adapters.register("forgetful", ForgetfulAdapter(), replace=True)
    assert main(["check", "--adapter", "forgetful", "--trials", "2"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] hard masks == physical removal" in out and "FAILED" in out


def test_undeclared_padding_fails_packed_only(capsys):
    get_registry().adapters.register("toy_no_padding", NoPaddingAdapter(), replace=True)
    assert main(["check", "--adapter", "toy_no_padding", "--trials", "2"]) == 1
    out = capsys.readouterr().out
    assert "[PASS] hard masks == physical removal" in out  # batch 1 has no padding
    assert "[FAIL] packed == masked (batch 3, padding, per-instance counts): AssertionError: mode 'packed'" in out
    assert "StreamSpec.padding_input" in out


def test_model_reading_dropped_tokens_fails_packed_with_the_diff(capsys):
    get_registry().adapters.register("toy_mean_pooled", _builds(MeanPooledToy), replace=True)
    assert main(["check", "--adapter", "toy_mean_pooled", "--trials", "2"]) == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "packed == masked" in l)
    assert line.startswith("  [FAIL]") and "max |packed - masked| = " in line and "> 0.0001 in trial 0" in line
    assert "kept per instance" in line and "real tokens {'text': [" in line and "leak" in line


def test_per_token_outputs_are_compared_on_kept_tokens(capsys):
    get_registry().adapters.register("toy_seq", _builds(SeqToyVLM), replace=True)
    assert main(["check", "--adapter", "toy_seq", "--trials", "2"]) == 0, capsys.readouterr().out


def test_build_options_reach_the_adapter(toy_registry, capsys):
    assert main(["check", "--adapter", "toy", "--trials", "1", "--build-option", "heads=2",
                 "--build-option", "cross=1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trimkit check --adapter toy --size tiny --build-option heads=2 --build-option cross=1\n")
    assert "layers {'text': 2, 'vision': 3}" in out and "5 head trimmers" in out


def test_help_describes_the_steps(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for step in ("trace and rewrite", "all masks 1 == original", "hard masks == physical", "bucketed removal", "packed == masked",
                 "per-instance counts", "padding_input", "SKIP", "MACs fall", "--build-option", "--batch"):
        assert step in out, step


def test_bad_arguments_are_reported(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--adapter", "toy", "--batch", "1"])
    assert exit_.value.code == 2
    assert "argument --batch: expected an integer >= 2, got '1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "--adapter", "toy", "--build-option", "novalue"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_check_unknown_adapter_is_reported(capsys):
    assert main(["check", "--adapter", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("trimkit check: error: unknown adapter 'nope'; registered: [")
    assert "Traceback" not in captured.err and captured.out == ""


def test_report_format_marks_skips():
    report = CheckReport("x", "tiny", [CheckResult("a", True, "fine"), CheckResult("b", True, "n/a", skipped=True)])
    assert report.ok and report.skipped == ["b"]
    assert report.format().splitlines() == ["trimkit check --adapter x --size tiny", "  [PASS] a: fine",
                                            "  [SKIP] b: n/a", "OK"]
