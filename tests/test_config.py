"""TrimConfig validation: bad values name the field; names list what is registered."""

import pytest
import torch
from pydantic import ValidationError
from toyvlm import ToyVLM

from trimkit import TrimConfig, TrimConfigError, trim


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, {"vision": 0.0}, {"vision": 2}, {}])
def test_ratio_out_of_range_names_field(value):
    with pytest.raises(ValidationError) as err:
        TrimConfig(token_target=value)
    assert "token_target" in str(err.value)


def test_unknown_policy_lists_registered():
    with pytest.raises(ValidationError) as err:
        TrimConfig(token_policy="nope")
    msg = str(err.value)
    assert "token_policy" in msg and "'nope'" in msg and "cross_modal" in msg and "local" in msg


def test_unknown_adapter_lists_registered():
    with pytest.raises(ValidationError) as err:
        TrimConfig(adapter="no-such-backbone")
    assert "adapter" in str(err.value) and "no-such-backbone" in str(err.value)


def test_unknown_field_rejected():
    with pytest.raises(ValidationError) as err:
        TrimConfig(lambda_cots=3)
    assert "lambda_cots" in str(err.value)


def test_defaults_follow_the_paper():
    from trimkit_train import RecipeConfig

    cfg, recipe = TrimConfig(), RecipeConfig()
    assert recipe.lambda_cost == 20.0 and recipe.lambda_sd == 1.0 and recipe.curriculum_fraction == 0.5
    assert cfg.token_policy == "cross_modal" and cfg.sampler == "gumbel"


def test_recipe_fields_are_not_trim_config_fields():
    with pytest.raises(ValidationError, match="lambda_cost.*recipe"):
        TrimConfig(lambda_cost=3.0)
    # a checkpoint's dump from before the recipe moved out still loads (the fields are dropped)
    old = {**TrimConfig(token_target=0.5).model_dump(mode="json"), "lambda_cost": 20.0, "objective": "smarttrim"}
    assert TrimConfig.from_saved(old) == TrimConfig(token_target=0.5)


def test_legacy_experiment_config_moves_recipe_fields():
    from trimkit_train import ExperimentConfig

    legacy = ExperimentConfig.from_dict({"train": {"steps": 1}, "trim": {"token_target": 0.5, "lambda_cost": 7.0,
                                                                       "final_temperature": 0.1}})
    assert legacy.trim == TrimConfig(token_target=0.5)
    assert legacy.recipe.lambda_cost == 7.0 and legacy.recipe.final_temperature == 0.1
    with pytest.raises(ValueError, match="both"):
        ExperimentConfig.from_dict({"train": {"steps": 1}, "trim": {"lambda_cost": 7.0}, "recipe": {"lambda_cost": 1.0}})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = TrimConfig(token_target={"vision": 0.5, "text.cross": 0.8}, head_target=0.6, token_layers=["vision"])
    path = cfg.save(tmp_path / f"cfg{suffix}")
    assert TrimConfig.load(path) == cfg


def test_load_bad_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("token_target: 3\n")
    with pytest.raises(ValidationError, match="token_target"):
        TrimConfig.load(p)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TrimConfig.load(tmp_path / "missing.yaml")


def test_layer_selector_that_does_not_exist(toy_registry):
    model = ToyVLM(cross=2)
    with pytest.raises(TrimConfigError) as err:
        trim(model, TrimConfig(token_layers=["vision.cross.7"]), adapter="toy")
    assert "token_layers[0]" in str(err.value) and "vision.cross.7" in str(err.value)


def test_target_key_that_selects_nothing(toy_registry):
    with pytest.raises(TrimConfigError, match=r"token_target\['audio'\]"):
        trim(ToyVLM(), TrimConfig(token_target={"audio": 0.5}), adapter="toy")


def test_per_site_targets_resolve_most_specific_first(toy_registry):
    tmodel = trim(ToyVLM(cross=2), TrimConfig(token_target={"vision": 0.5, "vision.cross.1": 0.3, "text": 0.9},
                                              head_target={"cross": 0.7, "default": 0.8}), adapter="toy")
    t = tmodel.final_targets
    assert t["vision.0"] == 0.5 and t["cross_v.0"] == 0.5 and t["cross_v.1"] == 0.3 and t["cross_t.0"] == 0.9
    assert t["cross_v.0.1"] == 0.7  # cross-attention module of a cross layer
    assert t["cross_v.0.0"] == 0.7  # self-attention inside a cross-*site* layer: the site key 'cross' matches first
    assert t["vision.0.0"] == 0.8


def test_only_selected_layers_get_trimmers(toy_registry):
    tmodel = trim(ToyVLM(cross=2), TrimConfig(token_layers=["cross_v.1", "text.uni"], trim_heads=False), adapter="toy")
    with_token = {k for k, v in tmodel.trimmers.items() if v.token is not None}
    assert with_token == {"cross_v_1", "text_0"}
    assert all(len(v.heads) == 0 for v in tmodel.trimmers.values())


def test_unrecognised_model_error_names_class():
    from trimkit.plugins import select_adapter

    with pytest.raises(LookupError, match="Linear"):
        select_adapter(torch.nn.Linear(2, 2))


def test_untrimmable_layers_get_no_trimmers_and_match_no_selector():
    import dataclasses

    from toyvlm import ToyAdapter

    from trimkit.plugins import get_registry

    class Partly(ToyAdapter):
        def describe(self, model):
            spec = super().describe(model)
            layers = [dataclasses.replace(l, trimmable=l.stream != "text") for l in spec.layers]
            return dataclasses.replace(spec, layers=layers)

    get_registry().adapters.register("toy_partly", Partly(), replace=True)
    tmodel = trim(ToyVLM(cross=2), TrimConfig(token_target=0.5, head_target=0.5), adapter="toy_partly")
    text = [k for k in tmodel.trimmers if k.startswith(("text", "cross_t"))]
    assert text and all(tmodel.trimmers[k].token is None and len(tmodel.trimmers[k].heads) == 0 for k in text)
    assert tmodel.trimmers["cross_v_0"].token is not None
    with pytest.raises(TrimConfigError, match="token_layers"):
        trim(ToyVLM(cross=2), TrimConfig(token_layers=["text"]), adapter="toy_partly")
