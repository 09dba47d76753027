"""`adaq quantize` on bad input: one-line error, non-zero exit, no traceback, and nothing half-written."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """adaq.cli.main in-process, as the console script runs it: (exit code, stderr)."""
    from adaq.cli import main

    monkeypatch.setattr(sys, "argv", ["adaq", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), captured.err


def assert_clean_failure(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not list(parent.glob(f".{name}.adaq-*")), "temp folders left behind"


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_weights(folder: Path, edit) -> None:
    shard = folder / "model.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_existing_output_needs_force(monkeypatch, capsys, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(monkeypatch, capsys, "quantize", str(tiny_qwen3), "-o", str(out))
    assert_clean_failure(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_config(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_folder(tiny_qwen3, tmp_path / "src")
    (source / "config.json").unlink()
    code, err = run_main(monkeypatch, capsys, "quantize", str(source), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, "config.json")
    assert_nothing_written(tmp_path, "out")


def test_missing_tokenizer(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_folder(tiny_qwen3, tmp_path / "src")
    (source / "tokenizer.json").unlink()
    code, err = run_main(monkeypatch, capsys, "quantize", str(source), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, "no tokenizer")
    assert_nothing_written(tmp_path, "out")


def test_unsupported_architecture_lists_the_supported_ones(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_folder(tiny_qwen3, tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    code, err = run_main(monkeypatch, capsys, "quantize", str(source), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                         "Gemma3ForCausalLM")
    assert_nothing_written(tmp_path, "out")


def test_k_not_a_multiple_of_16(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_folder(tiny_qwen3, tmp_path / "src")
    name = "model.layers.1.mlp.down_proj.weight"
    edit_weights(source, lambda t: t.__setitem__(name, t[name][:, :120].contiguous()))
    code, err = run_main(monkeypatch, capsys, "quantize", str(source), "-o", str(tmp_path / "out"))
    # refused before K is looked at: the shape disagrees with config.json (adaq.formats.consistency)
    assert_clean_failure(code, err, name.removesuffix(".weight"), "[64, 120]", "config.json gives [64, 128]")
    assert_nothing_written(tmp_path, "out")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(monkeypatch, capsys, tiny_qwen3, tmp_path, value):
    source = copy_folder(tiny_qwen3, tmp_path / "src")
    name = "model.layers.1.self_attn.v_proj.weight"

    def poison(tensors):
        tensors[name][3, 7] = value

    edit_weights(source, poison)
    code, err = run_main(monkeypatch, capsys, "quantize", str(source), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, name, "NaN or inf")
    assert_nothing_written(tmp_path, "out")


def test_truncated_safetensors(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_folder(tiny_qwen3, tmp_path / "src")
    shard = source / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, err = run_main(monkeypatch, capsys, "quantize", str(source), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, "model.safetensors")
    assert_nothing_written(tmp_path, "out")


def test_pickle_checkpoints_are_refused(monkeypatch, capsys, tiny_qwen3, tmp_path):
    source = copy_folder(tiny_qwen3, tmp_path / "src")
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    code, err = run_main(monkeypatch, capsys, "quantize", str(source), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, "safetensors")
    assert_nothing_written(tmp_path, "out")


def test_already_quantized_source(monkeypatch, capsys, tiny_qwen3_nvfp4, tmp_path):
    code, err = run_main(monkeypatch, capsys, "quantize", str(tiny_qwen3_nvfp4), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, "already quantized")


def test_w4a4_without_calibration_data(monkeypatch, capsys, tiny_qwen3, tmp_path):
    code, err = run_main(monkeypatch, capsys, "quantize", str(tiny_qwen3), "-o", str(tmp_path / "out"),
                         "--scheme", "nvfp4")
    assert_clean_failure(code, err, "--calib-data")
    assert_nothing_written(tmp_path, "out")


@pytest.mark.parametrize("case", ["bad_scheme", "bad_recipe", "no_recipe", "bad_method", "missing_source"])
def test_bad_arguments(monkeypatch, capsys, tiny_qwen3, tmp_path, case):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage:\n  mods:\n    QuantizationModifier:\n      scheme: W8A8\n")
    extra = {"bad_scheme": ["--scheme", "int4"], "bad_recipe": ["--recipe", str(recipe)],
             "no_recipe": ["--recipe", "absent.yaml"], "bad_method": ["--method", "magic"],
             "missing_source": []}[case]
    source = str(tmp_path / "absent-folder") if case == "missing_source" else str(tiny_qwen3)
    code, err = run_main(monkeypatch, capsys, "quantize", source, "-o", str(tmp_path / "out"), *extra)
    expected = {"bad_scheme": "--scheme", "bad_recipe": "W8A8", "no_recipe": "absent.yaml",
                "bad_method": "magic", "missing_source": "absent-folder"}[case]
    assert_clean_failure(code, err, expected)
    assert_nothing_written(tmp_path, "out")


def test_a_run_killed_midway_leaves_no_output(tiny_qwen3, calib_text, tmp_path):
    """SIGKILL once the temp folder exists (mid-calibration): no OUT appears."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from adaq.cli import main; main()", "quantize", str(tiny_qwen3), "-o",
               str(out), "--scheme", "nvfp4", "--calib-data", str(calib_text), "--num-samples", "4",
               "--seq-len", "64", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.adaq-tmp-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    from adaq.formats.outputs import remove_stale_temps

    remove_stale_temps(out)  # what the next run on OUT does first
    assert not [path for path in tmp_path.glob(".out.adaq-*") if path.is_dir()]


def test_an_interrupted_run_cleans_up(monkeypatch, tiny_qwen3, tmp_path):
    """Ctrl-C (KeyboardInterrupt) inside the method: no OUT and no temp folder."""
    from adaq.quant import pipeline, rtn

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rtn, "quantize_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize_model(str(tiny_qwen3), tmp_path / "out", device="cpu")
    assert_nothing_written(tmp_path, "out")


def test_nan_weights_in_a_sharded_source_name_the_tensor(tiny_qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    from adaq.errors import AdaqError
    from adaq.quant.pipeline import quantize_model

    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype="auto")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    source = tmp_path / "src"
    model.save_pretrained(source, max_shard_size="60KB")
    shutil.copy(tiny_qwen3 / "tokenizer.json", source / "tokenizer.json")
    with pytest.raises(AdaqError, match="layers.1.mlp.gate_proj.weight"):
        quantize_model(str(source), tmp_path / "out", device="cpu")
    assert_nothing_written(tmp_path, "out")


def test_unknown_demo_lists_the_demo_names(tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, "quantize", "demo:gemma3-4b", "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, "demo:gemma3-4b", "no such demo model", "available: demo:gemma3-270m")
    assert_nothing_written(tmp_path, "out")


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 0), ("num_hidden_layers", -1), ("hidden_size", "abc"),
                                         ("num_attention_heads", 0), ("vocab_size", -5), ("num_experts", -1),
                                         ("head_dim", True)])
def test_nonsense_config_sizes_are_refused_in_one_line(tiny_folder, tmp_path, monkeypatch, capsys, field, value):
    """A size config.json gives as no positive integer (a count: below 0) stops quantize before any work, in one
    line naming the field, exit 2; validate reports it as a `config` finding and exits 1."""
    from helpers.cli import run_main

    from adaq.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder("qwen3"), bad)
    config = json.loads((bad / "config.json").read_text())
    config[field] = value
    (bad / "config.json").write_text(json.dumps(config))
    code, err = run_main(monkeypatch, capsys, "quantize", bad, "-o", tmp_path / "out", "--method", "rtn")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and field in last and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(sys, "argv", ["adaq", "validate", str(bad), "--json"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    findings = json.loads(out)["findings"]
    assert any(f["rule"] == "config" and field in f["message"] for f in findings), findings
