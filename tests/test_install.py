"""scripts/install.sh's editable layout: README's Python snippet imports adaq even where Python starts in a folder that
holds the clone (named adaq/, no __init__.py), which shadows setuptools' default editable finder."""

import importlib.util
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def install_sh_editable_mode() -> str:
    return re.search(r"^EDITABLE_MODE=(\w+)$", (REPO / "scripts" / "install.sh").read_text(), re.M)[1]


def clone_into(parent: Path) -> Path:
    clone = parent / "adaq"
    clone.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, clone / name)
    shutil.copytree(REPO / "adaq", clone / "adaq", ignore=shutil.ignore_patterns("__pycache__"))
    return clone


def venv_seeing_our_dependencies(folder: Path) -> Path:
    """A bare venv whose site-packages also reads this interpreter's (torch, transformers, setuptools)."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "adaq_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def install_editable(python: Path, clone: Path, mode: str) -> None:
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *isolation,
                    "-e", str(clone), "--config-settings", f"editable_mode={mode}"],
                   capture_output=True, text=True, check=True)


@pytest.mark.slow
def test_snippet_imports_from_the_folder_that_holds_the_clone(tmp_path):
    clone = clone_into(tmp_path / "home")
    python = venv_seeing_our_dependencies(tmp_path / "venv")
    install_editable(python, clone, install_sh_editable_mode())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: only the install may find adaq
    result = subprocess.run([python, "-c", "from adaq import LLM; import adaq; print(adaq.__file__)"],
                            cwd=clone.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(clone / "adaq" / "__init__.py")
