"""``trimkit profile``: MACs per instance and interleaved speed, on the tiny METER (fast)."""

import json

import pytest
import torch

from trimkit.cli import main
from trimkit.commands.profile import profile

KEYS = {"macs_full", "macs_trimmed", "macs_ratio", "speed_ratio", "device", "batch"}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_profile_calibrates_untrained_trimmers_to_the_reduction():
    out = profile("meter", size="tiny", batch=1, reduction=2.0, repeats=1, instances=2, threads=1)
    assert KEYS <= set(out)
    assert out["decisions"] == "calibrated" and "calibrated to 2x" in out["source"]
    assert out["macs_ratio"] == pytest.approx(2.0, rel=0.15)
    assert len(out["macs_trimmed_per_instance"]) == 2
    assert all(t < f for f, t in zip(out["macs_full_per_instance"], out["macs_trimmed_per_instance"]))
    assert out["speed_ratio"] > 0 and out["latency_full_ms"] > 0 and out["engine"] == "remove"


def test_profile_cli_json_batch_uses_packed_engine(capsys):
    assert main(["profile", "--adapter", "meter", "--size", "tiny", "--batch", "3", "--reduction", "1.5",
                 "--repeats", "1", "--instances", "2", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert KEYS <= set(out)
    assert out["batch"] == 3 and out["device"] == "cpu" and out["engine"] == "packed"
    assert out["throughput_full"] > 0 and out["throughput_trimmed"] > 0
    assert out["macs_full"] / out["macs_trimmed"] == pytest.approx(out["macs_ratio"])


def test_profile_with_checkpoint(tmp_path, capsys):
    from trimkit import TrimConfig, trim
    from trimkit.plugins import get_registry

    impl = get_registry().adapters.get("meter")
    model = impl.build(size="tiny", seed=0)
    tmodel = trim(model, TrimConfig(token_target=0.5), adapter="meter")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tmodel.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    tmodel.save_pretrained(tmp_path)
    assert main(["profile", "--adapter", "meter", "--size", "tiny", "--checkpoint", str(tmp_path),
                 "--repeats", "1", "--instances", "2", "--threads", "1", "--reduction", "3"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert f"trained checkpoint {tmp_path}" in text and "speed ratio" in text and "MACs per instance" in text
    assert "note: --reduction 3 ignored: the keep decisions come from --checkpoint" in captured.err  # not silently


def test_profile_cuda_unavailable_is_clear():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        profile("meter", size="tiny", device="cuda")


def test_profile_compile_times_the_compiled_model_alongside(capsys):
    """``--compile BUCKETS``: the compiled trimmed model in the same interleaved rounds (inductor, the real
    path), every layer compiled (no eager fallback); refused at batch > 1."""
    assert main(["profile", "--adapter", "meter", "--size", "tiny", "--reduction", "2", "--repeats", "1",
                 "--instances", "2", "--threads", "1", "--compile", "2", "--new-tokens", "0"]) == 0
    text = capsys.readouterr().out
    assert "  compiled (2 buckets, " in text and "the eager trimmed model" in text and "run eager" not in text
    with pytest.raises(ValueError, match="compile .* is batch-1 inference; got batch 3"):
        profile("meter", size="tiny", batch=3, repeats=1, instances=1, compile_buckets=2)
