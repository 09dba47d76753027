"""The `adaq` command line: a thin typer app; each subcommand lives in adaq/commands/ and imports heavy libraries lazily."""

import importlib
import sys

import typer

from adaq.errors import AdaqError

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


def main() -> None:
    try:
        app()
    except AdaqError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="red", err=True)
        sys.exit(130)
