"""Nothing adaq prints is cut at an 80-column terminal: --help wraps, tables fold long cells and headers."""

import subprocess
import sys

import click
import pytest
import typer

from adaq.cli import app

COMMAND = typer.main.get_command(app)


def command_paths(group: click.Group = COMMAND, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in group.commands.items():
        paths += command_paths(command, prefix + (name,)) if isinstance(command, click.Group) else [prefix + (name,)]
    return paths


def command_at(path: tuple[str, ...]) -> click.Command:
    command = COMMAND
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", command_paths(), ids=lambda path: " ".join(path) or "adaq")
def test_help_fits_80_columns_and_names_every_option(path):
    result = subprocess.run([sys.executable, "-m", "adaq", *path, "--help"], capture_output=True, text=True,
                            env={"COLUMNS": "80", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80
    options = [name for param in command_at(path).params for name in param.opts + param.secondary_opts
               if name.startswith("--")]
    assert all(name in result.stdout for name in options), options


def test_tables_fold_instead_of_cutting():
    from rich.console import Console

    from adaq.tables import Table

    table = Table(title="Per variant and batch")
    for column in ("variant", "batch", "TTFT ms", "prefill tok/s", "ITL p50 ms", "ITL p99 ms", "decode tok/s",
                   "bytes/step GB", "GB/s", "% roofline", "bound tok/s", "peak alloc GB", "vs bf16"):
        table.add_column(column)
    table.add_row("nvfp4-long-variant-name", "16", *["12,345.6"] * 11)
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(table)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
