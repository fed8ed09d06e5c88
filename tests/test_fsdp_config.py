"""The sharded-training (FSDP2) settings a launch gives the trainer: the example accelerate config is
accepted as `accelerate launch` passes it (environment variables), options that would split the model
into per-layer units or that the trainer does not honour are refused naming the option. (Sharded
training itself runs in tests/test_distributed.py, 2 CPU processes.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from trimkit_train import ConfigError
from trimkit_train.trainer import TrainConfig, fsdp_settings

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp.yaml"


def _launch_env(config_file: Path) -> dict[str, str]:
    """The FSDP environment variables `accelerate launch --config_file FILE` sets for its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args = _validate_launch_command(args)[0]
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def _settings(monkeypatch, env: dict[str, str], train: TrainConfig | None = None):
    from accelerate.utils import FullyShardedDataParallelPlugin

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    acc = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"), state=SimpleNamespace(fsdp_plugin=plugin),
                          num_processes=8)
    return fsdp_settings(acc, train or TrainConfig(steps=1))


def test_the_example_fsdp_config_is_accepted(monkeypatch):
    env = _launch_env(CONFIG)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert _settings(monkeypatch, env) == {"reshard_after_forward": True}


def test_fsdp_version_1_is_refused():
    # (accelerate's FSDP1 plugin needs a GPU to be built: a stand-in with its fields)
    plugin = SimpleNamespace(fsdp_version=1, auto_wrap_policy=None, activation_checkpointing=False)
    acc = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"), state=SimpleNamespace(fsdp_plugin=plugin),
                          num_processes=8)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        fsdp_settings(acc, TrainConfig(steps=1))


@pytest.mark.parametrize("key, value, named", [
    ("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP", "fsdp_auto_wrap_policy: NO_WRAP"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "fsdp_activation_checkpointing"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "true", "fsdp_cpu_ram_efficient_loading"),
])
def test_options_that_split_the_model_or_are_not_honoured_are_refused(monkeypatch, key, value, named):
    env = dict(_launch_env(CONFIG), **{key: value})
    if key == "FSDP_AUTO_WRAP_POLICY":
        env["FSDP_TRANSFORMER_CLS_TO_WRAP"] = "Linear"
    with pytest.raises(ConfigError, match=named):
        _settings(monkeypatch, env)


def test_train_fsdp_settings_on_a_data_parallel_launch():
    ddp = SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_GPU"), state=SimpleNamespace(), num_processes=4)
    assert fsdp_settings(ddp, TrainConfig(steps=1)) is None  # not asked for
    assert fsdp_settings(ddp, TrainConfig(steps=1, fsdp=True)) == {}
    bf16 = fsdp_settings(ddp, TrainConfig(steps=1, fsdp=True, mixed_precision="bf16"))
    import torch

    assert bf16["mp_policy"].param_dtype == torch.bfloat16 and bf16["mp_policy"].reduce_dtype == torch.float32
    one = SimpleNamespace(distributed_type=SimpleNamespace(name="NO"), state=SimpleNamespace(), num_processes=1)
    with pytest.warns(UserWarning, match="nothing to shard"):
        assert fsdp_settings(one, TrainConfig(steps=1, fsdp=True)) is None


def test_fsdp_with_fp16_is_refused():
    with pytest.raises(ValueError, match="fsdp with mixed_precision fp16"):
        TrainConfig(steps=1, fsdp=True, mixed_precision="fp16")


def test_fp16_under_an_accelerate_fsdp_launch_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="fp16"):
        _settings(monkeypatch, _launch_env(CONFIG), TrainConfig(steps=1, mixed_precision="fp16"))
