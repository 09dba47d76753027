"""adaq's CUDA kernels against the reference backend, on fresh random data, outputs poisoned before each run.

Kernel error is tested apart from quantization error: the NVFP4 GEMM is compared with fp32 math on the exactly
dequantized weights, not with the unquantized weights. Skipped without CUDA.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from helpers.paged import decode_context  # noqa: E402
from helpers.gpu_checks import (  # noqa: E402
    check_decode_against_fp32, check_divergences, poison_allocator, rel_error, run_requests)
from adaq.formats import nvfp4  # noqa: E402
from adaq.formats.nvfp4 import NVFP4Weight  # noqa: E402
from adaq.kernels import layout, ops  # noqa: E402
from adaq.backends.numerics import activation, attention, moe, norm, rotary  # noqa: E402
from adaq.layers import rotary as layers_rotary  # noqa: E402

DEV = torch.device("cuda")

# (N, K) of every projection of the three target models (q|k|v and gate|up fused), plus padded/odd sizes.
QWEN3_8B = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
QWEN3_30B_A3B = [(5120, 2048), (2048, 4096), (1536, 2048), (2048, 768)]
GEMMA3_27B = [(8192, 5376), (5376, 4096), (43008, 5376), (5376, 21504)]
ODD_SHAPES = [(8, 16), (13, 48), (40, 272), (1000, 1040), (257, 2064), (3, 4096)]
LAYER_SHAPES = QWEN3_8B + QWEN3_30B_A3B + GEMMA3_27B
DECODE_ROWS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 47, 48, 61, 64]
LAYER_ROWS = [1, 7, 16, 33, 64]


@pytest.fixture(autouse=True)
def strict_fp32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture(scope="module")
def ext():
    return ops.ext()


def random_nvfp4(n: int, k: int, generator: torch.Generator) -> NVFP4Weight:
    """Every E2M1 code, E4M3 scales over the whole range (subnormals and zeros included), a random global scale."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV, generator=generator)
    exponent = torch.randint(-9, 9, (n, k // 16), device=DEV, generator=generator).float()
    mantissa = 1 + torch.rand((n, k // 16), device=DEV, generator=generator)
    scales = (mantissa * 2 ** exponent).clamp(max=448)
    scales[torch.rand(scales.shape, device=DEV, generator=generator) < 0.01] = 0
    global_scale = torch.rand(1, device=DEV, generator=generator) * 1000 + 1
    return NVFP4Weight(packed, scales.to(torch.float8_e4m3fn), global_scale)


# ---- NVFP4 GEMM ------------------------------------------------------------------------------------------------

def check_gemm(m: int, n: int, k: int, seed: int, splits: int = 0, bias: bool = False, linear=None) -> None:
    linear = linear or ops.nvfp4_linear
    gen = torch.Generator(device=DEV).manual_seed(seed)
    weight = random_nvfp4(n, k, gen)
    packed = layout.repack(weight, DEV)
    x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, device=DEV, generator=gen).to(torch.bfloat16) if bias else None
    ref = x.float() @ nvfp4.dequantize(weight, torch.float32).T
    if b is not None:
        ref = ref + b.float()
    poison_allocator()
    out = linear(x, packed, b, splits=splits)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    # The output is bf16: compare with the fp32 result rounded once to bf16 (kernel error, not output rounding).
    error = rel_error(out, ref.to(torch.bfloat16))
    assert error <= 1e-3, f"M={m} N={n} K={k}: relative error {error:.2e} vs fp32 math on dequantized weights"
    again = linear(x, packed, b, splits=splits)
    assert torch.equal(out, again), "split-K result changed between runs (counters not reset, or a race)"


@pytest.mark.parametrize("m", DECODE_ROWS)
@pytest.mark.parametrize("n,k", ODD_SHAPES)
def test_gemm_odd_shapes(m, n, k):
    check_gemm(m, n, k, seed=m * 1000 + n + k)


@pytest.mark.parametrize("m", LAYER_ROWS)
@pytest.mark.parametrize("n,k", LAYER_SHAPES)
def test_gemm_layer_shapes(m, n, k):
    check_gemm(m, n, k, seed=7 * m + n + 3 * k)


@pytest.mark.parametrize("splits", [1, 2, 3, 8, 32])
def test_gemm_forced_splits_and_bias(splits):
    check_gemm(16, 4096, 4096, seed=splits, splits=splits, bias=True)


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (16, 4096, 12288), (5, 1000, 1040), (16, 1000, 1040), (33, 257, 2064),
                                   (64, 2048, 768)])
def test_gemm_other_variants(variant, m, n, k):
    """Every GEMM variant (rings of 4, 3, 2 super-tiles; wide blocks; 2 or 4 column tiles per warp) computes the
    same function."""
    default = ops.gemm_variant()
    ops.set_gemm_variant(variant)
    try:
        check_gemm(m, n, k, seed=variant * 100 + m)
    finally:
        ops.set_gemm_variant(default)


# ---- The mid-size NVFP4 GEMM (prefill: x staged in shared memory, 64 rows per block) ---------------------------

MID_ROWS = [1, 9, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 129, 200, 256, 511]


@pytest.mark.parametrize("m", MID_ROWS)
@pytest.mark.parametrize("n,k", ODD_SHAPES)
def test_gemm_mid_odd_shapes(m, n, k):
    check_gemm(m, n, k, seed=m * 1000 + n + k + 1, linear=ops.nvfp4_linear_mid)


@pytest.mark.parametrize("m", [16, 32, 128, 512])
@pytest.mark.parametrize("n,k", LAYER_SHAPES)
def test_gemm_mid_layer_shapes(m, n, k):
    check_gemm(m, n, k, seed=7 * m + n + 3 * k + 1, linear=ops.nvfp4_linear_mid)


@pytest.mark.parametrize("m", [12, 100])
@pytest.mark.parametrize("splits", [1, 2, 3, 8, 32])
def test_gemm_mid_forced_splits_and_bias(m, splits):
    """Split-K down to one super-tile per split (shorter than the x ring), bias in the last block's sum."""
    check_gemm(m, 4096, 4096, seed=splits + m, splits=splits, bias=True, linear=ops.nvfp4_linear_mid)


@pytest.mark.parametrize("rows,tw", [(16, 1), (16, 2), (32, 1), (32, 2), (64, 1), (64, 2)])
@pytest.mark.parametrize("m,n,k", [(1, 1000, 1040), (100, 4096, 4096), (33, 257, 2064)])
def test_gemm_mid_overrides(rows, tw, m, n, k):
    """Every row block and tile width the sweep times (ops.mid_override) computes the same function."""
    with ops.mid_override(rows, tw):
        check_gemm(m, n, k, seed=rows + tw + m, linear=ops.nvfp4_linear_mid)


def test_gemm_mid_strided_rows():
    """x as a view with a row stride (a fused projection's slice) gives the contiguous copy's result."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    weight = random_nvfp4(1000, 1040, gen)
    packed = layout.repack(weight, DEV)
    wide = torch.randn(130, 1040 + 24, device=DEV, generator=gen).to(torch.bfloat16)
    x = wide[:, 8:8 + 1040]
    assert torch.equal(ops.nvfp4_linear_mid(x, packed), ops.nvfp4_linear_mid(x.contiguous(), packed))


def expert_groups(rows_per_expert: list[int], device, size: int = 64) -> tuple:
    """Tables for the grouped kernels: each expert's rows (consecutive row ids, experts in order) cut into groups of
    at most `size`; experts with no rows get no group."""
    offsets, group_expert, start = [0], [], 0
    for expert, count in enumerate(rows_per_expert):
        for first in range(0, count, size):
            offsets.append(start + min(count, first + size))
            group_expert.append(expert)
        start += count
    as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return (as_int(offsets), as_int(group_expert), torch.arange(start, dtype=torch.int32, device=device),
            as_int([len(group_expert)]))


@pytest.mark.parametrize("rows_per_expert,hidden,inter,size", [
    ([0, 1, 64, 65, 200, 7], 512, 256, 64), ([130] * 3, 2048, 768, 64), ([3, 0, 0, 129], 272, 144, 64),
    ([5, 16, 0, 40], 256, 128, 16), ([33, 1, 70], 512, 256, 32)])
def test_gemm_mid_grouped_experts(rows_per_expert, hidden, inter, size):
    """The mid-size kernel's grouped form against fp32 math: each group through its expert's dequantized weights
    (groups of at most 16, 32 or 64 rows: the kernel's three row-block sizes)."""
    gen = torch.Generator(device=DEV).manual_seed(sum(rows_per_expert) + hidden)
    experts = len(rows_per_expert)
    gate_up = [random_nvfp4(2 * inter, hidden, gen) for _ in range(experts)]
    down = [random_nvfp4(hidden, inter, gen) for _ in range(experts)]
    stacked = ops.StackedExperts([layout.repack(w, DEV) for w in gate_up], [layout.repack(w, DEV) for w in down])
    rows = sum(rows_per_expert)
    x = torch.randn(rows, hidden, device=DEV, generator=gen).to(torch.bfloat16)
    table = expert_groups(rows_per_expert, DEV, size)
    poison_allocator()
    out = ops.grouped_linear_mid(x, 1, stacked, "gate_up", table, rows, size)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    ref = torch.empty(rows, 2 * inter, device=DEV)
    start = 0
    for expert, count in enumerate(rows_per_expert):
        ref[start:start + count] = x[start:start + count].float() @ nvfp4.dequantize(gate_up[expert], torch.float32).T
        start += count
    assert rel_error(out, ref.to(torch.bfloat16)) <= 1e-3


def test_gemm_mid_shared_expert_table():
    """one_expert_table's groups of 64 (the prefill shared expert) through the grouped mid-size kernel equal the
    dense mid-size GEMM on that expert, bit for bit (same kernel, same split plan per row block)."""
    gen = torch.Generator(device=DEV).manual_seed(11)
    gate_up = [random_nvfp4(512, 256, gen) for _ in range(3)]
    down = [random_nvfp4(256, 256, gen) for _ in range(3)]
    packed = [layout.repack(w, DEV) for w in gate_up]
    stacked = ops.StackedExperts(packed, [layout.repack(w, DEV) for w in down])
    x = torch.randn(300, 256, device=DEV, generator=gen).to(torch.bfloat16)
    grouped = ops.grouped_linear_mid(x, 1, stacked, "gate_up", ops.one_expert_table(300, 2, DEV), 300, 64, splits=1)
    dense = ops.nvfp4_linear_mid(x, packed[2], splits=1)
    assert torch.equal(grouped, dense)


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 1000, 1040), (40, 272, 2064)])
def test_gemm_special_block_scales(m, n, k):
    """Negative, zero and subnormal E4M3 block scales (the layout folds signs into the codes, zeroes the codes of
    zero scales and normalises subnormals): the kernel still computes the reference's products."""
    gen = torch.Generator(device=DEV).manual_seed(n + m)
    weight = random_nvfp4(n, k, gen)
    scales = weight.block_scale.float()
    pick = torch.rand(scales.shape, device=DEV, generator=gen)
    scales = torch.where(pick < 0.2, -scales, scales)
    scales = torch.where((pick > 0.2) & (pick < 0.3), torch.zeros_like(scales), scales)
    scales = torch.where((pick > 0.3) & (pick < 0.4), torch.full_like(scales, 2 ** -9) * (1 + (pick > 0.35)), scales)
    weight.block_scale = scales.to(torch.float8_e4m3fn)
    packed = layout.repack(weight, DEV)
    x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
    ref = (x.float() @ nvfp4.dequantize(weight, torch.float32).T).to(torch.bfloat16)
    for linear in (ops.nvfp4_linear, ops.nvfp4_linear_mid):
        poison_allocator()
        out = linear(x, packed)
        assert torch.isfinite(out).all()
        assert rel_error(out, ref) <= 1e-3


@pytest.mark.parametrize("n,k", [(4096, 4096), (40, 272), (13, 4112), (2048, 768)])
def test_nvfp4_dequantize_is_exact(n, k):
    """The layout's dense dequantization (for dense-GEMM paths) is e2m1 x block_scale, bit-exact in bf16."""
    gen = torch.Generator(device=DEV).manual_seed(n * 3 + k)
    weight = random_nvfp4(n, k, gen)
    packed = layout.repack(weight, DEV)
    codes = nvfp4.e2m1_decode(nvfp4.unpack_nibbles(weight.packed)).float()
    exact = (codes.view(n, -1, 16) * weight.block_scale.float().unsqueeze(-1)).view(n, k)
    poison_allocator()
    out = ops.nvfp4_dequantize(packed)
    assert torch.equal(out.float(), exact.to(torch.bfloat16).float())
    assert torch.equal(exact.to(torch.bfloat16).float(), exact)  # the products are exact in bf16


@pytest.mark.parametrize("m", [65, 100, 200])
def test_gemm_rows_beyond_one_launch(m):
    check_gemm(m, 1000, 1040, seed=m)


def test_gemm_matches_reference_backend_linear():
    from adaq.backends.cuda import CudaBackend
    from adaq.backends.reference import ReferenceBackend

    gen = torch.Generator(device=DEV).manual_seed(5)
    weight = random_nvfp4(2048, 1024, gen)
    x = torch.randn(3, 1024, device=DEV, generator=gen).to(torch.bfloat16)
    reference = ReferenceBackend(DEV)
    cuda = CudaBackend(DEV)
    ref = reference.linear(x, reference.prepare_linear(weight, dtype=torch.bfloat16))
    out = cuda.linear(x, cuda.prepare_linear(weight, dtype=torch.bfloat16))
    assert rel_error(out, ref) < 1e-2  # the reference rounds the dequantized weights to bf16 first


# ---- MoE ---------------------------------------------------------------------------------------------------------

def moe_ref_fp32(x, logits, gate_up, down, top_k, renormalize):
    weights, chosen = moe.route(logits, top_k, renormalize)
    out = torch.zeros(x.shape, dtype=torch.float32, device=DEV)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = chosen[t, j].item()
            h = x[t].float() @ nvfp4.dequantize(gate_up[e], torch.float32).T
            g, u = h.chunk(2)
            y = (torch.nn.functional.silu(g) * u) @ nvfp4.dequantize(down[e], torch.float32).T
            out[t] += weights[t, j].float() * y
    return out, weights, chosen


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", [
    (1, 8, 2, 256, 128), (3, 16, 4, 512, 256), (16, 128, 8, 2048, 768), (64, 128, 8, 2048, 768),
    (70, 32, 4, 256, 128), (5, 60, 4, 272, 144)])
def test_moe_decode(tokens, experts, top_k, hidden, inter, monkeypatch):
    """The NVFP4 decode kernels' MoE (from 64 tokens `auto` would take the FP8 path: pinned to exact here)."""
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "exact")
    check_moe_decode(tokens, experts, top_k, hidden, inter)


def check_moe_decode(tokens, experts, top_k, hidden, inter):
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(tokens * 31 + experts)
    gate_up_pairs = [[random_nvfp4(inter, hidden, gen), random_nvfp4(inter, hidden, gen)] for _ in range(experts)]
    for pair in gate_up_pairs:  # llm-compressor links gate/up global scales
        pair[1].global_scale = pair[0].global_scale
    down = [random_nvfp4(hidden, inter, gen) for _ in range(experts)]
    x = (torch.randn(tokens, hidden, device=DEV, generator=gen) * 0.05).to(torch.bfloat16)
    logits = torch.randn(tokens, experts, device=DEV, generator=gen).to(torch.bfloat16)
    backend = CudaBackend(DEV)
    handle = backend.prepare_experts(gate_up_pairs, down, dtype=torch.bfloat16)
    poison_allocator()
    out = backend.moe(x, logits, handle, top_k, True)
    fused = [NVFP4Weight(torch.cat([p[0].packed, p[1].packed]), torch.cat([p[0].block_scale, p[1].block_scale]),
                         p[0].global_scale) for p in gate_up_pairs]
    ref, _, chosen = moe_ref_fp32(x, logits, fused, down, top_k, True)
    weights, ids = ops.router_topk(logits, top_k, True)
    assert_same_topk(logits, ids, chosen)
    assert torch.isfinite(out).all()
    error = rel_error(out, ref)
    assert error < 2e-2, f"MoE relative error {error:.2e} (bf16 intermediates)"


@pytest.mark.parametrize("variant", [1, 2, 3, 4, 5, 6, 7, 8])
def test_moe_decode_gemm_variants(variant):
    """The grouped expert GEMMs compute the same MoE layer with every GEMM variant (the default picks one per shape)."""
    default = ops.gemm_variant()
    ops.set_gemm_variant(variant)
    try:
        check_moe_decode(5, 60, 4, 272, 144)
        check_moe_decode(16, 32, 4, 512, 256)
    finally:
        ops.set_gemm_variant(default)


def assert_same_topk(logits, ids, ref_ids):
    """Same chosen logits in the same order; bf16 logits tie often, and torch.topk orders ties arbitrarily."""
    chosen = logits.float().gather(1, ids.long())
    expected = logits.float().gather(1, ref_ids.long())
    assert torch.equal(chosen, expected)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()


def test_router_topk_matches_reference():
    gen = torch.Generator(device=DEV).manual_seed(1)
    logits = torch.randn(37, 128, device=DEV, generator=gen).to(torch.bfloat16)
    for renormalize in (True, False):
        ref_w, ref_ids = moe.route(logits, 8, renormalize)
        w, ids = ops.router_topk(logits, 8, renormalize)
        assert_same_topk(logits, ids, ref_ids)
        assert (w.float() - ref_w.float()).abs().max() <= 2 ** -8 * ref_w.float().abs().max()


# ---- KV cache store and attention ----------------------------------------------------------------------------

def make_cache(num_blocks, block_size, kv_heads, dim, dtype):
    cache = torch.empty(num_blocks, block_size, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
    cache.normal_()
    if dtype == torch.float8_e4m3fn:
        cache = cache.clamp(-400, 400).to(dtype)
        scale = torch.rand(num_blocks, block_size, kv_heads, device=DEV) * 0.02 + 1e-3
        return cache, scale
    return cache, None


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128, 256, 512])
def test_store_kv_bitwise(kv_dtype, dim):
    gen = torch.Generator(device=DEV).manual_seed(dim)
    tokens, kv_heads, block_size, blocks = 37, 4, 16, 8
    k = (torch.randn(tokens, kv_heads, dim, device=DEV, generator=gen) * 3).to(torch.bfloat16)
    v = torch.randn(tokens, 2 * kv_heads, dim, device=DEV, generator=gen).to(torch.bfloat16)[:, :kv_heads]  # strided
    slots = torch.randperm(blocks * block_size, device=DEV, generator=gen)[:tokens]
    slots[::5] = -1
    caches = []
    for _ in range(2):
        kc = torch.full((blocks, block_size, kv_heads, dim), 7.0, device=DEV).to(kv_dtype)
        vc = kc.clone()
        ks = torch.full((blocks, block_size, kv_heads), 7.0, device=DEV) if kv_dtype == torch.float8_e4m3fn else None
        vs = None if ks is None else ks.clone()
        caches.append((kc, vc, ks, vs))
    # The spec (ARCHITECTURE.md): s = amax / 448 by true division. torch on the GPU divides a tensor by a Python
    # scalar as a multiply by its reciprocal (1 ulp off for some tokens), so the reference runs on CPU copies.
    cpu = [None if c is None else c.cpu() for c in caches[0]]
    attention.store_kv_reference(k.cpu(), v.cpu(), *cpu, slots.cpu())
    caches[0] = [None if c is None else c.to(DEV) for c in cpu]
    ops.store_kv(k, v, *caches[1], slots)
    for name, ref, out in zip(("k_cache", "v_cache", "k_scale", "v_scale"), caches[0], caches[1]):
        if ref is None:
            continue
        ref_bits = ref.view(torch.uint8) if ref.dtype == torch.float8_e4m3fn else ref
        out_bits = out.view(torch.uint8) if out.dtype == torch.float8_e4m3fn else out
        bad = (ref_bits != out_bits).nonzero()
        assert bad.numel() == 0, (f"{name}: {bad.shape[0]} of {ref.numel()} differ, first at {bad[:3].tolist()}: "
                                  f"reference {ref_bits[tuple(bad[0])].item()} kernel {out_bits[tuple(bad[0])].item()}")


ATTN_CASES = [  # heads, kv_heads, head_dim, sliding_window, softcap
    (32, 8, 128, None, None),  # Qwen3-8B
    (32, 4, 128, None, None),  # Qwen3-30B-A3B
    (32, 16, 128, 1024, None),  # Gemma3-27B local layer
    (4, 1, 256, 512, None),  # Gemma3-270M local layer
    (8, 8, 64, None, 50.0),  # softcap, no GQA
    (16, 2, 256, None, None),
    (24, 4, 256, None, None),  # Qwen3.5-27B full-attention layer: groups of 6
    (32, 4, 512, None, 30.0),  # Gemma4-31B global layer (its final softcap on the attention for coverage)
    (16, 2, 512, None, None),  # Gemma4-26B-A4B global layer
    (4, 4, 512, 700, None),  # head_dim 512, no GQA, sliding window
    (6, 3, 512, None, None),  # 2 heads per KV head, odd KV heads
]



@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap", ATTN_CASES)
@pytest.mark.parametrize("lens", [[1], [17, 1, 300], [8192], [5000, 33, 2049, 4096]])
def test_decode_attention(kv_dtype, heads, kv_heads, dim, window, softcap, lens):
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(sum(lens) + heads + dim)
    block_size = 16
    num_blocks = sum(-(-n // block_size) for n in lens) + 4
    k_cache, k_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    v_cache, v_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = torch.randn(len(lens), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    scale = dim ** -0.5
    ref = attention.attention_reference(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=scale,
                                        sliding_window=window, softcap=softcap)
    poison_allocator()
    out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=scale, sliding_window=window,
                                     softcap=softcap)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < 4e-3  # both round the same fp32 result to bf16


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_prefill_attention_chunked(kv_dtype):
    """Prefill over the cache: two sequences, one with a cached prefix (chunked prefill), sliding window."""
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(3)
    heads, kv_heads, dim, block_size = 8, 2, 128, 16
    lens, q_lens = [40, 300], [40, 77]
    num_blocks = 64
    k_cache, k_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    v_cache, v_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    ctx.is_prefill = True
    ctx.cu_seqlens_q = torch.tensor([0, 40, 117], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    for window in (None, 64):
        ref = attention.attention_reference(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=0.1,
                                            sliding_window=window)
        out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=0.1,
                                         sliding_window=window)
        assert rel_error(out, ref) < 4e-3


@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap", ATTN_CASES[:3] + ATTN_CASES[4:5])
def test_decode_attention_other_variants(variant, kv_dtype, heads, kv_heads, dim, window, softcap):
    """The non-default kernels (1: v2 on CUDA cores, 2: tensor cores with the other tiling, 3: splits merged in the
    kernel by the last block) stay correct."""
    with ops.attention_variant(variant):
        test_decode_attention(kv_dtype, heads, kv_heads, dim, window, softcap, [5000, 33, 2049, 4096])


@pytest.mark.parametrize("block_size", [8, 32, 48])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_decode_attention_block_sizes(block_size, kv_dtype):
    """Pages of 32/48 keys (tensor-core kernel, 16-key chunks inside a page) and of 8 (falls back to v2)."""
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(block_size)
    lens = [700, 1, 95, 3000]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, k_scale = make_cache(num_blocks, block_size, 4, 128, kv_dtype)
    v_cache, v_scale = make_cache(num_blocks, block_size, 4, 128, kv_dtype)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = torch.randn(len(lens), 16, 128, device=DEV, generator=gen).to(torch.bfloat16)
    for window in (None, 100):
        ref = attention.attention_reference(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=0.09,
                                            sliding_window=window)
        poison_allocator()
        out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=0.09,
                                         sliding_window=window)
        assert rel_error(out, ref) < 4e-3


# Against fp32 attention on the same dequantized cache: the bf16 output's own rounding (unit roundoff 2^-8, ~1.6e-3
# RMS relative) plus f16 P (2^-11). Device run 3 saw up to 2.07e-3 (head_dim 64, q x 3e4: softmax almost one-hot,
# the output one V row, where the bf16 rounding of 512 values alone fluctuates around 1.6-2e-3).
FP8_ATTENTION_BOUND = 3e-3


@pytest.mark.parametrize("q_mul,v_mul", [(1.0, 1.0), (3e4, 1.0), (1e-6, 1.0), (1.0, 1e-9), (30.0, 1e5)])
@pytest.mark.parametrize("dim,heads,kv_heads", [(128, 32, 8), (256, 16, 2), (64, 8, 8), (512, 32, 4)])
def test_attention_fp8_error_bound_over_ranges(q_mul, v_mul, dim, heads, kv_heads):
    """q far beyond f16's range (|q| ~ 1e5) or tiny, V scales from 1e-11 to 1e3: the kernel's power-of-two
    scalings (q to f16, P * vs / cv) keep the stated bound against fp32 attention over the dequantized cache."""
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(dim + int(math.log10(q_mul) * 7 + math.log10(v_mul)))
    lens, block_size = [3000, 17, 8192], 16
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    k_cache, k_scale = make_cache(num_blocks, block_size, kv_heads, dim, torch.float8_e4m3fn)
    v_cache, v_scale = make_cache(num_blocks, block_size, kv_heads, dim, torch.float8_e4m3fn)
    v_scale *= v_mul
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = (torch.randn(len(lens), heads, dim, device=DEV, generator=gen) * q_mul).to(torch.bfloat16)
    scale = dim ** -0.5
    poison_allocator()
    out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=scale)
    check_decode_against_fp32(out, q, (k_cache, k_scale, v_cache, v_scale), ctx, lens, scale, FP8_ATTENTION_BOUND)


@pytest.mark.parametrize("variant", [0, 3])
def test_attention_graph_replays_fresh_queries_and_cache(variant):
    """Decode attention with splits, captured once, replayed over new q and cache contents: equal to eager (variant 3:
    the in-kernel split merge resets its counters for the next replay)."""
    with ops.attention_variant(variant):
        check_attention_graph_replay()


def check_attention_graph_replay():
    gen = torch.Generator(device=DEV).manual_seed(21)
    lens, block_size = [8192, 100, 1500], 16
    num_blocks = sum(-(-n // block_size) for n in lens)
    k_cache, k_scale = make_cache(num_blocks, block_size, 8, 128, torch.float8_e4m3fn)
    v_cache, v_scale = make_cache(num_blocks, block_size, 8, 128, torch.float8_e4m3fn)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = torch.randn(len(lens), 32, 128, device=DEV, generator=gen).to(torch.bfloat16)
    splits = ops.attention_splits(len(lens), 8, max(lens), head_dim=128, group=4, fp8=True, block_size=16)
    assert splits > 1

    def run():
        return ops.paged_attention(q, k_cache, v_cache, k_scale, v_scale, ctx.block_tables, ctx.context_lens,
                                   scale=0.088, splits=splits)

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(2):
        q.copy_(torch.randn(q.shape, device=DEV, generator=gen).to(torch.bfloat16))
        fresh_k, fresh_ks = make_cache(num_blocks, block_size, 8, 128, torch.float8_e4m3fn)
        k_cache.copy_(fresh_k)
        k_scale.copy_(fresh_ks)
        graph.replay()
        assert torch.equal(out, run())


PREFILL_CASES = [  # heads, kv_heads, head_dim, sliding_window, softcap
    (32, 8, 128, None, None), (32, 4, 128, None, None), (32, 16, 128, 64, None), (8, 8, 64, None, 30.0),
    (4, 1, 256, 100, None), (16, 2, 256, None, None), (16, 16, 128, None, None), (24, 4, 256, None, None),
    (4, 1, 256, 100, None), (16, 2, 256, None, None), (16, 16, 128, None, None),
    (32, 4, 512, None, None), (16, 2, 512, 100, None), (4, 4, 512, None, 30.0), (12, 3, 512, None, None),
]


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap", PREFILL_CASES)
def test_prefill_attention_query_blocks(kv_dtype, heads, kv_heads, dim, window, softcap):
    """Packed prefill (several queries of a sequence per block): fresh prompts of odd lengths, a chunk against a
    cached prefix, a single query, an empty sequence; causal, windows, softcap; outputs poisoned."""
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(heads * dim + (window or 0))
    block_size = 16
    q_lens = [37, 1, 0, 130, 5, 16]
    lens = [37, 900, 12, 130, 5 + 300, 16]  # cached prefix where lens > q_lens (chunked prefill)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, k_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    v_cache, v_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    ctx.is_prefill = True
    offsets = [0]
    for n in q_lens:
        offsets.append(offsets[-1] + n)
    ctx.cu_seqlens_q = torch.tensor(offsets, dtype=torch.int32, device=DEV)
    q = torch.randn(offsets[-1], heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    ref = attention.attention_reference(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=dim ** -0.5,
                                        sliding_window=window, softcap=softcap)
    poison_allocator()
    out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=dim ** -0.5,
                                     sliding_window=window, softcap=softcap)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < 4e-3


def poison_page_tails(cache, ctx, lens, block_size):
    """NaN in every slot of a sequence's last page past its context: a kernel must never let one reach P.V."""
    nan = 0x7F if cache.dtype == torch.float8_e4m3fn else 0x7FC0
    raw = cache.view(torch.uint8 if cache.dtype == torch.float8_e4m3fn else torch.int16)
    for b, n in enumerate(lens):
        if n % block_size:
            raw[int(ctx.block_tables[b, n // block_size]), n % block_size:] = nan


LONG_PREFILL_CASES = [(32, 8, 128, None, None), (16, 16, 128, 1000, None), (8, 2, 64, None, 30.0),
                      (12, 3, 64, 100, None)]


@pytest.mark.parametrize("variant", [0, 4, 5])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap", LONG_PREFILL_CASES)
def test_prefill_attention_long_prompts(variant, kv_dtype, heads, kv_heads, dim, window, softcap):
    """Fresh prompts of 2048, 700 and 65 tokens and a 301-token chunk after a 1000-token prefix, through the flash
    kernel in both block sizes (8 and 4 warps: variants 0, 5) and v3's prefill (4); each last page's tail is NaN (never read); FP8 V
    scales spread over 2^-20 .. 2^20 per token for the flash kernel (its per-row power of two of the V scales), K
    scales over 2^-2 .. 2^2. Outputs poisoned; error per (token, head)."""
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(heads * dim + kv_heads)
    block_size = 16
    q_lens, lens = [2048, 700, 65, 301], [2048, 700, 65, 1301]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, k_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    v_cache, v_scale = make_cache(num_blocks, block_size, kv_heads, dim, kv_dtype)
    if kv_dtype == torch.float8_e4m3fn:  # wide K scales would make the softmax one-hot: an ill-posed comparison
        # v3 shares its power of two of the V scales across a warp's columns: a row whose keys all have V scales
        # 2^14 below a neighbour's falls into f16's subnormals there, so it gets a realistic spread (2^+-3)
        for scale, spread in ((k_scale, 2), (v_scale, 3 if variant == 4 else 20)):
            powers = torch.randint(-spread, spread + 1, scale.shape[:2], device=DEV, generator=gen).float()
            scale.mul_(torch.exp2(powers)[..., None])
    ctx = decode_context(lens, block_size, num_blocks, gen)
    for cache in (k_cache, v_cache):
        poison_page_tails(cache, ctx, lens, block_size)
    ctx.is_prefill = True
    ctx.cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    ref = attention.attention_reference(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=dim ** -0.5,
                                        sliding_window=window, softcap=softcap)
    with ops.attention_variant(variant):
        poison_allocator()
        out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=dim ** -0.5,
                                         sliding_window=window, softcap=softcap)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < 4e-3
    per_row = (out.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1).clamp(min=1e-30)
    assert per_row.max().item() < 2e-2


# ---- element-wise ------------------------------------------------------------------------------------------------

def assert_close_bf16(out, ref, ulps=1, fraction=0.002):
    """Equal up to `ulps` bf16 ulps, and off at all in at most `fraction` of the elements (rounding-order ties)."""
    out, ref = out.float(), ref.float()
    ulp = torch.clamp(ref.abs(), min=1e-30) * 2 ** -7
    assert ((out - ref).abs() <= ulps * ulp + 1e-30).all()
    assert (out != ref).float().mean().item() <= fraction


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 4096), (7, 5376), (33, 640), (5, 32, 128), (3, 5, 64), (9, 256), (2, 1152),
                                   (17, 2048), (1, 8192), (3, 12288), (2, 20480), (131, 4096)])
def test_rms_norm(unit_offset, shape):
    gen = torch.Generator(device=DEV).manual_seed(shape[0])
    x = torch.randn(*shape, device=DEV, generator=gen).to(torch.bfloat16)
    w = torch.randn(shape[-1], device=DEV, generator=gen).to(torch.bfloat16)
    assert_close_bf16(ops.rms_norm(x, w, 1e-6, unit_offset), norm.rms_norm(x, w, 1e-6, unit_offset))


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 4096), (7, 5376), (33, 640), (3, 5, 64), (16, 2048), (2, 12288), (131, 4096)])
def test_add_rms_norm(unit_offset, shape):
    gen = torch.Generator(device=DEV).manual_seed(shape[0] + 1)
    x, delta = (torch.randn(*shape, device=DEV, generator=gen).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(shape[-1], device=DEV, generator=gen).to(torch.bfloat16)
    total, normed = ops.add_rms_norm(x, delta, w, 1e-6, unit_offset)
    assert torch.equal(total, x + delta)
    assert_close_bf16(normed, norm.rms_norm(x + delta, w, 1e-6, unit_offset))


def test_rms_norm_strided_heads():
    gen = torch.Generator(device=DEV).manual_seed(9)
    qkv = torch.randn(6, 48 * 128, device=DEV, generator=gen).to(torch.bfloat16)
    q = qkv[:, :32 * 128].reshape(6, 32, 128)  # a view with a token stride of 48 heads
    w = torch.randn(128, device=DEV, generator=gen).to(torch.bfloat16)
    assert_close_bf16(ops.rms_norm(q, w, 1e-6, False), norm.rms_norm(q, w, 1e-6, False))


@pytest.mark.parametrize("rows,inter", [(1, 12288), (9, 768), (64, 2048), (3, 21504)])
def test_gated_activations(rows, inter):
    gen = torch.Generator(device=DEV).manual_seed(rows)
    x = (torch.randn(rows, 2 * inter, device=DEV, generator=gen) * 3).to(torch.bfloat16)
    assert_close_bf16(ops.silu_and_mul(x), activation.silu_and_mul(x))
    assert_close_bf16(ops.gelu_tanh_and_mul(x), activation.gelu_tanh_and_mul(x), fraction=0.01)


@pytest.mark.parametrize("heads,kv_heads,dim,base", [(32, 8, 128, 1e6), (4, 1, 256, 1e4), (8, 8, 64, 1e4)])
def test_rotary(heads, kv_heads, dim, base):
    gen = torch.Generator(device=DEV).manual_seed(dim)
    tokens = 19
    q = torch.randn(tokens, heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    k = torch.randn(tokens, kv_heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    positions = torch.randint(0, 40000, (tokens,), device=DEV, generator=gen)
    inv_freq = layers_rotary.inverse_frequencies(dim, {"rope_theta": base}).to(DEV)
    q_ref, k_ref = rotary.apply_rotary(q, k, *rotary.cos_sin(positions, inv_freq, q.dtype))
    q_out, k_out = ops.rotary(q, k, positions, inv_freq)
    assert_close_bf16(q_out, q_ref, ulps=2, fraction=0.01)
    assert_close_bf16(k_out, k_ref, ulps=2, fraction=0.01)


# ---- CUDA graphs ---------------------------------------------------------------------------------------------------

def test_graph_capture_of_kernels_replays_fresh_inputs():
    """GEMM (split-K), store, attention (splits) captured once, replayed on new data: same as eager."""
    gen = torch.Generator(device=DEV).manual_seed(11)
    weight = layout.repack(random_nvfp4(4096, 4096, gen), DEV)
    x = torch.randn(4, 4096, device=DEV, generator=gen).to(torch.bfloat16)
    ops.counters(DEV)
    ops.nvfp4_linear(x, weight)  # warm-up (build, lazy init)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.nvfp4_linear(x, weight)
    for _ in range(3):
        x.copy_(torch.randn(4, 4096, device=DEV, generator=gen).to(torch.bfloat16))
        graph.replay()
        assert torch.equal(y, ops.nvfp4_linear(x, weight))


# ---- end to end ----------------------------------------------------------------------------------------------------

NEAR_TIE_NATS = 0.1  # a divergence is accepted when the reference's top two tokens were this close


def build_engine(source, backend_name):
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine
    from adaq.backends import get_backend
    from adaq.models import build_model, load_weights

    engine_config = EngineConfig(model=source.path, backend=backend_name, kv_cache_dtype="bf16", max_model_len=256,
                                 max_num_seqs=4, max_num_batched_tokens=1024, num_kv_blocks=80, device=DEV,
                                 skip_tokenizer=True)
    model = build_model(source.config, get_backend(backend_name, DEV), torch.bfloat16, DEV)
    load_weights(model, source)
    return LLMEngine(engine_config, model=model, model_config=source.config)


@pytest.mark.parametrize("layers,lengths", [(8, (5, 17, 64, 128)), (4, (9, 33, 70))])
def test_end_to_end_greedy_matches_reference(layers, lengths, monkeypatch):
    """A Qwen3-8B-shaped random NVFP4 model (its shapes, `layers` of its 36 layers), bf16 KV: the cuda and reference
    backends give the same greedy tokens for 4 prompts x 64 tokens; a divergence must follow a near-tie of the
    reference's top two tokens (measured by scoring both continuations with the reference), and is reported.
    Exact prefill on both sides (the FP8 path is checked against its own emulation in test_prefill_fp8.py)."""
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "exact")
    from adaq.bench.shapes import load_model_config
    from adaq.bench.synthetic import SyntheticCheckpoint
    from adaq.engine.sampling_params import SamplingParams

    config = dict(load_model_config("qwen3-8b"))
    config["num_hidden_layers"] = layers
    source = SyntheticCheckpoint(config, quantized=True, device=DEV)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config["vocab_size"], (n,), generator=gen).tolist() for n in lengths]  # 3: a padded row
    greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    reference = build_engine(source, "reference")
    ref_tokens = [o.token_ids for o in run_requests(reference, prompts, greedy)]
    cuda = build_engine(source, "cuda")
    assert cuda.runner.decode_graphs is not None, "the cuda backend should decode through CUDA graphs"
    cuda_tokens = [o.token_ids for o in run_requests(cuda, prompts, greedy)]
    report = check_divergences(reference, prompts, ref_tokens, cuda_tokens, NEAR_TIE_NATS)
    print("end-to-end cuda vs reference:", "; ".join(report))
