"""The FP8 prefill path: generated CUTLASS sources, the reference emulation's error, and (GPU) each kernel against
the reference (adaq.formats.fp8_prefill)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.sass import cuobjdump, sass_of

from adaq.backends import prefill_route
from adaq.backends.reference import ReferenceBackend
from adaq.formats import fp8_prefill, nvfp4
from adaq.kernels import fp8_gemm

KERNELS = Path(__file__).resolve().parent.parent / "adaq" / "kernels"
FP8_MMA = "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"
HOPPER_ONLY = ("wgmma", "cp.async.bulk", "setmaxnreg", "tcgen05")
E4M3_HALF_ULP = 2.0 ** -4  # relative, normals (3 mantissa bits, round to nearest)
E4M3_HALF_SUBNORMAL = 2.0 ** -10  # absolute, in units of the scale

# (M, N, K): odd and padded row counts, then every projection of Qwen3-8B, Qwen3-30B-A3B (attention and one expert)
# and Gemma3-27B.
ODD_SHAPES = [(1, 128, 64), (7, 48, 80), (33, 272, 160), (100, 128, 4096), (257, 640, 2048), (64, 2048, 640)]
MODEL_LAYERS = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288),  # Qwen3-8B
                (5120, 2048), (2048, 4096), (1536, 2048), (2048, 768),  # Qwen3-30B-A3B
                (8192, 5376), (5376, 4096), (43008, 5376), (5376, 21504)]  # Gemma3-27B
GPU_ROWS = (64, 129, 2048)


def random_nvfp4(n: int, k: int, seed: int = 0, device: str = "cpu") -> nvfp4.NVFP4Weight:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator) * 0.1
    return nvfp4.quantize(weight.to(device))


def random_rows(m: int, k: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    outliers = (torch.rand(m, k, generator=generator) < 0.01) * 20.0
    return torch.randn(m, k, generator=generator) * (1.0 + outliers)


# ---- CPU: generated sources ------------------------------------------------------------------------------------

def test_generated_sources_are_current():
    result = subprocess.run([sys.executable, "-m", "adaq.kernels.cutlass_gen", "--check"], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def gemm_ptx(tmp_path_factory) -> tuple[str, str]:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    from adaq.kernels.fp8_gemm import cutlass_include

    out = tmp_path_factory.mktemp("fp8") / "gemm.ptx"
    source = KERNELS / "generated" / "fp8_gemm_sm89.cu"
    compiled = subprocess.run(["nvcc", "-arch=compute_89", "-ptx", "-std=c++17", "-O3", "--expt-relaxed-constexpr",
                               f"-I{cutlass_include()}", str(source), "-o", str(out)],
                              capture_output=True, text=True, timeout=1800)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assembled = subprocess.run(["ptxas", "-arch=sm_89", "-v", "-O3", str(out), "-o", str(out.with_suffix(".cubin"))],
                               capture_output=True, text=True, timeout=900)
    assert assembled.returncode == 0, assembled.stderr[-3000:]
    GEMM_CUBIN["sm_89"] = out.with_suffix(".cubin")
    return out.read_text(), assembled.stderr + assembled.stdout


GEMM_CUBIN: dict[str, Path] = {}  # the gemm_ptx fixture's sm_89 machine code, for the SASS check
SASS_FP8_MMA = "QMMA.16832.F32.E4M3.E4M3"  # how cuobjdump names sm_89's e4m3 mma.sync (QMMA, not HMMA)


def test_generated_gemm_sass_has_e4m3_mma_and_no_local_memory(gemm_ptx):
    if cuobjdump() is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump)")
    sass = sass_of(GEMM_CUBIN["sm_89"])
    tiles = __import__("adaq.kernels.fp8_gemm", fromlist=["tiles"]).tiles()
    assert sass.count("Function : ") == 2 * len(tiles)
    # per k-tile, each kernel (dense and grouped): m16 x n8 fragments of its warp tile x k32 steps, e.g. 64x32x64:
    # 4 x 4 x 2 = 32 QMMA
    per_k_tile = [(t["bm"] // t["wm"] // 16) * (t["bn"] // t["wn"] // 8) * (t["bk"] // 32) for t in tiles]
    assert sass.count(SASS_FP8_MMA) >= 2 * sum(per_k_tile)
    assert "HMMA" not in sass and "HGMMA" not in sass
    assert not re.search(r"\b(LDL|STL)\b", sass)


def test_generated_gemm_compiles_for_sm89_with_fp8_mma(gemm_ptx):
    ptx, ptxas = gemm_ptx
    assert FP8_MMA in ptx
    assert not [i for i in HOPPER_ONLY if re.search(rf"\b{re.escape(i)}\b", ptx)]
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_89'", ptxas)
    # every tile twice: the dense kernel and its grouped (MoE) launch (csrc/fp8_grouped.cuh)
    assert len(kernels) == 2 * len(__import__("adaq.kernels.fp8_gemm", fromlist=["tiles"]).tiles())
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas)]
    assert spills and not any(spills), ptxas


def test_operand_kernels_compile_for_sm89(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    ptx = tmp_path / "quant.ptx"
    compiled = subprocess.run(["nvcc", "-arch=compute_89", "-ptx", "-std=c++17", "-O3",
                               str(KERNELS / "csrc" / "fp8_quant.cu"), "-o", str(ptx)],
                              capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    text = ptx.read_text()
    assert "div.rn.f32" in text and "cvt.rn.f16x2.e4m3x2" in text
    assembled = subprocess.run(["ptxas", "-arch=sm_89", "-v", str(ptx), "-o", str(tmp_path / "q.cubin")],
                               capture_output=True, text=True, timeout=600)
    assert assembled.returncode == 0 and " 0 bytes spill stores" in assembled.stderr


# ---- CPU: the reference emulation ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(16, 64), (96, 256), (640, 2048)])
def test_weight_expansion_error_is_bounded_by_one_e4m3_rounding(n, k):
    weight = random_nvfp4(n, k, seed=n)
    expanded = fp8_prefill.expand_weight(weight)
    exact = nvfp4.dequantize(weight)
    approx = fp8_prefill.dequantize_expanded(expanded)
    bound = torch.maximum(exact.abs() * E4M3_HALF_ULP, expanded.col_scale.unsqueeze(1) * E4M3_HALF_SUBNORMAL)
    assert ((approx - exact).abs() <= bound * (1 + 1e-6)).all()
    assert float((approx - exact).norm() / exact.norm()) < 0.03
    assert expanded.values.float().abs().max() <= 6 * fp8_prefill.WEIGHT_HEADROOM


def test_weight_expansion_is_exact_when_block_scales_are_equal():
    weight = random_nvfp4(32, 128)
    weight.block_scale = torch.full_like(weight.block_scale.float(), 0.5).to(torch.float8_e4m3fn)
    expanded = fp8_prefill.expand_weight(weight)
    assert torch.equal(fp8_prefill.dequantize_expanded(expanded), nvfp4.dequantize(weight))


def test_zero_rows_expand_to_zero():
    weight = random_nvfp4(8, 64)
    weight.packed[3] = 0
    weight.block_scale[3] = 0
    expanded = fp8_prefill.expand_weight(weight)
    assert float(expanded.col_scale[3]) == 0 and not expanded.values[3].float().any()
    assert torch.isfinite(expanded.col_scale).all()


def test_activation_quantization_error_is_bounded():
    x = random_rows(37, 256)
    x8, row_scale = fp8_prefill.quantize_activation(x)
    back = x8.float() * row_scale.unsqueeze(1)
    bound = torch.maximum(x.abs() * E4M3_HALF_ULP, row_scale.unsqueeze(1) * E4M3_HALF_SUBNORMAL)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(x8.float().abs().amax(dim=1), torch.full((37,), 448.0))


def test_zero_activation_rows_stay_finite():
    x8, row_scale = fp8_prefill.quantize_activation(torch.zeros(3, 64))
    assert torch.equal(row_scale, torch.full((3,), fp8_prefill.MIN_ROW_SCALE)) and not x8.float().any()


def test_fp8_linear_error_against_exact_nvfp4():
    weight, x = random_nvfp4(256, 1024), random_rows(80, 1024)
    exact = x @ nvfp4.dequantize(weight).T
    approx = fp8_prefill.fp8_linear_reference(x, fp8_prefill.expand_weight(weight))
    error = float((approx - exact).norm() / exact.norm())
    assert 1e-3 < error < 0.05  # nonzero: the path really rounds; small: within the two E4M3 roundings


def test_reference_backend_emulates_fp8_only_from_min_tokens():
    weight, x = random_nvfp4(64, 256), random_rows(70, 256)
    backend = ReferenceBackend("cpu", prefill_fp8=True, prefill_fp8_min_tokens=64)
    handle = backend.prepare_linear(weight, dtype=torch.float32)
    bias = torch.randn(64)
    expected = fp8_prefill.fp8_linear_reference(x, fp8_prefill.expand_weight(weight), bias)
    assert torch.equal(backend.linear(x, handle, bias), expected)
    exact = torch.nn.functional.linear(x[:5], nvfp4.dequantize(weight), bias)
    assert torch.equal(backend.linear(x[:5], handle, bias), exact)


def test_fp8_path_skips_the_excluded_roles(monkeypatch):
    """down_proj stays on the exact path by default; ADAQ_PREFILL_FP8_EXCLUDE chooses the roles (empty: none)."""
    weight, x = random_nvfp4(64, 256), random_rows(70, 256)
    backend = ReferenceBackend("cpu", prefill_fp8=True, prefill_fp8_min_tokens=64)
    exact = torch.nn.functional.linear(x, nvfp4.dequantize(weight))
    fp8 = fp8_prefill.fp8_linear_reference(x, fp8_prefill.expand_weight(weight))
    assert torch.equal(backend.linear(x, backend.prepare_linear(weight, dtype=torch.float32, role="down_proj")), exact)
    assert torch.equal(backend.linear(x, backend.prepare_linear(weight, dtype=torch.float32, role="qkv_proj")), fp8)
    monkeypatch.setenv("ADAQ_PREFILL_FP8_EXCLUDE", "")
    assert torch.equal(backend.linear(x, backend.prepare_linear(weight, dtype=torch.float32, role="down_proj")), fp8)
    monkeypatch.setenv("ADAQ_PREFILL_FP8_EXCLUDE", "o_proj, qkv_proj")
    assert [prefill_route.covers(r) for r in ("qkv_proj", "o_proj", "down_proj", None)] == [False, False, True, True]


def test_reference_backend_fp8_flag_from_environment(monkeypatch):
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "fp8")
    assert ReferenceBackend("cpu").prefill_fp8
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "auto")
    assert not ReferenceBackend("cpu").prefill_fp8
    monkeypatch.delenv("ADAQ_PREFILL_PATH")
    assert not ReferenceBackend("cpu").prefill_fp8


def test_tile_choice_and_shared_memory():
    from adaq.kernels.fp8_gemm import choose_tile, tiles

    options = tiles()
    assert options[choose_tile(4096, 4096, 132)]["name"] == "64x128_64x4"  # measured best of the Ada-fit tiles
    assert options[choose_tile(64, 4096, 132)]["bm"] == 64
    for tile in options:  # fits Ada's 99 KB of shared memory per block with room for the epilogue
        assert (tile["bm"] + tile["bn"]) * tile["bk"] * tile["stages"] <= 80 * 1024


def test_invalid_path_setting_is_a_clear_error(monkeypatch):
    from adaq.errors import AdaqError
    from adaq.backends.prefill_route import configured_path

    monkeypatch.setenv("ADAQ_PREFILL_PATH", "fast")
    with pytest.raises(AdaqError, match="ADAQ_PREFILL_PATH"):
        configured_path()


# ---- CPU: the exact large-M path (dequantize + cuBLAS bf16) ---------------------------------------------------------

EXACT_SHAPES = [(8, 16), (13, 48), (40, 272), (96, 208), (136, 2048), (64, 640)]  # N, K off the layout tiles too


def test_every_e2m1_times_e4m3_product_is_exact_in_bf16():
    """The exact path's premise: the bf16 workspace can hold e2m1 x block_scale with no rounding at all."""
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3)]
    products = torch.outer(torch.cat([e2m1, -e2m1]), e4m3).double()
    assert torch.equal(products.to(torch.bfloat16).double(), products)


def test_exact_linear_reference_is_dequantize_then_matmul():
    weight, x = random_nvfp4(96, 512), random_rows(70, 512).double()
    exact = x @ nvfp4.dequantize(weight).double().T
    got = fp8_prefill.exact_linear_reference(x, weight)
    assert float((got - exact).abs().max() / exact.abs().max()) < 1e-6  # fp64: only 1/global_scale's fp32 rounding


def test_exact_plan_segments_per_global_scale():
    from adaq.kernels import layout
    from adaq.kernels.fp8_gemm import exact_plan

    weight = random_nvfp4(24, 64)
    plan = exact_plan(layout.repack(weight))
    shift = 2.0 ** layout.SCALE_EXPONENT_SHIFT  # the layout's colscale is 2^shift / global_scale in fp32
    alpha = float(torch.tensor(shift) / weight.global_scale.float().reshape(())) / shift
    assert plan.segments == ((0, 24, alpha),)
    assert alpha == float(1.0 / weight.global_scale.float().reshape(()))  # fp32(1/g), exactly
    scales = torch.cat([torch.full((16,), 2.0), torch.full((8,), 8.0)])
    plan = exact_plan(layout.repack(weight, column_global_scales=scales))
    assert plan.segments == ((0, 16, 0.5), (16, 24, 0.125))


def _dequantize_on_cpu(packed, out):
    """ops.nvfp4_dequantize's contract (e2m1 x block_scale from the decode layout, into out) through the layout's
    pure-PyTorch inverse."""
    from adaq.kernels import layout

    codes, scales = layout.unpack_codes(packed)
    n, k = packed.out_features, packed.in_features
    values = nvfp4.e2m1_decode(codes).unflatten(-1, (-1, nvfp4.GROUP_SIZE)) * scales.float().unsqueeze(-1)
    out[: n * k] = values.flatten().to(out.dtype)
    return out[: n * k].view(n, k)


def test_exact_linear_plumbing_on_cpu(monkeypatch):
    """exact_linear's real code (plan, workspace, segments, alpha, bias) with the kernel emulated: equals the spec."""
    from adaq.kernels import layout

    from adaq.kernels import ops

    monkeypatch.setattr(ops, "nvfp4_dequantize", _dequantize_on_cpu)
    weight, x = random_nvfp4(40, 272, seed=9), random_rows(9, 272).to(torch.bfloat16)
    packed = layout.repack(weight)
    got = fp8_gemm.exact_linear(x, packed, fp8_gemm.exact_plan(packed))
    expected = fp8_prefill.exact_linear_reference(x, weight)
    assert got.dtype == torch.bfloat16 and float((got.float() - expected.float()).abs().max()) <= float(
        expected.float().abs().max()) * 2 ** -7
    scales = torch.cat([torch.full((24,), float(weight.global_scale)), torch.full((16,), 3.0)])
    packed = layout.repack(weight, column_global_scales=scales)
    bias = torch.randn(40).to(torch.bfloat16)
    got = fp8_gemm.exact_linear(x, packed, fp8_gemm.exact_plan(packed), bias)
    truth = (x.double() @ fp8_prefill.unscaled_weight(weight).double().T) / scales.double() + bias.double()
    assert float((got.double() - truth).norm() / truth.norm()) < 4e-3


def test_route_by_path_and_rows(monkeypatch):

    cpu = torch.device("cpu")
    monkeypatch.setenv("ADAQ_PREFILL_EXACT_MIN_TOKENS", "100")
    monkeypatch.delenv("ADAQ_PREFILL_PATH", raising=False)
    monkeypatch.delenv(prefill_route.MID_MIN_TOKENS_ENV, raising=False)
    monkeypatch.setattr(prefill_route, "MID_MIN_TOKENS", None)  # the mid-size kernel: test_prefill_sweep.py
    assert prefill_route.route(99, cpu) == "decode" and prefill_route.route(100, cpu) == "exact"
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "nvfp4")
    assert prefill_route.route(4096, cpu) == "decode"
    for path in ("fp8", "auto", "exact"):  # no FP8 GEMM off a CUDA GPU: the exact path serves large M
        monkeypatch.setenv("ADAQ_PREFILL_PATH", path)
        assert prefill_route.route(4096, cpu) == "exact" and prefill_route.route(8, cpu) == "decode"
        assert not prefill_route.fp8_enabled(cpu)
        assert "exact" in prefill_route.describe(path, cpu)
    assert "decode kernels" in prefill_route.describe("nvfp4", cpu)


def test_bench_puts_prefill_paths_side_by_side_on_cpu(tmp_path):
    import json

    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": 512, "tie_word_embeddings": False, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-6, "initializer_range": 0.02}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, "-c", "from adaq.cli import main; main()", "bench", "--synthetic",
                             str(tmp_path / "tiny.json"), "--batch", "1", "--input-len", "70", "--output-len", "2",
                             "--repeats", "1", "--baselines", "bf16", "--prefill-path", "auto,fp8", "--json",
                             str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**__import__("os").environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [variant["variant"] for variant in report["variants"]] == ["nvfp4", "nvfp4-fp8", "bf16"]
    assert "FP8 PATH" in report["variants"][1]["label"] and "FP8" not in report["variants"][0]["label"]
    for variant in report["variants"][:2]:
        assert variant["results"][0]["prefill_speedup"]["bf16"] > 0
    assert "Prefill" in result.stdout and "nvfp4-fp8" in result.stdout
    bad = subprocess.run([sys.executable, "-c", "from adaq.cli import main; main()", "bench", "--synthetic",
                          "qwen3-8b", "--prefill-path", "fast"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--prefill-path" in bad.stderr and "Traceback" not in bad.stderr
    env = {**__import__("os").environ, "ADAQ_PREFILL_PATH": "exact"}  # no --prefill-path: the variable's path
    result = subprocess.run([sys.executable, "-c", "from adaq.cli import main; main()", "bench", "--synthetic",
                             str(tmp_path / "tiny.json"), "--batch", "1", "--input-len", "8", "--output-len", "2",
                             "--repeats", "1", "--baselines", "none", "--json", str(out)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert [variant["variant"] for variant in json.loads(out.read_text())["variants"]] == ["nvfp4-exact"]
    bad = subprocess.run([sys.executable, "-c", "from adaq.cli import main; main()", "bench", "--synthetic",
                          "qwen3-8b"], capture_output=True, text=True, timeout=120,
                         env={**env, "ADAQ_PREFILL_PATH": "fast"})
    assert bad.returncode != 0 and "ADAQ_PREFILL_PATH" in bad.stderr and "Traceback" not in bad.stderr


# ---- GPU: kernels against the reference -------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_gpu(weight: nvfp4.NVFP4Weight) -> nvfp4.NVFP4Weight:
    return weight.to("cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(n, k) for _, n, k in ODD_SHAPES] + [(13, 1040), (9, 16)] + MODEL_LAYERS)
def test_gpu_weight_expansion_is_bit_identical(n, k):

    weight = random_nvfp4(n, k, seed=n + k, device="cuda").to("cpu")
    expected = fp8_prefill.expand_weight(weight)
    values, col_scale = fp8_gemm.workspace(torch.device("cuda"), n, k).view(n, k)
    values.view(torch.uint8).fill_(0x7F)  # poison (E4M3 NaN)
    values, col_scale = fp8_gemm.expand_weight(_on_gpu(weight), torch.device("cuda"))
    assert torch.equal(values.cpu().view(torch.uint8), expected.values.view(torch.uint8))
    assert torch.equal(col_scale.cpu(), expected.col_scale)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(n, k) for _, n, k in ODD_SHAPES] + [(13, 1040), (9, 16), (40, 272)] + MODEL_LAYERS)
def test_gpu_expansion_from_the_decode_layout_is_bit_identical(n, k):
    """The cuda backend's FP8 weight operand, expanded from the decode kernels' layout (padded N and K included):
    the same bytes as the spec on the original weight; the workspace is poisoned first."""
    from adaq.kernels import layout, ops

    weight = random_nvfp4(n, k, seed=3 * n + k, device="cuda").to("cpu")
    expected = fp8_prefill.expand_weight(weight)
    scales = fp8_gemm.Fp8Scales.of(weight, torch.device("cuda"))
    packed = layout.repack(_on_gpu(weight), torch.device("cuda"))
    out = torch.full((n * k + 64,), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    values = ops.nvfp4_expand_e4m3(packed, scales.row_mul, out)
    assert torch.equal(values.cpu().view(torch.uint8), expected.values.view(torch.uint8))
    assert torch.equal(out.view(torch.uint8)[n * k:].cpu(), torch.full((64,), 0x7F, dtype=torch.uint8))  # no overrun
    assert torch.equal(scales.col_scale.cpu(), expected.col_scale)


@gpu
@needs_cuda
@pytest.mark.parametrize("m,k", [(1, 64), (7, 80), (33, 2048), (257, 4096), (2048, 5376), (100, 21504), (5, 4104)])
def test_gpu_activation_quantization_is_bit_identical(m, k):

    x = random_rows(m, k).to(torch.bfloat16)
    x8, row_scale = fp8_gemm.quantize_rows(x.cuda())
    expected, expected_scale = fp8_prefill.quantize_activation(x)
    assert torch.equal(x8.cpu().view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(row_scale.cpu(), expected_scale)


@gpu
@needs_cuda
@pytest.mark.parametrize("k", [2048, 5376, 12288])  # the row in registers (2, 4 chunks per thread), or re-read
@pytest.mark.parametrize("unit_offset", [False, True])
def test_gpu_fused_rms_norm_quantization(unit_offset, k):
    from adaq.backends.numerics.norm import rms_norm

    x = random_rows(129, k).to(torch.bfloat16).cuda()
    weight = (torch.randn(k) * 0.2).to(torch.bfloat16).cuda()
    x8, row_scale = fp8_gemm.quantize_rows(x, weight, 1e-6, unit_offset)
    expected, expected_scale = fp8_prefill.quantize_activation(rms_norm(x, weight, 1e-6, unit_offset))
    torch.testing.assert_close(row_scale, expected_scale, rtol=1e-2, atol=0)
    got = x8.float() * row_scale.unsqueeze(1)
    want = expected.float() * expected_scale.unsqueeze(1)
    assert float((got - want).norm() / want.norm()) < 5e-3  # rsqrt and bf16 rounding may move a few values 1 ulp


def _gemm_case(m: int, n: int, k: int):
    """Operands on the GPU and the reference result (fp32 matmul on the GPU, TF32 off: E4M3 products are exact)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    x8, row_scale = fp8_prefill.quantize_activation(random_rows(m, k).cuda())
    expanded = fp8_prefill.expand_weight(random_nvfp4(n, k, seed=m + n, device="cuda"))
    expected = fp8_prefill.scaled_mm_reference(x8, row_scale, expanded.values, expanded.col_scale, torch.float32)
    return (x8, row_scale, expanded.values, expanded.col_scale), expected


def _assert_gemm_close(got: torch.Tensor, expected: torch.Tensor):
    assert not torch.isnan(got).any()
    scale = expected.abs().amax().clamp(min=1e-30)
    # bf16 output rounding (2^-9 relative) plus fp32 accumulation in another order: a few ulps of the largest value
    torch.testing.assert_close(got.float(), expected.to(got.device), rtol=2 ** -7, atol=float(scale) * 1e-4)


# cuBLASLt's FP8 GEMM on Hopper (wgmma) does not accumulate FP8 products in full fp32: inside each k-block the
# tensor core adds products at reduced precision before the partial sum is promoted (DeepSeek-V3 report, sec. 3.3.2;
# measured in bench/results/prefill/session2/hopper_accuracy.json). Its error therefore scales with the sum of |products|
# (absdot), not with |result|: the bound is bf16 output rounding plus HOPPER_FP8_ACC x absdot.
HOPPER_FP8_ACC = 2.0 ** -12


def _assert_hopper_close(got, expected, x8, row_scale, w8, col_scale):
    assert not torch.isnan(got).any()
    absdot = ((x8.float().abs() @ w8.float().abs().T) * row_scale.unsqueeze(1)) * col_scale.unsqueeze(0)
    expected = expected.to(got.device)
    error = (got.float() - expected).abs()
    bound = 2.0 ** -8 * expected.abs() + HOPPER_FP8_ACC * absdot + 1e-30
    worst = float((error / bound).max())
    assert worst <= 1.0, f"error up to {worst:.2f}x the bound"
    assert float((got.float() - expected).norm() / expected.norm()) < 3e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("tile", [0, 1, 2])  # every generated tile
@pytest.mark.parametrize("m,n,k", ODD_SHAPES + [(rows, n, k) for rows in GPU_ROWS for n, k in MODEL_LAYERS[:4]])
def test_gpu_ada_gemm_matches_reference(tile, m, n, k):

    (x8, row_scale, w8, col_scale), expected = _gemm_case(m, n, k)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned
    fp8_gemm.ext().fp8_gemm(x8, w8, row_scale, col_scale, out, tile)
    _assert_gemm_close(out, expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", [(2048, n, k) for n, k in MODEL_LAYERS])
def test_gpu_ada_gemm_every_model_layer(m, n, k):

    (x8, row_scale, w8, col_scale), expected = _gemm_case(m, n, k)
    _assert_gemm_close(fp8_gemm.scaled_mm(x8, row_scale, w8, col_scale, "ada"), expected)


@gpu
@needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="cuBLASLt FP8 row-wise scaling needs sm_90")
@pytest.mark.parametrize("m,n,k", [(64, 128, 64), (129, 640, 2048)] + [(2048, n, k) for n, k in MODEL_LAYERS[:4]])
def test_gpu_hopper_gemm_matches_reference(m, n, k):

    operands, expected = _gemm_case(m, n, k)
    _assert_hopper_close(fp8_gemm.scaled_mm(*operands, "hopper"), expected, *operands)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["ada", "hopper"])
def test_gpu_fp8_linear_matches_reference_backend(kind):

    if kind == "hopper" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs sm_90")
    weight, x = random_nvfp4(640, 2048), random_rows(300, 2048).to(torch.bfloat16)
    backend = ReferenceBackend("cpu", prefill_fp8=True)
    expected = backend.linear(x.float(), backend.prepare_linear(weight, dtype=torch.float32))
    got = fp8_gemm.fp8_linear(x.cuda(), _on_gpu(weight), kind=kind)
    from adaq.kernels import layout

    packed = layout.repack(_on_gpu(weight), torch.device("cuda"))
    scales = fp8_gemm.Fp8Scales.of(weight, torch.device("cuda"))
    assert torch.equal(fp8_gemm.fp8_linear_packed(x.cuda(), packed, scales, kind=kind), got)  # same operands
    if kind == "ada":
        _assert_gemm_close(got, expected)
        return
    expanded = fp8_prefill.expand_weight(weight)
    x8, row_scale = fp8_prefill.quantize_activation(x)
    _assert_hopper_close(got, expected, x8.cuda(), row_scale.cuda(), expanded.values.cuda(), expanded.col_scale.cuda())


@gpu
@needs_cuda
def test_gpu_workspace_is_reused():

    device = torch.device("cuda")
    first = fp8_gemm.workspace(device, 4096, 4096).values.data_ptr()
    assert fp8_gemm.workspace(device, 1024, 4096).values.data_ptr() == first


# ---- GPU: the exact large-M path ----------------------------------------------------------------------------------

def _exact_bound_check(got: torch.Tensor, x: torch.Tensor, unscaled: torch.Tensor, alpha: torch.Tensor,
                       bias: torch.Tensor | None = None) -> None:
    """fp64 truth of (x @ (e2m1 x block_scale)^T) * alpha (+ bias): the error allowed is bf16 output rounding (2^-9
    relative, doubled for the bias add) plus fp32 accumulation in cuBLAS's order, far below 2^-12 of sum |x w|."""
    exact = (x.double() @ unscaled.double().T) * alpha.double()
    absdot = (x.double().abs() @ unscaled.double().abs().T) * alpha.double()
    if bias is not None:
        exact = exact + bias.double()
        absdot = absdot + bias.double().abs()
    error = (got.double() - exact).abs()
    bound = 2.0 ** -8 * exact.abs() + 2.0 ** -12 * absdot + 1e-30
    assert not torch.isnan(got).any()
    assert float((error / bound).max()) <= 1.0, f"error up to {float((error / bound).max()):.2f}x the bound"
    assert float((got.double() - exact).norm() / exact.norm()) < 3e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", EXACT_SHAPES + MODEL_LAYERS)
def test_gpu_dequantize_is_bit_exact(n, k):
    from adaq.kernels import layout

    weight = random_nvfp4(n, k, seed=n + k, device="cuda")
    packed = layout.repack(weight, "cuda")
    out = torch.full((n * k + 4096,), float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned, guard tail
    got = fp8_gemm.dequantize_packed(packed, out)
    assert torch.equal(got.float(), fp8_prefill.unscaled_weight(weight))
    assert torch.isnan(out[n * k:]).all()  # nothing written past [n, k]


@gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", ODD_SHAPES + [(rows, n, k) for rows in (129, 2048) for n, k in MODEL_LAYERS[:4]]
                         + [(2048, n, k) for n, k in MODEL_LAYERS[4:]])
def test_gpu_exact_linear_matches_reference(m, n, k):
    from adaq.kernels import layout

    torch.backends.cuda.matmul.allow_tf32 = False
    weight = random_nvfp4(n, k, seed=m + n, device="cuda")
    packed = layout.repack(weight, "cuda")
    x = random_rows(m, k, seed=m).to(torch.bfloat16).cuda()
    fp8_gemm.reserve_dense_workspace(torch.device("cuda"), n, k).fill_(float("nan"))  # poisoned
    got = fp8_gemm.exact_linear(x, packed, fp8_gemm.exact_plan(packed))
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    _exact_bound_check(got, x, fp8_prefill.unscaled_weight(weight), 1.0 / weight.global_scale.float().reshape(1))
    expected = fp8_prefill.exact_linear_reference(x, weight)  # the spec: fp32 accumulation, one rounding
    assert float((got.float() - expected.float()).norm() / expected.float().norm()) < 2e-3


@gpu
@needs_cuda
def test_gpu_exact_linear_column_segments_and_bias():
    from adaq.kernels import layout

    weight = random_nvfp4(48, 256, seed=5, device="cuda")
    scales = torch.cat([torch.full((32,), 2.0), torch.full((16,), 0.25)])  # fused weights, two global scales
    packed = layout.repack(weight, "cuda", column_global_scales=scales)
    plan = fp8_gemm.exact_plan(packed)
    assert [segment[:2] for segment in plan.segments] == [(0, 32), (32, 48)]
    x = random_rows(130, 256).to(torch.bfloat16).cuda()
    bias = (torch.randn(48) * 0.1).to(torch.bfloat16).cuda()
    got = fp8_gemm.exact_linear(x, packed, plan, bias)
    _exact_bound_check(got, x, fp8_prefill.unscaled_weight(weight), (1.0 / scales).cuda(), bias)


@gpu
@needs_cuda
def test_gpu_cuda_backend_routes_prefill(monkeypatch):
    from adaq.backends import cuda as backend_cuda

    monkeypatch.setenv("ADAQ_PREFILL_PATH", "exact")
    monkeypatch.setenv("ADAQ_PREFILL_EXACT_MIN_TOKENS", "96")
    calls = []
    real = fp8_gemm.exact_linear
    monkeypatch.setattr(fp8_gemm, "exact_linear", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    backend = backend_cuda.CudaBackend("cuda")
    weight = random_nvfp4(640, 2048, seed=3)
    handle = backend.prepare_linear(weight, dtype=torch.bfloat16)
    unscaled, alpha = fp8_prefill.unscaled_weight(weight).cuda(), 1.0 / weight.global_scale.float().reshape(1).cuda()
    for rows in (95, 96, 300):
        x = random_rows(rows, 2048, seed=rows).to(torch.bfloat16).cuda()
        y = backend.linear(x.view(1, rows, 2048), handle)
        assert y.shape == (1, rows, 640)
        _exact_bound_check(y[0], x, unscaled, alpha)
    assert calls == [96, 300]  # 95 rows: the decode kernels
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "nvfp4")
    backend.linear(random_rows(300, 2048).to(torch.bfloat16).cuda(), handle)
    assert calls == [96, 300]


@gpu
@needs_cuda
def test_gpu_auto_path_is_fp8_on_fp8_gpus(monkeypatch):
    """`auto` (the default) on sm_89 / sm_90: linears of >= 64 rows take the FP8 path, except the excluded role
    (down_proj), which takes the exact path; fewer rows the decode kernels. Other GPUs: exact."""
    from adaq.backends import cuda as backend_cuda

    monkeypatch.delenv("ADAQ_PREFILL_PATH", raising=False)
    monkeypatch.delenv("ADAQ_PREFILL_FP8_EXCLUDE", raising=False)
    calls = []
    for name in ("fp8_linear_packed", "exact_linear"):
        real = getattr(fp8_gemm, name)
        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args[0].shape[0]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(fp8_gemm, name, spy)
    backend = backend_cuda.CudaBackend("cuda")
    fp8_gpu = torch.cuda.get_device_capability() >= (8, 9)
    weight = random_nvfp4(640, 2048, seed=5)
    for role in ("qkv_proj", "down_proj"):
        handle = backend.prepare_linear(weight, dtype=torch.bfloat16, role=role)
        assert (getattr(handle, "fp8_scales", None) is not None) == (fp8_gpu and role == "qkv_proj")
        for rows in (63, 300):
            calls.clear()
            backend.linear(random_rows(rows, 2048, seed=rows).to(torch.bfloat16).cuda(), handle)
            fp8 = fp8_gpu and role == "qkv_proj"
            expected = [] if rows < 64 else [("fp8_linear_packed" if fp8 else "exact_linear", rows)]
            assert calls == expected, (role, rows, calls)
    assert ("FP8 PATH" in prefill_route.describe()) == fp8_gpu
