"""Our Qwen3, Qwen3-MoE, Gemma3 and Gemma 4 (dense, MoE) on tiny random NVFP4 checkpoints against transformers'
forward on the same decompressed weights (fp32 compute, reference backend, through a paged KV cache)."""

import json

import pytest
import torch
from helpers.paged import PagedRunner, prefill_logits
from helpers.tiny_models import make_checkpoint

from adaq.errors import CheckpointError, UnsupportedArchitecture
from adaq.formats import nvfp4
from adaq.formats.architectures import SUPPORTED_ARCHITECTURES
from adaq.formats.checkpoint import open_checkpoint
from adaq.backends import get_backend
from adaq.models import build_model, load_weights

ARCHS = ("qwen3", "qwen3_moe", "gemma3", "gemma4", "gemma4_moe")
TOLERANCE = 1e-3  # max |delta logit| <= TOLERANCE * max |logit|
PROMPT = [249, 17, 200, 3, 96, 45, 150, 7, 88, 230, 61, 12, 5, 140, 33, 201, 99, 18, 77, 254, 1, 64]  # > window 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: make_checkpoint(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHS}


def ours(folder, activation_quant: bool = True, dtype=torch.float32):
    checkpoint = open_checkpoint(folder)
    backend = get_backend("reference", "cpu", activation_quant=activation_quant)
    return load_weights(build_model(checkpoint.config, backend, dtype), checkpoint)


def hf_logits(folder, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    error = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert error <= tolerance, f"max |delta logit| is {error:.2e} of max |logit|"
    return error


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(checkpoints, arch):
    reference = hf_logits(checkpoints[arch] / "decompressed", PROMPT)
    assert_close(prefill_logits(ours(checkpoints[arch] / "nvfp4"), PROMPT), reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_then_decode_matches_transformers(checkpoints, arch):
    """Prefill in chunks of 5 (each attending to its cached prefix), then one token per step."""
    model = ours(checkpoints[arch] / "nvfp4")
    runner = PagedRunner(model, 1, len(PROMPT), block_size=4)
    split = 10
    logits = [runner.step({0: PROMPT[i:min(i + 5, split)]}, logits_for_all=True) for i in range(0, split, 5)]
    logits += [runner.step({0: [token]}) for token in PROMPT[split:]]
    assert_close(torch.cat(logits), hf_logits(checkpoints[arch] / "decompressed", PROMPT))


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_sequences_match_each_alone(checkpoints, arch):
    """Three sequences of different lengths in one prefill step, then a decode step of all three."""
    model = ours(checkpoints[arch] / "nvfp4")
    prompts = [PROMPT[:13], PROMPT[3:6], PROMPT[5:21]]
    runner = PagedRunner(model, 3, 24, block_size=4)
    last = runner.step(dict(enumerate(prompts)))
    following = [PROMPT[0], PROMPT[1], PROMPT[2]]
    decoded = runner.step({i: [following[i]] for i in range(3)})
    for i, prompt in enumerate(prompts):
        reference = hf_logits(checkpoints[arch] / "decompressed", prompt + [following[i]])
        assert_close(last[i], reference[len(prompt) - 1])
        assert_close(decoded[i], reference[-1])


def test_gemma3_config_exercises_both_layer_kinds(checkpoints):
    config = json.loads((checkpoints["gemma3"] / "nvfp4" / "config.json").read_text())
    assert len(PROMPT) > config["sliding_window"]
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["rope_parameters"]["full_attention"]["rope_type"] == "linear"
    model = ours(checkpoints["gemma3"] / "nvfp4")
    windows = [layer.sliding_window for layer in model.attention_layers()]
    assert windows == [config["sliding_window"], config["sliding_window"], None]


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_and_kept_tensors(checkpoints, arch):
    model = ours(checkpoints[arch] / "nvfp4")
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.fused
    assert layer.self_attn.qkv_proj.handles[0].packed is not None
    assert model.embed_tokens.weight.dtype == torch.float32
    mlp = layer.mlp
    if arch == "qwen3_moe":
        assert all(len(pair) == 1 for pair in mlp.experts.gate_up)
        assert mlp.gate.handles[0].packed is None  # the router stays dense, as llm-compressor leaves it
    else:
        assert mlp.gate_up_proj.fused


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_checkpoint_matches_transformers(checkpoints, arch):
    """The bf16-baseline path: an unquantized folder loads as plain weights."""
    model = ours(checkpoints[arch] / "dense")
    assert model.layers[0].self_attn.qkv_proj.handles[0].packed is None
    assert_close(prefill_logits(model, PROMPT), hf_logits(checkpoints[arch] / "dense", PROMPT))


def test_tied_qwen3(tmp_path):
    root = make_checkpoint("qwen3", tmp_path, tie_word_embeddings=True)
    model = ours(root / "nvfp4")
    assert model.lm_head.linear.handles[0].dense is model.embed_tokens.weight
    assert_close(prefill_logits(model, PROMPT), hf_logits(root / "decompressed", PROMPT))


def test_w4a4_matches_compressed_tensors_forward(tmp_path):
    """Scheme NVFP4: our activation emulation equals transformers + compressed-tensors running the checkpoint
    (its decompressed weights are rounded to bf16, so they are set to the exact dequantized values first)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    root = make_checkpoint("qwen3", tmp_path, scheme="nvfp4")
    checkpoint = open_checkpoint(root / "nvfp4")
    assert checkpoint.scheme == "nvfp4"
    hf = AutoModelForCausalLM.from_pretrained(root / "nvfp4", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    hf = hf.float().eval()
    with torch.no_grad():
        for prefix in checkpoint.quantized_prefixes():
            hf.get_submodule(prefix).weight.copy_(nvfp4.dequantize(checkpoint.nvfp4(prefix)))
        reference = hf(torch.tensor([PROMPT])).logits[0]
    assert_close(prefill_logits(ours(root / "nvfp4"), PROMPT), reference)
    weight_only = prefill_logits(ours(root / "nvfp4", activation_quant=False), PROMPT)
    assert (weight_only - reference).abs().max() > 10 * TOLERANCE * reference.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_dtype_error_is_bounded(checkpoints, arch):
    """Logits with FP8 (E4M3, scale per token and head), NVFP4 and bf16 KV against an fp32 cache. Measured on these
    models: bf16 5e-4 to 8e-4, fp8 6e-3 to 1e-2, nvfp4 2.4e-2 to 5.1e-2 of max |logit| (top-1 86-100 %; printed
    with -s)."""
    model = ours(checkpoints[arch] / "nvfp4")
    exact = prefill_logits(model, PROMPT, kv_dtype=torch.float32)
    bf16 = assert_close(prefill_logits(model, PROMPT, kv_dtype=torch.bfloat16), exact, 2e-3)
    fp8 = assert_close(prefill_logits(model, PROMPT, kv_dtype=torch.float8_e4m3fn), exact, 2.5e-2)
    nvfp4 = prefill_logits(model, PROMPT, kv_dtype=torch.uint8)  # NVFP4: E2M1's one mantissa bit, ~4x FP8's error
    nvfp4_error = assert_close(nvfp4, exact, 1e-1)
    top1 = (nvfp4.argmax(-1) == exact.argmax(-1)).float().mean().item()
    print(f"{arch}: KV bf16 {bf16:.2e}, KV fp8 {fp8:.2e}, KV nvfp4 {nvfp4_error:.2e} of max |logit|; "
          f"nvfp4 top-1 agreement {top1:.1%}")
    assert fp8 > 0 and bf16 > 0 and nvfp4_error > fp8


def test_bf16_compute_stays_close(checkpoints):
    model = ours(checkpoints["qwen3"] / "nvfp4", dtype=torch.bfloat16)
    assert model.layers[0].self_attn.qkv_proj.handles[0].dense.dtype == torch.bfloat16
    logits = prefill_logits(model, PROMPT, kv_dtype=torch.bfloat16)
    assert_close(logits, hf_logits(checkpoints["qwen3"] / "decompressed", PROMPT), 5e-2)


def test_unsupported_architecture_names_the_supported_ones(checkpoints):
    config = json.loads((checkpoints["qwen3"] / "nvfp4" / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    with pytest.raises(UnsupportedArchitecture) as error:
        build_model(config, get_backend("reference", "cpu"))
    message = str(error.value)
    assert "LlamaForCausalLM" in message and all(name in message for name in SUPPORTED_ARCHITECTURES)


class DroppingSource:
    """A checkpoint with one tensor removed."""

    def __init__(self, checkpoint, dropped: str):
        self.checkpoint, self.dropped = checkpoint, dropped
        self.config, self.path = checkpoint.config, checkpoint.path

    def quantized_prefixes(self):
        return self.checkpoint.quantized_prefixes()

    def nvfp4(self, prefix):
        return self.checkpoint.nvfp4(prefix)

    def tensor_names(self):
        return [n for n in self.checkpoint.tensor_names() if n != self.dropped]

    def tensor(self, name):
        return self.checkpoint.tensor(name)


def test_missing_tensor_is_a_one_line_checkpoint_error(checkpoints):
    checkpoint = open_checkpoint(checkpoints["gemma3"] / "nvfp4")
    source = DroppingSource(checkpoint, "model.layers.1.pre_feedforward_layernorm.weight")
    model = build_model(checkpoint.config, get_backend("reference", "cpu"))
    with pytest.raises(CheckpointError, match="pre_feedforward_layernorm.weight is missing"):
        load_weights(model, source)


class MultimodalSource:
    """A text Gemma3 checkpoint laid out as Gemma3ForConditionalGeneration (transformers 5 names)."""

    def __init__(self, checkpoint):
        self.checkpoint, self.path = checkpoint, checkpoint.path
        text = {k: v for k, v in checkpoint.config.items() if k not in ("architectures", "quantization_config")}
        self.config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                       "text_config": text, "quantization_config": checkpoint.config["quantization_config"]}

    @staticmethod
    def renamed(name: str) -> str:
        return name.replace("model.", "model.language_model.", 1)

    def quantized_prefixes(self):
        return [self.renamed(p) for p in self.checkpoint.quantized_prefixes()]

    def nvfp4(self, prefix):
        return self.checkpoint.nvfp4(prefix.replace("model.language_model.", "model.", 1))

    def tensor_names(self):
        return [self.renamed(n) for n in self.checkpoint.tensor_names()]

    def tensor(self, name):
        return self.checkpoint.tensor(name.replace("model.language_model.", "model.", 1))


def test_gemma3_multimodal_checkpoint_runs_its_text_model(checkpoints):
    source = MultimodalSource(open_checkpoint(checkpoints["gemma3"] / "nvfp4"))
    model = load_weights(build_model(source.config, get_backend("reference", "cpu")), source)
    assert_close(prefill_logits(model, PROMPT), hf_logits(checkpoints["gemma3"] / "decompressed", PROMPT))


@pytest.mark.slow
def test_real_gemma3_270m_past_its_sliding_window():
    """The real model's bf16 folder, a prompt longer than its 512-token window: our last hidden states and logits
    against transformers (fp32 both)."""
    from transformers import AutoModelForCausalLM

    from adaq.demo import gemma3_270m_folder

    folder = gemma3_270m_folder()
    checkpoint = open_checkpoint(folder)
    window = checkpoint.config["sliding_window"]
    tokens = [2] + torch.randint(100, 20000, (window + 40,), generator=torch.Generator().manual_seed(0)).tolist()
    model = load_weights(build_model(checkpoint.config, get_backend("reference", "cpu")), checkpoint)
    runner = PagedRunner(model, 1, len(tokens), block_size=16)
    ours = runner.step({0: tokens[:-8]}, logits_for_all=False)
    ours = torch.cat([ours] + [runner.step({0: [t]}) for t in tokens[-8:]])
    del model, runner
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(torch.tensor([tokens]), logits_to_keep=9).logits[0]
    assert_close(ours, reference)


def test_load_reports_progress_per_layer(checkpoints):
    checkpoint = open_checkpoint(checkpoints["qwen3_moe"] / "nvfp4")
    calls = []
    load_weights(build_model(checkpoint.config, get_backend("reference", "cpu")), checkpoint,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]


def test_qwen3_with_yarn_rope(tmp_path):
    """YaRN (Qwen3's long-context setting): transformers' inv_freq, and its attention factor folded into the scale."""
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    root = make_checkpoint("qwen3", tmp_path, rope_parameters=yarn)
    assert json.loads((root / "nvfp4" / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    model = ours(root / "nvfp4")
    assert model.layers[0].self_attn.attn.scale > 16 ** -0.5
    assert_close(prefill_logits(model, PROMPT), hf_logits(root / "decompressed", PROMPT))


def test_length_dependent_rope_is_refused(checkpoints):
    config = json.loads((checkpoints["qwen3"] / "nvfp4" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedArchitecture, match="RoPE type 'dynamic'"):
        build_model(config, get_backend("reference", "cpu"))


def test_qwen3_moe_without_renormalisation_and_sparse_step_2(tmp_path):
    root = make_checkpoint("qwen3_moe", tmp_path, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[])
    model = ours(root / "nvfp4")
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["GatedMLP", "SparseMoE"]
    assert_close(prefill_logits(model, PROMPT), hf_logits(root / "decompressed", PROMPT))
