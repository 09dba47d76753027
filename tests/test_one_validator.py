"""One validator for every command (issue 20): what `adaq validate` calls valid, run / serve / bench / quantize
accept, and what it calls invalid, they refuse with the same one-line reason — NaN in a kept tensor, a model_type
the architecture is not read as, layers missing, a Linear whose shape disagrees with config.json; and a context
length the model claims but memory cannot hold is capped, not allocated."""

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaq.cli import main
from adaq.errors import CheckpointError

FAST = ["--backend", "reference", "--device", "cpu", "--max-tokens", "2", "--no-chat"]
NORM = "model.layers.0.input_layernorm.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj"


def adaq(args: list, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["adaq", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_of(folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def edit_config(folder: Path, drop: tuple[str, ...] = (), **fields) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config = {key: value for key, value in {**config, **fields}.items() if key not in drop}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def edit_tensors(folder: Path, edit) -> Path:
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(shard)
    edit(tensors)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, shard, metadata={"format": "pt"})
    return folder


def one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code != 0 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def validate_findings(folder: Path, capsys, monkeypatch) -> list[dict]:
    code, out, err = adaq(["validate", folder, "--json"], capsys, monkeypatch)
    report = json.loads(out)
    assert code == 1 and not report["valid"], out
    return [finding for finding in report["findings"] if finding["severity"] == "error"]


# ---- NaN in a kept tensor ------------------------------------------------------------------------------------------
@pytest.fixture
def nan_norm(tiny_qwen3_nvfp4, tmp_path) -> Path:
    def poison(tensors):
        tensors[NORM][3] = float("nan")

    return edit_tensors(copy_of(tiny_qwen3_nvfp4, tmp_path, "nan"), poison)


def test_nan_in_a_norm_weight_is_invalid_for_validate_and_refused_by_run(nan_norm, capsys, monkeypatch):
    errors = validate_findings(nan_norm, capsys, monkeypatch)
    assert [(e["rule"], e["tensor"]) for e in errors] == [("finite", NORM)] and "1 NaN" in errors[0]["message"]
    code, out, err = adaq(["run", nan_norm, "hi", *FAST], capsys, monkeypatch)
    one_error_line(code, err, NORM, "NaN")
    assert out == ""  # no token ids [0, 0, ...] printed


def test_inf_in_a_dense_embedding_is_refused_when_the_engine_loads_it(tiny_qwen3, tmp_path):
    from adaq.engine.api import LLM

    def poison(tensors):
        tensors["model.embed_tokens.weight"][5, 7] = float("-inf")

    folder = edit_tensors(copy_of(tiny_qwen3, tmp_path, "inf"), poison)
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight holds NaN or inf \(0 NaN and 1 inf"):
        LLM(folder, backend="reference", device="cpu", max_model_len=64)


def test_nan_block_scales_are_refused_at_load_as_validate_refuses_them(tiny_qwen3_nvfp4, tmp_path, capsys,
                                                                       monkeypatch):
    def poison(tensors):
        tensors[f"{Q_PROJ}.weight_scale"].view(torch.uint8)[0, 0] = 0x7F  # E4M3 NaN

    folder = edit_tensors(copy_of(tiny_qwen3_nvfp4, tmp_path, "nan-scale"), poison)
    assert validate_findings(folder, capsys, monkeypatch)[0]["rule"] == "block-scale"
    code, _, err = adaq(["run", folder, "hi", *FAST], capsys, monkeypatch)
    one_error_line(code, err, f"{Q_PROJ}.weight_scale", "NaN")


# ---- config against tensors ----------------------------------------------------------------------------------------
def test_an_unknown_model_type_is_invalid_for_validate_and_refused_by_run(tiny_qwen3_nvfp4, tmp_path, capsys,
                                                                         monkeypatch):
    folder = edit_config(copy_of(tiny_qwen3_nvfp4, tmp_path, "llama"), model_type="llama3000")
    errors = validate_findings(folder, capsys, monkeypatch)
    assert errors[0]["rule"] == "architecture" and "llama3000" in errors[0]["message"]
    code, _, err = adaq(["run", folder, "hi", *FAST], capsys, monkeypatch)
    one_error_line(code, err, "llama3000")


def test_more_layers_in_the_config_than_in_the_tensors_is_invalid_everywhere(tiny_qwen3_nvfp4, tmp_path, capsys,
                                                                             monkeypatch):
    folder = edit_config(copy_of(tiny_qwen3_nvfp4, tmp_path, "layers"), drop=("layer_types",), num_hidden_layers=5)
    errors = validate_findings(folder, capsys, monkeypatch)
    assert errors[0]["rule"] == "layers" and "no layer 2..4" in errors[0]["message"], errors
    for command in (["run", folder, "hi", *FAST], ["bench", folder, "--batch", "1", "--baselines", "none"]):
        code, _, err = adaq(command, capsys, monkeypatch)
        one_error_line(code, err, "num_hidden_layers 5", "no layer 2..4")


def test_quantize_refuses_a_source_whose_q_proj_disagrees_with_the_config_and_writes_nothing(
        tiny_qwen3, tmp_path, capsys, monkeypatch):
    def truncate(tensors):
        tensors[f"{Q_PROJ}.weight"] = tensors[f"{Q_PROJ}.weight"][:48].clone()

    source = edit_tensors(copy_of(tiny_qwen3, tmp_path, "bad-q"), truncate)
    out = tmp_path / "out"
    code, _, err = adaq(["quantize", source, "-o", out], capsys, monkeypatch)
    one_error_line(code, err, Q_PROJ, "[48, 64]", "[64, 64]")
    assert not out.exists()
    errors = validate_findings(source, capsys, monkeypatch)
    assert (errors[0]["rule"], errors[0]["tensor"]) == ("shape-vs-config", Q_PROJ)


def test_a_config_transformers_cannot_read_is_one_line_for_validate_and_run(tiny_qwen3_nvfp4, tmp_path, capsys,
                                                                           monkeypatch):
    folder = edit_config(copy_of(tiny_qwen3_nvfp4, tmp_path, "types"), num_hidden_layers=5)  # 2 layer_types
    errors = validate_findings(folder, capsys, monkeypatch)
    assert errors[0]["rule"] == "config" and "layer_types" in errors[0]["message"], errors
    code, _, err = adaq(["run", folder, "hi", *FAST], capsys, monkeypatch)
    one_error_line(code, err, "layer_types")


def test_check_checkpoint_is_validate_without_the_vram_plan(tiny_qwen3_nvfp4, nan_norm):
    from adaq.validate import check_checkpoint

    report = check_checkpoint(tiny_qwen3_nvfp4)
    assert report.valid and report.budget is None and report.rules_applied["finite"] > 0
    assert check_checkpoint(nan_norm, level="layout").valid  # layout reads no values: the engine checks at load
    with pytest.raises(CheckpointError, match=r"not a valid checkpoint: .*input_layernorm.weight: holds 1 NaN"):
        check_checkpoint(nan_norm)


# ---- context against memory ----------------------------------------------------------------------------------------
def test_a_huge_max_position_embeddings_is_capped_to_the_kv_budget(tiny_qwen3_nvfp4, tmp_path, capsys, monkeypatch,
                                                                   caplog):
    from adaq.engine.api import LLM

    folder = edit_config(copy_of(tiny_qwen3_nvfp4, tmp_path, "long"), max_position_embeddings=10**9)
    assert adaq(["validate", folder], capsys, monkeypatch)[0] == 0
    with caplog.at_level("WARNING", logger="adaq.engine"):
        llm = LLM(folder, backend="reference", device="cpu", kv_cache_memory="8MiB")
    blocks = llm.engine.block_manager.num_blocks
    assert llm.engine.max_model_len == blocks * llm.engine.config.block_size < 10**9
    assert llm.engine.runner.kv_cache_bytes <= 8 * 2**20
    assert any("--max-model-len" in record.message and "capped" in record.message for record in caplog.records)
    code, _, err = adaq(["run", folder, "hi", *FAST, "--kv-cache-memory", "8MiB", "--max-model-len", str(10**9)],
                        capsys, monkeypatch)
    one_error_line(code, err, "--max-model-len")


def test_a_missing_o_proj_or_a_wrong_embedding_is_invalid_for_validate_and_refused_by_run(tiny_qwen3, tmp_path, capsys,
                                                                                        monkeypatch):
    """Found by scripts/fuzz_cli.py: validate called these valid while run refused them."""
    from safetensors.torch import load_file, save_file

    for case, edit in (("o_proj", lambda t: t.pop("model.layers.1.self_attn.o_proj.weight")),
                       ("embedding", lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:7]}))):
        folder = copy_of(tiny_qwen3, tmp_path, case)
        shard = next(folder.glob("*.safetensors"))
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
        errors = validate_findings(folder, capsys, monkeypatch)
        assert errors and errors[0]["rule"] == "shape-vs-config", errors
        code, _, err = adaq(["run", folder, "hi", *FAST], capsys, monkeypatch)
        one_error_line(code, err, "o_proj" if case == "o_proj" else "embed")
