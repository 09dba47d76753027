"""README's examples run as pasted, in order, from a folder laid out like the repository root after
`bash scripts/demo.sh`: every ```bash and ```python block, except those a `<!-- readme-test: skip (why) -->` line
marks; a `<!-- readme-test: server -->` block starts in the background and serves the blocks after it."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:<!-- readme-test: (?P<mark>skip|server)(?: \((?P<why>[^)]*)\))? -->\n)?"
                   r"```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)
STDIN = "The capital of France is\n/exit\n"  # for the interactive example
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    mark: str | None
    why: str | None


def readme_blocks() -> list[Block]:
    text = (REPO / "README.md").read_text()
    return [Block(text.count("\n", 0, m.start("code")), m["lang"], m["code"], m["mark"], m["why"])
            for m in FENCE.finditer(text)]


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The repository root as README's reader has it (data/, recipes/, scripts/), with an `adaq` command on PATH."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("data", "recipes", "scripts"):
        (folder / name).symlink_to(REPO / name)
    (folder / "bin").mkdir()
    (folder / "bin" / "adaq").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m adaq "$@"\n')
    (folder / "bin" / "adaq").chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def servers():
    running: list[subprocess.Popen] = []
    yield running
    for process in running:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def port() -> int:
    """README says 8000; a free port keeps this run apart from any other server on the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_block_is_run_or_says_why_not():
    assert len(BLOCKS) >= 10 and all(block.mark != "skip" or block.why for block in BLOCKS)
    assert sum(block.mark is None for block in BLOCKS) >= 5
    assert not [block.line for block in BLOCKS if "../" in block.code]  # nothing outside a user's clone


def _env(root: Path) -> dict:
    offline = {name: "1" for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    # One torch thread for the Python examples too, as `adaq run` defaults to: on a shared CI CPU two threads are
    # many times slower (README's --threads figures).
    return {**os.environ, **offline, "PATH": f"{root / 'bin'}:{os.environ['PATH']}", "COLUMNS": "120",
            "OMP_NUM_THREADS": "1"}


def _command(block: Block) -> list[str]:
    if block.lang == "bash":
        return ["bash", "-euo", "pipefail", "-c", block.code]
    return [sys.executable, "-c", block.code]


def _wait_until_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the server did not come up in 300 s: {log.read_text()[-3000:]}")


def _start_server(block: Block, root: Path, servers: list, port: int) -> None:
    log = root / f"server-{block.line}.log"
    code = block.code.replace("--port 8000", f"--port {port}")
    process = subprocess.Popen(["bash", "-c", f"exec {code}"], cwd=root, env=_env(root), stdout=log.open("w"),
                               stderr=subprocess.STDOUT)
    servers.append(process)
    _wait_until_healthy(process, port, log)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(block: Block, root: Path, servers: list, port: int):
    if block.mark == "skip":
        pytest.skip(block.why)
    if block.mark == "server":
        _start_server(block, root, servers, port)
        return
    code = block.code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    result = subprocess.run(_command(Block(block.line, block.lang, code, None, None)), cwd=root, env=_env(root),
                            input=STDIN, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, f"README.md:{block.line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
