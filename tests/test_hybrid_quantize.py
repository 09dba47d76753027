"""`adaq quantize` on tiny random hybrid (Gated DeltaNet) models: RTN bytes equal llm-compressor's with the same
ignore list (llm-compressor's Qwen3.5 / Qwen3-Next NVFP4 examples), and the result runs."""

import pytest
import torch
from helpers.tiny_models import HYBRID_IGNORE, HYBRIDS, hybrid_bf16_folders
from safetensors.torch import load_file
from test_quantize import llmcompressor_oneshot, quantization_config, raw_bytes

from adaq.formats.checkpoint import open_checkpoint
from adaq.quant.pipeline import quantize_model


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    return hybrid_bf16_folders(tmp_path_factory)


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def assert_same_tensors(ours, theirs) -> None:
    """Byte for byte, except the (1 + w) norms: llm-compressor turns them into w + 1 for calibration and back in
    bf16 (a lossy round trip adaq does not copy: it keeps the source's). The GDN's gated norm is a plain w."""
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    offset_norms = [n for n in b if n.endswith("norm.weight") and not n.endswith("linear_attn.norm.weight")]
    for name in offset_norms:
        assert torch.equal((a.pop(name) + 1) - 1, b.pop(name)), name
    different = [n for n in b if a[n].dtype != b[n].dtype or not torch.equal(raw_bytes(a[n]), raw_bytes(b[n]))]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("arch", HYBRIDS)
def test_rtn_bytes_equal_llmcompressor(arch, tiny_bf16, tmp_path):
    ours = tmp_path / "ours"
    quantize_model(str(tiny_bf16[arch]), ours, scheme="nvfp4a16", method="rtn", device="cpu")
    theirs = llmcompressor_oneshot(tiny_bf16[arch], tmp_path / "lc", "NVFP4A16", HYBRID_IGNORE)
    assert_same_tensors(ours, theirs)
    assert quantization_config(ours) == quantization_config(theirs)
    kept = quantization_config(ours)["ignore"]
    assert any("linear_attn.in_proj" in name for name in kept) and "lm_head" in kept
    quantized = open_checkpoint(ours).quantized_prefixes()
    assert any(p.endswith("self_attn.q_proj") for p in quantized)
    assert not any("linear_attn" in p or p.endswith(("mlp.gate", "shared_expert_gate")) for p in quantized)


def test_rtn_output_runs_like_transformers_decompression(tiny_bf16, tmp_path):
    """adaq's Qwen3.5 NVFP4 folder, run by adaq, against transformers + compressed-tensors decompressing it."""
    from helpers.paged import prefill_logits
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from adaq.backends import get_backend
    from adaq.formats import nvfp4
    from adaq.models import build_model, load_weights

    out = tmp_path / "out"
    quantize_model(str(tiny_bf16["qwen3_5"]), out, scheme="nvfp4a16", method="rtn", device="cpu")
    checkpoint = open_checkpoint(out)
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    hf = hf.float().eval()
    tokens = list(range(3, 40, 2))
    with torch.no_grad():
        for prefix in checkpoint.quantized_prefixes():  # exact dequantized values (transformers rounds to bf16)
            hf.get_submodule(prefix).weight.copy_(nvfp4.dequantize(checkpoint.nvfp4(prefix)))
        reference = hf(torch.tensor([tokens])).logits[0]
    model = load_weights(build_model(checkpoint.config, get_backend("reference", "cpu"), torch.float32), checkpoint)
    got = prefill_logits(model, tokens)
    assert ((got - reference).abs().max() / reference.abs().max()).item() <= 1e-4
