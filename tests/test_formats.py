"""adaq.formats: the NVFP4 codec against compressed-tensors' own functions, the readers and the writer."""

import json

import pytest
import torch

from adaq.errors import CheckpointError
from adaq.formats import nvfp4
from adaq.formats.checkpoint import open_checkpoint
from adaq.formats.compressed_tensors import StreamingShard, TensorSpec, quantization_config, save_compressed_tensors
from adaq.formats.modelopt import save_modelopt

SHAPES = [(16, 16), (7, 48), (33, 160), (128, 64), (3, 2048)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_weight(shape, dtype, seed=0) -> torch.Tensor:
    """Gaussian weights with the awkward cases llm-compressor's bytes depend on: zero blocks, -0.0, tiny
    negatives (code 8), outliers, and values right on E2M1 midpoints."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.05
    weight[0, :16] = 0.0
    weight[0, 3] = -0.0
    if shape[0] > 1:
        weight[1, :16] = -1e-7
        weight[1, 5] = 0.3
    weight[-1, -1] = 4.0
    return weight.to(dtype)


def compressed_tensors_reference(weight: torch.Tensor, global_scale: torch.Tensor):
    """llm-compressor's steps, through compressed-tensors' functions: observer min/max per group in the weight's
    dtype, calculate_qparams, the scale stored in the weight's dtype, quantize, pack."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = preset_name_to_scheme("NVFP4A16", ["Linear"]).weights
    groups = weight.unflatten(-1, (-1, 16))
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=global_scale)
    scale = scale.to(weight.dtype)
    codes = quantize(x=weight, scale=scale, zero_point=zero.to(weight.dtype), args=args, global_scale=global_scale)
    return pack_fp4_to_uint8(codes), scale.to(torch.float8_e4m3fn)


def ct_global_scale(weight: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.quantization.utils import generate_gparam

    amax = weight.abs().amax().reshape(1)
    return generate_gparam(-amax, amax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_compressed_tensors_bytes(shape, dtype):
    pytest.importorskip("compressed_tensors")
    weight = random_weight(shape, dtype, seed=shape[0])
    expected_global = ct_global_scale(weight)
    ours = nvfp4.quantize(weight)
    assert torch.equal(ours.global_scale, expected_global)
    packed, scale = compressed_tensors_reference(weight, expected_global)
    assert torch.equal(ours.block_scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours.packed, packed)


def test_negative_values_that_round_to_zero_keep_their_sign_bit():
    codes = nvfp4.e2m1_encode(torch.tensor([-0.1, 0.1, -0.0, 0.0, -0.3, -7.0, 0.25, 0.75, 2.5, 5.0]))
    assert codes.tolist() == [8, 0, 0, 0, 9, 15, 0, 2, 4, 6]


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_compressed_tensors_decompression(shape):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    weight = nvfp4.quantize(random_weight(shape, torch.bfloat16))
    state = {"weight_packed": weight.packed, "weight_scale": weight.block_scale,
             "weight_global_scale": weight.global_scale}
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    theirs = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(nvfp4.dequantize(weight, theirs.dtype), theirs)


def test_quantize_refuses_bad_weights():
    from adaq.errors import AdaqError

    with pytest.raises(AdaqError, match="multiple of 16"):
        nvfp4.quantize(torch.randn(4, 24))
    bad = torch.randn(4, 32)
    bad[1, 2] = float("nan")
    with pytest.raises(AdaqError, match="NaN"):
        nvfp4.quantize(bad)


def _quantized_state(seed=0, w4a4=False):
    """A small 'model': two fused q/k/v sets and a down_proj, plus kept tensors."""
    weights = {f"model.layers.{i}.self_attn.{p}": random_weight((32, 64), torch.bfloat16, seed + i * 3 + j)
               for i in range(2) for j, p in enumerate(("q_proj", "k_proj", "v_proj"))}
    quantized = {}
    for prefix, weight in weights.items():
        quantized[prefix] = nvfp4.quantize(weight)
        if w4a4:
            quantized[prefix].input_global_scale = torch.tensor([448 * 6 / (3.0 + len(prefix) % 5)])
    kept = {"model.embed_tokens.weight": torch.randn(8, 64).to(torch.bfloat16),
            "model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}
    return quantized, kept


CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64}


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_compressed_tensors_round_trip(tmp_path, scheme):
    quantized, kept = _quantized_state(w4a4=scheme == "nvfp4")
    save_compressed_tensors(tmp_path, CONFIG, scheme, ["lm_head"], quantized, kept)
    checkpoint = open_checkpoint(tmp_path)
    assert (checkpoint.format, checkpoint.scheme) == ("compressed-tensors", scheme)
    assert checkpoint.quantized_prefixes() == sorted(quantized)
    assert checkpoint.tensor_names() == sorted(kept)
    for prefix, weight in quantized.items():
        read = checkpoint.nvfp4(prefix)
        assert torch.equal(read.packed, weight.packed) and torch.equal(read.global_scale, weight.global_scale)
        assert torch.equal(read.block_scale.view(torch.uint8), weight.block_scale.view(torch.uint8))
        if scheme == "nvfp4":
            assert torch.equal(read.input_global_scale, weight.input_global_scale)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written == quantization_config(scheme, ["lm_head"])


def test_quantization_config_is_what_compressed_tensors_builds():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    for scheme, preset in (("nvfp4a16", "NVFP4A16"), ("nvfp4", "NVFP4")):
        ours = QuantizationConfig.model_validate(quantization_config(scheme, ["lm_head"]))
        reference = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                       format="nvfp4-pack-quantized", ignore=["lm_head"],
                                       quantization_status="compressed")
        strip = lambda args: None if args is None else {**args.model_dump(), "observer": None}  # noqa: E731
        group, expected = ours.config_groups["group_0"], reference.config_groups["group_0"]
        assert strip(group.weights) == strip(expected.weights)
        assert strip(group.input_activations) == strip(expected.input_activations)
        assert (ours.format, ours.ignore, ours.quant_method) == (reference.format, reference.ignore,
                                                                 reference.quant_method)


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4"])
def test_modelopt_and_compressed_tensors_decode_identically(tmp_path, scheme):
    quantized, kept = _quantized_state(seed=5, w4a4=scheme == "nvfp4")
    save_compressed_tensors(tmp_path / "ct", CONFIG, scheme, ["lm_head"], quantized, kept)
    save_modelopt(tmp_path / "mo", CONFIG, scheme, ["lm_head"], quantized, kept)
    ct, mo = open_checkpoint(tmp_path / "ct"), open_checkpoint(tmp_path / "mo")
    assert mo.format == "modelopt" and mo.scheme == scheme
    assert mo.quantized_prefixes() == ct.quantized_prefixes()
    assert mo.tensor_names() == ct.tensor_names()
    for prefix in ct.quantized_prefixes():
        a, b = ct.nvfp4(prefix), mo.nvfp4(prefix)
        assert torch.equal(nvfp4.dequantize(a), nvfp4.dequantize(b))
        assert torch.equal(nvfp4.dequantize(a, torch.bfloat16), nvfp4.dequantize(b, torch.bfloat16))
        if scheme == "nvfp4":
            assert torch.equal(a.input_global_scale, b.input_global_scale)


def test_modelopt_copy_of_a_real_rtn_checkpoint_decodes_identically(tiny_qwen3_nvfp4, tmp_path):
    ct = open_checkpoint(tiny_qwen3_nvfp4)
    quantized = {p: ct.nvfp4(p) for p in ct.quantized_prefixes()}
    kept = {name: ct.tensor(name) for name in ct.tensor_names()}
    save_modelopt(tmp_path, ct.config, "nvfp4a16", ["lm_head"], quantized, kept)
    mo = open_checkpoint(tmp_path)
    for prefix, weight in quantized.items():
        assert torch.equal(nvfp4.dequantize(mo.nvfp4(prefix)), nvfp4.dequantize(weight))


def test_modelopt_scheme_from_hf_quant_config(tmp_path):
    quantized, kept = _quantized_state()
    save_modelopt(tmp_path, CONFIG, "nvfp4a16", ["lm_head"], quantized, kept)
    section = json.loads((tmp_path / "hf_quant_config.json").read_text())
    assert section["quantization"]["quant_algo"] == "W4A16_NVFP4"
    section["quantization"]["quant_algo"] = "FP8"
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(section))
    with pytest.raises(CheckpointError, match="FP8"):
        open_checkpoint(tmp_path)


def test_reader_refuses_non_nvfp4_compressed_tensors(tmp_path):
    quantized, kept = _quantized_state()
    save_compressed_tensors(tmp_path, CONFIG, "nvfp4a16", ["lm_head"], quantized, kept)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["format"] = "float-quantized"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="float-quantized"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("breakage", ["scale_dtype", "scale_shape", "packed_dtype"])
def test_reader_names_the_bad_tensor(tmp_path, breakage):
    quantized, kept = _quantized_state()
    prefix = "model.layers.0.self_attn.k_proj"
    weight = quantized[prefix]
    if breakage == "scale_dtype":
        weight.block_scale = weight.block_scale.float()
    elif breakage == "scale_shape":
        weight.block_scale = weight.block_scale[:, :2].contiguous()
    else:
        weight.packed = weight.packed.to(torch.int32)
    save_compressed_tensors(tmp_path, CONFIG, "nvfp4a16", ["lm_head"], quantized, kept)
    checkpoint = open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=prefix):
        checkpoint.nvfp4(prefix)


def test_streaming_shard_is_a_valid_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    from adaq.formats.safetensors_check import check_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.uint8),
               "c": torch.randn(2, 16).to(torch.float8_e4m3fn), "d": torch.zeros(0, 4, dtype=torch.bfloat16)}
    shard = StreamingShard(tmp_path / "x.safetensors", [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in
                                                         tensors.items()])
    for name, tensor in tensors.items():
        shard.write(name, tensor)
    shard.close()
    check_safetensors(tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8))


def test_streaming_shard_refuses_tensors_out_of_plan(tmp_path):
    shard = StreamingShard(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2,))])
    with pytest.raises(ValueError, match="expected"):
        shard.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="never written"):
        shard.close()


def test_open_checkpoint_refuses_truncated_shards(tmp_path):
    quantized, kept = _quantized_state()
    save_compressed_tensors(tmp_path, CONFIG, "nvfp4a16", ["lm_head"], quantized, kept)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tmp_path)
