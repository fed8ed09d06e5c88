"""The core package holds no training code: ``trimkit`` (and the shipped adapters and method
plugins) import and trim a model without the training extras (accelerate, scikit-learn,
matplotlib), and without importing ``trimkit_train``; ``trimkit_train`` says which extras it needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import sys
    class _Block:
        names = {"accelerate", "sklearn", "matplotlib"}
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    import importlib.util
    _find = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in _Block.names else _find(name, *a)
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_core_trims_without_training_extras():
    proc = _run("""
        import torch, trimkit
        from trimkit import trim, TrimConfig, get_registry
        from trimkit_meter import build_meter, meter_example_inputs
        names = get_registry().adapters.names()
        model = build_meter("tiny")
        tmodel = trim(model, TrimConfig(token_target=0.5, head_target=0.5))
        tmodel.eval()
        with torch.no_grad():
            tmodel(**meter_example_inputs(model, batch_size=1))
        # the built-in task plugin (trimkit_train.tasks) loads with the registry; nothing else of it may
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("trimkit_train", "accelerate", "sklearn", "matplotlib")
                     and m not in ("trimkit_train", "trimkit_train._extras") and not m.startswith("trimkit_train.tasks"))
        print("ADAPTERS", names)
        print("LOADED", bad)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout
    for name in ("meter", "timm", "open_clip", "blip", "bridgetower", "vilt"):
        assert repr(name) in proc.stdout


def test_training_package_names_the_missing_extras():
    proc = _run("""
        import trimkit_train  # importing works; using the Trainer needs the extras
        from trimkit_train import ExperimentConfig, Trainer
        config = ExperimentConfig.from_dict({"train": {"steps": 1}})
        try:
            Trainer(config)
        except ImportError as err:
            print("ERROR", err)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR" in proc.stdout and "accelerate" in proc.stdout and "trimkit[train]" in proc.stdout


def test_cli_without_training_extras_keeps_core_commands():
    proc = _run("""
        from trimkit.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
    """)
    # the training commands need the extras: without them `trimkit --help` still lists the core ones
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check" in proc.stdout and "plugins" in proc.stdout and "train" in proc.stdout


def test_train_command_without_extras_is_one_line_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 1}\n")
    proc = _run(f"""
        from trimkit.cli import main
        raise SystemExit(main(["train", "--config", {str(cfg)!r}, "--out", {str(tmp_path / 'run')!r}]))
    """)
    assert proc.returncode == 1
    assert "trimkit[train]" in proc.stderr and "Traceback" not in proc.stderr
