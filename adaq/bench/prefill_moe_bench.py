"""Microbenchmark of MoE prefill (Qwen3-30B-A3B experts: 128 experts, top-8, hidden 2048, moe_intermediate 768) on
the GPU at hand: the FP8 path (adaq.backends.prefill_moe: grouped FP8 GEMMs) against what the engine runs otherwise
-- the bf16 model's MoE (per-expert cuBLAS bf16 linears, the reference backend) and the NVFP4 decode kernels in
chunks of 64 tokens (ops.moe_forward, the cuda backend's MoE without the FP8 path). Random weights generated on the
GPU; times are medians of CUDA-event timings after warm-up (prefill_bench.median_ms). The grouped GEMMs' TFLOP/s
count useful work only (2 x rows x N x K, no padding) and are stated against the FP8 mma.sync ceiling.
"""

import torch

from adaq.formats import nvfp4
from adaq.formats.nvfp4 import NVFP4Weight
from adaq.backends import prefill_moe
from adaq.bench import prefill_bench
from adaq.kernels import fp8_gemm

QWEN3_30B_A3B = {"experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768}


def _slice(w: NVFP4Weight, start: int, end: int) -> NVFP4Weight:
    return NVFP4Weight(w.packed[start:end], w.block_scale[start:end], w.global_scale)


def random_experts(experts: int, hidden: int, intermediate: int, seed: int = 0):
    """Per expert ([gate, up], down) NVFP4 weights (one global scale per projection, as llm-compressor links
    gate and up) and the same experts in bf16 (the baseline's weights)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    gate_up = torch.randn(experts * 2 * intermediate, hidden, device="cuda", generator=generator) * 0.02
    down = torch.randn(experts * hidden, intermediate, device="cuda", generator=generator) * 0.02
    q_gate_up, q_down = nvfp4.quantize(gate_up), nvfp4.quantize(down)
    pairs = [[_slice(q_gate_up, (2 * e) * intermediate, (2 * e + 1) * intermediate),
              _slice(q_gate_up, (2 * e + 1) * intermediate, (2 * e + 2) * intermediate)] for e in range(experts)]
    downs = [_slice(q_down, e * hidden, (e + 1) * hidden) for e in range(experts)]
    dense_pairs = [[t.to(torch.bfloat16) for t in gate_up[2 * e * intermediate:(2 * e + 2) * intermediate]
                    .split(intermediate)] for e in range(experts)]
    dense_down = [t.to(torch.bfloat16) for t in down.split(hidden)]
    return pairs, downs, dense_pairs, dense_down


def run(tokens: tuple[int, ...] = (512, 2048, 8192), ceiling: float | None = None, shape: dict | None = None) -> dict:
    from adaq.kernels import ops
    from adaq.backends.cuda import CudaBackend
    from adaq.backends.reference import ReferenceBackend

    shape = shape or QWEN3_30B_A3B
    experts, top_k, hidden, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["intermediate"]
    pairs, downs, dense_pairs, dense_down = random_experts(experts, hidden, inter)
    fp8 = prefill_moe.Fp8Experts.from_weights(pairs, downs, "cuda")
    prepared = CudaBackend("cuda").prepare_experts(pairs, downs, dtype=torch.bfloat16)
    decode, exact = prepared.stacked, getattr(prepared, "exact", None)
    bf16_backend = ReferenceBackend("cuda", dequant_cache_bytes=0)
    bf16 = bf16_backend.prepare_experts(dense_pairs, dense_down, dtype=torch.bfloat16)
    device = torch.device("cuda")
    results = {"shape": shape, "ceiling_TFLOP/s": ceiling, "tokens": []}
    for count in tokens:
        generator = torch.Generator(device="cuda").manual_seed(count)
        x = torch.randn(count, hidden, device="cuda", generator=generator).to(torch.bfloat16)
        logits = torch.randn(count, experts, device="cuda", generator=generator).to(torch.bfloat16)
        rows = count * top_k
        flop = 2.0 * rows * (2 * inter * hidden + hidden * inter)
        entry = {"tokens": count, "rows": rows, "GFLOP": flop / 1e9,
                 "default_tile": prefill_moe.choose_grouped_tile(rows, experts), "fp8": {}}
        for tile in range(len(fp8_gemm.tiles())):
            ms = prefill_bench.median_ms(lambda: prefill_moe.fp8_moe_forward(x, logits, fp8, top_k, True, tile=tile))
            entry["fp8"][fp8_gemm.tiles()[tile]["name"]] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
        entry["fp8_total"] = entry["fp8"][fp8_gemm.tiles()[entry["default_tile"]]["name"]]
        entry["grouped_gemm"] = _grouped_gemm_only(x, logits, fp8, top_k, flop, ceiling)
        entry["expand_ms"] = prefill_bench.median_ms(lambda: (prefill_moe.expand_stacked(fp8.gate_up, device),
                                                               prefill_moe.expand_stacked(fp8.down, device)))
        entry["stages_ms"] = _stages(x, logits, fp8, top_k)
        ms = prefill_bench.median_ms(lambda: bf16_backend.moe(x, logits, bf16, top_k, True), repeats=5)
        entry["bf16_reference_backend"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
        ms = prefill_bench.median_ms(lambda: ops.moe_forward(x, logits, decode, top_k, True), repeats=5)
        entry["nvfp4_decode_kernels"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9}
        if exact is not None:  # what `auto` runs from moe_exact_min_tokens (adaq.backends.prefill_moe_exact)
            from adaq.backends.prefill_moe_exact import exact_moe_forward

            ms = prefill_bench.median_ms(lambda: exact_moe_forward(x, logits, exact, top_k, True), repeats=5)
            entry["nvfp4_exact_grouped"] = {"ms": ms, "TFLOP/s": flop / ms / 1e9,
                                            "tokens/s per layer": count / ms * 1e3}
        entry["speedup_vs_bf16"] = entry["bf16_reference_backend"]["ms"] / entry["fp8_total"]["ms"]
        entry["speedup_vs_nvfp4_decode"] = entry["nvfp4_decode_kernels"]["ms"] / entry["fp8_total"]["ms"]
        results["tokens"].append(entry)
    return results


def _grouped_gemm_only(x, logits, fp8, top_k, flop, ceiling) -> dict:
    """The two grouped GEMMs alone (operands prepared once), per tile."""
    from adaq.kernels import ops

    weights, ids = ops.router_topk(logits, top_k, True)
    align = prefill_moe.align_rows(ids, fp8.num_experts)
    rows = align[2].long()
    x8, row_scale = fp8_gemm.quantize_rows(x)
    a, a_scale = x8.view(torch.uint8)[rows // top_k].view(x8.dtype), row_scale[rows // top_k]
    device = x.device
    gate_up = prefill_moe.expand_stacked(fp8.gate_up, device)
    gate_up = (gate_up[0].clone(), gate_up[1].clone())
    down = prefill_moe.expand_stacked(fp8.down, device)
    inter = fp8.down.in_features
    h8, h_scale = fp8_gemm.quantize_rows(torch.randn(a.shape[0], inter, device=device).to(torch.bfloat16))
    out = {}
    for tile, spec in enumerate(fp8_gemm.tiles()):
        ms = prefill_bench.median_ms(lambda: (prefill_moe.grouped_gemm(a, a_scale, *gate_up, align, tile),
                                               prefill_moe.grouped_gemm(h8, h_scale, *down, align, tile)))
        tflops = flop / ms / 1e9
        out[spec["name"]] = {"ms": ms, "TFLOP/s": tflops,
                             "efficiency_vs_fp8_mma_ceiling": tflops / ceiling if ceiling else None,
                             "projected_rtx4090_TFLOP/s (projection)":
                                 tflops / ceiling * prefill_bench.RTX4090_FP8_TFLOPS if ceiling else None}
    return out


def _stages(x, logits, fp8, top_k) -> dict:
    """Where the FP8 MoE's time goes besides the GEMMs and the expansion (each stage alone, inputs prepared)."""
    from adaq.kernels import ops

    weights, ids = ops.router_topk(logits, top_k, True)
    align = prefill_moe.align_rows(ids, fp8.num_experts)
    rows = align[2].long()
    gate_up = torch.randn(rows.numel(), 2 * fp8.down.in_features, device=x.device).to(torch.bfloat16)
    y_sorted = torch.randn(rows.numel(), x.shape[1], device=x.device).to(torch.bfloat16)
    y = torch.empty_like(y_sorted)
    timed = {
        "router_and_grouping": lambda: prefill_moe.align_rows(ops.router_topk(logits, top_k, True)[1], fp8.num_experts),
        "quantize_and_gather": lambda: prefill_moe._gather_rows(*fp8_gemm.quantize_rows(x), rows // top_k),
        "silu_and_quantize": lambda: fp8_gemm.quantize_rows(ops.silu_and_mul(gate_up)),
        "scatter_and_combine": lambda: ops.moe_combine(y.index_copy_(0, rows, y_sorted), weights, ids),
    }
    return {name: prefill_bench.median_ms(step) for name, step in timed.items()}


def summary_lines(results: dict) -> list[str]:
    s = results["shape"]
    lines = [f"MoE prefill, {s['experts']} experts top-{s['top_k']}, hidden {s['hidden']}, moe_intermediate "
             f"{s['intermediate']} (Qwen3-30B-A3B layer), random weights; ms per MoE layer"]
    for e in results["tokens"]:
        tile = fp8_gemm.tiles()[e["default_tile"]]["name"]
        gemm = e["grouped_gemm"][tile]
        eff = gemm.get("efficiency_vs_fp8_mma_ceiling")
        projection = gemm.get("projected_rtx4090_TFLOP/s (projection)")
        lines.append(
            f"  T={e['tokens']:>5}: FP8 path {e['fp8_total']['ms']:.3f} ms (tile {tile}; grouped GEMMs "
            f"{gemm['ms']:.3f} ms = {gemm['TFLOP/s']:.0f} TFLOP/s"
            + (f", {100 * eff:.0f}% of ceiling, RTX 4090 projection {projection:.0f}" if eff else "")
            + f"; expansion {e['expand_ms']:.3f} ms) | bf16 {e['bf16_reference_backend']['ms']:.3f} ms "
            f"(x{e['speedup_vs_bf16']:.2f}) | NVFP4 decode kernels {e['nvfp4_decode_kernels']['ms']:.3f} ms "
            f"(x{e['speedup_vs_nvfp4_decode']:.2f})"
            + (f" | exact grouped (auto) {e['nvfp4_exact_grouped']['ms']:.3f} ms" if "nvfp4_exact_grouped" in e
               else ""))
        if "stages_ms" in e:
            stages = ", ".join(f"{name} {ms:.3f}" for name, ms in e["stages_ms"].items())
            lines.append(f"           other stages (ms): {stages}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """`python -m adaq.bench.prefill_moe_bench [--json PATH] [--tokens 512,2048,8192]`: the FP8 mma.sync ceiling,
    the Ada GEMM at M = 2048 (prefill_bench, with the ptxas report of its sm_89 code) and MoE prefill, as tables."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m adaq.bench.prefill_moe_bench", description=main.__doc__)
    parser.add_argument("--json", help="write every figure as JSON")
    parser.add_argument("--tokens", default="512,2048,8192", help="MoE prompt lengths, comma-separated")
    parser.add_argument("--no-moe", action="store_true", help="only the ceiling and the dense GEMM")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_moe_bench: needs a CUDA GPU (the FP8 kernels are timed on it)")
    dense = prefill_bench.run_all()
    print("\n".join(prefill_bench.summary_lines(dense)))
    report = {"dense": dense}
    if not args.no_moe:
        tokens = tuple(int(t) for t in args.tokens.split(","))
        report["moe"] = run(tokens, ceiling=dense["fp8_mma_sync_ceiling"]["TFLOP/s"])
        print("\n".join(summary_lines(report["moe"])))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
