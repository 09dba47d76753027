"""`adaq validate` on hybrid (Gated DeltaNet) checkpoints: the layer types, the shapes of their Linears, and the
state cache in the VRAM budget."""

import pytest
from helpers.tiny_models import HYBRIDS, hybrid_bf16_folders

from adaq.quant.pipeline import quantize_model
from adaq.validate.budget import estimate_weight_bytes, plan, state_bytes_per_sequence, Gpu
from adaq.formats.shapes import ModelShape
from adaq.validate.validator import validate_checkpoint


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    folders = {}
    for arch, source in hybrid_bf16_folders(tmp_path_factory).items():
        folders[arch] = tmp_path_factory.mktemp(f"nvfp4-{arch}") / "out"
        quantize_model(str(source), folders[arch], scheme="nvfp4a16", method="rtn", device="cpu")
    return folders


@pytest.mark.parametrize("arch", HYBRIDS)
def test_tiny_hybrid_checkpoint_validates_with_its_state_cache(quantized, arch):
    report = validate_checkpoint(quantized[arch], batch=3, context=256)
    assert report.valid, [f.message for f in report.errors]
    assert not [f for f in report.findings if f.rule == "shape"]  # every Linear (gated q_proj too) as config says
    budget = report.budget
    # 3 GDN layers × (conv 128 channels × 3 × 2 bytes + recurrent 4 heads × 16 × 16 × 4 bytes), 3 sequences
    assert budget.state_cache == 3 * 3 * (128 * 3 * 2 + 4 * 16 * 16 * 4)
    assert budget.kv_per_token == 1 * 2 * 2 * (32 * 1 + 4)  # one full-attention layer, FP8 + scales
    assert any("Gated DeltaNet" in note for note in budget.notes)
    assert budget.as_dict()["state_cache_bytes"] == budget.state_cache


def test_qwen3_5_35b_a3b_shape_from_transformers_defaults():
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_5_moe_text").to_dict()
    config["architectures"] = ["Qwen3_5MoeForCausalLM"]
    shape = ModelShape.from_config(config)
    assert (shape.layers, shape.linear_layers, shape.kv_layers, shape.moe_layers) == (40, 30, 10, 40)
    per_layer = (2 * 16 * 128 + 32 * 128) * 3 * 2 + 32 * 128 * 128 * 4
    assert state_bytes_per_sequence(shape) == 30 * per_layer  # about 61 MiB per sequence
    assert shape.expected_linear_shape("model.layers.3.self_attn.q_proj") == (2 * 16 * 256, 2048)
    assert shape.expected_linear_shape("model.layers.0.linear_attn.in_proj_qkv") == (8192, 2048)
    assert shape.expected_linear_shape("model.layers.0.mlp.shared_expert.down_proj") == (2048, 512)
    budget = plan(shape, estimate_weight_bytes(shape), Gpu.parse("rtx4090"), batch=4, context=4096)
    assert budget.state_cache == 4 * 30 * per_layer and budget.total > budget.state_cache + budget.kv_cache


def test_validate_command_shows_the_state_cache(quantized, capsys, monkeypatch):
    from test_run_cli import adaq

    code, out, err = adaq(["validate", quantized["qwen3_next"], "--batch", "2"], capsys, monkeypatch)
    assert code == 0, out + err
    assert "state cache" in out and "Gated DeltaNet" in out
