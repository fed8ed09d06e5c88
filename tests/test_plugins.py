"""Plugin discovery through the ``trimkit`` entry-point group, as a third party would ship one."""

import importlib.metadata
import json
import sys
import textwrap
import types
import warnings

import pytest
import torch

from trimkit import TrimConfig, trim
from trimkit import plugins as P

THIRD_PARTY = '''
import torch
from torch import nn
from trimkit import hookimpl
from toyvlm import ToyAdapter


class NormPolicy(nn.Module):
    """A user's token policy: a linear score of each token, nothing cross-modal."""

    def __init__(self, dim, context_dim, config):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.constant_(self.score.bias, config.init_logit)

    def forward(self, hidden, cls_self, cls_context):
        return self.score(hidden).squeeze(-1)


class ThirdPartyToyAdapter(ToyAdapter):
    pass


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("toy3p", ThirdPartyToyAdapter())


@hookimpl
def trimkit_register_token_policies(registry):
    registry.token_policies.register("norm", NormPolicy)
'''


def _install(tmp_path, module: str, source: str, dist: str = "thirdparty-trim") -> None:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[trimkit]\n{module} = {module}\n")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    P.reset()
    yield tmp_path
    P.reset()
    for name in [m for m in sys.modules if m.endswith("_trim")]:
        del sys.modules[name]


def test_third_party_adapter_and_policy_end_to_end(fresh):
    from toyvlm import ToyVLM

    _install(fresh, "thirdparty_trim", THIRD_PARTY)
    registry = P.get_registry()
    assert registry.adapters.source("toy3p") == "thirdparty_trim (thirdparty-trim 1.0)"
    assert "cross_modal" in registry.token_policies  # built-ins still there, through the same mechanism
    assert registry.token_policies.source("cross_modal").startswith("smarttrim (trimkit")

    torch.manual_seed(0)
    model = ToyVLM().eval()
    assert P.select_adapter(model) == "toy3p"  # found from the model, no name given
    tmodel = trim(model, TrimConfig(token_policy="norm", token_target=0.5))
    assert tmodel.adapter_name == "toy3p"
    assert type(tmodel.trimmers["cross_v_0"].token).__name__ == "NormPolicy"
    x = registry.adapters.get("toy3p").example_inputs(model, 2, seed=0)
    tmodel.train()
    tmodel(**x).sum().backward()
    tmodel.eval()
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.normal_(0, 0.3)
        one = {k: v[:1] for k, v in x.items()}
        with tmodel.mode("hard"):
            a = tmodel(**one)
        b = tmodel(**one)  # eval at batch 1 removes tokens
    assert min(float(r.keep) for r in tmodel.records if r.kind == "token") < 1
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


BUILTIN_ADAPTERS = {"meter", "timm", "open_clip", "blip", "bridgetower"}

HALF_REGISTERS = '''
from trimkit import hookimpl
from toyvlm import ToyAdapter


def sampler(logits, temperature):
    return logits.sigmoid()


@hookimpl
def trimkit_register_adapters(registry):
    registry.adapters.register("half_adapter", ToyAdapter())


@hookimpl
def trimkit_register_samplers(registry):
    registry.samplers.register("half_sampler", sampler)
    registry.samplers.register("gumbel", sampler, replace=True)  # a replacement, rolled back too
    raise RuntimeError("half way through")
'''

MISSPELT = '''
from trimkit import hookimpl
from toyvlm import ToyAdapter


@hookimpl
def trimkit_register_adapter(registry):  # missing "s": no such hook
    registry.adapters.register("never", ToyAdapter())
'''

BAD_SAMPLER = '''
from trimkit import hookimpl


@hookimpl
def trimkit_register_samplers(registry):
    registry.samplers.register("one_arg", lambda logits: logits)
'''


def _assert_builtins(registry) -> None:
    assert BUILTIN_ADAPTERS <= set(registry.adapters.names())
    assert registry.token_policies.source("cross_modal").startswith("smarttrim (trimkit")
    assert registry.samplers.source("gumbel").startswith("smarttrim (trimkit")


def test_broken_plugin_is_reported_and_skipped(fresh, capsys):
    _install(fresh, "broken_trim", "raise ImportError('needs libfoo')\n", dist="broken-dist")
    _install(fresh, "thirdparty_trim", THIRD_PARTY)
    with pytest.warns(P.PluginWarning, match=r"skipped plugin 'broken_trim' .*broken-dist 1\.0.*needs libfoo"):
        registry = P.get_registry()
    _assert_builtins(registry)
    assert "toy3p" in registry.adapters and "norm" in registry.token_policies  # the healthy third party loads
    [failure] = P.failures()
    assert (failure.name, failure.distribution, failure.stage) == ("broken_trim", "broken-dist 1.0", "import")
    assert failure.error == "ImportError: needs libfoo"
    assert P.describe_failures() == [{"name": "broken_trim", "source": "broken_trim (broken-dist 1.0)",
                                      "error": "import: ImportError: needs libfoo"}]

    from trimkit.cli import main

    assert main(["plugins"]) == 0  # the rest loaded: not an error
    out = capsys.readouterr().out
    table, _, failed = out.partition("failed to load:")
    assert "toy3p" in table and "cross_modal" in table and "broken_trim" not in table
    assert "broken_trim" in failed and "broken-dist 1.0" in failed and "ImportError: needs libfoo" in failed


def test_plugin_whose_hook_raises_leaves_nothing_behind(fresh):
    _install(fresh, "half_trim", HALF_REGISTERS, dist="half-dist")
    _install(fresh, "thirdparty_trim", THIRD_PARTY)
    with pytest.warns(P.PluginWarning, match=r"'half_trim'.*trimkit_register_samplers failed: RuntimeError: half way"):
        registry = P.get_registry()
    assert "half_adapter" not in registry.adapters  # registered by its (successful) adapters hook: rolled back
    assert "half_sampler" not in registry.samplers
    _assert_builtins(registry)  # the replaced 'gumbel' is smarttrim's again
    assert registry.samplers.get("gumbel").__name__ == "gumbel_sigmoid"
    assert "toy3p" in registry.adapters
    assert [(f.name, f.stage) for f in P.failures()] == [("half_trim", "trimkit_register_samplers")]
    assert not P.get_plugin_manager().has_plugin("half_trim")  # not run again on a rebuild
    import trimkit_smarttrim

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.get_registry(plugins=[trimkit_smarttrim])
    assert len(P.failures()) == 1


def test_third_party_cannot_take_a_builtin_name(fresh):
    _install(fresh, "clash_trim", '''
from trimkit import hookimpl


@hookimpl
def trimkit_register_token_policies(registry):
    registry.token_policies.register("cross_modal", lambda dim, context_dim, config: None)
''', dist="clash-dist")
    with pytest.warns(P.PluginWarning, match="'cross_modal' is already registered by smarttrim"):
        registry = P.get_registry()
    _assert_builtins(registry)  # third parties register after the built-ins: the clash is theirs
    assert [f.name for f in P.failures()] == ["clash_trim"]


def test_builtin_failure_raises(fresh, monkeypatch):
    real = P._entry_points
    fake = importlib.metadata.EntryPoint("smarttrim_extra", "trimkit_smarttrim.no_such_module", P.ENTRY_POINT_GROUP)
    monkeypatch.setattr(P, "_entry_points", lambda: real() + [fake])
    with pytest.raises(P.PluginLoadError, match=r"built-in trimkit plugin 'smarttrim_extra'.*no_such_module"):
        P.get_registry()


def test_autoload_off_still_loads_builtins(fresh, monkeypatch):
    _install(fresh, "thirdparty_trim", THIRD_PARTY)
    monkeypatch.setenv(P.DISABLE_AUTOLOAD_ENV, "1")
    registry = P.get_registry()
    _assert_builtins(registry)
    assert "toy3p" not in registry.adapters and "norm" not in registry.token_policies
    import thirdparty_trim

    registry = P.get_registry(plugins=[thirdparty_trim])  # registered by hand instead
    assert registry.adapters.source("toy3p") == "thirdparty_trim"
    _assert_builtins(registry)


def test_plugins_can_be_excluded_by_name(fresh, monkeypatch, capsys):
    _install(fresh, "thirdparty_trim", THIRD_PARTY)
    monkeypatch.setenv(P.EXCLUDE_ENV, " smarttrim, thirdparty_trim ,blip")
    registry = P.get_registry()
    assert "toy3p" not in registry.adapters and "blip" not in registry.adapters
    # smarttrim excluded (other installed plugins, e.g. training_free, may still register policies)
    assert not {"cross_modal", "local", "random"} & set(registry.token_policies.names()) and len(registry.samplers) == 0
    assert BUILTIN_ADAPTERS - {"blip"} <= set(registry.adapters.names())
    assert P.excluded() == ["blip", "smarttrim", "thirdparty_trim"]

    from trimkit.cli import main

    assert main(["plugins"]) == 0
    assert "excluded by TRIMKIT_EXCLUDE_PLUGINS: blip, smarttrim, thirdparty_trim" in capsys.readouterr().out


def test_misspelt_hook_by_hand_is_a_clear_error(fresh):
    misspelt = types.ModuleType("misspelt_trim")
    exec(textwrap.dedent(MISSPELT), misspelt.__dict__)
    with pytest.raises(P.PluginHookError) as err:
        P.get_registry(plugins=[misspelt])
    msg = str(err.value)
    assert "'misspelt_trim'" in msg
    assert "'trimkit_register_adapter' (did you mean 'trimkit_register_adapters'?)" in msg
    assert "Valid hooks: trimkit_register_adapters, trimkit_register_head_policies" in msg
    assert "trimkit_select_adapter." in msg
    assert not P.get_plugin_manager().is_registered(misspelt)  # the manager is still usable
    _assert_builtins(P.get_registry())


def test_misspelt_hook_of_an_entry_point_is_skipped(fresh):
    _install(fresh, "misspelt_trim", MISSPELT, dist="misspelt-dist")
    with pytest.warns(P.PluginWarning, match="unknown hook"):
        registry = P.get_registry()
    [failure] = P.failures()
    assert failure.name == "misspelt_trim" and failure.stage == "hooks"
    assert "'trimkit_register_adapter' (did you mean 'trimkit_register_adapters'?)" in failure.error
    assert failure.error.endswith("trimkit_select_adapter.")  # the whole message, valid hooks included
    assert "never" not in registry.adapters
    _assert_builtins(registry)


def test_registration_is_checked_against_the_protocols(fresh):
    from toyvlm import ToyAdapter

    from trimkit.registry import RegistrationError

    _install(fresh, "bad_trim", BAD_SAMPLER, dist="bad-dist")
    with pytest.warns(P.PluginWarning):
        registry = P.get_registry()
    [failure] = P.failures()
    assert failure.error.startswith("RegistrationError: sampler 'one_arg' registered by bad_trim (bad-dist 1.0)")
    assert "trimkit.protocols.Sampler" in failure.error and "f(logits, temperature)" in failure.error
    assert "one_arg" not in registry.samplers

    class NoBuild:
        matches = describe = example_inputs = ToyAdapter.matches

    cases = [
        (registry.adapters, NoBuild(), r"adapter 'x' registered by <direct> .*Adapter.*without build"),
        (registry.adapters, ToyAdapter, r"adapter 'x'.*the class ToyAdapter itself"),
        (registry.token_policies, 3, r"token policy 'x'.*TokenPolicyFactory.*not callable"),
        (registry.token_policies, lambda dim, config: None, r"token policy 'x'.*f\(dim, context_dim, config\)"),
        (registry.head_policies, lambda dim, ctx, config: None, r"head policy 'x'.*num_heads"),
        (registry.objectives, lambda: None, r"objective 'x'.*ObjectiveFactory.*f\(config\)"),
        (registry.schedulers, lambda config, *, total: None, r"scheduler 'x'.*SchedulerFactory.*'total'"),
    ]
    for reg, obj, pattern in cases:
        with pytest.raises(RegistrationError, match=pattern):
            reg.register("x", obj)
        assert "x" not in reg
    # what the core accepts passes: classes, lambdas, defaults, *args, instances of adapters
    registry.token_policies.register("ok", lambda dim, context_dim, config, extra=None: None)
    registry.samplers.register("ok", lambda *args: None)
    registry.adapters.register("ok", ToyAdapter())
    from trimkit.protocols import Adapter, Scheduler
    from trimkit_smarttrim import LinearCurriculum

    assert isinstance(ToyAdapter(), Adapter) and isinstance(LinearCurriculum(), Scheduler)


def test_duplicate_names_are_refused():
    reg = P.get_registry()
    with pytest.raises(ValueError, match="already registered by smarttrim"):
        reg.token_policies.register("cross_modal", object())


def test_cli_lists_plugins_as_json(capsys):
    from trimkit.cli import main

    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {(r["kind"], r["name"]) for r in rows}
    assert ("token_policies", "cross_modal") in names and ("samplers", "gumbel") in names
    assert ("adapters", "meter") in names
    assert all(r["source"] for r in rows)
