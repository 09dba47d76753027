"""Where adaq writes: outputs kept apart from every input, replaced only when adaq wrote them, one writer at a time,
temp folders that name their run, and the temp folders of killed runs cleaned at the next one.

Beside an output folder OUT, adaq uses only names of its own: `.OUT.adaq-lock` (held with flock while a run writes
OUT) and `.OUT.adaq-{tmp,src,old}-PID-XXXXXXXX/` (a run's temp folders: its process id and 8 random
characters). Nothing else beside OUT is ever touched, so a user's own `OUT.old` or `.OUT-notes` stays.
"""

import fcntl
import glob
import os
import re
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from adaq.errors import AdaqError

ADAQ_MARKER = "adaq_quantize.json"  # written last into every folder `adaq quantize` makes
TEMP_KINDS = ("tmp", "src", "old")


def real(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_apart(out: str | Path, inputs: dict[str, str | Path | None], flag: str = "-o") -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs ({label: path}; None skipped)."""
    target = real(out)
    for label, path in inputs.items():
        if path is None or not Path(path).expanduser().exists():
            continue
        source = real(path)
        if target == source:
            raise AdaqError(f"{flag} {out} is the {label} itself; write to another path")
        if source.is_relative_to(target):
            raise AdaqError(f"{flag} {out} contains the {label} {source}; write to a path outside it")
        if target.is_relative_to(source):
            raise AdaqError(f"{flag} {out} is inside the {label} {source}; write to a path outside it")


def check_replaceable(out: Path, force: bool) -> None:
    """An existing OUT is replaced only with --force, and only when adaq wrote it (it holds ADAQ_MARKER)."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise AdaqError(f"{out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir() or not (out / ADAQ_MARKER).is_file():
        raise AdaqError(f"{out} exists and adaq did not write it (no {ADAQ_MARKER}); --force replaces only adaq's "
                        "outputs: remove it yourself or choose another -o")


def make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AdaqError(f"cannot create {out.parent}: {error.strerror}") from None


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.adaq-lock"


@contextmanager
def output_lock(out: Path):
    """Held while a run writes OUT: a second writer fails at once. flock dies with its process, so a killed run
    never leaves OUT locked."""
    path = lock_path(out)
    handle = _take_lock(path, out)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)


def _take_lock(path: Path, out: Path) -> int:
    for _ in range(3):  # the file may be unlinked by its last holder between our open and our flock
        handle = _open_lock_file(path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise AdaqError(f"{out} is being written by another adaq run (pid {holder}); wait for it to finish "
                            "or choose another -o") from None
        if _still_linked(path, handle):
            os.ftruncate(handle, 0)
            os.pwrite(handle, str(os.getpid()).encode(), 0)
            return handle
        os.close(handle)
    raise AdaqError(f"{out}: could not take the lock {path}; another adaq run keeps replacing it")


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise AdaqError(f"cannot write into {path.parent}: {error.strerror}") from None


def _still_linked(path: Path, handle: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False


def temp_name(out: Path, kind: str) -> Path:
    """A fresh name beside OUT (same filesystem, so renames are atomic), named after this run: this process's pid
    and 8 random characters (what `remove_stale_temps` recognises)."""
    while True:
        folder = out.parent / f".{out.name}.adaq-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        if not os.path.lexists(folder):
            return folder


def make_temp(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700)
    except OSError as error:
        raise AdaqError(f"cannot write into {folder.parent}: {error.strerror}") from None


def _temp_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.adaq-(?:{'|'.join(TEMP_KINDS)})-(\d+)-[a-z0-9_]{{8}}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """The temp folders of earlier runs on OUT whose process is gone (killed); says so on one line."""
    pattern, stale = _temp_pattern(out), []
    for folder in out.parent.glob(f".{glob.escape(out.name)}.adaq-*"):
        match = pattern.fullmatch(folder.name)
        if match and folder.is_dir() and not folder.is_symlink() and not pid_alive(int(match[1])):
            shutil.rmtree(folder, ignore_errors=True)
            stale.append(folder)
    if stale:
        print(f"notice: removed {len(stale)} temp folder(s) left beside {out} by killed adaq runs "
              f"({', '.join(folder.name for folder in stale)})", file=sys.stderr)
    return stale


@contextmanager
def staged_folder(out: Path, force: bool):
    """Under OUT's lock, a fresh temp folder beside OUT that becomes OUT when the block succeeds; removed whatever
    happens, so an interrupted run leaves no OUT."""
    make_parent(out)
    with output_lock(out):
        check_replaceable(out, force)
        remove_stale_temps(out)
        with scratch_folder(out, "tmp") as tmp:
            yield tmp
            tmp.chmod(0o755)  # make_temp makes 0700; OUT is an ordinary folder
            replace_folder(tmp, out)


@contextmanager
def scratch_folder(out: Path, kind: str = "src"):
    """A temp folder beside OUT for the duration of the block, removed whatever happens: its name is chosen before
    the mkdir, so a signal (raised as an exception at any bytecode) cannot fall between the folder's creation and
    the `try` that removes it."""
    folder = temp_name(out, kind)
    try:
        make_temp(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place; an older OUT goes only once the new one is complete, through a
    backup folder of this run (never `OUT.old`, which may be the user's)."""
    if not out.exists():
        tmp.rename(out)
        return
    with scratch_folder(out, "old") as backup:
        previous = backup / out.name
        out.rename(previous)
        try:
            tmp.rename(out)
        except BaseException:
            previous.rename(out)
            raise


def check_writable_file(path: str | Path | None, flag: str, inputs: dict[str, str | Path | None] | None = None) -> None:
    """Before the work starts: a file output (--json, --plot, --samples) that can be written and is no input."""
    if path is None:
        return
    path = Path(path).expanduser()
    check_apart(path, inputs or {}, flag)
    if path.is_dir():
        raise AdaqError(f"{flag} {path} is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise AdaqError(f"{flag} {path}: the file is not writable")
    _probe_folder(_nearest_existing(path.parent), path, flag)


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def _probe_folder(folder: Path, path: Path, flag: str) -> None:
    # os.access says yes to root on a read-only filesystem: only a real write tells.
    if not folder.is_dir():
        raise AdaqError(f"{flag} {path}: {folder} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".adaq-probe-")
    except OSError as error:
        raise AdaqError(f"{flag} {path}: cannot write into {folder} ({error.strerror})") from None
    os.close(handle)
    os.unlink(probe)
