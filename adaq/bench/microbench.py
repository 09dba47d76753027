"""Kernel microbenchmarks, called by `adaq bench kernels` and scripts/gpu_kernels.sh. Each returns plain dicts.

Timing: the op is captured `REPEATS` times into one CUDA graph, cycling through enough copies of its inputs to
exceed the L2 cache (so weights come from DRAM, as in a real decode step), and the graph is replayed several
times; a launch's time is the replay time over REPEATS, median over replays (warm-up and compilation excluded).
Bandwidth counts the bytes the op must move at least once (weights, scales, activations in, outputs out).
"""

import statistics

import torch

from adaq.backends.numerics.attention import kv_bytes_per_token_head
from adaq.kernels import layout, ops

REPEATS = 20
REPLAYS = 15
L2_FLUSH_BYTES = 256 << 20  # several times the L2 of a 4090 (72 MB) or an H100 (50 MB)

QWEN3_8B_LINEARS = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (24576, 4096),
                    "down_proj": (4096, 12288)}
# Qwen3-30B-A3B's decode projections: attention (32 q / 4 KV heads of 128 over hidden 2048) and one expert (768).
QWEN3_30B_A3B_LINEARS = {"qkv_proj": (5120, 2048), "o_proj": (2048, 4096), "expert_gate_up": (1536, 2048),
                         "expert_down": (2048, 768)}
INT4_GROUP_SIZE = 32  # torch's 4-bit weight-only GEMM, as gpt-fast runs it
INT4_INNER_K_TILES = 8


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
    del dense
    result.update(torch_int4_peer(n, k, xs, gen, us))
    if copy_gbs:
        result["pct_of_copy"] = 100 * result["GB/s"] / copy_gbs
    return result


def torch_int4_peer(n: int, k: int, xs: list[torch.Tensor], gen: torch.Generator, nvfp4_us: float) -> dict:
    """torch's own 4-bit weight-only GEMM (`torch._weight_int4pack_mm`, group 32, random int4 codes, bf16 scales
    and zeros) on the same shape and activations: the peer a PyTorch user reaches for first."""
    copies = _copies(n * k // 2 + n * (k // INT4_GROUP_SIZE) * 4)
    try:
        packed = [torch._convert_weight_to_int4pack(
            torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen), INT4_INNER_K_TILES)
            for _ in range(copies)]
        scales = [torch.rand(k // INT4_GROUP_SIZE, n, 2, device="cuda", generator=gen).to(torch.bfloat16) * 0.01
                  for _ in range(copies)]
        int4_us = _time_graph(lambda i: torch._weight_int4pack_mm(xs[i % len(xs)], packed[i], INT4_GROUP_SIZE,
                                                                  scales[i]), copies)
    except (RuntimeError, AttributeError) as error:  # not every torch build has the int4 kernel for every GPU
        return {"torch_int4_error": str(error).splitlines()[0]}
    return {"torch_int4_us": int4_us, "speedup_vs_torch_int4": int4_us / nvfp4_us}


def paged_attention(batch: int, context: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                    kv_dtype: str = "fp8", copy_gbs: float | None = None, block_size: int = 16,
                    variant: int | None = None, name: str = "") -> dict:
    """Decode attention of `batch` sequences of `context` keys each (Qwen3-8B heads by default); `variant` picks
    the kernel (ops.ATTENTION_VARIANTS; None = default; NVFP4: 0, 2, 3). kv_dtype: fp8, bf16 or nvfp4."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    per_token_head = kv_bytes_per_token_head(kv_dtype, head_dim)
    per_cache = num_blocks * block_size * kv_heads * per_token_head
    copies = _copies(2 * per_cache)
    gen = torch.Generator(device="cuda").manual_seed(context)
    caches = [_random_kv(kv_dtype, (num_blocks, block_size, kv_heads, head_dim), gen) for _ in range(copies)]
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).int().view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    with ops.attention_variant(variant):
        splits = ops.attention_splits(batch, kv_heads, context, head_dim=head_dim, group=heads // kv_heads,
                                      fp8=kv_dtype == "fp8", block_size=block_size, nvfp4=kv_dtype == "nvfp4")
        us = _time_graph(lambda i: ops.paged_attention(q, *caches[i], tables, lens, scale=head_dim ** -0.5,
                                                       splits=splits), copies)
    moved = 2 * batch * context * kv_heads * per_token_head
    result = {"op": "paged_attention", "name": name, "kv_dtype": kv_dtype, "batch": batch, "context": context,
              "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "splits": splits,
              "variant": ops.DEFAULT_ATTENTION_VARIANT if variant is None else variant, "us": us, "bytes": moved,
              "GB/s": moved / us / 1e3}
    if copy_gbs:
        result["pct_of_copy"] = 100 * result["GB/s"] / copy_gbs
    return result


def _random_kv(kv_dtype: str, shape: tuple[int, ...], gen: torch.Generator) -> tuple:
    """(k_cache, v_cache, k_scale, v_scale) of random contents in the cache's format: FP8/bf16 values of N(0, 1) with
    fp32 scales in (0.01, 1.01); NVFP4 random E2M1 bytes, E4M3 block scales in [2^-3, 2^5) (bytes 0x20..0x5F: no
    NaN) and exponents 2^-8 .. 2^-1."""
    blocks, block_size, kv_heads, head_dim = shape
    if kv_dtype == "nvfp4":
        def one():
            values = torch.randint(0, 256, (*shape[:-1], head_dim // 2), dtype=torch.uint8, device="cuda",
                                   generator=gen)
            scales = torch.randint(0x20, 0x60, (*shape[:-1], head_dim // 16), dtype=torch.uint8, device="cuda",
                                   generator=gen)
            return torch.cat([values, scales], dim=-1).contiguous()

        exps = [torch.randint(119, 127, shape[:-1], dtype=torch.uint8, device="cuda", generator=gen) for _ in range(2)]
        return (one(), one(), *exps)
    dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else torch.bfloat16
    k = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    v = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    scales = [torch.rand(shape[:-1], device="cuda", generator=gen) + 0.01
              for _ in range(2)] if kv_dtype == "fp8" else [None, None]
    return (k, v, *scales)


def run_all(quick: bool = False, compare_v1: bool = False) -> dict:
    """The figures issue 4 asks for: Qwen3-8B GEMMs at M = 1 and 16 (and more), attention at 8k context."""
    copy = copy_bandwidth()
    gbs = copy["GB/s"]
    rows = (1, 16) if quick else (1, 4, 16, 32, 64)
    gemms = [nvfp4_gemm(n, k, m, gbs, name=name) for name, (n, k) in QWEN3_8B_LINEARS.items() for m in rows]
    gemms += [nvfp4_gemm(n, k, m, gbs, name=f"30b-a3b {name}") for name, (n, k) in QWEN3_30B_A3B_LINEARS.items()
              for m in (1, 16)]
    if compare_v1:
        ops.set_gemm_variant(1)
        gemms += [dict(nvfp4_gemm(n, k, m, gbs, name=name + "@v1"), variant=1)
                  for name, (n, k) in QWEN3_8B_LINEARS.items() for m in (1, 16)]
        ops.set_gemm_variant(ops.DEFAULT_GEMM_VARIANT)
    attn = [paged_attention(b, 8192, copy_gbs=gbs, kv_dtype=d, name="qwen3-8b") for d in ("fp8", "nvfp4", "bf16")
            for b in (1, 16)]
    attn += [paged_attention(b, 8192, heads=32, kv_heads=4, copy_gbs=gbs, name="qwen3-30b-a3b")  # 8 heads per KV
             for b in (1, 16)]
    moe = [moe_decode(t, copy_gbs=gbs) for t in (1, 16)]
    return {"device": torch.cuda.get_device_name(), "copy": copy, "gemm": gemms, "attention": attn, "moe": moe}


def kv_nvfp4_suite(contexts=(8192, 32768), batches=(1, 16), copy_gbs: float | None = None,
                   nvfp4_variants=(None,)) -> list[dict]:
    """Issue 18's measurement: decode attention of Qwen3-8B's heads (32 q / 8 KV of 128) over FP8 and NVFP4 caches
    at 8k and 32k keys, batch 1 and 16 (goal: >= 70 % of copy bandwidth at 32k x 16). `nvfp4_variants`: the NVFP4
    kernel variants to time (None: the default; 2: the other chunks per warp step)."""
    if copy_gbs is None:
        copy_gbs = copy_bandwidth()["GB/s"]
    out = []
    for context in contexts:
        for batch in batches:
            cases = [("fp8", None)] + [("nvfp4", variant) for variant in nvfp4_variants]
            for kv_dtype, variant in cases:
                out.append(paged_attention(batch, context, copy_gbs=copy_gbs, kv_dtype=kv_dtype, variant=variant,
                                           name="qwen3-8b"))
                torch.cuda.empty_cache()
    return out


ATTENTION_GEOMETRIES = {"qwen3-8b": (32, 8, 128), "qwen3-30b-a3b": (32, 4, 128), "gemma3-27b": (32, 16, 128)}


def attention_suite(context: int = 8192, batches=(1, 16), variants=(0, 1, 2, 3), copy_gbs: float | None = None,
                    geometries: dict | None = None) -> list[dict]:
    """Decode attention at `context` keys for each geometry x KV dtype x batch x kernel variant."""
    out = []
    for name, (heads, kv_heads, dim) in (geometries or ATTENTION_GEOMETRIES).items():
        for kv_dtype in ("fp8", "bf16"):
            for batch in batches:
                for variant in variants:
                    out.append(paged_attention(batch, context, heads, kv_heads, dim, kv_dtype, copy_gbs,
                                               variant=variant, name=name))
                    torch.cuda.empty_cache()
    return out


def prefill_attention_case(seqs: int, seq_len: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                           kv_dtype: str = "fp8", block_size: int = 16):
    """`seqs` fresh prompts of `seq_len` tokens, K/V already stored in the paged cache: (our attention, torch SDPA
    (causal, bf16, GQA) on the same bf16 q/k/v, FLOP of the causal QK^T + PV), the two as zero-argument calls."""
    from adaq.backends.context import Context
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device="cuda").manual_seed(seq_len)
    tokens = seqs * seq_len
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = seqs * blocks_per_seq
    q = torch.randn(tokens, heads, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(tokens, kv_heads, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(tokens, kv_heads, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else torch.bfloat16
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    scales = [torch.ones(num_blocks, block_size, kv_heads, device="cuda") for _ in range(2)] \
        if kv_dtype == "fp8" else [None, None]
    tables = torch.arange(num_blocks, device="cuda", dtype=torch.int32).view(seqs, blocks_per_seq)
    slots = (tables.long()[:, :, None] * block_size + torch.arange(block_size, device="cuda")).view(seqs, -1)
    ops.store_kv(k, v, k_cache, v_cache, *scales, slots[:, :seq_len].reshape(-1))
    lens = torch.full((seqs,), seq_len, dtype=torch.int32, device="cuda")
    cu = torch.arange(seqs + 1, device="cuda", dtype=torch.int32) * seq_len
    ctx = Context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=seq_len, context_lens=lens, block_tables=tables,
                  max_context_len=seq_len)
    backend = CudaBackend("cuda")
    scale = head_dim ** -0.5
    qs = q.view(seqs, seq_len, heads, head_dim).transpose(1, 2)
    group = heads // kv_heads  # K/V expanded to every query head outside the timing: SDPA's flash path
    ks = k.view(seqs, seq_len, kv_heads, head_dim).repeat_interleave(group, dim=2).transpose(1, 2)
    vs = v.view(seqs, seq_len, kv_heads, head_dim).repeat_interleave(group, dim=2).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    flop = 4 * seqs * heads * head_dim * seq_len * (seq_len + 1) / 2  # causal QK^T + PV
    return (lambda: backend.attention(q, k_cache, v_cache, *scales, ctx, scale=scale),
            lambda: sdpa(qs, ks, vs, is_causal=True, scale=scale), flop)


def prefill_attention(seqs: int, seq_len: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                      kv_dtype: str = "fp8", block_size: int = 16, variant: int | None = None) -> dict:
    """Prefill attention of `seqs` fresh prompts of `seq_len` tokens through the cuda backend against torch SDPA
    (`prefill_attention_case`); `variant` 4 times v3's prefill kernel instead of the flash kernel
    (ops.ATTENTION_VARIANTS)."""
    ours, sdpa, flop = prefill_attention_case(seqs, seq_len, heads, kv_heads, head_dim, kv_dtype, block_size)
    with ops.attention_variant(variant):
        us = _time_graph(lambda i: ours(), 1)
    sdpa_us = _time_graph(lambda i: sdpa(), 1)
    return {"op": "prefill_attention", "variant": ops.DEFAULT_ATTENTION_VARIANT if variant is None else variant,
            "kv_dtype": kv_dtype, "seqs": seqs, "seq_len": seq_len, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "us": us, "TFLOP/s": flop / us / 1e6,
            "sdpa_bf16_us": sdpa_us, "sdpa_TFLOP/s": flop / sdpa_us / 1e6, "speedup_vs_sdpa": sdpa_us / us}


def attention_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if r["op"] == "prefill_attention":
            lines.append(f"prefill v{r.get('variant', 0)} {r['kv_dtype']:>4} {r['seqs']}x{r['seq_len']:<5} H={r['heads']} Hkv={r['kv_heads']} "
                         f"{r['us']:9.1f} us {r['TFLOP/s']:6.1f} TFLOP/s | SDPA bf16 {r['sdpa_bf16_us']:8.1f} us "
                         f"x{r['speedup_vs_sdpa']:.2f}")
            continue
        lines.append(f"attn {r.get('name', ''):>14} {r['kv_dtype']:>4} B={r['batch']:<3} ctx={r['context']} "
                     f"H={r['heads']} Hkv={r['kv_heads']} v{r.get('variant', 0)} splits={r['splits']:<3} "
                     f"{r['us']:8.1f} us {r['GB/s']:7.0f} GB/s {r.get('pct_of_copy', 0):5.1f}% copy")
    return lines


def summary_lines(results: dict) -> list[str]:
    lines = [f"copy: {results['copy']['GB/s']:.0f} GB/s (read+write)"]
    for r in results["gemm"]:
        lines.append(f"gemm {r['name']:>12} M={r['M']:<3} N={r['N']:<6} K={r['K']:<6} {r['us']:8.1f} us "
                     f"{r['GB/s']:7.0f} GB/s {r.get('pct_of_copy', 0):5.1f}% copy  bf16 cuBLAS {r['bf16_cublas_us']:7.1f} us "
                     f"x{r['speedup_vs_bf16']:.2f}  torch int4 {_int4_text(r)}")
    lines += attention_lines(results["attention"])
    for r in results.get("moe", []):
        lines.append(f"moe  T={r['tokens']:<3} {r['routed_experts']} experts routed {r['us']:8.1f} us "
                     f"{r['GB/s']:7.0f} GB/s {r.get('pct_of_copy', 0):5.1f}% copy")
    return lines


def _int4_text(row: dict) -> str:
    if "torch_int4_us" not in row:
        return f"n/a ({row.get('torch_int4_error', 'not run')})"
    return f"{row['torch_int4_us']:7.1f} us x{row['speedup_vs_torch_int4']:.2f}"


def gemm_sweep(shapes: dict | None = None, rows=(1, 16), variants=(1, 2, 3, 4, 5, 6, 7, 8), splits=(0,),
               copy_gbs: float | None = None) -> list[dict]:
    """µs of the decode GEMM over kernel variants and forced split counts (0 = the planner's choice), to tune the
    planner: one set of weight copies per shape, reused. Variants are timed interleaved, twice each (rounds), so
    drift of the card shows up as a spread instead of a bias between variants."""
    shapes = shapes or QWEN3_8B_LINEARS
    out = []
    for name, (n, k) in shapes.items():
        gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        one = _random_weight(n, k, gen)
        copies = _copies(one.nbytes)
        weights = [one] + [_random_weight(n, k, gen) for _ in range(copies - 1)]
        for m in rows:
            xs = [torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(copies)]
            times: dict[tuple[int, int], list[float]] = {}
            for _ in range(2):
                for variant in variants:
                    ops.set_gemm_variant(variant)
                    for s in splits:
                        us = _time_graph(lambda i: ops.nvfp4_linear(xs[i], weights[i], splits=s), copies)
                        times.setdefault((variant, s), []).append(us)
            for (variant, s), runs in times.items():
                us = min(runs)
                gbs = (one.wq.numel() + one.ws.numel()) / us / 1e3
                out.append({"name": name, "M": m, "N": n, "K": k, "variant": variant, "splits": s, "us": us,
                            "us_runs": runs, "GB/s": gbs, "pct_of_copy": 100 * gbs / copy_gbs if copy_gbs else None})
        del weights
    ops.set_gemm_variant(ops.DEFAULT_GEMM_VARIANT)
    return out


def moe_decode(tokens: int = 1, experts: int = 128, top_k: int = 8, hidden: int = 2048, inter: int = 768,
               copy_gbs: float | None = None, variants: tuple[int, ...] = ()) -> dict:
    """Qwen3-30B-A3B MoE layer decode (router top-k, grouped gate|up and down GEMMs, combine) against the bytes of
    the experts actually routed (measured from the routing), default one token. `variants`: also time these GEMM
    variants on the same layers (results under "variants")."""
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
    step = lambda i: ops.moe_forward(xs[i], logits[i], layers[i], top_k, True)  # noqa: E731
    us = _time_graph(step, copies)
    routed = torch.unique(ops.router_topk(logits[0], top_k, True)[1]).numel()
    moved = routed * (3 * inter * hidden) * 0.5625
    result = {"op": "moe_decode", "tokens": tokens, "experts": experts, "top_k": top_k, "hidden": hidden,
              "intermediate": inter, "routed_experts": routed, "us": us, "bytes": moved, "GB/s": moved / us / 1e3}
    if copy_gbs:
        result["pct_of_copy"] = 100 * result["GB/s"] / copy_gbs
    if variants:
        result["variants"] = {}
        for variant in variants:
            ops.set_gemm_variant(variant)
            v_us = _time_graph(step, copies)
            result["variants"][variant] = {"us": v_us, "pct_of_copy": 100 * moved / v_us / 1e3 / copy_gbs
                                           if copy_gbs else None}
        ops.set_gemm_variant(ops.DEFAULT_GEMM_VARIANT)
    return result


def gemm_report(variants=(1, 2, 3, 4, 5, 6, 7, 8), splits=(0,)) -> dict:
    """The decode GEMM figures of issue 4 in one call (scripts/gpu_kernels.sh gemm): copy bandwidth, the default
    variant on every Qwen3-8B projection at M = 1 and 16 (with bf16 cuBLAS beside it), every variant on the same
    shapes, and the Qwen3-30B-A3B MoE layer at 1 and 16 tokens."""
    copy = copy_bandwidth()
    gbs = copy["GB/s"]
    default = [nvfp4_gemm(n, k, m, gbs, name=name) for name, (n, k) in QWEN3_8B_LINEARS.items() for m in (1, 16)]
    sweep = gemm_sweep(rows=(1, 16), variants=variants, splits=splits, copy_gbs=gbs)
    moe = [moe_decode(t, copy_gbs=gbs, variants=variants) for t in (1, 16)]
    return {"device": torch.cuda.get_device_name(), "copy": copy, "default_variant": ops.gemm_variant(),
            "gemm": default, "sweep": sweep, "moe": moe}


def gemm_report_lines(report: dict) -> list[str]:
    """A short table: per shape and M, µs and % of copy for the default and each variant; the per-layer sums."""
    gbs = report["copy"]["GB/s"]
    lines = [f"copy {gbs:.0f} GB/s; default variant {report['default_variant']} (0 = per shape)"]
    variants = sorted({r["variant"] for r in report["sweep"]})
    lines.append(f"{'shape':>13} M   default us  %copy  cuBLAS  " + "  ".join(f"v{v:<2} us  %copy" for v in variants))
    layer = {}
    for r in report["gemm"]:
        cells = []
        for v in variants:
            hit = [s for s in report["sweep"]
                   if s["name"] == r["name"] and s["M"] == r["M"] and s["variant"] == v and s["splits"] == 0]
            if hit:
                cells.append(f"{hit[0]['us']:7.1f} {hit[0]['pct_of_copy']:5.1f}")
                layer.setdefault((r["M"], v), 0.0)
                layer[(r["M"], v)] += hit[0]["us"]
        layer.setdefault((r["M"], "default"), 0.0)
        layer[(r["M"], "default")] += r["us"]
        lines.append(f"{r['name']:>13} {r['M']:<3} {r['us']:9.1f} {r['pct_of_copy']:6.1f} {r['bf16_cublas_us']:7.1f}  "
                     + "  ".join(cells))
        best = min((s for s in report["sweep"] if s["name"] == r["name"] and s["M"] == r["M"]), key=lambda s: s["us"])
        lines[-1] += f"  | best v{best['variant']} splits={best['splits']} {best['us']:.1f}"
    layer_bytes = {m: sum(r["bytes"] for r in report["gemm"] if r["M"] == m) for m in (1, 16)}
    for m in (1, 16):
        parts = [f"default {layer[(m, 'default')]:.1f} us "
                 f"({100 * layer_bytes[m] / layer[(m, 'default')] / 1e3 / gbs:.1f}%)"]
        parts += [f"v{v} {layer[(m, v)]:.1f} us ({100 * layer_bytes[m] / layer[(m, v)] / 1e3 / gbs:.1f}%)"
                  for v in variants if (m, v) in layer]
        lines.append(f"per layer M={m}: " + ", ".join(parts))
    for r in report["moe"]:
        extra = ", ".join(f"v{v} {x['us']:.1f} us ({x['pct_of_copy']:.1f}%)" for v, x in r.get("variants", {}).items())
        lines.append(f"moe T={r['tokens']:<3} {r['routed_experts']} experts: {r['us']:.1f} us "
                     f"({r.get('pct_of_copy', 0):.1f}% of copy on routed bytes); {extra}")
    return lines
