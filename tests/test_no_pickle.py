"""No pickle, anywhere: a folder whose weights are a `.bin` that would run code when unpickled is refused by every
command, in one line, and the code never runs (no marker file appears)."""

import pickle
import shutil
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, run_main

CALIBRATED = ["--calib-data", "{calib}", "--num-samples", "2", "--seq-len", "32"]
COMMANDS = {
    "quantize rtn": ["quantize", "{bad}", "-o", "{out}", "--device", "cpu"],
    "quantize w4a4": ["quantize", "{bad}", "-o", "{out}", "--device", "cpu", "--scheme", "nvfp4", *CALIBRATED],
    "quantize llmcompressor": ["quantize", "{bad}", "-o", "{out}", "--device", "cpu", "--method", "llmcompressor"],
    "quantize gptq-llmcompressor": ["quantize", "{bad}", "-o", "{out}", "--device", "cpu", "--method",
                                    "gptq-llmcompressor", *CALIBRATED],
    "quantize gptq": ["quantize", "{bad}", "-o", "{out}", "--device", "cpu", "--method", "gptq", *CALIBRATED],
    "quantize search-act": ["quantize", "{bad}", "-o", "{out}", "--device", "cpu", "--method", "search-act",
                            *CALIBRATED],
    "eval transformers": ["eval", "ppl", "{bad}", "--text", "{calib}", "--runner", "transformers"],
    "eval transformers baseline": ["eval", "ppl", "{good}", "--baseline", "{bad}", "--text", "{calib}",
                                   "--runner", "transformers"],
    "eval engine": ["eval", "ppl", "{bad}", "--text", "{calib}", "--backend", "reference"],
    "run": ["run", "{bad}", "Hi", "--max-tokens", "1", "--backend", "reference", "--device", "cpu"],
    "validate": ["validate", "{bad}"],
    "bench": ["bench", "{bad}", "--device", "cpu", "--backend", "reference", "--batch", "1", "--output-len", "2",
              "--baselines", "hf"],
}


class WritesMarker:
    """Unpickling this creates the file `path`: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def plant_pickle(folder: Path, marker: Path) -> None:
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": WritesMarker(marker)}))


@pytest.fixture
def hostile(tiny_qwen3, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny Qwen3 whose only weights are the hostile pickle, and the marker it would write."""
    folder = shutil.copytree(tiny_qwen3, tmp_path / "hostile")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    plant_pickle(folder, marker)
    return folder, marker


def test_the_payload_is_real(tmp_path):
    marker = tmp_path / "UNPICKLED"
    plant_pickle(tmp_path, marker)
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_refuses_a_pickle_checkpoint(monkeypatch, capsys, hostile, tiny_qwen3, calib_text, tmp_path,
                                                   name):
    bad, marker = hostile
    fields = dict(bad=bad, good=tiny_qwen3, out=tmp_path / "out", calib=calib_text)
    code, err = run_main(monkeypatch, capsys, *[part.format(**fields) for part in COMMANDS[name]])
    if name == "validate":  # validate reports its findings, then exits 1
        assert code != 0 and "Traceback" not in err
        assert "safetensors" in capsys.readouterr().out + err
    else:
        assert_one_line_error(code, err, "safetensors")
    assert not marker.exists(), "the pickle was loaded"
    assert not (tmp_path / "out").exists()


def test_transformers_reads_the_safetensors_beside_a_pickle(monkeypatch, capsys, tiny_qwen3, calib_text, tmp_path):
    folder = shutil.copytree(tiny_qwen3, tmp_path / "both")
    marker = tmp_path / "UNPICKLED"
    plant_pickle(folder, marker)
    code, err = run_main(monkeypatch, capsys, "eval", "ppl", folder, "--text", calib_text, "--runner", "transformers",
                         "--window", "32", "--max-windows", "1")
    assert code == 0, err
    assert not marker.exists()
