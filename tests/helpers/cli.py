"""Running the `adaq` console script in-process and as a subprocess, and checking that a failure is one clean line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """adaq.cli.main in-process, as the console script runs it: (exit code, stderr)."""
    from adaq.cli import main

    monkeypatch.setattr(sys, "argv", ["adaq", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1) if code is not None else 0, capsys.readouterr().err


def child_env() -> dict[str, str]:
    """The environment of a child Python that imports this checkout's adaq first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def adaq_process(*args, **popen) -> subprocess.Popen:
    """`python -m adaq ARGS` in a child process."""
    return subprocess.Popen([sys.executable, "-m", "adaq", *map(str, args)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: mode 0555, or /sys where root ignores modes."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    folder.chmod(0o755)
    sysfs = Path("/sys")
    try:
        (sysfs / ".adaq-probe").write_text("")
    except OSError:
        return sysfs
    pytest.skip("no unwritable folder here (root, and /sys is writable)")
