"""Microbenchmark of the FP8 prefill path on the GPU at hand (JSON-ready dicts; scripts/gpu_prefill.sh runs it).

For each shape: the generated sm_89 FP8 GEMM (every tile, and the tile `choose_tile` picks), cuBLASLt FP8
(`torch._scaled_mm`, sm_90 only) and cuBLAS bf16, in TFLOP/s; the operand kernels in GB/s. Next to them, the
FP8 mma.sync ceiling measured by a register-only kernel on the same GPU: the Ada GEMM's efficiency is its TFLOP/s
over that ceiling, and the RTX 4090 figure is a projection (efficiency x 330 TFLOP/s dense FP8), labelled so.
Times are medians of CUDA-event timings after warm-up.
"""

import statistics

import torch

from adaq.backends import prefill_route
from adaq.formats import fp8_prefill
from adaq.kernels import fp8_gemm

RTX4090_FP8_TFLOPS = 330.0
SHAPES = {  # name: (N, K) at M = 2048 prompt tokens
    "qwen3-8b qkv": (6144, 4096), "qwen3-8b o": (4096, 4096), "qwen3-8b gate_up": (24576, 4096),
    "qwen3-8b down": (4096, 12288), "gemma3-27b gate_up": (43008, 5376), "square 8192": (8192, 8192),
}


def median_ms(step, repeats: int = 20, warmup: int = 3, flush: torch.Tensor | None = None) -> float:
    """Median milliseconds of `step()` by CUDA events, after `warmup` calls; `flush` is zeroed before each."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mma_ceiling(iterations: int = 8192, threads: tuple[int, ...] = (128, 256)) -> dict:
    """The FP8 mma.sync ceiling (csrc/fp8_mma_peak.cu): full waves of register-only blocks, each warp issuing the
    generated GEMM's 64x32 warp tile of independent m16n8k32 e4m3 MMAs with new operands every k-step; the best of
    the block sizes tried."""
    module = fp8_gemm.ext()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    mmas = module.fp8_mma_peak_mmas_per_iteration()
    runs = []
    for size in threads:
        per_sm = module.fp8_mma_peak_blocks_per_sm(size)
        blocks = sm * max(per_sm, 1)
        sink = torch.zeros(blocks, device="cuda")
        ms = median_ms(lambda: module.fp8_mma_peak(sink, size, iterations), repeats=10)
        flop = blocks * (size // 32) * iterations * mmas * 2 * 16 * 8 * 32
        runs.append({"TFLOP/s": flop / ms / 1e9, "ms": ms, "blocks": blocks, "threads": size,
                     "blocks_per_sm": per_sm, "mmas_per_warp_iteration": mmas})
    best = max(runs, key=lambda r: r["TFLOP/s"])
    return {**best, "runs": runs}


def ptxas_report(arch: str = "sm_89") -> dict:
    """Registers and spills per kernel of the generated GEMM's sm_89 machine code (nvcc -Xptxas -v; needs nvcc)."""
    import re
    import shutil
    import subprocess
    import tempfile

    if shutil.which("nvcc") is None:
        return {"error": "nvcc not found"}
    source = fp8_gemm.GENERATED / "fp8_gemm_sm89.cu"
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "-std=c++17", "-O3", "--expt-relaxed-constexpr",
                                 "-Xptxas", "-v", f"-I{fp8_gemm.cutlass_include()}", str(source), "-o",
                                 f"{tmp}/gemm.cubin"], capture_output=True, text=True, timeout=900)
    if result.returncode:
        return {"error": result.stderr[-2000:]}
    kernels, current = {}, None
    for line in result.stderr.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line):
            current = match.group(1)
            kernels[current] = {}
        elif current and (match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                             r"(\d+) bytes spill loads", line)):
            kernels[current].update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                                    spill_loads=int(match.group(3)))
        elif current and (match := re.search(r"Used (\d+) registers", line)):
            kernels[current]["registers"] = int(match.group(1))
    spills = sum(k.get("spill_stores", 0) + k.get("spill_loads", 0) for k in kernels.values())
    return {"arch": arch, "kernels": kernels, "spill_bytes": spills}


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
    x8, row_scale = fp8_gemm.quantize_rows(x)
    w8, col_scale = fp8_gemm.expand_weight(weight, x.device)
    w8, col_scale = w8.clone(), col_scale.clone()
    result = {"name": name, "M": m, "N": n, "K": k, "tiles": {}}
    for index, tile in enumerate(fp8_gemm.tiles()):
        ms = median_ms(lambda: fp8_gemm.scaled_mm(x8, row_scale, w8, col_scale, "ada", tile=index))
        result["tiles"][tile["name"]] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = fp8_gemm.tiles()[fp8_gemm.choose_tile(m, n, sm)]["name"]
    best = max(result["tiles"].values(), key=lambda r: r["TFLOP/s"])
    result["ada"] = {"chosen_tile": chosen, **result["tiles"][chosen],
                     "efficiency_vs_fp8_mma_ceiling": result["tiles"][chosen]["TFLOP/s"] / ceiling,
                     "best_efficiency": best["TFLOP/s"] / ceiling,
                     "projected_rtx4090_TFLOP/s (projection)": result["tiles"][chosen]["TFLOP/s"] / ceiling
                     * RTX4090_FP8_TFLOPS}
    ms = median_ms(lambda: torch.nn.functional.linear(x, dense))
    result["cublas_bf16"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
    if torch.cuda.get_device_capability() >= (9, 0):
        ms = median_ms(lambda: fp8_gemm.scaled_mm(x8, row_scale, w8, col_scale, "hopper"))
        result["cublaslt_fp8"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
    ms = median_ms(lambda: fp8_gemm.expand_weight(weight, x.device))
    result["expand_nvfp4"] = {"ms": ms, "GB/s": (n * k * 1.5 + n * k / 16) / ms / 1e6}
    ms = median_ms(lambda: fp8_gemm.quantize_rows(x))
    result["quantize_rows"] = {"ms": ms, "GB/s": m * k * 3 / ms / 1e6}
    ms = median_ms(lambda: fp8_gemm.fp8_linear(x, weight))
    result["fp8_linear_total"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9, "path": prefill_route.gemm_kind(x.device)}
    reference = fp8_prefill.scaled_mm_reference(x8, row_scale, w8, col_scale, torch.float32)
    got = fp8_gemm.scaled_mm(x8, row_scale, w8, col_scale, "ada")
    result["ada_rel_error_vs_reference"] = float((got.float() - reference).norm() / reference.norm())
    return result


def run_all(m: int = 2048, shapes: dict | None = None, ptxas: dict | None = None) -> dict:
    """`ptxas`: a `ptxas_report()` computed beside (it compiles CUTLASS for a minute); None runs it here."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ceiling = mma_ceiling()
    results = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
               "fp8_mma_sync_ceiling": ceiling, "ptxas": ptxas if ptxas is not None else ptxas_report(),
               "shapes": []}
    for name, (n, k) in (shapes or SHAPES).items():
        results["shapes"].append(gemm_shape(name, m, n, k, ceiling["TFLOP/s"]))
    return results


def summary_lines(results: dict) -> list[str]:
    ceiling = results["fp8_mma_sync_ceiling"]
    lines = [f"{results['device']}: FP8 mma.sync ceiling {ceiling['TFLOP/s']:.0f} TFLOP/s (fp8_mma_peak.cu, "
             f"{ceiling.get('blocks', '?')} blocks x {ceiling.get('threads', 128)} threads, measured on this GPU)"]
    for r in results["shapes"]:
        ada = r["ada"]
        extra = f", cuBLASLt FP8 {r['cublaslt_fp8']['TFLOP/s']:.0f}" if "cublaslt_fp8" in r else ""
        lines.append(f"{r['name']:>20} {r['M']}x{r['N']}x{r['K']}: ada {ada['chosen_tile']} {ada['TFLOP/s']:.0f} "
                     f"TFLOP/s ({100 * ada['efficiency_vs_fp8_mma_ceiling']:.0f}% of ceiling, best "
                     f"{100 * ada['best_efficiency']:.0f}%; RTX 4090 projection "
                     f"{ada['projected_rtx4090_TFLOP/s (projection)']:.0f}), bf16 cuBLAS "
                     f"{r['cublas_bf16']['TFLOP/s']:.0f}{extra}; expand {r['expand_nvfp4']['GB/s']:.0f} GB/s")
    report = results.get("ptxas")
    if report and "kernels" in report:
        registers = sorted({k.get("registers", 0) for k in report["kernels"].values()})
        lines.append(f"ptxas {report['arch']} (generated GEMM, {len(report['kernels'])} kernels): "
                     f"{report['spill_bytes']} bytes spilled, registers {registers}")
    elif report:
        lines.append(f"ptxas report failed: {report.get('error', '')[:200]}")
    lines.append(f"RTX 4090 figures are projections: efficiency vs this GPU's FP8 mma.sync ceiling x "
                 f"{RTX4090_FP8_TFLOPS:.0f} TFLOP/s (dense FP8, fp32 accumulate), not measurements")
    return lines


# ---- the exact path and the threshold between the decode kernels and a GEMM ----------------------------------------

QWEN3_8B_LAYER = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
SWEEP_ROWS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)


def _median_cold_ms(step, flush: torch.Tensor, repeats: int = 10, warmup: int = 2) -> float:
    """Median over repeats with L2 flushed before each (a model's layers never find their weights in L2)."""
    return median_ms(step, repeats, warmup, flush)


MID_VARIANTS = tuple((rows, tw) for rows in (16, 32, 64) for tw in (1, 2))  # rows per block, column tiles per warp


def _mid_variants(x: torch.Tensor, packed, flush: torch.Tensor) -> dict[str, float]:
    """The mid-size kernel at every row block and tile width (ops.mid_override), for tuning its plan."""
    from adaq.kernels import ops

    times = {}
    for rows, tw in MID_VARIANTS:
        with ops.mid_override(rows, tw):
            times[f"mid_r{rows}_tw{tw}"] = _median_cold_ms(lambda: ops.nvfp4_linear_mid(x, packed), flush)
    return times


def threshold_sweep(rows: tuple[int, ...] = SWEEP_ROWS, layer: dict | None = None) -> dict:
    """Per M: one Qwen3-8B transformer layer's four linears through the decode kernels, the exact path (dequantize
    + cuBLAS bf16), the FP8 path and cuBLAS bf16 on a dense weight, in ms (sums over the four). `threshold`: the
    smallest M of the sweep from which the exact path is at least as fast as the decode kernels at every larger M."""
    from adaq.formats import nvfp4
    from adaq.kernels import layout, ops

    torch.backends.cuda.matmul.allow_tf32 = False
    layer = layer or QWEN3_8B_LAYER
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for name, (n, k) in layer.items():
        dense = torch.randn(n, k, device="cuda", generator=generator) * 0.02
        weight = nvfp4.quantize(dense)
        packed = layout.repack(weight, "cuda")
        fp8_gemm.reserve_dense_workspace(torch.device("cuda"), n, k)
        weights[name] = (weight, packed, fp8_gemm.exact_plan(packed), dense.to(torch.bfloat16))
    kind = prefill_route.gemm_kind(torch.device("cuda")) or "none"
    per_rows = []
    for m in rows:
        entry = {"M": m, "layers": {}}
        for name, (weight, packed, plan, dense) in weights.items():
            x = torch.randn(m, dense.shape[1], device="cuda", generator=generator).to(torch.bfloat16)
            times = {
                "decode": _median_cold_ms(lambda: ops.nvfp4_linear(x, packed), flush),
                "mid": _median_cold_ms(lambda: ops.nvfp4_linear_mid(x, packed), flush),
                **_mid_variants(x, packed, flush),
                "exact": _median_cold_ms(lambda: fp8_gemm.exact_linear(x, packed, plan), flush),
                "dequantize_only": _median_cold_ms(lambda: fp8_gemm.dequantize_packed(packed), flush),
                "bf16_cublas": _median_cold_ms(lambda: torch.nn.functional.linear(x, dense), flush),
            }
            if not kind.startswith("none"):
                try:
                    times["fp8"] = _median_cold_ms(lambda: fp8_gemm.fp8_linear(x, weight, kind=kind), flush)
                    times["fp8_expand_only"] = _median_cold_ms(lambda: fp8_gemm.expand_weight(weight, x.device),
                                                               flush)
                except Exception as error:  # the FP8 extension needs CUTLASS; the sweep still serves the threshold
                    kind = f"none ({type(error).__name__}: {str(error)[:200]})"
            entry["layers"][name] = times
        for path in entry["layers"]["qkv"]:
            if all(path in times for times in entry["layers"].values()):
                entry[f"{path}_ms"] = sum(times[path] for times in entry["layers"].values())
        per_rows.append(entry)
    threshold = None
    for entry in reversed(per_rows):
        if entry["exact_ms"] > entry["decode_ms"]:
            break
        threshold = entry["M"]
    n_k = sum(n * k for n, k in layer.values())
    dequant_gbs = {name: (n * k * (2 + 0.5625)) / per_rows[-1]["layers"][name]["dequantize_only"] / 1e6
                   for name, (n, k) in layer.items()}
    return {"layer": {name: list(shape) for name, shape in layer.items()}, "fp8_kind": kind, "rows": per_rows,
            "threshold": threshold, "weights_per_layer": n_k, "dequantize_GB/s (read + written)": dequant_gbs}


def sweep_lines(sweep: dict) -> list[str]:
    lines = [f"one Qwen3-8B layer (qkv, o, gate_up, down), ms; L2 flushed; FP8 = {sweep['fp8_kind']}",
             f"{'M':>5} {'decode':>8} {'mid':>8} {'exact':>8} {'fp8':>8} {'bf16':>8}  exact/bf16  mid/bf16"]
    for entry in sweep["rows"]:
        fp8 = f"{entry['fp8_ms']:8.3f}" if "fp8_ms" in entry else f"{'-':>8}"
        mid = f"{entry['mid_ms']:8.3f}" if "mid_ms" in entry else f"{'-':>8}"
        mid_ratio = f"{entry['mid_ms'] / entry['bf16_cublas_ms']:8.2f}" if "mid_ms" in entry else f"{'-':>8}"
        exact_ratio = entry['exact_ms'] / entry['bf16_cublas_ms']
        lines.append(f"{entry['M']:>5} {entry['decode_ms']:8.3f} {mid} {entry['exact_ms']:8.3f} {fp8} "
                     f"{entry['bf16_cublas_ms']:8.3f}  {exact_ratio:10.2f}  {mid_ratio}")
    variants = [f"mid_r{rows}_tw{tw}" for rows, tw in MID_VARIANTS]
    for entry in sweep["rows"]:
        timed = {name: entry[f"{name}_ms"] for name in variants if f"{name}_ms" in entry}
        if timed:
            best = min(timed, key=timed.get)
            lines.append(f"M = {entry['M']}: mid-size variants, best {best} {timed[best]:.3f} ms (plan's: "
                         f"{entry['mid_ms']:.3f}); " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in timed.items()))
    lines.append(f"threshold (exact path from M =): {sweep['threshold']}; dequantize GB/s: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in sweep["dequantize_GB/s (read + written)"].items()))
    return lines


# ---- why cuBLASLt FP8 (Hopper) differs from the fp32 reference -----------------------------------------------------

HOPPER_CASES = ((129, 640, 2048), (2048, 6144, 4096), (2048, 4096, 12288))


def _fp8_case(m: int, n: int, k: int, seed: int):
    from adaq.formats import nvfp4

    generator = torch.Generator(device="cuda").manual_seed(seed)
    outliers = (torch.rand(m, k, device="cuda", generator=generator) < 0.01) * 20.0
    x = torch.randn(m, k, device="cuda", generator=generator) * (1.0 + outliers)
    w = torch.randn(n, k, device="cuda", generator=generator) * torch.rand(n, 1, device="cuda", generator=generator)
    x8, row_scale = fp8_prefill.quantize_activation(x)
    expanded = fp8_prefill.expand_weight(nvfp4.quantize(w * 0.1))
    return x8, row_scale, expanded.values, expanded.col_scale


def _errors(got: torch.Tensor, exact: torch.Tensor, absdot: torch.Tensor) -> dict:
    error = (got.double() - exact).abs()
    return {"max_err_over_absdot": float((error / absdot.clamp(min=1e-300)).max()),
            "max_err_over_max_abs": float(error.max() / exact.abs().max()),
            "rel_frobenius": float(error.norm() / exact.norm())}


def hopper_accuracy(cases=HOPPER_CASES) -> dict:
    """Splits the FP8 GEMM's difference from the reference into accumulation and epilogue: the unscaled product
    (tensor-wise unit scales, fp32 out) from cuBLASLt FP8 with and without fast accumulation and from fp32 cuBLAS,
    against the fp64 sum of the exact E4M3 products; then the full row-wise scaled bf16 GEMM, both accumulations."""
    torch.backends.cuda.matmul.allow_tf32 = False
    one = torch.ones((), device="cuda")
    results = []
    for m, n, k in cases:
        x8, row_scale, w8, col_scale = _fp8_case(m, n, k, seed=m + n)
        exact = x8.double() @ w8.double().T
        absdot = x8.double().abs() @ w8.double().abs().T
        entry = {"M": m, "N": n, "K": k, "unscaled_fp32_out": {}, "scaled_bf16_out": {}}
        entry["unscaled_fp32_out"]["fp32 cuBLAS (reference)"] = _errors(x8.float() @ w8.float().T, exact, absdot)
        for fast in (False, True):
            try:
                acc = torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                       use_fast_accum=fast)
            except RuntimeError as error:
                entry["unscaled_fp32_out"][f"cuBLASLt FP8 use_fast_accum={fast}"] = {"error": str(error)[:200]}
                continue
            entry["unscaled_fp32_out"][f"cuBLASLt FP8 use_fast_accum={fast}"] = _errors(acc, exact, absdot)
        scale = row_scale.double().unsqueeze(1) * col_scale.double().unsqueeze(0)
        for fast in (False, True):
            try:
                got = torch._scaled_mm(x8, w8.t(), scale_a=row_scale.view(m, 1), scale_b=col_scale.view(1, n),
                                       out_dtype=torch.bfloat16, use_fast_accum=fast)
            except RuntimeError as error:
                entry["scaled_bf16_out"][f"use_fast_accum={fast}"] = {"error": str(error)[:200]}
                continue
            errors = _errors(got, exact * scale, absdot * scale)
            error = (got.double() - exact * scale).abs()
            beyond_bf16 = (error - 2.0 ** -8 * (exact * scale).abs()).clamp(min=0)
            errors["u_needed (err <= 2^-8|y| + u * absdot)"] = float((beyond_bf16 / (absdot * scale)).max())
            reference = fp8_prefill.scaled_mm_reference(x8, row_scale, w8, col_scale, torch.float32)
            diff = (got.float() - reference).abs()
            old_tolerance = 2 ** -7 * reference.abs() + float(reference.abs().max()) * 1e-4
            errors["elements over the old test tolerance"] = int((diff > old_tolerance).sum())
            entry["scaled_bf16_out"][f"use_fast_accum={fast}"] = errors
        results.append(entry)
    return {"cases": results}


def hopper_lines(report: dict) -> list[str]:
    lines = ["cuBLASLt FP8 vs exact (fp64 of the E4M3 products): max |err| / sum|x w|, max |err| / max|y|"]
    for entry in report["cases"]:
        lines.append(f"  {entry['M']}x{entry['N']}x{entry['K']}:")
        for name, errors in {**entry["unscaled_fp32_out"], **{f"scaled bf16 {k}": v for k, v in
                                                               entry["scaled_bf16_out"].items()}}.items():
            if "error" in errors:
                lines.append(f"    {name:>40}: {errors['error']}")
                continue
            extra = (f", {errors['elements over the old test tolerance']} over old tolerance"
                     if "elements over the old test tolerance" in errors else "")
            lines.append(f"    {name:>40}: {errors['max_err_over_absdot']:.2e}, {errors['max_err_over_max_abs']:.2e}"
                         f", rel {errors['rel_frobenius']:.2e}{extra}")
    return lines
