"""Output safety (adaq.formats.outputs): an output never overlaps an input, --force replaces only adaq's own
folders, temp and backup folders are named after their run, one writer per OUT, SIGTERM cleans up like Ctrl-C, and
the temp folders of killed runs go at the next run."""

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import adaq_process, assert_one_line_error, child_env, run_main, unwritable_folder

from adaq.formats.outputs import ADAQ_MARKER, output_lock


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_source(tiny_qwen3: Path, target: Path) -> Path:
    shutil.copytree(tiny_qwen3, target)
    (target / "sentinel.txt").write_text("the user's own file")
    return target


def quantize(monkeypatch, capsys, source, out, *extra) -> tuple[int, str]:
    return run_main(monkeypatch, capsys, "quantize", source, "-o", out, "--device", "cpu", *extra)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.adaq-*"))


# ---- outputs that overlap an input --------------------------------------------------------------------------------
def test_output_that_is_the_source_is_refused_and_the_source_kept(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_source(tiny_qwen3, tmp_path / "src")
    before = snapshot(source)
    code, err = quantize(monkeypatch, capsys, source, source, "--force")
    assert_one_line_error(code, err, "is the source itself")
    assert snapshot(source) == before


def test_output_that_contains_the_source_is_refused(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_source(tiny_qwen3, tmp_path / "parent" / "src")
    (tmp_path / "parent" / "beside.txt").write_text("mine")
    before = snapshot(tmp_path / "parent")
    code, err = quantize(monkeypatch, capsys, source, tmp_path / "parent", "--force")
    assert_one_line_error(code, err, "contains the source")
    assert snapshot(tmp_path / "parent") == before


def test_output_inside_the_source_is_refused(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_source(tiny_qwen3, tmp_path / "src")
    code, err = quantize(monkeypatch, capsys, source, source / "nvfp4")
    assert_one_line_error(code, err, "is inside the source")
    assert not (source / "nvfp4").exists()


def test_output_through_a_symlink_to_the_source_is_refused(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_source(tiny_qwen3, tmp_path / "src")
    (tmp_path / "link").symlink_to(source)
    before = snapshot(source)
    code, err = quantize(monkeypatch, capsys, source, tmp_path / "link", "--force")
    assert_one_line_error(code, err, "is the source itself")
    assert snapshot(source) == before


def test_output_over_the_calibration_data_is_refused(monkeypatch, capsys, tiny_qwen3, calib_text, tmp_path):
    calib = shutil.copy(calib_text, tmp_path / "calib.txt")
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, calib, "--force", "--method", "search-act",
                         "--calib-data", calib)
    assert_one_line_error(code, err, "calibration data")
    assert Path(calib).read_text() == calib_text.read_text()


def test_compare_output_inside_the_source_is_refused(monkeypatch, capsys, tiny_qwen3, calib_text, tmp_path):
    source = copy_source(tiny_qwen3, tmp_path / "src")
    code, err = quantize(monkeypatch, capsys, source, source / "cmp", "--compare", "rtn", "--eval-text", calib_text)
    assert_one_line_error(code, err, "is inside the source")
    assert not (source / "cmp").exists()


# ---- --force and existing outputs ---------------------------------------------------------------------------------
def test_force_refuses_a_folder_adaq_did_not_write(monkeypatch, capsys, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, out, "--force")
    assert_one_line_error(code, err, "adaq did not write it", ADAQ_MARKER, "remove it yourself")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_force_refuses_a_file(monkeypatch, capsys, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, out, "--force")
    assert_one_line_error(code, err, "adaq did not write it")
    assert out.read_text() == "a file"


def test_force_keeps_the_users_own_folders_beside_out(monkeypatch, capsys, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    assert quantize(monkeypatch, capsys, tiny_qwen3, out)[0] == 0
    for name in ("out.old", ".out.adaq-tmp-notes", ".out.adaq-old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text(name)
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, out, "--force")
    assert code == 0, err
    for name in ("out.old", ".out.adaq-tmp-notes", ".out.adaq-old"):
        assert (tmp_path / name / "mine.txt").read_text() == name
    assert (out / ADAQ_MARKER).is_file()
    assert leftovers(tmp_path, "out") == [".out.adaq-old", ".out.adaq-tmp-notes"]


def test_temp_folders_are_named_after_the_run(monkeypatch, tiny_qwen3, tmp_path):
    import os

    from adaq.quant import pipeline, rtn

    seen = []
    real = rtn.quantize_checkpoint

    def spy(source, out_dir, *args, **kwargs):
        seen.append(Path(out_dir).name)
        return real(source, out_dir, *args, **kwargs)

    monkeypatch.setattr(rtn, "quantize_checkpoint", spy)
    pipeline.quantize_model(str(tiny_qwen3), tmp_path / "out", device="cpu")
    assert re.fullmatch(rf"\.out\.adaq-tmp-{os.getpid()}-[a-z0-9_]{{8}}", seen[0]), seen


# ---- one writer at a time -----------------------------------------------------------------------------------------
def test_a_second_writer_fails_at_once(monkeypatch, capsys, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    hold = ("import time; from pathlib import Path; from adaq.formats.outputs import output_lock\n"
            f"with output_lock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        code, err = quantize(monkeypatch, capsys, tiny_qwen3, out)
        assert_one_line_error(code, err, "being written by another adaq run", f"pid {holder.pid}")
        assert time.monotonic() - started < 10
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, out)  # a killed holder leaves no lock behind
    assert code == 0, err


def test_the_lock_is_exclusive_in_one_process_too(tmp_path):
    from adaq.errors import AdaqError

    with output_lock(tmp_path / "out"):
        with pytest.raises(AdaqError, match="being written by another adaq run"):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):
        pass
    assert list(tmp_path.iterdir()) == []


# ---- interrupts and stale temp folders ----------------------------------------------------------------------------
def hear_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so: the child must hear Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_slow_quantize(source: Path, out: Path, calib_text: Path) -> subprocess.Popen:
    """W4A4 with calibration: slow enough to be caught with its temp folder in place."""
    process = adaq_process("quantize", source, "-o", out, "--scheme", "nvfp4", "--calib-data", calib_text,
                           "--num-samples", "16", "--seq-len", "64", "--device", "cpu", "--json",
                           preexec_fn=hear_sigint)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.adaq-tmp-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    return process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_cleans_up_like_ctrl_c(tiny_qwen3, calib_text, tmp_path, sig):
    out = tmp_path / "out"
    process = start_slow_quantize(tiny_qwen3, out, calib_text)
    process.send_signal(sig)
    _, err = process.communicate(timeout=30)
    expected = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
    assert process.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert_one_line_error(process.returncode, err, expected)
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


def test_temp_folders_of_a_killed_run_go_at_the_next_run(monkeypatch, capsys, tiny_qwen3, calib_text, tmp_path):
    out = tmp_path / "out"
    process = start_slow_quantize(tiny_qwen3, out, calib_text)
    process.kill()
    process.wait()
    assert not out.exists() and leftovers(tmp_path, "out")
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, out)
    assert code == 0, err
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "killed adaq runs" in notices[0], err
    assert leftovers(tmp_path, "out") == []


def test_only_dead_runs_temp_folders_are_removed(monkeypatch, capsys, tiny_qwen3, tmp_path):
    import os

    from adaq.formats.outputs import remove_stale_temps

    out = tmp_path / "out"
    names = {"dead": f".out.adaq-tmp-{dead_pid()}-abcd1234", "alive": f".out.adaq-src-{os.getpid()}-abcd1234",
             "user": ".out.adaq-tmp-12-mine"}
    for name in names.values():
        (tmp_path / name).mkdir()
    removed = remove_stale_temps(out)
    assert [p.name for p in removed] == [names["dead"]]
    assert leftovers(tmp_path, "out") == sorted([names["alive"], names["user"]])
    assert "notice: removed 1 temp folder" in capsys.readouterr().err


# ---- unwritable destinations --------------------------------------------------------------------------------------
def test_read_only_destination_is_one_line(monkeypatch, capsys, tiny_qwen3, tmp_path):
    folder = unwritable_folder(tmp_path)
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, folder / "out")
    assert_one_line_error(code, err, "cannot write into", str(folder))


def test_destination_below_a_read_only_folder_is_one_line(monkeypatch, capsys, tiny_qwen3, tmp_path):
    folder = unwritable_folder(tmp_path)
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, folder / "deeper" / "out")
    assert_one_line_error(code, err, "cannot create")


def test_compare_refuses_a_folder_of_the_users(monkeypatch, capsys, tiny_qwen3, calib_text, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text('{"mine": true}')
    code, err = quantize(monkeypatch, capsys, tiny_qwen3, out, "--compare", "rtn", "--eval-text", calib_text)
    assert_one_line_error(code, err, "not an earlier --compare's output")
    assert (out / "compare.json").read_text() == '{"mine": true}'


def test_a_failed_swap_puts_the_old_output_back(monkeypatch, tmp_path):
    from adaq.formats.outputs import replace_folder

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / ADAQ_MARKER).write_text("old")
    new.mkdir()
    real_rename = Path.rename

    def rename(self, target):
        if self == new:
            raise OSError("disk full")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        replace_folder(new, out)
    assert (out / ADAQ_MARKER).read_text() == "old"
    assert leftovers(tmp_path, "out") == []
