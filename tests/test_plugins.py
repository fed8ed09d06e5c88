"""Plugin discovery through the ``trimkit`` entry-point group, as a third party would ship one."""

import json
import sys
import textwrap

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
    for name in [m for m in sys.modules if m in ("thirdparty_trim", "broken_trim")]:
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


def test_broken_plugin_names_itself_and_its_distribution(fresh):
    _install(fresh, "broken_trim", "raise ImportError('needs libfoo')\n", dist="broken-dist")
    with pytest.raises(P.PluginLoadError) as err:
        P.get_registry()
    msg = str(err.value)
    assert "'broken_trim'" in msg and "broken-dist 1.0" in msg and "needs libfoo" in msg


def test_autoload_can_be_switched_off(fresh, monkeypatch):
    monkeypatch.setenv(P.DISABLE_AUTOLOAD_ENV, "1")
    registry = P.get_registry()
    assert len(registry.token_policies) == 0 and len(registry.adapters) == 0
    import trimkit_smarttrim

    registry = P.get_registry(plugins=[trimkit_smarttrim])  # registered by hand instead
    assert "cross_modal" in registry.token_policies


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
