"""The ``trimkit`` command line. Each subcommand lives in :mod:`trimkit.commands` and registers
itself with ``register(subparsers)``; its handler returns the process exit code.

Errors, the same for every subcommand (the handler only raises):

* bad arguments (argparse, the ``type=`` functions of :mod:`trimkit.commands._args`, or a
  :class:`UsageError` raised by a handler): the subcommand's usage and ``trimkit CMD: error: ...``
  on stderr, exit status 2;
* trimkit's own errors for bad input (a checkpoint or config that cannot be used, an unknown
  adapter, a trace that fails...): ``trimkit CMD: error: <message>`` and a hint to rerun with
  ``--debug``, on stderr, exit status 1;
* anything else (a bug in trimkit, an adapter or a library): one line with the exception's type,
  where it was raised and its message, and the hint; exit status 1;
* ``--debug`` (``trimkit --debug CMD ...`` or ``trimkit CMD ... --debug``) prints the traceback too;
* Ctrl-C: ``trimkit CMD: interrupted``, exit status 130.
"""

from __future__ import annotations

import argparse
import dis
import importlib
import os
import re
import sys
import traceback
from typing import Any

from trimkit.commands._args import finite_float, int_range, nonneg_int, positive_int, reduction_float

__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "describe_error", "is_user_error",
           "finite_float", "int_range", "nonneg_int", "positive_int", "reduction_float"]

#: Built-in commands, in ``--help`` order: name -> module with ``register(subparsers)``. The
#: training commands live in the ``trimkit_train`` package (optional dependencies: ``trimkit[train]``);
#: other distributions add commands through the ``trimkit.commands`` entry-point group.
BUILTIN_COMMANDS = {
    "demo": "trimkit_train.commands.demo",
    "repro": "trimkit_train.commands.repro",
    "train": "trimkit_train.commands.train",
    "eval": "trimkit_train.commands.eval",
    "check": "trimkit.commands.check",
    "profile": "trimkit.commands.profile",
    "plugins": "trimkit.commands.plugins",
}
COMMANDS = tuple(BUILTIN_COMMANDS)

HINT = "(run with --debug for the traceback)"
BUG_HINT = "(unexpected: probably a bug; run with --debug for the traceback)"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

# exception types that trimkit (and its adapters/plugins) raise with a message meant for the user
# when they come out of an explicit ``raise`` in trimkit's own code
_RAISED_BY_TRIMKIT = (ValueError, TypeError, LookupError, RuntimeError, NotImplementedError)
_FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class UsageError(Exception):
    """Raised by a subcommand handler for arguments that argparse cannot check alone (options that
    conflict, a value that does not fit the loaded checkpoint...): printed with the subcommand's
    usage, exit status 2."""


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the full traceback (also accepted before the command)")


def _command_modules() -> dict[str, str]:
    """The built-in commands, then those of the ``trimkit.commands`` entry points (a name already
    taken is skipped)."""
    from importlib.metadata import entry_points

    modules = dict(BUILTIN_COMMANDS)
    for ep in entry_points(group="trimkit.commands"):
        modules.setdefault(ep.name, ep.value)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimkit",
        description="SmartTrim for vision-language transformers: learned, cross-modal token and head trimming.",
        epilog="Run `trimkit COMMAND --help` for a command's options. Exit status: 0 success, 1 an error "
               "(one line on stderr; --debug for the traceback) or a failed check, 2 bad arguments, 130 interrupted.",
    )
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, path in _command_modules().items():
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name is None or not path.startswith(err.name):
                raise
            continue  # not installed in this build
        module.register(sub)
    for name, p in sub.choices.items():
        if not any("--debug" in a.option_strings for a in p._actions):
            # SUPPRESS: without --debug after the command, the global one (or its False) stands
            _add_debug(p, argparse.SUPPRESS)
    return parser


def _module_of(tb) -> str:
    return str(tb.tb_frame.f_globals.get("__name__", ""))


def _is_trimkit_module(name: str) -> bool:
    top = name.split(".")[0]
    return top == "trimkit" or top.startswith("trimkit_")


def _innermost(err: BaseException):
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _at_raise_statement(tb) -> bool:
    """Whether a traceback entry stopped at a ``raise`` statement (not at an operation or a call
    that failed): the bytecode there, or else the source line."""
    code = tb.tb_frame.f_code
    try:
        return dis.opname[code.co_code[tb.tb_lasti]] == "RAISE_VARARGS"
    except (IndexError, TypeError):  # pragma: no cover - an unusual code object: read the line
        pass
    import linecache

    line = linecache.getline(code.co_filename, tb.tb_lineno).strip()
    return re.match(r"(?:[^#]*:\s*)?raise\b", line) is not None and "(" not in line.split("raise", 1)[0]


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of trimkit's errors about its input (printed as a plain message)
    rather than an unexpected one (a bug: printed with its type and where it was raised).

    trimkit's errors: a class defined by trimkit or one of its adapters/plugins (``TrimConfigError``,
    ``ConfigError``, ``TraceError``, ``PluginLoadError``, ``UnknownNameError``, ``CalibrationError``...),
    pydantic's ``ValidationError`` (a config value), a file that is missing or cannot be read, and a
    ``ValueError``/``TypeError``/``LookupError``/``RuntimeError`` from an explicit ``raise`` statement
    in trimkit's (or an adapter's) code. A ``TypeError`` or ``KeyError`` that Python raises in trimkit's
    code (a wrong call, a missing key) is a bug, not a message.
    """
    if _is_trimkit_module(type(err).__module__):
        return True
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic is a dependency
        ValidationError = ()  # type: ignore[assignment]
    if isinstance(err, ValidationError):
        return True
    if isinstance(err, _FILE_ERRORS):
        return True
    if isinstance(err, _RAISED_BY_TRIMKIT):
        tb = _innermost(err)
        if tb is None or not _is_trimkit_module(_module_of(tb)):
            return False
        return _at_raise_statement(tb)
    return False


def _validation_message(err: Any) -> str:
    """pydantic's ValidationError, one line per field, without its links."""
    lines = [f"invalid {err.title}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        got = ""
        if "input" in e and not isinstance(e["input"], dict):
            shown = repr(e["input"])
            got = f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        lines.append(f"  {where}: {e.get('msg', '')}{got}")
    return "\n".join(lines)


def _where(tb) -> str:
    """``package/module.py:LINE`` of a traceback entry (the path from its top-level package)."""
    path = tb.tb_frame.f_code.co_filename
    module = _module_of(tb)
    parts = path.replace(os.sep, "/").split("/")
    depth = module.count(".") + (2 if parts[-1] == "__init__.py" else 1)
    return f"{'/'.join(parts[-depth:]) if module else path}:{tb.tb_lineno}"


def describe_error(err: BaseException) -> tuple[str, bool]:
    """The message printed for ``err`` and whether it is one of trimkit's errors (see
    :func:`is_user_error`); unexpected errors get their type and where they were raised."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover
        ValidationError = ()  # type: ignore[assignment]
    if isinstance(err, ValidationError):
        return _validation_message(err), True
    text = str(err).strip()
    if is_user_error(err):
        if isinstance(err, _FILE_ERRORS) and getattr(err, "filename", None) and not text:
            text = f"{err.strerror or type(err).__name__}: {err.filename}"
        return text or type(err).__name__, True
    first, _, rest = text.partition("\n")
    tb = _innermost(err)
    where = f" (raised at {_where(tb)})" if tb is not None else ""
    return f"unexpected {type(err).__name__}{where}: {first}{' [...]' if rest.strip() else ''}", False


def _report(prog: str, err: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    message, known = describe_error(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    if not debug:
        print(HINT if known else BUG_HINT, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: usage + message, SystemExit(2)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    prog = f"trimkit {args.command}"
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.handler(args) or 0)
    except UsageError as err:
        if debug:
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(str(err))  # usage + message, SystemExit(2)
        raise  # pragma: no cover - error() exits
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `trimkit plugins | head`: the reader left; nothing to report
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except Exception as err:
        _report(prog, err, debug)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
