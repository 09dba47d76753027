"""Gemma 4 (dense and MoE) on tiny random NVFP4 checkpoints against transformers' forward on the same decompressed
weights: batched prefill of sequences of different lengths, then 40 decode steps through a bf16 paged KV cache
(fp32 compute, reference backend). The generic prefill / chunked / packed / dense / KV-dtype checks run on these
models in test_models.py."""

import json

import pytest
import torch
from helpers.paged import PagedRunner, prefill_logits
from helpers.tiny_models import make_checkpoint
from test_models import PROMPT, MultimodalSource, assert_close, hf_logits, ours

from adaq.backends import get_backend
from adaq.errors import AdaqNotice, UnsupportedArchitecture
from adaq.formats.checkpoint import open_checkpoint
from adaq.models import build_model, load_weights

ARCHS = ("gemma4", "gemma4_moe")
DECODE_STEPS = 40
CONTINUATION = [(17 * i + 5) % 256 for i in range(DECODE_STEPS)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: make_checkpoint(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHS}


def batched_decode(model, prompts: list[list[int]], kv_dtype: torch.dtype) -> list[torch.Tensor]:
    """Per sequence: logits [1 + DECODE_STEPS, V] of its prompt's last token and of each decode step."""
    longest = max(map(len, prompts)) + DECODE_STEPS
    runner = PagedRunner(model, len(prompts), longest, block_size=4, kv_dtype=kv_dtype)
    steps = [runner.step(dict(enumerate(prompts)))]
    for token in CONTINUATION:
        steps.append(runner.step({b: [(token + 31 * b) % 256] for b in range(len(prompts))}))
    return [torch.stack([step[b] for step in steps]) for b in range(len(prompts))]


def continued(prompt: list[int], b: int) -> list[int]:
    return prompt + [(token + 31 * b) % 256 for token in CONTINUATION]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_prefill_and_decode_match_transformers(checkpoints, arch):
    """Three sequences (3, 13 and 22 tokens, window 8) in one prefill, then 40 decode steps of all three."""
    model = ours(checkpoints[arch] / "nvfp4")
    prompts = [PROMPT[3:6], PROMPT[:13], PROMPT]
    errors = []
    for b, logits in enumerate(batched_decode(model, prompts, torch.bfloat16)):
        tokens = continued(prompts[b], b)
        reference = hf_logits(checkpoints[arch] / "decompressed", tokens)[len(prompts[b]) - 1:]
        errors.append(assert_close(logits, reference))
    print(f"{arch}: max |delta logit| / max |logit| = {max(errors):.2e} (bf16 KV, {DECODE_STEPS} decode steps)")


def test_layer_kinds_head_dims_and_kv_heads(checkpoints):
    config = json.loads((checkpoints["gemma4"] / "nvfp4" / "config.json").read_text())
    model = ours(checkpoints["gemma4"] / "nvfp4")
    layers = model.attention_layers()
    assert [layer.sliding_window for layer in layers] == [config["sliding_window"]] * 5 + [None]
    assert [(layer.head_dim, layer.num_kv_heads) for layer in layers] == [(16, 2)] * 5 + [(32, 1)]
    assert [layer.scale for layer in layers] == [1.0] * 6
    assert model.layers[5].self_attn.projections == "qk"  # k_eq_v: no v_proj
    assert model.layers[0].self_attn.projections == "qkv"
    inv_freq = model.layers[5].self_attn.inv_freq  # proportional: a quarter of the 16 frequencies rotate
    assert int((inv_freq > 0).sum()) == 4 and inv_freq.numel() == 16


def test_moe_layers_hold_dense_mlp_and_experts(checkpoints):
    model = ours(checkpoints["gemma4_moe"] / "nvfp4")
    layer = model.layers[0]
    assert layer.mlp.gate_up_proj.fused and layer.experts.experts is not None
    assert layer.router.proj.handles[0].packed is None  # the router stays bf16, as llm-compressor leaves it
    assert layer.experts.activation == "gelu_tanh" and layer.experts.top_k == 2


def test_multimodal_packaging_runs_its_text_model(checkpoints):
    source = MultimodalSource(open_checkpoint(checkpoints["gemma4_moe"] / "nvfp4"))
    source.config["architectures"] = ["Gemma4ForConditionalGeneration"]
    source.config["model_type"] = "gemma4"
    with pytest.warns(AdaqNotice, match="vision and audio towers are ignored"):
        model = load_weights(build_model(source.config, get_backend("reference", "cpu")), source)
    assert_close(prefill_logits(model, PROMPT), hf_logits(checkpoints["gemma4_moe"] / "decompressed", PROMPT))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size_per_layer_input", 16, "per-layer inputs"),
    ("num_kv_shared_layers", 2, "KV shared across layers"),
])
def test_e2b_style_variants_are_refused_in_one_line(checkpoints, field, value, message):
    config = json.loads((checkpoints["gemma4"] / "nvfp4" / "config.json").read_text())
    config[field] = value
    with pytest.raises(UnsupportedArchitecture, match=message) as error:
        build_model(config, get_backend("reference", "cpu"))
    assert "\n" not in str(error.value)


GEMMA4_IGNORE = ["lm_head", "re:.*embed.*", "re:.*router", "re:.*vision_tower.*", "re:.*audio_tower.*"]


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_bytes_equal_llmcompressor(arch, tiny_folder, tiny_nvfp4, tmp_path):
    """llm-compressor linearizes the fused 3-D experts into one Linear per expert and projection; adaq reads the
    same slices (adaq.formats.fused_experts): same tensors, same bytes, same config (routers in `ignore`)."""
    from test_quantize import assert_same_tensors, llmcompressor_oneshot, quantization_config

    theirs = llmcompressor_oneshot(tiny_folder(arch), tmp_path / "lc", "NVFP4A16", GEMMA4_IGNORE)
    ours = tiny_nvfp4(arch)
    assert_same_tensors(ours, theirs)
    assert quantization_config(ours) == quantization_config(theirs)
    if arch == "gemma4_moe":
        assert "model.layers.0.router" in quantization_config(ours)["ignore"]
        assert "model.layers.0.experts.3.up_proj" in open_checkpoint(ours).quantized_prefixes()


def test_fused_experts_are_read_per_expert(tiny_folder):
    checkpoint = open_checkpoint(tiny_folder("gemma4_moe"))
    names = checkpoint.tensor_names()
    assert "model.layers.0.experts.gate_up_proj" not in names
    fused = load_file_tensor(tiny_folder("gemma4_moe"), "model.layers.0.experts.gate_up_proj")
    assert torch.equal(checkpoint.tensor("model.layers.0.experts.2.up_proj.weight"), fused[2, 32:])
    assert checkpoint.tensor_spec("model.layers.0.experts.2.down_proj.weight")[1] == (64, 32)


def load_file_tensor(folder, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")[name]


@pytest.mark.parametrize("arch", ARCHS)
def test_adaq_run_end_to_end_on_the_cpu(checkpoints, arch, capsys, monkeypatch):
    """`adaq run` through the CLI entry point: engine, paged FP8 KV cache, sampler, detokenizer."""
    from helpers.tiny_tokenizer import write_tokenizer
    from test_run_cli import FAST, adaq

    write_tokenizer(checkpoints[arch] / "nvfp4")
    code, out, err = adaq(["run", checkpoints[arch] / "nvfp4", "Hello there", "--no-chat", "--json",
                           "--temperature", "0", "--max-tokens", "12", *FAST], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] in ("length", "stop") and result["text"]


def test_bench_shapes_of_the_real_models():
    """Parameter counts from the bundled configs (values partly assumed: see their _adaq_source), Gemma 4's global
    layers with their own KV heads and head_dim in the KV bytes, and only the top-k experts in a MoE step."""
    from adaq.bench import roofline
    from adaq.bench.shapes import layer_windows, load_model_config, model_tensors

    expected_billions = {"gemma4-31b": 30.70, "gemma4-26b-a4b": 25.23}
    for name, billions in expected_billions.items():
        config = load_model_config(name)
        assert sum(spec.numel for spec in model_tensors(config)) / 1e9 == pytest.approx(billions, abs=0.01), name
    config = load_model_config("gemma4-26b-a4b")
    windows = layer_windows(config)
    assert windows.count(None) == 5 and set(windows) == {1024, None}
    per_layer = roofline.kv_bytes_per_layer(config, "bf16")
    assert per_layer[0] == 2 * 8 * 256 * 2 and per_layer[5] == 2 * 2 * 512 * 2  # sliding; global (k_eq_v)
    weights = roofline.weight_bytes(model_tensors(config), config, quantized=True)
    assert weights.experts_per_token == 8 and weights.num_experts == 128
    assert weights.expert == 30 * 128 * 3 * roofline.nvfp4_bytes(704, 2816)
    one = roofline.step_weight_bytes(weights, 1)
    assert one == pytest.approx(weights.linear + weights.router + weights.lm_head + weights.norm + 2816 * 2
                                + weights.expert * 8 / 128)


@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_source_loads_into_the_model(arch):
    """bench --synthetic's weights carry exactly the names and shapes the model reads."""
    from helpers.tiny_models import CONFIGS, hf_config

    from adaq.bench.synthetic import SyntheticCheckpoint

    parsed = hf_config(arch).to_dict()
    config = CONFIGS[arch] | {key: parsed[key] for key in ("layer_types", "rope_parameters")}
    source = SyntheticCheckpoint(config, quantized=True, device="cpu")
    model = load_weights(build_model(source.config, get_backend("reference", "cpu")), source)
    assert torch.isfinite(prefill_logits(model, PROMPT[:6])).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_validate_knows_gemma4(checkpoints, arch):
    """Global layers' own q/k/o shapes (and no v_proj with k_eq_v) pass the shape check; the KV budget counts the
    slots the engine gives: with window-sized KV each pool's own layers' shape, without it one slot for every layer
    as wide as the widest layer's K or V; it says so."""
    from adaq.validate.validator import validate_checkpoint

    report = validate_checkpoint(checkpoints[arch] / "nvfp4")
    assert report.valid, [f.message for f in report.findings if f.severity == "error"]
    assert any("Gemma 4: 1 global layers" in note for note in report.budget.notes)
    sliding_heads = 2 if arch == "gemma4" else 1  # 2 x 16 sliding and 1 x 32 global; 1 x 16 and 1 x 32
    per_head = lambda dim: dim * 1 + 4  # noqa: E731 (fp8 values + an fp32 scale per head)
    assert report.budget.kv_per_token == 5 * 2 * sliding_heads * per_head(16) + 1 * 2 * 1 * per_head(32)
    full = validate_checkpoint(checkpoints[arch] / "nvfp4", window_kv=False)
    heads, dim = (2, 16) if arch == "gemma4" else (1, 32)
    assert full.budget.kv_per_token == 6 * 2 * heads * per_head(dim)
    assert any("one KV pool, each layer's slot" in note for note in full.budget.notes)


def test_validate_shapes_of_the_real_models():
    from adaq.bench.shapes import load_model_config
    from adaq.formats.shapes import ModelShape

    shape = ModelShape.from_config(load_model_config("gemma4-31b"))
    assert shape.global_layers[:2] == (5, 11) and len(shape.global_layers) == 10
    assert (shape.global_head_dim, shape.global_kv_heads, shape.k_eq_v) == (512, 4, True)
    assert shape.expected_linear_shape("model.layers.5.self_attn.q_proj") == (32 * 512, 5376)
    assert shape.expected_linear_shape("model.layers.4.self_attn.k_proj") == (16 * 256, 5376)
    assert "self_attn.v_proj" not in shape.layer_linears(5) and shape.kv_slot == (16, 256)
    moe = ModelShape.from_config(load_model_config("gemma4-26b-a4b"))
    assert moe.dense_layers == moe.moe_layers == 30 and moe.experts_per_token == 8
    assert moe.expected_linear_shape("model.layers.0.experts.7.down_proj") == (2816, 704)


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory):
    """A Gemma4ForConditionalGeneration folder as transformers saves it: the tiny MoE text model under
    model.language_model.*, a one-layer vision tower, fused 3-D experts."""
    from helpers.tiny_models import random_model
    from helpers.tiny_tokenizer import write_tokenizer
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    text = random_model("gemma4_moe", seed=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    config = AutoConfig.for_model("gemma4", text_config=text.config.to_dict(), vision_config=vision)
    model = Gemma4ForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(text.model.state_dict())
    folder = tmp_path_factory.mktemp("gemma4-vl") / "dense"
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def test_multimodal_folder_runs_its_text_model_and_quantizes(vl_folder, tmp_path):
    """The real layout (vision tower, embed_vision, experts fused): our text model against transformers'
    Gemma4ForConditionalGeneration on text; `adaq quantize` keeps the tower and the result loads and runs."""
    from transformers import Gemma4ForConditionalGeneration

    from adaq.quant.pipeline import quantize_model

    reference_model = Gemma4ForConditionalGeneration.from_pretrained(vl_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = reference_model(input_ids=torch.tensor([PROMPT])).logits[0]
    with pytest.warns(AdaqNotice, match="vision and audio towers are ignored"):
        model = ours(vl_folder)
    assert_close(prefill_logits(model, PROMPT), reference)
    out = tmp_path / "nvfp4"
    quantize_model(str(vl_folder), out, device="cpu")
    checkpoint = open_checkpoint(out)
    assert any(name.startswith("model.vision_tower.") for name in checkpoint.tensor_names())
    assert all(prefix.startswith("model.language_model.layers.") for prefix in checkpoint.quantized_prefixes())
    assert "model.language_model.layers.0.experts.3.down_proj" in checkpoint.quantized_prefixes()
    quantized = prefill_logits(ours(out), PROMPT)  # exactness of NVFP4 Gemma 4 is checked on the text layout above
    assert quantized.shape == reference.shape and torch.isfinite(quantized).all()


def test_bench_synthetic_end_to_end_on_cpu(tmp_path):
    """`adaq bench --synthetic` on a tiny Gemma 4 MoE config: adaq NVFP4, adaq bf16 and transformers all run."""
    from helpers.tiny_models import CONFIGS, hf_config
    from test_bench import _adaq

    parsed = hf_config("gemma4_moe").to_dict()
    config = tmp_path / "tiny-gemma4.json"
    config.write_text(json.dumps(CONFIGS["gemma4_moe"] | {k: parsed[k] for k in ("layer_types", "rope_parameters")}))
    result = _adaq("bench", "--synthetic", str(config), "--batch", "1", "--input-len", "8", "--output-len", "4",
                   "--repeats", "1", "--json", str(tmp_path / "out.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert [variant["variant"] for variant in report["variants"]] == ["nvfp4", "bf16", "hf"]
    assert all(variant["skipped"] is None and variant["results"][0]["decode_tokens_per_s"] > 0
               for variant in report["variants"])


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_compute_stays_as_close_as_transformers_bf16(checkpoints, arch):
    """bf16 compute and KV against transformers in fp32. Measured: 9.9e-3 (dense) and 1.1e-2 (MoE) of max |logit|,
    transformers' own bf16 forward 1.2e-2 (adaq's RMSNorm rounds before the weight multiply: see gemma4.py)."""
    model = ours(checkpoints[arch] / "nvfp4", dtype=torch.bfloat16)
    logits = prefill_logits(model, PROMPT, kv_dtype=torch.bfloat16)
    assert_close(logits, hf_logits(checkpoints[arch] / "decompressed", PROMPT), 3e-2)
