"""adaq bench on the CPU: the report's arithmetic against hand-computed values, the synthetic weight source, and
the command end to end on tiny models with the reference backend (labelled CPU, no roofline claims)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adaq import cli
from adaq.bench import roofline
from adaq.bench.runner import Generation, attach_roofline, percentile, summarize
from adaq.bench.shapes import bundled_names, layer_windows, load_model_config, model_tensors
from adaq.bench.synthetic import SyntheticCheckpoint
from adaq.formats import nvfp4
from helpers.tiny_models import make_checkpoint

# Qwen3-8B by hand: 36 layers of q, o (4096x4096), k, v (1024x4096), gate, up (12288x4096), down (4096x12288).
QWEN3_8B_LINEAR_PARAMS = 36 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 12288 * 4096)
QWEN3_8B_NVFP4_LINEAR = QWEN3_8B_LINEAR_PARAMS * 9 // 16 + 36 * 7 * 4  # 0.5 + 1/16 byte per weight, fp32 globals
QWEN3_8B_LM_HEAD = 151936 * 4096 * 2
QWEN3_8B_NORMS = 36 * (2 * 4096 + 2 * 128) * 2 + 4096 * 2  # two layer norms, q/k norms, the final norm (bf16)
COPY_BANDWIDTH = 3.0e12  # the H100's measured device-to-device copy (NOTES)

TINY_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": 512, "tie_word_embeddings": False, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-6, "initializer_range": 0.02}


@pytest.fixture(scope="module")
def qwen3_8b():
    config = load_model_config("qwen3-8b")
    return config, model_tensors(config)


def test_bundled_configs_hold_the_published_sizes():
    assert {"qwen3-8b", "qwen3-30b-a3b", "gemma3-4b", "gemma3-27b"} <= set(bundled_names())
    expected_billions = {"qwen3-8b": 8.19, "qwen3-30b-a3b": 30.53, "gemma3-4b": 3.88, "gemma3-27b": 27.01}
    for name, billions in expected_billions.items():
        config = load_model_config(name)
        specs = model_tensors(config)
        # tied embeddings (Gemma) appear once, as the checkpoint stores them
        assert sum(spec.numel for spec in specs) / 1e9 == pytest.approx(billions, abs=0.01), name


def test_qwen3_8b_weight_bytes_by_hand(qwen3_8b):
    config, specs = qwen3_8b
    assert sum(spec.numel for spec in specs if spec.quantizable) == QWEN3_8B_LINEAR_PARAMS == 6_945_767_424
    quantized = roofline.weight_bytes(specs, config, quantized=True)
    assert quantized.linear == QWEN3_8B_NVFP4_LINEAR
    assert quantized.linear / 1e9 == pytest.approx(3.91, abs=0.005)  # NOTES: 3.91 GB in NVFP4
    assert quantized.lm_head == QWEN3_8B_LM_HEAD and quantized.lm_head / 1e9 == pytest.approx(1.24, abs=0.005)
    assert quantized.norm == QWEN3_8B_NORMS
    dense = roofline.weight_bytes(specs, config, quantized=False)
    assert dense.linear == 2 * QWEN3_8B_LINEAR_PARAMS
    # NOTES' "bf16 moves 16.4 GB" is the whole checkpoint, input embedding table included
    assert dense.total == 2 * QWEN3_8B_LINEAR_PARAMS + 2 * QWEN3_8B_LM_HEAD + QWEN3_8B_NORMS
    assert dense.total / 1e9 == pytest.approx(16.4, abs=0.05)


def test_qwen3_8b_decode_step_roofline_by_hand(qwen3_8b):
    config, specs = qwen3_8b
    quantized = roofline.weight_bytes(specs, config, quantized=True)
    traffic = roofline.decode_traffic(quantized, config, batch=1, input_len=128, output_len=256, kv_cache_dtype="fp8")
    assert traffic.weights == QWEN3_8B_NVFP4_LINEAR + QWEN3_8B_LM_HEAD + QWEN3_8B_NORMS + 4096 * 2
    # FP8 KV: per token and layer, K and V of 8 heads x (128 bytes + a 4-byte scale); decode steps attend over
    # 129 .. 383 tokens, 256 on average
    kv_per_token_layer = 2 * 8 * (128 + 4)
    assert traffic.kv_read == pytest.approx(kv_per_token_layer * 36 * 256)
    assert traffic.kv_write == kv_per_token_layer * 36
    step_seconds = traffic.bound_step_seconds(COPY_BANDWIDTH)
    assert step_seconds * 1e3 == pytest.approx(1.724, abs=0.001)  # NOTES: no less than 1.7 ms
    assert traffic.bound_tokens_per_second(COPY_BANDWIDTH) == pytest.approx(580, abs=1)  # NOTES: ~580 tok/s
    dense = roofline.weight_bytes(specs, config, quantized=False)
    bf16 = roofline.decode_traffic(dense, config, batch=1, input_len=128, output_len=256, kv_cache_dtype="bf16")
    assert bf16.weights == 2 * QWEN3_8B_LINEAR_PARAMS + QWEN3_8B_LM_HEAD + QWEN3_8B_NORMS + 4096 * 2
    assert bf16.kv_read == pytest.approx(2 * 8 * 256 * 36 * 256)
    # 15.17 GB: NOTES' 5.5 ms counts the 1.24 GB input embedding table, which a step only gathers one row of
    assert bf16.bound_step_seconds(COPY_BANDWIDTH) * 1e3 == pytest.approx(5.058, abs=0.002)
    batch16 = roofline.decode_traffic(quantized, config, batch=16, input_len=128, output_len=256,
                                      kv_cache_dtype="fp8")
    assert batch16.weights - traffic.weights == 15 * 4096 * 2
    assert batch16.kv_read == pytest.approx(16 * traffic.kv_read)
    # NVFP4 KV: 128 / 2 bytes of E2M1 + 8 E4M3 block scales + 1 E8M0 exponent per (token, head), for K and for V
    nvfp4 = roofline.decode_traffic(quantized, config, batch=16, input_len=8192, output_len=2, kv_cache_dtype="nvfp4")
    fp8 = roofline.decode_traffic(quantized, config, batch=16, input_len=8192, output_len=2, kv_cache_dtype="fp8")
    assert nvfp4.kv_read == pytest.approx(16 * 2 * 8 * 73 * 36 * 8193)
    assert fp8.kv_read / nvfp4.kv_read == pytest.approx(132 / 73)


def test_moe_step_reads_only_routed_experts():
    config = load_model_config("qwen3-30b-a3b")
    weights = roofline.weight_bytes(model_tensors(config), config, quantized=True)
    expert_bytes = 48 * 128 * 3 * roofline.nvfp4_bytes(768, 2048)
    assert weights.expert == expert_bytes
    assert roofline.expected_active_experts(128, 8, 1) == pytest.approx(8)
    assert roofline.expected_active_experts(128, 8, 16) == pytest.approx(128 * (1 - (120 / 128) ** 16))
    one = roofline.step_weight_bytes(weights, 1)
    assert one - (weights.linear + weights.router + weights.lm_head + weights.norm + 2048 * 2) == pytest.approx(
        expert_bytes * 8 / 128)


def test_sliding_window_layers_read_at_most_their_window():
    config = load_model_config("gemma3-27b")
    windows = layer_windows(config)
    assert len(windows) == 62 and windows.count(None) == 10 and set(windows) == {1024, None}
    tiny = {**load_model_config("gemma3-270m"), "sliding_window": 8, "num_hidden_layers": 6,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    weights = roofline.weight_bytes(model_tensors(tiny), tiny, quantized=True)
    traffic = roofline.decode_traffic(weights, tiny, batch=1, input_len=10, output_len=3, kv_cache_dtype="bf16")
    per_token_layer = 2 * 1 * 256 * 2
    # steps 1, 2 attend over 11, 12 tokens: sliding layers read 8, the global layer all of them
    assert traffic.kv_read == pytest.approx(per_token_layer * (5 * 8 + (11 + 12) / 2))


def test_checkpoint_bytes_come_from_safetensors_headers(tmp_path):
    folder = make_checkpoint("qwen3", tmp_path) / "nvfp4"
    config = json.loads((folder / "config.json").read_text())
    from_headers = roofline.checkpoint_weight_bytes(folder, config)
    from_shapes = roofline.weight_bytes(model_tensors(config), config, quantized=True, dtype_bytes=4)
    assert from_headers.linear == from_shapes.linear > 0
    assert from_headers.lm_head == from_shapes.lm_head and from_headers.norm == from_shapes.norm


def test_generation_figures_by_hand():
    # two requests, prompt of 4 tokens: first tokens at 0.10 and 0.12 s, then one every 0.01 s
    start = 1000.0
    token_times = [[start + 0.10, start + 0.13, start + 0.14], [start + 0.12, start + 0.13, start + 0.15]]
    figures = Generation(start, token_times, input_len=4).figures()
    assert figures["ttft_s"] == pytest.approx(0.11)
    assert figures["prefill_tokens_per_s"] == pytest.approx(2 * 4 / 0.12)
    assert figures["decode_tokens_per_s"] == pytest.approx(2 * 2 / 0.03)
    assert figures["total_tokens_per_s"] == pytest.approx(2 * 3 / 0.15)
    assert Generation(start, token_times, 4).inter_token_latencies() == pytest.approx([0.03, 0.01, 0.01, 0.02])
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([0, 10], 99) == pytest.approx(9.9)


def test_roofline_fraction_is_achieved_bytes_over_copy_bandwidth(qwen3_8b):
    config, specs = qwen3_8b
    traffic = roofline.decode_traffic(roofline.weight_bytes(specs, config, quantized=True), config, batch=1,
                                      input_len=128, output_len=256, kv_cache_dtype="fp8")
    # 255 decode steps in 0.87 s: 293 tok/s
    times = [[0.01 + step * (0.87 / 255) for step in range(256)]]
    result = summarize("nvfp4", [Generation(0.0, times, 128)], (None, None))
    attach_roofline(result, traffic, COPY_BANDWIDTH)
    assert result.decode_tokens_per_s == pytest.approx(255 / 0.87)
    assert result.achieved_bytes_per_s == pytest.approx(traffic.total * 255 / 0.87)
    assert result.roofline_fraction == pytest.approx(traffic.total * 255 / 0.87 / 3.0e12)
    assert result.roofline_fraction == pytest.approx(result.decode_tokens_per_s / 580.1, rel=1e-3)


def test_synthetic_nvfp4_looks_like_quantized_gaussian_weights():
    source = SyntheticCheckpoint(TINY_QWEN3, quantized=True, device="cpu")
    prefixes = source.quantized_prefixes()
    assert len(prefixes) == 2 * 7 and "model.layers.0.self_attn.q_proj" in prefixes
    q, k = source.nvfp4("model.layers.0.self_attn.q_proj"), source.nvfp4("model.layers.0.self_attn.k_proj")
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (64, 32)
    assert q.block_scale.dtype == torch.float8_e4m3fn and q.block_scale.shape == (64, 4)
    assert torch.equal(q.global_scale, k.global_scale)  # q/k/v share it, as llm-compressor links them
    assert not torch.equal(q.packed, k.packed)
    assert torch.equal(q.packed, source.nvfp4("model.layers.0.self_attn.q_proj").packed)  # seeded by name
    big = SyntheticCheckpoint({**TINY_QWEN3, "hidden_size": 1024, "intermediate_size": 2048}, quantized=True,
                              device="cpu").nvfp4("model.layers.0.mlp.down_proj")
    weights = nvfp4.dequantize(big)
    assert weights.std().item() == pytest.approx(0.02, rel=0.15)  # initializer_range
    codes = torch.bincount(nvfp4.unpack_nibbles(big.packed).flatten().long(), minlength=16)
    assert (codes > 0).all()  # -0 too: llm-compressor's quantizer writes it for small negative weights
    assert big.block_scale.float().min() > 0 and big.block_scale.float().max() <= 448
    requantized = nvfp4.quantize(weights, big.global_scale)  # a real quantizer finds the same codes and scales
    assert torch.equal(nvfp4.dequantize(requantized), weights)
    assert torch.equal(requantized.block_scale.view(torch.uint8), big.block_scale.view(torch.uint8))


def test_synthetic_attention_output_is_drawn_at_a_tenth_of_the_std():
    """So that a long prompt's tokens stay distinct and a MoE router spreads them as a trained one does
    (adaq.bench.synthetic.ATTENTION_OUTPUT_STD_FACTOR); every other weight keeps initializer_range."""
    config = {**TINY_QWEN3, "hidden_size": 1024, "intermediate_size": 2048, "num_attention_heads": 16,
              "head_dim": 64}
    quantized = SyntheticCheckpoint(config, quantized=True, device="cpu")
    o_proj = nvfp4.dequantize(quantized.nvfp4("model.layers.0.self_attn.o_proj"))
    q_proj = nvfp4.dequantize(quantized.nvfp4("model.layers.0.self_attn.q_proj"))
    assert o_proj.std().item() == pytest.approx(0.002, rel=0.15)
    assert q_proj.std().item() == pytest.approx(0.02, rel=0.15)
    dense = SyntheticCheckpoint(config, quantized=False, device="cpu")
    assert dense.tensor("model.layers.0.self_attn.o_proj.weight").float().std().item() == pytest.approx(0.002, rel=0.1)
    assert dense.tensor("model.layers.0.mlp.up_proj.weight").float().std().item() == pytest.approx(0.02, rel=0.1)


def test_synthetic_sources_name_every_tensor_a_checkpoint_has():
    quantized = SyntheticCheckpoint(TINY_QWEN3, quantized=True, device="cpu")
    dense = SyntheticCheckpoint(TINY_QWEN3, quantized=False, device="cpu")
    assert dense.quantized_prefixes() == [] and dense.scheme is None and quantized.scheme == "nvfp4a16"
    assert set(dense.tensor_names()) == set(quantized.tensor_names()) | {
        f"{prefix}.weight" for prefix in quantized.quantized_prefixes()}
    assert quantized.config["quantization_config"]["ignore"] == ["lm_head"]
    embedding = dense.tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch.bfloat16 and embedding.float().std().item() == pytest.approx(0.02, rel=0.1)
    assert dense.tensor("model.norm.weight").float().mean().item() == pytest.approx(1.0, abs=0.05)


def _adaq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from adaq.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_bench_end_to_end_on_cpu(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_QWEN3))
    result = _adaq("bench", "--synthetic", str(config), "--batch", "2,1", "--input-len", "8", "--output-len", "4",
                   "--repeats", "1", "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "out.png"),
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CPU" in result.stdout and "AdaLLM" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["on_cpu"] and report["device"]["name"] == "CPU" and report["copy_bandwidth_bytes_per_s"] is None
    assert report["command"].startswith("adaq bench --synthetic")
    assert [variant["variant"] for variant in report["variants"]] == ["nvfp4", "bf16", "hf"]
    for variant in report["variants"]:
        assert variant["skipped"] is None
        assert [result["batch"] for result in variant["results"]] == [1, 2]
        for entry in variant["results"]:
            assert entry["total_tokens"] == entry["batch"] * 4
            assert entry["decode_tokens_per_s"] > 0 and entry["ttft_s"] > 0
            assert entry["roofline_fraction"] is None and entry["achieved_bytes_per_s"] is None  # no CPU claims
    assert "reference backend" in report["variants"][0]["label"]
    assert set(report["variants"][0]["results"][0]["speedup"]) == {"bf16", "hf"}
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_a_checkpoint_against_its_dequantized_weights(tmp_path):
    folder = make_checkpoint("qwen3", tmp_path) / "nvfp4"
    result = _adaq("bench", str(folder), "--batch", "1", "--input-len", "5", "--output-len", "3", "--repeats", "1",
                   "--baselines", "bf16", "--json", str(tmp_path / "out.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert not report["model"]["synthetic"]
    assert [variant["variant"] for variant in report["variants"]] == ["nvfp4", "bf16"]
    config = json.loads((folder / "config.json").read_text())
    assert report["variants"][0]["weight_bytes"]["linear"] == roofline.checkpoint_weight_bytes(folder, config).linear
    assert "bf16 weights" in report["variants"][1]["label"]


@pytest.mark.parametrize("args, message", [
    ([], "either a checkpoint"),
    (["--synthetic", "qwen3-8b", "somewhere"], "either a checkpoint"),
    (["--synthetic", "llama-7b"], "unknown synthetic model"),
    (["--synthetic", "qwen3-8b", "--batch", "1,x"], "invalid --batch"),
    (["--synthetic", "qwen3-8b", "--baselines", "vllm"], "unknown baseline"),
    (["--synthetic", "qwen3-8b", "--output-len", "1"], "invalid --output-len 1"),
])
def test_bench_rejects_bad_arguments_with_a_one_line_error(args, message):
    from adaq.errors import AdaqError

    result = CliRunner().invoke(cli.app, ["bench", *args])
    assert isinstance(result.exception, AdaqError), result.output  # adaq.cli.main prints it on one line, exit 2
    assert message in str(result.exception)


def test_bench_kernels_is_a_subcommand_not_a_checkpoint():
    from adaq.errors import AdaqError

    result = CliRunner().invoke(cli.app, ["bench", "kernels", "--help"])
    assert result.exit_code == 0 and "tensor-core" in result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(cli.app, ["bench", "kernels"])
        assert isinstance(result.exception, AdaqError) and "CUDA GPU" in str(result.exception)


def test_json_has_no_infinities(tmp_path):
    from adaq.bench.report import write_json

    write_json({"a": math.inf, "b": [1.0, math.nan]}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None]}


def test_gpu_report_puts_roofline_and_speedups_beside_each_figure(tmp_path):
    from rich.console import Console

    from adaq.bench.plot import plot
    from adaq.bench.report import render, write_json
    from adaq.bench.runner import VariantOutcome, Workload
    from adaq.bench.suite import BenchOptions, add_roofline, add_speedups, assemble

    options = BenchOptions("qwen3-8b", True, Workload((1,), 128, 256, 1))
    config = load_model_config("qwen3-8b")

    def outcome(variant: str, step_seconds: float, peak: int) -> VariantOutcome:
        times = [[0.02 + step * step_seconds for step in range(256)]]
        result = summarize(variant, [Generation(0.0, times, 128)], (peak, peak + 10**9))
        return VariantOutcome(variant, f"{variant} label", results=[result])

    outcomes = [outcome("nvfp4", 0.0025, 6 * 10**9), outcome("bf16", 0.0060, 16 * 10**9)]
    for entry in outcomes:
        add_roofline(entry, config, options, COPY_BANDWIDTH)
    add_speedups(outcomes)
    nvfp4_result, bf16_result = outcomes[0].results[0], outcomes[1].results[0]
    assert nvfp4_result.speedup == {"bf16": {"decode": pytest.approx(2.4), "total": pytest.approx(
        (0.02 + 255 * 0.0060) / (0.02 + 255 * 0.0025))}}
    assert nvfp4_result.roofline_fraction == pytest.approx(1.724e-3 / 0.0025, rel=1e-3)  # 69% of the roofline
    assert bf16_result.bound_tokens_per_s == pytest.approx(3.0e12 / bf16_result.traffic["total"])
    environment = {"device": {"name": "NVIDIA H100 80GB HBM3", "type": "cuda"}, "command": "adaq bench -x",
                   "versions": {}, "timestamp_utc": "", "git_commit": None}
    report = assemble(options, config, environment, COPY_BANDWIDTH, outcomes, torch.device("cuda"))
    console = Console(record=True, width=250)
    render(report, console)
    text = console.export_text()
    assert "3.00 TB/s (measured)" in text and "% roofline" in text and "69%" in text and "2.40x" in text
    assert "AdaLLM" in text and "6.00" in text  # peak GB in the AdaLLM view
    write_json(report, tmp_path / "report.json")
    plot(json.loads((tmp_path / "report.json").read_text()), tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert png_width(tmp_path / "report.png") == png_width_of_panels(3)
    plot({**json.loads((tmp_path / "report.json").read_text()), "on_cpu": True}, tmp_path / "cpu.png")
    assert png_width(tmp_path / "cpu.png") == png_width_of_panels(2), "a CPU run draws no empty memory panel"


def png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width field


def png_width_of_panels(panels: int) -> int:
    from adaq.bench.plot import PANEL_WIDTH_IN

    return round(PANEL_WIDTH_IN * panels * 130)  # plot() saves at 130 dpi


def test_a_failing_variant_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    from adaq.bench import runner
    from adaq.errors import AdaqError

    def broken(spec, *args):
        if spec.variant == "bf16":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_build(spec, *args)

    real_build = runner.build_engine
    monkeypatch.setattr(runner, "build_engine", broken)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_QWEN3))
    result = CliRunner().invoke(cli.app, ["bench", "--synthetic", str(config), "--batch", "1", "--input-len", "4",
                                          "--output-len", "2", "--repeats", "1", "--baselines", "bf16",
                                          "--json", str(tmp_path / "out.json")])
    assert isinstance(result.exception, AdaqError) and result.exception.exit_code == 1
    assert "bf16 (RuntimeError: CUDA error: an illegal memory access" in str(result.exception)
    report = json.loads((tmp_path / "out.json").read_text())
    nvfp4_variant, bf16_variant = report["variants"]
    assert nvfp4_variant["results"] and nvfp4_variant["error"] is None
    assert bf16_variant["results"] == [] and "illegal memory access" in bf16_variant["error"]
    assert "bf16 failed" in result.output


def test_bench_show_prints_a_saved_report(tmp_path):
    from adaq.errors import AdaqError

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_QWEN3))
    (tmp_path / "not-a-report.json").write_text("{}")
    result = CliRunner().invoke(cli.app, ["bench", "show", str(tmp_path / "not-a-report.json")])
    assert isinstance(result.exception, AdaqError) and "not an adaq bench report" in str(result.exception)
    result = CliRunner().invoke(cli.app, ["bench", "--synthetic", str(config), "--batch", "1", "--input-len", "4",
                                          "--output-len", "2", "--repeats", "1", "--baselines", "none",
                                          "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(cli.app, ["bench", "show", str(tmp_path / "out.json"), "--plot",
                                         str(tmp_path / "out.png")])
    assert shown.exit_code == 0 and "AdaLLM" in shown.output and (tmp_path / "out.png").is_file()
