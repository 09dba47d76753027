"""Microbenchmark of the FP8 prefill path on the GPU at hand (JSON-ready dicts; scripts/gpu_prefill.sh runs it).

For each shape: the generated sm_89 FP8 GEMM (every tile, and the tile `choose_tile` picks), cuBLASLt FP8
(`torch._scaled_mm`, sm_90 only) and cuBLAS bf16, in TFLOP/s; the operand kernels in GB/s. Next to them, the
FP8 mma.sync ceiling measured by a register-only kernel on the same GPU: the Ada GEMM's efficiency is its TFLOP/s
over that ceiling, and the RTX 4090 figure is a projection (efficiency x 330 TFLOP/s dense FP8), labelled so.
Times are medians of CUDA-event timings after warm-up.
"""

import statistics

import torch

from adaq.kernels import prefill_fp8
from adaq.layers import fp8_prefill

RTX4090_FP8_TFLOPS = 330.0
SHAPES = {  # name: (N, K) at M = 2048 prompt tokens
    "qwen3-8b qkv": (6144, 4096), "qwen3-8b o": (4096, 4096), "qwen3-8b gate_up": (24576, 4096),
    "qwen3-8b down": (4096, 12288), "gemma3-27b gate_up": (43008, 5376), "square 8192": (8192, 8192),
}


def _median_ms(step, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mma_ceiling(iterations: int = 4096) -> dict:
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    blocks, threads = sm * 8, 128
    sink = torch.zeros(blocks, device="cuda")
    ms = _median_ms(lambda: prefill_fp8.ext().fp8_mma_peak(sink, threads, iterations), repeats=10)
    flop = blocks * (threads // 32) * iterations * 8 * 2 * 16 * 8 * 32
    return {"TFLOP/s": flop / ms / 1e9, "ms": ms, "blocks": blocks}


def _operands(m: int, n: int, k: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=generator).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=generator) * 0.02)
    from adaq.formats import nvfp4

    weight = nvfp4.quantize(w)
    return x, weight, w.to(torch.bfloat16)


def gemm_shape(name: str, m: int, n: int, k: int, ceiling: float) -> dict:
    x, weight, dense = _operands(m, n, k)
    flop = 2.0 * m * n * k
    x8, row_scale = prefill_fp8.quantize_rows(x)
    w8, col_scale = prefill_fp8.expand_weight(weight, x.device)
    w8, col_scale = w8.clone(), col_scale.clone()
    result = {"name": name, "M": m, "N": n, "K": k, "tiles": {}}
    for index, tile in enumerate(prefill_fp8.tiles()):
        ms = _median_ms(lambda: prefill_fp8.scaled_mm(x8, row_scale, w8, col_scale, "ada", tile=index))
        result["tiles"][tile["name"]] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = prefill_fp8.tiles()[prefill_fp8.choose_tile(m, n, sm)]["name"]
    best = max(result["tiles"].values(), key=lambda r: r["TFLOP/s"])
    result["ada"] = {"chosen_tile": chosen, **result["tiles"][chosen],
                     "efficiency_vs_fp8_mma_ceiling": result["tiles"][chosen]["TFLOP/s"] / ceiling,
                     "best_efficiency": best["TFLOP/s"] / ceiling,
                     "projected_rtx4090_TFLOP/s (projection)": result["tiles"][chosen]["TFLOP/s"] / ceiling
                     * RTX4090_FP8_TFLOPS}
    ms = _median_ms(lambda: torch.nn.functional.linear(x, dense))
    result["cublas_bf16"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
    if torch.cuda.get_device_capability() >= (9, 0):
        ms = _median_ms(lambda: prefill_fp8.scaled_mm(x8, row_scale, w8, col_scale, "hopper"))
        result["cublaslt_fp8"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
    ms = _median_ms(lambda: prefill_fp8.expand_weight(weight, x.device))
    result["expand_nvfp4"] = {"ms": ms, "GB/s": (n * k * 1.5 + n * k / 16) / ms / 1e6}
    ms = _median_ms(lambda: prefill_fp8.quantize_rows(x))
    result["quantize_rows"] = {"ms": ms, "GB/s": m * k * 3 / ms / 1e6}
    ms = _median_ms(lambda: prefill_fp8.fp8_linear(x, weight))
    result["fp8_linear_total"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9, "path": prefill_fp8.gemm_kind(x.device)}
    reference = fp8_prefill.scaled_mm_reference(x8, row_scale, w8, col_scale, torch.float32)
    got = prefill_fp8.scaled_mm(x8, row_scale, w8, col_scale, "ada")
    result["ada_rel_error_vs_reference"] = float((got.float() - reference).norm() / reference.norm())
    return result


def run_all(m: int = 2048, shapes: dict | None = None) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    ceiling = mma_ceiling()
    results = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
               "fp8_mma_sync_ceiling": ceiling, "shapes": []}
    for name, (n, k) in (shapes or SHAPES).items():
        results["shapes"].append(gemm_shape(name, m, n, k, ceiling["TFLOP/s"]))
    return results


def summary_lines(results: dict) -> list[str]:
    lines = [f"{results['device']}: FP8 mma.sync ceiling {results['fp8_mma_sync_ceiling']['TFLOP/s']:.0f} TFLOP/s"]
    for r in results["shapes"]:
        ada = r["ada"]
        extra = f", cuBLASLt FP8 {r['cublaslt_fp8']['TFLOP/s']:.0f}" if "cublaslt_fp8" in r else ""
        lines.append(f"{r['name']:>20} {r['M']}x{r['N']}x{r['K']}: ada {ada['chosen_tile']} {ada['TFLOP/s']:.0f} "
                     f"TFLOP/s ({100 * ada['efficiency_vs_fp8_mma_ceiling']:.0f}% of ceiling, best "
                     f"{100 * ada['best_efficiency']:.0f}%; RTX 4090 projection "
                     f"{ada['projected_rtx4090_TFLOP/s (projection)']:.0f}), bf16 cuBLAS "
                     f"{r['cublas_bf16']['TFLOP/s']:.0f}{extra}; expand {r['expand_nvfp4']['GB/s']:.0f} GB/s")
    return lines
