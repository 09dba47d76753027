"""The `adaq` command line: a thin typer app; each subcommand lives in adaq/commands/ and imports heavy libraries lazily."""

import importlib
import os
import signal
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path

import typer

from adaq.errors import AdaqError, AdaqNotice

app = typer.Typer(
    name="adaq",
    help="NVFP4 for GPUs with FP8 but no FP4 tensor cores (Ada, sm_89): quantize, validate, run, serve, bench, eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help wraps to any width; typer's rich panels cut option names at 80
)

# (module in adaq.commands, attribute, kind): kind "command" registers a function, "group" a sub-typer.
_COMMANDS = [
    ("quantize", "quantize", "command"),
    ("validate", "validate", "command"),
    ("run", "run", "command"),
    ("serve", "serve", "command"),
    ("bench", "app", "group"),
    ("eval", "app", "group"),
]


def _register() -> None:
    for module_name, attribute, kind in _COMMANDS:
        try:
            module = importlib.import_module(f"adaq.commands.{module_name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"adaq.commands.{module_name}":
                raise
            continue
        target = getattr(module, attribute)
        if kind == "group":
            app.add_typer(target, name=module_name)
        else:
            app.command(name=module_name)(target)


_register()


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `finally` cleans up as for Ctrl-C. Not a
    KeyboardInterrupt: `adaq run` takes Ctrl-C as "stop this reply", and SIGTERM must end the process."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def log_dir() -> Path:
    return Path(os.environ.get("ADAQ_CACHE", Path.home() / ".cache" / "adaq")) / "logs"


def write_crash_log(error: BaseException) -> Path:
    """The full traceback and command line in a log file (adaq's cache, else the temp folder)."""
    name = f"adaq-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = f"adaq {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(error))
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "adaq-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return Path("(no log: adaq's cache and the temp folder are not writable)")


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    return message if len(message) <= 300 else message[:297] + "..."


def _exit_after_interrupt(exit: SystemExit) -> None:
    if exit.code == 130:  # typer's exit for a KeyboardInterrupt (Ctrl-C, SIGINT)
        typer.secho("error: interrupted", fg="red", err=True)
        sys.exit(130)


def main() -> None:
    """The console script: a user's mistake is one line; an unexpected failure is one line and a log file
    (ADAQ_DEBUG=1 shows its traceback instead)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _one_line_warnings()
    try:
        _run_app()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line_warnings() -> None:
    """adaq's own warnings (a fallback, a capped context) read as one `warning:` line and its notices (a vision tower
    ignored, prefix caching off) as one `notice:` line, not Python's file:line and source echo; other libraries'
    warnings keep their form."""
    import warnings

    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if issubclass(category, AdaqNotice):
            return f"notice: {message}\n"
        if category.__module__.startswith("adaq."):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line


def _run_app() -> None:
    debug = os.environ.get("ADAQ_DEBUG", "") not in ("", "0")
    try:
        app()
    except SystemExit as exit:
        _exit_after_interrupt(exit)
        raise
    except AdaqError as error:
        if debug:
            raise
        typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        _exit_after_interrupt(SystemExit(130))
    except Terminated:
        typer.secho("error: terminated (SIGTERM)", fg="red", err=True)
        sys.exit(128 + signal.SIGTERM)
    except Exception as error:  # noqa: BLE001 - the last guard: never a bare traceback
        if debug:
            raise
        log = write_crash_log(error)
        typer.secho(f"error: {type(error).__name__}: {one_line(error)} (full log: {log})", fg="red", err=True)
        sys.exit(1)
