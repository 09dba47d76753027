"""Kernel microbenchmarks, called by `adaq bench kernels` and scripts/gpu_kernels.sh. Each returns plain dicts.

Timing: the op is captured `REPEATS` times into one CUDA graph, cycling through enough copies of its inputs to
exceed the L2 cache (so weights come from DRAM, as in a real decode step), and the graph is replayed several
times; a launch's time is the replay time over REPEATS, median over replays (warm-up and compilation excluded).
Bandwidth counts the bytes the op must move at least once (weights, scales, activations in, outputs out).
"""

import statistics

import torch

from adaq.kernels import layout, ops

REPEATS = 20
REPLAYS = 15
L2_FLUSH_BYTES = 256 << 20  # several times the L2 of a 4090 (72 MB) or an H100 (50 MB)

QWEN3_8B_LINEARS = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (24576, 4096),
                    "down_proj": (4096, 12288)}


def _time_graph(step, copies: int) -> float:
    """Median µs of one call of step(i) for i cycling over `copies` input sets."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(copies, 3)):
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPEATS):
            step(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / REPEATS)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> dict:
    """Device-to-device copy, counting bytes read plus bytes written: the ceiling the other figures are put against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_()
    dst = torch.empty_like(src)
    us = _time_graph(lambda i: dst.copy_(src), 1)
    return {"op": "copy", "bytes": 2 * nbytes, "us": us, "GB/s": 2 * nbytes / us / 1e3}


def _copies(nbytes: int) -> int:
    return max(1, -(-L2_FLUSH_BYTES // max(nbytes, 1)))


def _random_weight(n: int, k: int, generator: torch.Generator) -> layout.PackedNVFP4:
    from adaq.formats.nvfp4 import NVFP4Weight

    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=generator)
    scales = (torch.rand(n, k // 16, device="cuda", generator=generator) * 2 + 0.1).to(torch.float8_e4m3fn)
    return layout.repack(NVFP4Weight(packed, scales, torch.tensor([100.0], device="cuda")), "cuda")


def nvfp4_gemm(n: int, k: int, m: int, copy_gbs: float | None = None, splits: int = 0, name: str = "") -> dict:
    """One decode GEMM y[m, n] = x[m, k] W^T against its NVFP4 weight bytes; also cuBLAS bf16 on the same shape."""
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    one = _random_weight(n, k, gen)
    copies = _copies(one.nbytes)
    weights = [one] + [_random_weight(n, k, gen) for _ in range(copies - 1)]
    xs = [torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(copies)]
    us = _time_graph(lambda i: ops.nvfp4_linear(xs[i], weights[i], splits=splits), copies)
    moved = one.wq.numel() + one.ws.numel() + m * k * 2 + m * n * 2
    result = {"op": "nvfp4_gemm", "name": name, "shape": [m, n, k], "M": m, "N": n, "K": k, "us": us,
              "bytes": moved, "GB/s": moved / us / 1e3, "TFLOP/s": 2 * m * n * k / us / 1e6}
    del weights
    dense = [torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(_copies(n * k * 2))]
    bf16_us = _time_graph(lambda i: torch.matmul(xs[i % copies], dense[i].T), len(dense))
    result.update(bf16_cublas_us=bf16_us, speedup_vs_bf16=bf16_us / us)
    if copy_gbs:
        result["pct_of_copy"] = 100 * result["GB/s"] / copy_gbs
    return result


def paged_attention(batch: int, context: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                    kv_dtype: str = "fp8", copy_gbs: float | None = None, block_size: int = 16) -> dict:
    """Decode attention of `batch` sequences of `context` keys each (Qwen3-8B heads by default)."""
    dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else torch.bfloat16
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    per_cache = num_blocks * block_size * kv_heads * head_dim * dtype.itemsize
    copies = _copies(2 * per_cache)
    gen = torch.Generator(device="cuda").manual_seed(context)
    caches = []
    for _ in range(copies):
        k = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
        v = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
        scales = [torch.rand(num_blocks, block_size, kv_heads, device="cuda", generator=gen) + 0.01
                  for _ in range(2)] if kv_dtype == "fp8" else [None, None]
        caches.append((k, v, *scales))
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).int().view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    splits = ops.attention_splits(batch, kv_heads, context)
    us = _time_graph(lambda i: ops.paged_attention(q, *caches[i], tables, lens, scale=head_dim ** -0.5,
                                                   splits=splits), copies)
    moved = 2 * batch * context * kv_heads * (head_dim * dtype.itemsize + (4 if kv_dtype == "fp8" else 0))
    result = {"op": "paged_attention", "kv_dtype": kv_dtype, "batch": batch, "context": context, "heads": heads,
              "kv_heads": kv_heads, "head_dim": head_dim, "splits": splits, "us": us, "bytes": moved,
              "GB/s": moved / us / 1e3}
    if copy_gbs:
        result["pct_of_copy"] = 100 * result["GB/s"] / copy_gbs
    return result


def run_all(quick: bool = False, compare_v1: bool = False) -> dict:
    """The figures issue 4 asks for: Qwen3-8B GEMMs at M = 1 and 16 (and more), attention at 8k context."""
    copy = copy_bandwidth()
    gbs = copy["GB/s"]
    rows = (1, 16) if quick else (1, 4, 16, 32, 64)
    gemms = [nvfp4_gemm(n, k, m, gbs, name=name) for name, (n, k) in QWEN3_8B_LINEARS.items() for m in rows]
    if compare_v1:
        ops.set_gemm_variant(1)
        gemms += [dict(nvfp4_gemm(n, k, m, gbs, name=name + "@v1"), variant=1)
                  for name, (n, k) in QWEN3_8B_LINEARS.items() for m in (1, 16)]
        ops.set_gemm_variant(ops.DEFAULT_GEMM_VARIANT)
    attn = [paged_attention(b, 8192, copy_gbs=gbs, kv_dtype=d) for d in ("fp8", "bf16") for b in (1, 16)]
    attn.append(paged_attention(1, 8192, heads=32, kv_heads=4, copy_gbs=gbs))  # Qwen3-30B-A3B: 8 heads per KV head
    moe = [moe_decode(t, copy_gbs=gbs) for t in (1, 16)]
    return {"device": torch.cuda.get_device_name(), "copy": copy, "gemm": gemms, "attention": attn, "moe": moe}


def summary_lines(results: dict) -> list[str]:
    lines = [f"copy: {results['copy']['GB/s']:.0f} GB/s (read+write)"]
    for r in results["gemm"]:
        lines.append(f"gemm {r['name']:>12} M={r['M']:<3} N={r['N']:<6} K={r['K']:<6} {r['us']:8.1f} us "
                     f"{r['GB/s']:7.0f} GB/s {r.get('pct_of_copy', 0):5.1f}% copy  bf16 cuBLAS {r['bf16_cublas_us']:7.1f} us "
                     f"x{r['speedup_vs_bf16']:.2f}")
    for r in results["attention"]:
        lines.append(f"attn {r['kv_dtype']:>4} B={r['batch']:<3} ctx={r['context']} H={r['heads']} Hkv={r['kv_heads']} "
                     f"splits={r['splits']:<3} {r['us']:8.1f} us {r['GB/s']:7.0f} GB/s {r.get('pct_of_copy', 0):5.1f}% copy")
    for r in results.get("moe", []):
        lines.append(f"moe  T={r['tokens']:<3} {r['routed_experts']} experts routed {r['us']:8.1f} us "
                     f"{r['GB/s']:7.0f} GB/s {r.get('pct_of_copy', 0):5.1f}% copy")
    return lines


def gemm_sweep(shapes: dict | None = None, rows=(1, 16), variants=(2, 3, 4), splits=(0, 1, 2, 4, 8),
               copy_gbs: float | None = None) -> list[dict]:
    """µs of the decode GEMM over kernel variants and forced split counts (0 = the planner's choice), to tune the
    planner: one set of weight copies per shape, reused."""
    shapes = shapes or QWEN3_8B_LINEARS
    out = []
    for name, (n, k) in shapes.items():
        gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        one = _random_weight(n, k, gen)
        copies = _copies(one.nbytes)
        weights = [one] + [_random_weight(n, k, gen) for _ in range(copies - 1)]
        for m in rows:
            xs = [torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(copies)]
            for variant in variants:
                ops.set_gemm_variant(variant)
                for s in splits:
                    us = _time_graph(lambda i: ops.nvfp4_linear(xs[i], weights[i], splits=s), copies)
                    gbs = (one.wq.numel() + one.ws.numel()) / us / 1e3
                    out.append({"name": name, "M": m, "N": n, "K": k, "variant": variant, "splits": s, "us": us,
                                "GB/s": gbs, "pct_of_copy": 100 * gbs / copy_gbs if copy_gbs else None})
        del weights
    ops.set_gemm_variant(ops.DEFAULT_GEMM_VARIANT)
    return out


def moe_decode(tokens: int = 1, experts: int = 128, top_k: int = 8, hidden: int = 2048, inter: int = 768,
               copy_gbs: float | None = None) -> dict:
    """Qwen3-30B-A3B MoE layer decode (router top-k, grouped gate|up and down GEMMs, combine) against the bytes of
    the experts actually routed (measured from the routing), default one token."""
    from adaq.formats.nvfp4 import NVFP4Weight

    gen = torch.Generator(device="cuda").manual_seed(tokens)

    def weight(n, k):
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
        scales = (torch.rand(n, k // 16, device="cuda", generator=gen) * 2 + 0.1).to(torch.float8_e4m3fn)
        return layout.repack(NVFP4Weight(packed, scales, torch.tensor([100.0], device="cuda")), "cuda")

    layer_bytes = experts * (2 * inter * hidden + hidden * inter) * 0.5625
    copies = max(1, -(-L2_FLUSH_BYTES // int(layer_bytes)))
    layers = [ops.StackedExperts([weight(2 * inter, hidden) for _ in range(experts)],
                                 [weight(hidden, inter) for _ in range(experts)]) for _ in range(copies)]
    xs = [torch.randn(tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(copies)]
    logits = [torch.randn(tokens, experts, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(copies)]
    us = _time_graph(lambda i: ops.moe_forward(xs[i], logits[i], layers[i], top_k, True), copies)
    routed = torch.unique(ops.router_topk(logits[0], top_k, True)[1]).numel()
    moved = routed * (3 * inter * hidden) * 0.5625
    result = {"op": "moe_decode", "tokens": tokens, "experts": experts, "top_k": top_k, "hidden": hidden,
              "intermediate": inter, "routed_experts": routed, "us": us, "bytes": moved, "GB/s": moved / us / 1e3}
    if copy_gbs:
        result["pct_of_copy"] = 100 * result["GB/s"] / copy_gbs
    return result
