"""The CLI's errors (issue 11): every numeric option checked by argparse, naming the option and the
value (exit 2); trimkit's own errors in one or two lines without a traceback (exit 1; ``--debug``
shows it); unexpected exceptions in one line with their type; Ctrl-C exits 130; ``trimkit eval``
says how its batches ran and takes ``--inference``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trimkit import cli
from trimkit.cli import main
from trimkit.commands._args import finite_float, int_range, nonneg_int, positive_int, reduction_float

BAD_NUMBERS = [
    # (command and its required arguments, option, bad value, what the message says is expected)
    (["eval", "--checkpoint", "x"], "--instances", "0", "an integer >= 1"),
    (["eval", "--checkpoint", "x"], "--instances", "-3", "an integer >= 1"),
    (["eval", "--checkpoint", "x"], "--instances", "2.5", "an integer >= 1"),
    (["eval", "--checkpoint", "x"], "--macs-instances", "-1", "an integer >= 0"),
    (["eval", "--checkpoint", "x"], "--macs-instances", "many", "an integer >= 0"),
    (["eval", "--checkpoint", "x"], "--batch-size", "0", "an integer >= 1"),
    (["profile", "--adapter", "meter"], "--reduction", "nan", "a finite number >= 1"),
    (["profile", "--adapter", "meter"], "--reduction", "inf", "a finite number >= 1"),
    (["profile", "--adapter", "meter"], "--reduction", "-inf", "a finite number >= 1"),
    (["profile", "--adapter", "meter"], "--reduction", "0.5", "a finite number >= 1"),
    (["profile", "--adapter", "meter"], "--reduction", "two", "a finite number >= 1"),
    (["profile", "--adapter", "meter"], "--repeats", "0", "an integer >= 1"),
    (["profile", "--adapter", "meter"], "--threads", "0", "an integer >= 1"),
    (["profile", "--adapter", "meter"], "--instances", "0", "an integer >= 1"),
    (["profile", "--adapter", "meter"], "--batch", "0", "an integer >= 1"),
    (["profile", "--adapter", "meter"], "--seed", "-1", "an integer >= 0"),
    (["check", "--adapter", "toy"], "--batch", "1", "an integer >= 2"),
    (["check", "--adapter", "toy"], "--trials", "0", "an integer >= 1"),
    (["check", "--adapter", "toy"], "--seed", "-2", "an integer >= 0"),
    (["demo"], "--finetune-steps", "0", "an integer >= 1"),
]


@pytest.mark.parametrize("base,option,value,want", BAD_NUMBERS,
                         ids=[f"{b[0]} {o} {v}" for b, o, v, _ in BAD_NUMBERS])
def test_bad_numeric_option_is_a_usage_error_naming_it(base, option, value, want, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(base + [f"{option}={value}"])  # "=": argparse would read "-1" as an option otherwise
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: trimkit {base[0]}" in err
    assert f"trimkit {base[0]}: error: argument {option}: expected {want}, got {value!r}" in err
    assert "Traceback" not in err


def test_argument_types():
    assert positive_int("3") == 3 and nonneg_int("0") == 0 and int_range(2)("2") == 2
    assert reduction_float("1") == 1.0 and reduction_float("2.5") == 2.5
    assert finite_float(0.0, 1.0, lo_open=True)("1") == 1.0
    for parse, text in [(positive_int, "0"), (nonneg_int, "-1"), (int_range(2, 4), "5"), (positive_int, "1e3"),
                        (reduction_float, "nan"), (finite_float(), "inf"), (finite_float(0.0, lo_open=True), "0")]:
        with pytest.raises(Exception, match=f"got {text!r}"):
            parse(text)


def test_profile_function_checks_its_numbers_too():
    from trimkit.commands.profile import profile

    for kwargs, name in [({"repeats": 0}, "repeats"), ({"instances": 0}, "instances"), ({"threads": 0}, "threads"),
                         ({"batch": 0}, "batch"), ({"reduction": float("nan")}, "reduction"),
                         ({"reduction": 0.5}, "reduction"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=f"profile: {name} must be"):
            profile("meter", **kwargs)


# --- trimkit's errors: one or two lines, exit 1; --debug: the traceback ----------------------------
def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("argv,message", [
    (["check", "--adapter", "nosuch"], "trimkit check: error: unknown adapter 'nosuch'; registered: ["),
    (["profile", "--adapter", "nosuch"], "trimkit profile: error: unknown adapter 'nosuch'; registered: ["),
    (["eval", "--checkpoint", "/nonexistent"], "trimkit eval: error: /nonexistent: not a trimkit checkpoint"),
])
def test_trimkit_error_is_one_line_and_a_hint(argv, message, capsys):
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = _lines(captured.err)
    assert "Traceback" not in captured.err and captured.out == ""
    assert len(err) == 2 and err[0].startswith(message) and err[1] == cli.HINT


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(where, capsys):
    argv = ["check", "--adapter", "nosuch"]
    assert main(["--debug"] + argv if where == "before" else argv + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "UnknownNameError" in err
    assert _lines(err)[-1].startswith("trimkit check: error: unknown adapter 'nosuch'")
    assert cli.HINT not in err


def test_no_debug_flag_means_no_traceback():
    parser = cli.build_parser()
    assert parser.parse_args(["plugins"]).debug is False
    assert parser.parse_args(["--debug", "plugins"]).debug is True
    assert parser.parse_args(["plugins", "--debug"]).debug is True


def test_error_raised_by_trimkit_code_is_a_message(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["profile", "--adapter", "meter", "--device", "cuda"]) == 1  # a RuntimeError trimkit raises
    err = _lines(capsys.readouterr().err)
    assert err == ["trimkit profile: error: --device cuda: CUDA is not available on this machine", cli.HINT]


def _caught(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        return err
    raise AssertionError("no error")


def test_which_errors_are_trimkit_messages():
    from pydantic import ValidationError

    from trimkit.check import run_check
    from trimkit.config import TrimConfig, TrimConfigError

    assert cli.is_user_error(TrimConfigError("token_target: bad"))  # trimkit's own classes
    assert cli.is_user_error(_caught(lambda: run_check("toy", batch=1)))  # ValueError from a `raise` in trimkit
    assert cli.is_user_error(_caught(lambda: open("/nonexistent/file")))  # a file that is not there
    bad = _caught(lambda: TrimConfig(token_target="lots"))
    assert isinstance(bad, ValidationError) and cli.is_user_error(bad)
    message, known = cli.describe_error(bad)
    assert known and message.startswith("invalid TrimConfig:") and "token_target" in message
    assert "https://" not in message  # pydantic's links left out
    assert not cli.is_user_error(_caught(lambda: int("x")))  # raised outside trimkit: unexpected
    assert not cli.is_user_error(_caught(lambda: {}["k"]))


def test_python_errors_in_trimkit_code_are_bugs_not_messages(tmp_path):
    """Only an explicit ``raise`` in trimkit's code is a message; a TypeError or KeyError that Python
    raises there (a wrong call, a missing key) is reported as unexpected."""
    source = tmp_path / "fake.py"
    source.write_text("def bad_input(x):\n"
                      "    raise ValueError(f'x must be positive, got {x}')\n"
                      "\n"
                      "def bug(d):\n"
                      "    return d['key'] + 1\n")
    namespace = {"__name__": "trimkit._fake_module"}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    err = _caught(lambda: namespace["bad_input"](-1))
    assert cli.is_user_error(err) and cli.describe_error(err) == ("x must be positive, got -1", True)
    for arg in ({}, {"key": "text"}):  # KeyError, TypeError
        err = _caught(lambda: namespace["bug"](arg))
        message, known = cli.describe_error(err)
        assert not known and message.startswith(f"unexpected {type(err).__name__} (raised at ")
        assert "fake.py:5" in message


def test_unexpected_error_is_one_line_with_its_type_and_place(monkeypatch, capsys):
    import trimkit.commands.plugins as plugins_cmd

    def broken(args):
        return {}["missing"]  # a bug

    monkeypatch.setattr(plugins_cmd, "run", broken)
    assert main(["plugins"]) == 1
    captured = capsys.readouterr()
    err = _lines(captured.err)
    assert "Traceback" not in captured.err
    assert err[0].startswith("trimkit plugins: error: unexpected KeyError (raised at ")
    assert "test_cli_errors.py:" in err[0] and err[0].endswith(": 'missing'")
    assert err[1] == cli.BUG_HINT and len(err) == 2
    assert main(["plugins", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "return {}[\"missing\"]" in err


def test_unexpected_multiline_message_keeps_its_first_line(monkeypatch, capsys):
    import trimkit.commands.plugins as plugins_cmd

    def broken(args):
        raise RuntimeError("first line\nsecond line\nthird line")  # outside trimkit: unexpected

    monkeypatch.setattr(plugins_cmd, "run", broken)
    assert main(["plugins"]) == 1
    err = _lines(capsys.readouterr().err)
    assert len(err) == 2 and err[0].startswith("trimkit plugins: error: unexpected RuntimeError (raised at ")
    assert err[0].endswith(": first line [...]") and "second line" not in err[0]


def test_keyboard_interrupt_exits_130_quietly(monkeypatch, capsys):
    import trimkit.commands.plugins as plugins_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plugins_cmd, "run", interrupted)
    assert main(["plugins"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and _lines(err) == ["trimkit plugins: interrupted"]


def test_usage_error_from_a_handler_exits_2_with_usage(monkeypatch, capsys):
    import trimkit.commands.plugins as plugins_cmd

    def conflicting(args):
        raise cli.UsageError("--a and --b conflict")

    monkeypatch.setattr(plugins_cmd, "run", conflicting)
    with pytest.raises(SystemExit) as exit_:
        main(["plugins"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: trimkit plugins" in err and "trimkit plugins: error: --a and --b conflict" in err


def test_end_to_end_exit_status_and_stderr(tmp_path):
    run = subprocess.run([sys.executable, "-m", "trimkit.cli", "eval", "--checkpoint", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stdout == ""
    assert "Traceback" not in run.stderr and len(_lines(run.stderr)) == 2
    assert run.stderr.startswith(f"trimkit eval: error: {tmp_path / 'nope'}: not a trimkit checkpoint")


# --- help --------------------------------------------------------------------------------------
HELP = {
    "eval": ["--checkpoint", "--instances", "--macs-instances", "--batch-size", "--inference", "packed",
             "run masked", "--debug"],
    "profile": ["--reduction", "a finite number >= 1", "--repeats", "--threads", "--instances", "--debug"],
    "check": ["--batch", ">= 2", "--trials", "--debug"],
    "demo": ["--finetune-steps", ">= 1", "--debug"],
    "plugins": ["--json", "--debug"],
    "train": ["--config", "--debug"],
    "repro": ["--seeds", "--quick", "--steps", "--out", "table6", "fig4a", "fig7", "switches", "--debug"],
}


def test_every_builtin_command_has_its_help_checked():
    assert set(HELP) == set(cli.BUILTIN_COMMANDS)


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.startswith(f"usage: trimkit {command}")
    for word in HELP[command]:
        assert word in out, word


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out
    assert "--debug" in out and "Exit status" in out
    assert main([]) == 2  # no command: the help, exit 2


# --- eval: the inference mode, said and chosen -------------------------------------------------
def _train_one_step(out, trim: bool):
    from trimkit_train import ExperimentConfig, Trainer

    config = ExperimentConfig.from_dict({
        "model": {"adapter": "toy", "overrides": {"dim": 32, "heads": 4, "image": 32, "patch": 8, "vocab": 64,
                                                  "labels": 13}},
        "data": {"options": {"grid": 2, "cell": 16, "digits_per_image": [1, 3]}, "train_size": 16, "eval_size": 9},
        "train": {"steps": 1, "batch_size": 8, "eval_batch_size": 4, "macs_instances": 0, "out_dir": str(out),
                  "progress": False},
        "trim": {"token_target": 0.5, "head_target": 0.75} if trim else None,
    })
    Trainer(config).fit()
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, toy_registry_module):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _train_one_step(tmp_path_factory.mktemp("cli") / "run", trim=True)
    torch.set_num_threads(threads)


def test_eval_says_its_batches_run_masked_by_default(run_dir, capsys):
    import warnings

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "inference    remove (batches of 4 run masked" in captured.out
    assert "--inference packed" in captured.out and "the last batch, of 1" in captured.out
    assert "GMACs/inst.  not counted (train.macs_instances of the run is 0" in captured.out
    # said once, in the output: not also as the model's MaskedBatchWarning (which names the API, not the option)
    assert not [w for w in caught if "runs masked" in str(w.message)]


@pytest.mark.parametrize("mode", ["packed", "padded", "hard", "remove"])
def test_eval_inference_option(run_dir, mode, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--inference", mode, "--json", "--macs-instances", "0"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["inference"] == mode and ev["eval_batch_size"] == 4 and ev["n"] == 9
    assert ev["inference_note"].startswith(f"{mode} (") and 0.0 <= ev["accuracy"] <= 1.0


def test_eval_batch_size_and_notes(run_dir, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--batch-size", "1", "--instances", "50",
                 "--macs-instances", "0"]) == 0
    captured = capsys.readouterr()
    assert "inference    remove (batch 1: tokens and heads removed)" in captured.out
    assert "(split test, 9 examples)" in captured.out
    assert "trimkit eval: note: --instances 50: split 'test' has 9 examples" in captured.err


def test_eval_errors_after_loading_are_one_line(run_dir, tmp_path, capsys):
    import shutil

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--split", "nosuch"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(_lines(captured.err)) == 2
    assert _lines(captured.err)[0].startswith("trimkit eval: error: ") and "'nosuch'" in captured.err

    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "checkpoint", broken)
    (broken / "experiment.yaml").write_text("model: [unclosed\n")
    assert main(["eval", "--checkpoint", str(broken)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.startswith("trimkit eval: error: ")
    assert "experiment.yaml" in captured.err and cli.HINT in captured.err


def test_eval_of_a_plain_backbone_says_inference_does_not_apply(tmp_path, toy_registry, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _train_one_step(tmp_path / "plain", trim=False)
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(run), "--inference", "packed", "--macs-instances", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "inference    full model (no trimmers)" in captured.out
    assert "note: --inference packed ignored" in captured.err and "plain backbone" in captured.err
