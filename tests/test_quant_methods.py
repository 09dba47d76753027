"""Quantization methods beyond round-to-nearest: scale search, activation-aware search, GPTQ (issue 7)."""

import pytest
import torch

from adaq.errors import AdaqError
from adaq.formats import nvfp4
from adaq.quant import gptq, scale_search
from adaq.quant.scale_search import SearchConfig

SHAPES = [(1, 16), (7, 48), (64, 256), (33, 640)]


def _weight(shape, seed=0, outliers=True):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator) * 0.05
    if outliers:
        mask = torch.rand(shape, generator=generator) < 0.01
        w = torch.where(mask, w * 20, w)
    return w


def _reference_block_errors(weight, q, importance=None):
    error = (nvfp4.dequantize(q) - weight).square()
    if importance is not None:
        error = error * importance
    return error.unflatten(-1, (-1, 16)).sum(-1)


def test_e2m1_round_matches_reference_codec_including_ties():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, 0.0, -0.0])
    x = torch.cat([torch.randn(50_000) * 3, ties, -ties, torch.nextafter(ties, torch.zeros_like(ties))])
    assert torch.equal(scale_search.e2m1_round(x), nvfp4.e2m1_decode(nvfp4.e2m1_encode(x)))


@pytest.mark.parametrize("shape", SHAPES)
def test_block_errors_match_reference_dequantization(shape):
    w = _weight(shape)
    q = nvfp4.quantize(w)
    got = scale_search.block_errors(w, q.block_scale, q.global_scale)
    torch.testing.assert_close(got, _reference_block_errors(w, q), rtol=1e-5, atol=1e-12)


def test_encode_with_rtn_scales_is_byte_identical_to_reference_quantize():
    w = _weight((64, 256))
    ref = nvfp4.quantize(w)
    ours = scale_search.encode(w, ref.block_scale, ref.global_scale)
    assert torch.equal(ours.packed, ref.packed)
    assert torch.equal(ours.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_search_never_worse_than_rtn_on_any_block(shape, weighted):
    w = _weight(shape, seed=shape[0])
    importance = torch.rand(shape[1]) ** 4 * 10 if weighted else None
    rtn = nvfp4.quantize(w)
    searched = scale_search.quantize_searched(w, rtn.global_scale, importance)
    rtn_err = _reference_block_errors(w, rtn, importance)
    ours = _reference_block_errors(w, searched, importance)
    assert (ours <= rtn_err).all()
    assert torch.equal(searched.global_scale, rtn.global_scale)
    if shape[0] * shape[1] >= 4096:
        assert ours.sum() < 0.97 * rtn_err.sum()


REAL_TENSORS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.5.self_attn.o_proj.weight",
                "model.layers.11.mlp.down_proj.weight", "model.layers.17.mlp.gate_proj.weight"]


@pytest.mark.slow
def test_search_never_worse_than_rtn_on_any_block_of_real_gemma3_weights(gemma3_270m):
    from safetensors import safe_open

    with safe_open(str(gemma3_270m / "model.safetensors"), "pt") as handle:
        weights = {name: handle.get_tensor(name) for name in REAL_TENSORS}
    generator = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        assert w.dtype == torch.bfloat16
        importance = torch.rand(w.shape[1], generator=generator) ** 4
        rtn = nvfp4.quantize(w)
        for weights_of_error in (None, importance):
            searched = scale_search.quantize_searched(w, rtn.global_scale, weights_of_error)
            ours = _reference_block_errors(w.float(), searched, weights_of_error)
            theirs = _reference_block_errors(w.float(), rtn, weights_of_error)
            assert (ours <= theirs).all(), name
            assert ours.sum() < 0.9 * theirs.sum(), name


def test_search_handles_zero_blocks_and_tiny_blocks():
    w = _weight((8, 64))
    w[0] = 0.0
    w[1, :16] = 1e-30
    rtn = nvfp4.quantize(w)
    searched = scale_search.quantize_searched(w, rtn.global_scale)
    assert (_reference_block_errors(w, searched) <= _reference_block_errors(w, rtn)).all()
    assert torch.isfinite(nvfp4.dequantize(searched)).all()
    assert (searched.block_scale.float() > 0).all()


def test_search_is_deterministic():
    w, importance = _weight((40, 320), seed=3), torch.rand(320, generator=torch.Generator().manual_seed(1))
    a = scale_search.quantize_searched(w, importance=importance)
    b = scale_search.quantize_searched(w.clone(), importance=importance.clone())
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))


def test_global_scale_search_never_increases_total_error():
    ws = [_weight((32, 128), seed=s) for s in range(3)]
    base = scale_search.rtn_global_scale(ws)
    config = SearchConfig(global_steps=4)
    chosen = scale_search.search_global_scale(ws, base, config=config)
    total = lambda g: sum(scale_search.search_block_scales(w, g, None, config)[1].sum() for w in ws)  # noqa: E731
    assert total(chosen) <= total(base)
    assert chosen.to(torch.bfloat16).float().item() == chosen.item() or chosen.item() == base.item()


def test_search_config_rejects_bad_fields():
    with pytest.raises(AdaqError, match="codes_above"):
        SearchConfig(codes_above=-1)
    with pytest.raises(AdaqError, match="global_steps"):
        SearchConfig(global_steps=0)


def _correlated_inputs(k, rows=2048, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / k ** 0.5 + torch.eye(k)
    scale = torch.rand(k, generator=generator) ** 3 * 4 + 0.1
    return (torch.randn(rows, k, generator=generator) @ mixing) * scale


def test_gptq_lowers_output_error_below_rtn_and_weighted_search():
    w = _weight((48, 128), seed=5, outliers=False)
    x = _correlated_inputs(128)
    hessian = x.T @ x / len(x)
    g = scale_search.rtn_global_scale([w])
    out_error = lambda q: ((nvfp4.dequantize(q) - w) @ x.T).square().sum().item()  # noqa: E731
    rtn = out_error(nvfp4.quantize(w, g))
    weighted_search = out_error(scale_search.quantize_searched(w, g, torch.diag(hessian)))
    gptq_rtn_scales = out_error(gptq.gptq_quantize(w, hessian, g, gptq.GPTQConfig(search=None)))
    gptq_searched = out_error(gptq.gptq_quantize(w, hessian, g))
    assert gptq_rtn_scales < 0.8 * rtn
    assert weighted_search < rtn
    assert gptq_searched < min(weighted_search, gptq_rtn_scales)


def test_gptq_group_shares_global_scale_and_is_deterministic():
    ws = [_weight((16, 64), seed=s) for s in range(3)]
    x = _correlated_inputs(64)
    hessian = x.T @ x / len(x)
    g = scale_search.rtn_global_scale(ws)
    first = gptq.gptq_quantize_group(ws, hessian, g)
    second = gptq.gptq_quantize_group([w.clone() for w in ws], hessian.clone(), g)
    for a, b, w in zip(first, second, ws):
        assert a.packed.shape == (w.shape[0], w.shape[1] // 2)
        assert torch.equal(a.global_scale, g.reshape(1))
        assert torch.equal(a.packed, b.packed)
        assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))


def test_gptq_rejects_mismatched_hessian():
    with pytest.raises(AdaqError, match="Hessian"):
        gptq.gptq_quantize(torch.randn(4, 32), torch.eye(16), torch.ones(1))


# --- the methods end to end, through `adaq quantize`'s pipeline, on tiny random checkpoints -----------------------

def _quantize(folder, out, method, calib_text, scheme="nvfp4a16"):
    from adaq.quant.methods import CalibrationSpec
    from adaq.quant.pipeline import quantize_model

    return quantize_model(str(folder), out, scheme=scheme, method=method, device="cpu",
                          calibration=CalibrationSpec(calib_text, num_samples=4, seq_len=64))


def _tensor_layout(folder):
    from adaq.formats.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(folder)
    layout = {p: (checkpoint.nvfp4(p).packed.shape, checkpoint.nvfp4(p).block_scale.shape)
              for p in checkpoint.quantized_prefixes()}
    return layout, sorted(checkpoint.tensor_names()), checkpoint.config["quantization_config"]


def _held_out_ids(source, calib_text):
    """Calibration-like text the methods did not calibrate on (they read the first 4 windows of 64 tokens)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(source))(calib_text.read_text(), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[512:512 + 2 * 96]).view(2, 96)


def _forward_error(folder, source, ids):
    """Max |logits(quantized) - logits(source)| through transformers' own decompression, and the decompressed state."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=CompressedTensorsConfig(dequantize=True)).float().eval()
    reference = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.no_grad():
        error = (quantized(ids).logits - reference(ids).logits).square().mean().item()
    return error, quantized.state_dict()


@pytest.mark.parametrize("method", ["search", "search-act", "gptq"])
def test_method_output_is_a_valid_rtn_shaped_checkpoint_that_transformers_decodes_exactly(
        method, tiny_folder, tiny_nvfp4, calib_text, tmp_path):
    pytest.importorskip("compressed_tensors")
    from adaq.formats.checkpoint import open_checkpoint
    from adaq.validate.validator import validate_checkpoint

    source = tiny_folder("gemma3")
    out = tmp_path / method
    report = _quantize(source, out, method, calib_text)
    assert report.method == method and report.quantized > 0
    assert _tensor_layout(out) == _tensor_layout(tiny_nvfp4("gemma3"))
    assert validate_checkpoint(out).valid

    ids = _held_out_ids(source, calib_text)
    ours, state = _forward_error(out, source, ids)
    rtn, _ = _forward_error(tiny_nvfp4("gemma3"), source, ids)
    assert ours < rtn
    checkpoint = open_checkpoint(out)
    for prefix in checkpoint.quantized_prefixes():
        decompressed = state[f"{prefix}.weight"]
        expected = nvfp4.dequantize(checkpoint.nvfp4(prefix), torch.bfloat16).float()
        assert torch.equal(decompressed, expected), prefix


def test_calibrated_methods_write_w4a4_with_input_scales_and_are_deterministic(tiny_folder, calib_text, tmp_path):
    from adaq.formats.checkpoint import open_checkpoint
    from adaq.validate.validator import validate_checkpoint

    source = tiny_folder("qwen3")
    first, second = tmp_path / "a", tmp_path / "b"
    _quantize(source, first, "gptq", calib_text, scheme="nvfp4")
    _quantize(source, second, "gptq", calib_text, scheme="nvfp4")
    assert validate_checkpoint(first).valid
    a, b = open_checkpoint(first), open_checkpoint(second)
    assert a.scheme == "nvfp4"
    for prefix in a.quantized_prefixes():
        wa, wb = a.nvfp4(prefix), b.nvfp4(prefix)
        assert wa.input_global_scale is not None and torch.isfinite(wa.input_global_scale).all()
        assert torch.equal(wa.packed, wb.packed) and torch.equal(wa.input_global_scale, wb.input_global_scale)
        assert torch.equal(wa.block_scale.view(torch.uint8), wb.block_scale.view(torch.uint8))


def test_quantize_compare_prints_one_table_and_writes_json(tiny_folder, calib_text, tmp_path):
    import json

    from typer.testing import CliRunner

    from adaq.cli import app

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["quantize", str(tiny_folder("gemma3")), "-o", str(out),
                                      "--compare", "rtn,search", "--calib-data", str(calib_text),
                                      "--num-samples", "4", "--seq-len", "64", "--eval-text", str(calib_text),
                                      "--max-windows", "3", "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for label in ("bf16 (source)", "rtn", "search", "recovery"):
        assert label in result.output
    report = json.loads((out / "compare.json").read_text())
    assert set(report["models"]) == {"bf16", "rtn/nvfp4a16", "search/nvfp4a16"}
    assert all(model["windows"] == 3 for model in report["models"].values())
    assert (out / "search-nvfp4a16" / "config.json").is_file()


def test_quantize_compare_rejects_unknown_methods(tiny_folder, calib_text, tmp_path):
    from typer.testing import CliRunner

    from adaq.cli import app

    result = CliRunner().invoke(app, ["quantize", str(tiny_folder("gemma3")), "-o", str(tmp_path / "x"),
                                      "--compare", "rtn,magic", "--eval-text", str(calib_text)])
    assert result.exit_code != 0
    assert "magic" in str(result.exception) or "magic" in result.output


@pytest.mark.slow
def test_gptq_through_llmcompressor_recipe_writes_the_same_layout(tiny_folder, tiny_nvfp4, calib_text, tmp_path):
    pytest.importorskip("llmcompressor")
    from adaq.validate.validator import validate_checkpoint

    out = tmp_path / "gptq-llmc"
    _quantize(tiny_folder("gemma3"), out, "gptq-llmcompressor", calib_text)
    assert _tensor_layout(out)[0] == _tensor_layout(tiny_nvfp4("gemma3"))[0]
    assert validate_checkpoint(out).valid
    assert "GPTQModifier" in (out / "recipe.yaml").read_text()


def test_gptq_recipes_parse_for_both_schemes():
    for scheme in ("nvfp4a16", "nvfp4"):
        text = gptq.llmcompressor_recipe(scheme, ["lm_head"], ["Linear"])
        assert f"scheme: {scheme.upper()}" in text and "GPTQModifier" in text


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_layerwise_calibration_reproduces_the_models_own_forward(arch):
    from helpers.tiny_models import random_model

    from adaq.quant.activation_aware import CalibrationConfig, calibrate_layerwise

    model = random_model(arch, seed=2).float().eval()
    ids = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    visited = []
    hidden = calibrate_layerwise(model, ids, lambda i, layer, stats: visited.append((i, sorted(stats))),
                                 CalibrationConfig(micro_batch=2))
    torch.testing.assert_close(torch.cat(hidden), seen[0], rtol=1e-5, atol=1e-5)
    assert [i for i, _ in visited] == list(range(model.config.num_hidden_layers))
    assert "self_attn.q_proj" in visited[0][1] and "mlp.down_proj" in visited[0][1]
