"""Entry-point wrapper: a user error is one or a few lines on stderr, not a traceback.

Every command of the project (`python -m data_prep.*`, `softcon_jax.export`,
`softcon_jax.report`, the trainer and the evaluator) runs its `main` through `run` (argparse
tools) or `run_absl` (absl tools):

- An error in what the user gave (a file, a record, a checkpoint step, a config key) raises
  a `UserError` whose message names it, says what was expected and how to fix it. The
  wrapper prints `error: <message>` on stderr and exits with status 1 (`UsageError`: 2).
  Operating-system errors (missing file, permission denied, disk full: `OSError`) are
  printed the same way.
- The full traceback is always written to a log file, named on the last line:
  `$SOFTCON_LOG_DIR` if set, else `$XDG_CACHE_HOME/softcon_jax/logs` (default
  `~/.cache/softcon_jax/logs`), one file `<command>-<date>-<pid>.log` per failed run.
- `--verbose` (anywhere on the command line; the wrapper removes it before the tool parses
  its arguments) or `SOFTCON_VERBOSE=1` also prints the traceback on the terminal.
- Anything else (a bug) keeps Python's full traceback on the terminal, and in the log file.
- Ctrl-C outside the tool's own handling exits with status 130 and one line.

Raise the subclass matching the built-in type the code used before (`UserValueError`,
`UserFileNotFoundError`, `UserKeyError`), so callers catching `ValueError` etc. still work.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "SOFTCON_VERBOSE"
LOG_DIR_ENV = "SOFTCON_LOG_DIR"


class UserError(Exception):
    """A problem with the user's input; the message alone tells what to do."""

    exit_code = 1


class UserValueError(UserError, ValueError):
    """A value (file content, record, config setting) is not what was expected."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the command needs does not exist."""


class UserKeyError(UserError, KeyError):
    """A name (config key, state key) is unknown."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else ""


class UsageError(UserError, ValueError):
    """The command line itself is wrong (exit status 2, as argparse)."""

    exit_code = 2


def storage_error_cause(e: BaseException, limit: int = 200) -> str:
    """'<OS reason>; <type>: <message, shortened>' of a storage error, on one line.

    Storage libraries wrap the OS error in their own types, with the errno in the text:
    TensorStore (under Orbax) a ValueError (`[os_error_code='28']`), safetensors a
    SafetensorError (`(os error 28)`, Rust's wording). The OS reason
    ("No space left on device") goes first so that it survives the shortening.
    """
    text = " ".join(str(e).split())
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"os_error_code='?(\d+)|os error (\d+)", text)):
        code = int(m.group(1) or m.group(2))
    reason = f"{os.strerror(code)}; " if code else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{reason}{type(e).__name__}: {text}"


def verbose_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _strip_verbose(argv: list[str]) -> tuple[list[str], bool]:
    kept = [a for a in argv if a != VERBOSE_FLAG]
    return kept, len(kept) != len(argv) or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def log_dir() -> str:
    if os.environ.get(LOG_DIR_ENV):
        return os.environ[LOG_DIR_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "softcon_jax", "logs")


def _command_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0])
    return (name or "python").replace(os.sep, "_")


def write_log(exc: BaseException, argv: list[str] | None = None) -> str | None:
    """Writes the traceback of `exc` (and the command line) to a new log file; its path."""
    try:
        directory = log_dir()
        os.makedirs(directory, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(directory, f"{_command_name()}-{stamp}-{os.getpid()}.log")
        with open(path, "w") as f:
            f.write("command: " + " ".join([sys.executable] + list(argv or sys.argv)) + "\n")
            f.write("cwd: " + os.getcwd() + "\n\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return path
    except OSError:  # the log is a convenience: never hide the real error behind it
        return None


def report(exc: BaseException, *, verbose: bool, argv: list[str] | None = None) -> int:
    """Prints the short form of a known error on stderr; returns the exit status."""
    path = write_log(exc, argv)
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, UserError):
        message = f"{type(exc).__name__}: {message}"
    print(f"error: {message}", file=sys.stderr)
    if path and not verbose:
        print(f"(full traceback in {path}; run with {VERBOSE_FLAG} to print it)",
              file=sys.stderr)
    return int(getattr(exc, "exit_code", 1))


def call(main: Callable[..., Any], *args: Any, verbose: bool = False,
         argv: list[str] | None = None, passthrough: tuple = ()) -> int:
    """Calls `main(*args)` and turns its outcome into an exit status (see module docstring).

    Exceptions of the `passthrough` types propagate untouched (absl's own UsageError).
    """
    try:
        rc = main(*args)
    except passthrough:
        raise
    except (UserError, OSError) as e:
        return report(e, verbose=verbose, argv=argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as e:  # a bug: keep the traceback on the terminal, and log it
        path = write_log(e, argv)
        if path:
            print(f"(traceback also in {path})", file=sys.stderr)
        raise
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> NoReturn:
    """Runs an argparse-style `main(argv)` and exits (argv: default sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, verbose = _strip_verbose(argv)
    sys.exit(call(main, argv, verbose=verbose, argv=argv))


def run_absl(main: Callable[[list[str]], Any]) -> NoReturn:
    """`absl.app.run(main)` with the same error handling (`--verbose` is removed first)."""
    from absl import app

    sys.argv, verbose = _strip_verbose(list(sys.argv))

    def wrapped(argv: list[str]) -> Any:
        rc = call(main, argv, verbose=verbose, argv=sys.argv[1:],
                  passthrough=(app.UsageError,))
        if rc:
            sys.exit(rc)
        return None

    app.run(wrapped)
    sys.exit(0)  # app.run exits itself; for completeness
