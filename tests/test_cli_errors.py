"""What used to end in a traceback is one `error:` line and a non-zero exit; anything unexpected is one line plus a
log file (ADAQ_DEBUG=1 shows the traceback)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_one_line_error, run_main, unwritable_folder

CPU = ["--backend", "reference", "--device", "cpu"]
EVAL_CPU = ["--backend", "reference"]  # eval has no --device: the engine picks CUDA when there is one
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch that sees no CUDA GPU")


@pytest.fixture
def text_file(tmp_path, calib_text) -> Path:
    return shutil.copy(calib_text, tmp_path / "text.txt")


@no_cuda
@pytest.mark.parametrize("command", [["run", "{ckpt}", "Hi", "--max-tokens", "1"], ["bench", "{ckpt}"],
                                     ["quantize", "{src}", "-o", "{out}"], ["serve", "{ckpt}", "--port", "0"]])
def test_device_cuda_on_a_cpu_only_torch(monkeypatch, capsys, tiny_qwen3, tiny_qwen3_nvfp4, tmp_path, command):
    args = [part.format(ckpt=tiny_qwen3_nvfp4, src=tiny_qwen3, out=tmp_path / "out") for part in command]
    code, err = run_main(monkeypatch, capsys, *args, "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_eval_ppl_batch_size_zero(monkeypatch, capsys, tiny_qwen3_nvfp4, text_file):
    code, err = run_main(monkeypatch, capsys, "eval", "ppl", tiny_qwen3_nvfp4, "--text", text_file,
                         "--batch-size", "0", *EVAL_CPU)
    assert_one_line_error(code, err, "--batch-size 0", ">= 1")


def test_eval_ppl_binary_text(monkeypatch, capsys, tiny_qwen3_nvfp4, tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 16)
    code, err = run_main(monkeypatch, capsys, "eval", "ppl", tiny_qwen3_nvfp4, "--text", binary, *EVAL_CPU)
    assert_one_line_error(code, err, "binary.txt", "not UTF-8 text")


def forbid_loading(monkeypatch):
    """Fails the test if an evaluation gets as far as loading a model."""
    from adaq.eval import sources

    def load_scorer(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(sources, "load_scorer", load_scorer)


@pytest.mark.parametrize("target", ["read-only", "folder", "inside-checkpoint", "the-text"])
def test_eval_unwritable_json_is_refused_before_the_work(monkeypatch, capsys, tiny_qwen3_nvfp4, text_file,
                                                         tmp_path, target):
    forbid_loading(monkeypatch)
    path = {"read-only": lambda: unwritable_folder(tmp_path) / "r.json", "folder": lambda: tmp_path,
            "inside-checkpoint": lambda: tiny_qwen3_nvfp4 / "r.json", "the-text": lambda: text_file}[target]()
    code, err = run_main(monkeypatch, capsys, "eval", "ppl", tiny_qwen3_nvfp4, "--text", text_file, "--json", path,
                         *EVAL_CPU)
    assert_one_line_error(code, err, "--json")
    assert not (tiny_qwen3_nvfp4 / "r.json").exists()


def test_mmlu_pro_unwritable_samples_is_refused_before_the_work(monkeypatch, capsys, tiny_qwen3_nvfp4, tmp_path):
    forbid_loading(monkeypatch)
    samples = unwritable_folder(tmp_path) / "samples.jsonl"
    code, err = run_main(monkeypatch, capsys, "eval", "mmlu-pro", tiny_qwen3_nvfp4, "--samples", samples, *EVAL_CPU)
    assert_one_line_error(code, err, "--samples")


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_unwritable_outputs_are_refused_before_the_work(monkeypatch, capsys, tiny_qwen3_nvfp4, tmp_path, flag):
    from adaq.bench import suite

    monkeypatch.setattr(suite, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    path = unwritable_folder(tmp_path) / "bench.out"
    code, err = run_main(monkeypatch, capsys, "bench", tiny_qwen3_nvfp4, flag, path, "--device", "cpu")
    assert_one_line_error(code, err, flag)


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_serve_port_out_of_range(monkeypatch, capsys, tiny_qwen3_nvfp4, port):
    code, err = run_main(monkeypatch, capsys, "serve", tiny_qwen3_nvfp4, "--port", port)
    assert_one_line_error(code, err, f"--port {port}", "0-65535")


def test_run_caps_a_huge_context_from_memory(monkeypatch, capsys, caplog, tiny_qwen3_nvfp4, tmp_path):
    """The model's own context (max_position_embeddings 1e9) is capped to what the KV budget holds, in one warning
    line naming the setting; asked for explicitly, it is a one-line error, never a 256 GB allocation."""
    from adaq.engine import model_runner

    monkeypatch.setattr(model_runner, "available_host_bytes", lambda: 16 * 2**30)  # the same on any CI machine
    checkpoint = shutil.copytree(tiny_qwen3_nvfp4, tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    config["max_position_embeddings"] = 10**9
    (checkpoint / "config.json").write_text(json.dumps(config))
    code, err = run_main(monkeypatch, capsys, "run", checkpoint, "Hi", "--max-tokens", "1", *CPU)
    assert code in (0, None) and "Traceback" not in err, err
    capped = [record.getMessage() for record in caplog.records if "context capped" in record.getMessage()]
    assert len(capped) == 1 and "--max-model-len" in capped[0], err  # one line on stderr outside pytest
    code, err = run_main(monkeypatch, capsys, "run", checkpoint, "Hi", "--max-tokens", "1", "--max-model-len",
                         str(10**9), *CPU)
    assert_one_line_error(code, err, "--max-model-len")


# ---- the generic guard --------------------------------------------------------------------------------------------
def explode(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def test_an_unexpected_exception_is_one_line_and_a_log(monkeypatch, capsys, tiny_qwen3, tmp_path):
    from adaq.quant import pipeline

    monkeypatch.setenv("ADAQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADAQ_DEBUG", raising=False)
    monkeypatch.setattr(pipeline, "quantize_model", explode)
    code, err = run_main(monkeypatch, capsys, "quantize", tiny_qwen3, "-o", tmp_path / "out")
    line = assert_one_line_error(code, err, "error: RuntimeError: boom (full log: ")
    log = Path(line.split("(full log: ")[1].rstrip(")"))
    assert log.parent == tmp_path / "cache" / "logs"
    assert "Traceback" in log.read_text() and "second line" in log.read_text()


def test_adaq_debug_shows_the_traceback(monkeypatch, tiny_qwen3, tmp_path):
    import sys

    from adaq.cli import main
    from adaq.quant import pipeline

    monkeypatch.setenv("ADAQ_DEBUG", "1")
    monkeypatch.setattr(pipeline, "quantize_model", explode)
    monkeypatch.setattr(sys, "argv", ["adaq", "quantize", str(tiny_qwen3), "-o", str(tmp_path / "out")])
    with pytest.raises(RuntimeError, match="boom"):
        main()


def test_sigterm_ends_an_interactive_chat(tiny_qwen3_nvfp4):
    """SIGTERM is not Ctrl-C: in `adaq run`'s chat, Ctrl-C stops one reply, SIGTERM ends the process."""
    import signal
    import subprocess

    from helpers.cli import adaq_process

    process = adaq_process("run", tiny_qwen3_nvfp4, *CPU, stdin=subprocess.PIPE)
    for line in process.stderr:
        if "chat with the model" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143, err
    assert_one_line_error(process.returncode, err, "terminated (SIGTERM)")


@pytest.mark.parametrize("command", [["run", "{ckpt}", "Hi", *CPU], ["quantize", "{ckpt}", "-o", "{out}"]])
def test_binary_config_json(monkeypatch, capsys, tiny_qwen3, tmp_path, command):
    """Found by scripts/fuzz_cli.py: a config.json that is not UTF-8 was a UnicodeDecodeError."""
    checkpoint = shutil.copytree(tiny_qwen3, tmp_path / "ckpt")
    (checkpoint / "config.json").write_bytes(bytes(range(256)))
    args = [part.format(ckpt=checkpoint, out=tmp_path / "out") for part in command]
    code, err = run_main(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "config.json: not valid JSON")
