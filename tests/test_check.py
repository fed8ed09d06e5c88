"""``trimkit check``: passes on a correct adapter, fails readably on a wrong description."""

import dataclasses

from toyvlm import ToyAdapter

from trimkit.cli import main
from trimkit.plugins import get_registry


class ForgetfulAdapter(ToyAdapter):
    """Describes ToyVLM but forgets that the cross layers' ``context_bias`` carries text tokens."""

    def describe(self, model):
        spec = super().describe(model)
        layers = [dataclasses.replace(l, context_token_args={}) if l.site == "cross" else l for l in spec.layers]
        return dataclasses.replace(spec, layers=layers)


def test_check_passes_on_toy_adapter(toy_registry, capsys):
    assert main(["check", "--adapter", "toy", "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("[PASS]") == 5 and "OK" in out


def test_check_fails_on_wrong_description(capsys):
    get_registry().adapters.register("forgetful", ForgetfulAdapter(), replace=True)
    assert main(["check", "--adapter", "forgetful", "--trials", "3"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] hard masks == physical removal" in out and "FAILED" in out


def test_check_unknown_adapter_is_reported(capsys):
    assert main(["check", "--adapter", "nope"]) == 1
    assert "unknown adapter 'nope'" in capsys.readouterr().out
