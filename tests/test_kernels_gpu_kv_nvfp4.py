"""The NVFP4 KV cache's kernels (store, decode and prefill attention) against the reference, on fresh random data,
outputs poisoned before each run. Skipped without CUDA.

Kernel error is tested apart from quantization error: attention is compared with the reference's fp32 attention over
the same NVFP4 bytes dequantized (adaq.backends.numerics.attention.dequantize_kv_nvfp4), which the kernel reproduces
exactly in f16 (e2m1 * s * 2^-7); what remains is the FP8 path's: P rounded to f16 and the bf16 output.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from helpers.paged import decode_context  # noqa: E402
from helpers.gpu_checks import (  # noqa: E402
    check_decode_against_fp32, poison_allocator, rel_error)
from adaq.backends.numerics import attention  # noqa: E402
from adaq.kernels import ops  # noqa: E402

DEV = torch.device("cuda")
# Same roundings as the FP8 path (tests/test_kernels_gpu.py): the bf16 output (~1.6e-3 RMS) and f16 P (2^-11).
NVFP4_ATTENTION_BOUND = 4e-3

ATTN_CASES = [  # heads, kv_heads, head_dim, sliding_window, softcap
    (32, 8, 128, None, None),  # Qwen3-8B
    (32, 4, 128, None, None),  # Qwen3-30B-A3B
    (32, 16, 128, 1024, None),  # Gemma3-27B local layer
    (4, 1, 256, 512, None),  # Gemma3-270M local layer
    (8, 8, 64, None, 50.0),  # softcap, no GQA
    (16, 2, 256, None, None),
    (64, 8, 64, 100, None),  # 8 heads per KV head, head_dim 64
    (24, 4, 256, None, None),  # Qwen3.5-27B full-attention layer: groups of 6
    (32, 4, 512, None, None),  # Gemma4-31B global layer
    (16, 2, 512, 300, 30.0),  # Gemma4-26B-A4B global layer shape, window and softcap
    (4, 1, 512, None, None), (12, 3, 512, None, None),  # 4 heads per KV head (2 chunks per step), odd KV heads
]
PREFILL_CASES = [  # heads, kv_heads, head_dim, sliding_window, softcap
    (32, 8, 128, None, None), (32, 4, 128, None, None), (32, 16, 128, 64, None), (8, 8, 64, None, 30.0),
    (4, 1, 256, 100, None), (16, 2, 256, None, None), (16, 16, 128, None, None), (64, 8, 256, None, None),
    (24, 4, 256, None, None),
    (32, 4, 512, None, None), (16, 2, 512, 100, None), (4, 4, 512, None, 30.0), (12, 3, 512, None, None),
]


def wide_values(shape, gen, spread: int = 3, shift: int = 0) -> torch.Tensor:
    """N(0, 1) rows times 2^(shift + U(-spread, spread)) per (token, head), one channel in 8 times 4 (K-like
    outliers: blocks of one row get different E4M3 scales)."""
    x = torch.randn(shape, device=DEV, generator=gen)
    powers = torch.randint(-spread, spread + 1, shape[:-1], device=DEV, generator=gen).float() + shift
    x = x * torch.exp2(powers)[..., None]
    x[..., ::8] *= 4
    return x


# Per-token spreads: K 2^+-1 (wider makes the softmax one-hot, an ill-posed comparison), V 2^+-3 (the tensor-core
# kernel shares one power of two of the V scales per warp step: a key whose V is 2^14 below its neighbours' falls
# into f16's subnormals, as docs/KERNELS.md says for FP8; real caches vary far less per token).
K_SPREAD, V_SPREAD = 1, 3


def make_nvfp4_cache(num_blocks, block_size, kv_heads, dim, gen, spread: int = V_SPREAD, shift: int = 0):
    """(rows uint8 [blocks, bs, Hkv, D/2 + D/16], exponents uint8 [blocks, bs, Hkv]) of quantized random values."""
    x = wide_values((num_blocks, block_size, kv_heads, dim), gen, spread, shift).to(torch.bfloat16).float()
    rows, exps = attention.quantize_kv_nvfp4(x)
    return rows.contiguous(), exps.contiguous()



def poison_page_tails(rows, exps, ctx, lens, block_size):
    """NaN scale bytes (0x7F) and exponent 255 past each sequence's context in its last page: never read."""
    dim = attention.nvfp4_kv_head_dim(rows.shape[-1])
    for b, n in enumerate(lens):
        if n % block_size:
            page = int(ctx.block_tables[b, n // block_size])
            rows[page, n % block_size:, :, dim // 2:] = 0x7F
            exps[page, n % block_size:] = 255


# ---- store -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [64, 128, 256, 512])
def test_store_kv_nvfp4_bitwise(dim):
    """ops.store_kv into an NVFP4 cache writes the reference's bytes exactly (rows and exponents), skips slot -1,
    reads strided V; rows of every magnitude, a zero row, a tiny block, exact E2M1 ties."""
    gen = torch.Generator(device=DEV).manual_seed(dim)
    tokens, kv_heads, block_size, blocks = 37, 4, 16, 8
    k = wide_values((tokens, kv_heads, dim), gen, spread=40).to(torch.bfloat16)
    k[3, 1] = 0
    k[5, 0, 16:32] *= 1e-6
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], device=DEV)
    k[7, 2] = 0
    k[7, 2, :16] = torch.cat([ties, -ties]).to(torch.bfloat16)  # amax 6: e = -8, scale 256, step 1: exact ties
    v = wide_values((tokens, 2 * kv_heads, dim), gen).to(torch.bfloat16)[:, :kv_heads]  # strided heads
    slots = torch.randperm(blocks * block_size, device=DEV, generator=gen)[:tokens]
    slots[::5] = -1
    width = attention.nvfp4_kv_row_bytes(dim)
    caches = []
    for _ in range(2):
        kc = torch.full((blocks, block_size, kv_heads, width), 7, dtype=torch.uint8, device=DEV)
        ke = torch.full((blocks, block_size, kv_heads), 7, dtype=torch.uint8, device=DEV)
        caches.append([kc, kc.clone(), ke, ke.clone()])
    cpu = [c.cpu() for c in caches[0]]  # the spec's divisions, as the FP8 test does (torch on CUDA may not divide)
    attention.store_kv_reference(k.cpu(), v.cpu(), *cpu, slots.cpu())
    caches[0] = [c.to(DEV) for c in cpu]
    ops.store_kv(k, v, *caches[1], slots)
    for name, ref, out in zip(("k_cache", "v_cache", "k_exponent", "v_exponent"), caches[0], caches[1]):
        bad = (ref != out).nonzero()
        assert bad.numel() == 0, (f"{name}: {bad.shape[0]} of {ref.numel()} bytes differ, first at "
                                  f"{bad[:3].tolist()}: reference {ref[tuple(bad[0])].item()} "
                                  f"kernel {out[tuple(bad[0])].item()}")


def test_store_kv_nvfp4_in_a_cuda_graph():
    """Captured once, replayed over fresh K/V and slots (-1 rows skipped): the replay writes what an eager call does."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    tokens, kv_heads, dim, blocks, block_size = 16, 8, 128, 4, 16
    k = torch.randn(tokens, kv_heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    v = torch.randn(tokens, kv_heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    slots = torch.arange(tokens, device=DEV)
    width = attention.nvfp4_kv_row_bytes(dim)
    cache = [torch.zeros(blocks, block_size, kv_heads, width, dtype=torch.uint8, device=DEV) for _ in range(2)]
    exps = [torch.zeros(blocks, block_size, kv_heads, dtype=torch.uint8, device=DEV) for _ in range(2)]
    ops.store_kv(k, v, *cache, *exps, slots)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.store_kv(k, v, *cache, *exps, slots)
    k.copy_(torch.randn(k.shape, device=DEV, generator=gen).to(torch.bfloat16) * 100)
    v.copy_(torch.randn(v.shape, device=DEV, generator=gen).to(torch.bfloat16) * 1e-3)
    slots.copy_(torch.randperm(blocks * block_size, device=DEV, generator=gen)[:tokens])
    slots[::3] = -1
    graph.replay()
    eager = [c.clone() for c in cache + exps]
    for t in eager:
        t.zero_()
    ops.store_kv(k, v, *eager[:2], *eager[2:], slots)
    written = slots[slots >= 0]
    for out, ref in zip(cache + exps, eager):
        flat_out, flat_ref = out.view(blocks * block_size, -1), ref.view(blocks * block_size, -1)
        assert torch.equal(flat_out[written], flat_ref[written])


# ---- attention ---------------------------------------------------------------------------------------------------

def run_attention(q, k_cache, v_cache, k_exp, v_exp, ctx, **kwargs):
    from adaq.backends.cuda import CudaBackend

    ref = attention.attention_reference(q, k_cache, v_cache, k_exp, v_exp, ctx, **kwargs)
    poison_allocator()
    out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_exp, v_exp, ctx, **kwargs)
    assert torch.isfinite(out).all()
    return out, ref


@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap", ATTN_CASES)
@pytest.mark.parametrize("lens", [[1], [17, 1, 300], [8192], [5000, 33, 2049, 4096]])
def test_decode_attention_nvfp4(heads, kv_heads, dim, window, softcap, lens):
    gen = torch.Generator(device=DEV).manual_seed(sum(lens) + heads + dim)
    block_size = 16
    num_blocks = sum(-(-n // block_size) for n in lens) + 4
    k_cache, k_exp = make_nvfp4_cache(num_blocks, block_size, kv_heads, dim, gen, spread=K_SPREAD)
    v_cache, v_exp = make_nvfp4_cache(num_blocks, block_size, kv_heads, dim, gen)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    poison_page_tails(k_cache, k_exp, ctx, lens, block_size)
    poison_page_tails(v_cache, v_exp, ctx, lens, block_size)
    q = torch.randn(len(lens), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    out, ref = run_attention(q, k_cache, v_cache, k_exp, v_exp, ctx, scale=dim ** -0.5, sliding_window=window,
                             softcap=softcap)
    assert rel_error(out, ref) < NVFP4_ATTENTION_BOUND


@pytest.mark.parametrize("variant", [3])
def test_decode_attention_nvfp4_in_kernel_merge(variant):
    """Variant 3 merges the splits in the kernel (counters) for NVFP4 too."""
    with ops.attention_variant(variant):
        test_decode_attention_nvfp4(32, 8, 128, None, None, [5000, 33, 2049, 4096])


@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap", [
    (32, 8, 128, None, None), (32, 4, 128, None, None), (32, 16, 128, 1024, None), (16, 16, 128, None, 30.0),
    (4, 1, 256, 512, None), (16, 2, 256, None, None), (16, 8, 256, None, None), (24, 4, 256, None, None),
    (32, 32, 256, None, None)])
def test_decode_attention_nvfp4_other_tiling(heads, kv_heads, dim, window, softcap):
    """Variant 2 runs head dims 128 and 256 with the other chunks per warp step (csrc/attention.cu
    visit_attention_nv4): the same bound, every group."""
    with ops.attention_variant(2):
        test_decode_attention_nvfp4(heads, kv_heads, dim, window, softcap, [5000, 33, 2049, 4096])
        test_decode_attention_nvfp4(heads, kv_heads, dim, window, softcap, [1])


@pytest.mark.parametrize("q_mul,v_shift", [(1.0, 0), (3e4, 0), (1e-6, 0), (1.0, -30), (30.0, 30)])
@pytest.mark.parametrize("dim,heads,kv_heads", [(128, 32, 8), (256, 16, 2), (64, 8, 8)])
def test_attention_nvfp4_error_bound_over_ranges(q_mul, v_shift, dim, heads, kv_heads):
    """q far beyond f16's range or tiny, V caches around 2^-30, 1 and 2^30 (exponents far from 0): the kernel's
    powers of two (q to f16, P * 2^(e + 7) / cv) keep the bound against fp32 attention over the same bytes."""
    gen = torch.Generator(device=DEV).manual_seed(dim + int(math.log10(q_mul) * 7) + v_shift)
    lens, block_size = [3000, 17, 8192], 16
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    k_cache, k_exp = make_nvfp4_cache(num_blocks, block_size, kv_heads, dim, gen, spread=K_SPREAD)
    v_cache, v_exp = make_nvfp4_cache(num_blocks, block_size, kv_heads, dim, gen, shift=v_shift)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = (torch.randn(len(lens), heads, dim, device=DEV, generator=gen) * q_mul).to(torch.bfloat16)
    scale = dim ** -0.5
    from adaq.backends.cuda import CudaBackend

    poison_allocator()
    out = CudaBackend(DEV).attention(q, k_cache, v_cache, k_exp, v_exp, ctx, scale=scale)
    check_decode_against_fp32(out, q, (k_cache, k_exp, v_cache, v_exp), ctx, lens, scale, NVFP4_ATTENTION_BOUND)


@pytest.mark.parametrize("block_size", [8, 32, 48])
def test_decode_attention_nvfp4_block_sizes(block_size):
    """Pages of 32/48 keys on the kernel; pages of 8 fall back to the reference (the backend's rule)."""
    gen = torch.Generator(device=DEV).manual_seed(block_size)
    lens = [700, 1, 95, 3000]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, k_exp = make_nvfp4_cache(num_blocks, block_size, 4, 128, gen, spread=K_SPREAD)
    v_cache, v_exp = make_nvfp4_cache(num_blocks, block_size, 4, 128, gen)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = torch.randn(len(lens), 16, 128, device=DEV, generator=gen).to(torch.bfloat16)
    for window in (None, 100):
        out, ref = run_attention(q, k_cache, v_cache, k_exp, v_exp, ctx, scale=0.09, sliding_window=window)
        assert rel_error(out, ref) < NVFP4_ATTENTION_BOUND


@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap", PREFILL_CASES)
def test_prefill_attention_nvfp4(heads, kv_heads, dim, window, softcap):
    """Packed prefill over the NVFP4 cache: fresh prompts of odd lengths, a chunk against a cached prefix, a single
    query, an empty sequence, a 2048-token prompt; causal, windows, softcap; page tails NaN; outputs poisoned."""
    gen = torch.Generator(device=DEV).manual_seed(heads * dim + (window or 0))
    block_size = 16
    q_lens = [37, 1, 0, 130, 5, 16, 2048, 301]
    lens = [37, 900, 12, 130, 5 + 300, 16, 2048, 1301]  # cached prefix where lens > q_lens (chunked prefill)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, k_exp = make_nvfp4_cache(num_blocks, block_size, kv_heads, dim, gen, spread=K_SPREAD)
    v_cache, v_exp = make_nvfp4_cache(num_blocks, block_size, kv_heads, dim, gen)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    poison_page_tails(k_cache, k_exp, ctx, lens, block_size)
    poison_page_tails(v_cache, v_exp, ctx, lens, block_size)
    ctx.is_prefill = True
    offsets = [0]
    for n in q_lens:
        offsets.append(offsets[-1] + n)
    ctx.cu_seqlens_q = torch.tensor(offsets, dtype=torch.int32, device=DEV)
    q = torch.randn(offsets[-1], heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    out, ref = run_attention(q, k_cache, v_cache, k_exp, v_exp, ctx, scale=dim ** -0.5, sliding_window=window,
                             softcap=softcap)
    assert rel_error(out, ref) < NVFP4_ATTENTION_BOUND
    per_row = (out.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1).clamp(min=1e-30)
    assert per_row.max().item() < 2e-2


def test_store_then_attend_matches_reference_end_to_end():
    """bf16 K/V stored by the kernel, attended by the kernel, against the reference doing both: the same bytes, the
    same bound (Qwen3-8B heads, 3 sequences)."""
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(11)
    lens, block_size, kv_heads, heads, dim = [513, 64, 2000], 16, 8, 32, 128
    num_blocks = sum(-(-n // block_size) for n in lens) + 1
    ctx = decode_context(lens, block_size, num_blocks, gen)
    width = attention.nvfp4_kv_row_bytes(dim)
    caches = [torch.zeros(num_blocks, block_size, kv_heads, width, dtype=torch.uint8, device=DEV) for _ in range(2)]
    exps = [torch.zeros(num_blocks, block_size, kv_heads, dtype=torch.uint8, device=DEV) for _ in range(2)]
    backend = CudaBackend(DEV)
    for b, n in enumerate(lens):
        pages = ctx.block_tables[b].long()
        slots = pages[torch.arange(n, device=DEV) // block_size] * block_size + torch.arange(n, device=DEV) % block_size
        k = wide_values((n, kv_heads, dim), gen, spread=K_SPREAD).to(torch.bfloat16)
        v = wide_values((n, kv_heads, dim), gen).to(torch.bfloat16)
        backend.store_kv(k, v, *caches, *exps, slots)
    q = torch.randn(len(lens), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    out, ref = run_attention(q, *caches, *exps, ctx, scale=dim ** -0.5)
    assert rel_error(out, ref) < NVFP4_ATTENTION_BOUND


def test_microbench_runs_nvfp4():
    """adaq.bench.microbench.paged_attention with kv_dtype nvfp4 (issue 18's 8k / 32k entry) runs and reports."""
    from adaq.bench import microbench

    row = microbench.paged_attention(2, 1024, kv_dtype="nvfp4", copy_gbs=1000.0)
    assert row["kv_dtype"] == "nvfp4" and row["us"] > 0 and row["bytes"] == 2 * 2 * 1024 * 8 * 73
