"""The reference backend's ops against plain formulas: NVFP4 linears, FP8 KV store, paged attention, backends."""

import pytest
import torch

from adaq.backends.context import Context
from adaq.errors import AdaqError
from adaq.formats import nvfp4
from adaq.backends import get_backend
from adaq.backends.numerics.attention import (dequantize_kv_fp8, dequantize_kv_nvfp4, nvfp4_kv_row_bytes,
                                             quantize_kv_fp8, quantize_kv_nvfp4, store_kv_reference)
from adaq.backends.reference import ReferenceBackend
from adaq.formats.nvfp4 import quantize_activation_nvfp4
from adaq.layers.linear import Linear

LINEAR_SHAPES = [(1, 16, 16), (3, 48, 32), (7, 64, 80), (33, 128, 96)]  # (M, N, K), odd M included


def random_nvfp4(n: int, k: int, seed: int, input_global_scale: float | None = None) -> nvfp4.NVFP4Weight:
    generator = torch.Generator().manual_seed(seed)
    weight = nvfp4.quantize(torch.randn(n, k, generator=generator))
    if input_global_scale is not None:
        weight.input_global_scale = torch.tensor([input_global_scale])
    return weight


@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES)
@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_nvfp4_linear_is_dequantize_then_matmul(m, n, k, cache_bytes):
    backend = ReferenceBackend("cpu", dequant_cache_bytes=cache_bytes)
    weight = random_nvfp4(n, k, seed=m)
    handle = backend.prepare_linear(weight, dtype=torch.float32)
    assert (handle.dense is None) == (cache_bytes == 0)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    expected = x @ nvfp4.dequantize(weight).T + bias
    torch.testing.assert_close(backend.linear(x, handle, bias), expected, rtol=0, atol=1e-5)


def test_activation_emulation_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                            dynamic="local", scale_dtype=torch.float8_e4m3fn)
    x = torch.randn(9, 64) * torch.logspace(-2, 1, 64)  # blocks of very different ranges
    x[0, :16] = 0  # an all-zero block takes E4M3's smallest scale
    global_scale = torch.tensor([448 * 6 / 9.0])
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=global_scale)
    expected = fake_quantize(x, scale, zero_point, args, global_scale=global_scale)
    torch.testing.assert_close(quantize_activation_nvfp4(x, global_scale), expected, rtol=0, atol=0)


def test_w4a4_handle_quantizes_inputs_only_when_asked():
    weight = random_nvfp4(32, 64, seed=1, input_global_scale=448 * 6 / 3.0)
    x = torch.randn(5, 64)
    emulated = ReferenceBackend("cpu").prepare_linear(weight, dtype=torch.float32)
    weight_only = ReferenceBackend("cpu", activation_quant=False).prepare_linear(weight, dtype=torch.float32)
    dense = nvfp4.dequantize(weight)
    backend = ReferenceBackend("cpu")
    torch.testing.assert_close(backend.linear(x, emulated), quantize_activation_nvfp4(x, weight.input_global_scale)
                               @ dense.T)
    torch.testing.assert_close(backend.linear(x, weight_only), x @ dense.T)


def test_stacked_linear_fuses_only_with_equal_global_scales():
    backend = ReferenceBackend("cpu")
    shared = torch.tensor([700.0])
    parts = [nvfp4.quantize(torch.randn(n, 32), shared) for n in (16, 32, 48)]
    fused = Linear(backend, 32, [16, 32, 48])
    fused.load(parts, torch.float32)
    assert fused.fused
    apart = Linear(backend, 32, [16, 32, 48])
    apart.load([parts[0], nvfp4.quantize(torch.randn(32, 32)), parts[2]], torch.float32)
    assert not apart.fused and len(apart.handles) == 3
    x = torch.randn(4, 32)
    for linear in (fused, apart):
        expected = torch.cat([x @ h.weight().T for h in linear.handles], dim=-1)
        torch.testing.assert_close(linear(x), expected)


def test_stacked_linear_rejects_wrong_shapes():
    from adaq.errors import CheckpointError

    linear = Linear(ReferenceBackend("cpu"), 32, [16, 16])
    with pytest.raises(CheckpointError, match=r"\(16, 32\) was expected"):
        linear.load([torch.randn(16, 32), torch.randn(16, 48)], torch.float32)


def test_fp8_kv_rounding_is_per_token_and_head():
    x = torch.randn(6, 3, 32) * torch.tensor([1e-3, 1.0, 300.0])[None, :, None]
    x[2, 1] = 0
    stored, scale = quantize_kv_fp8(x)
    assert stored.dtype == torch.float8_e4m3fn and scale.shape == (6, 3)
    amax = x.abs().amax(-1)
    torch.testing.assert_close(scale, (amax / 448).clamp(min=1e-12), rtol=0, atol=0)
    assert scale[2, 1] == 1e-12
    torch.testing.assert_close(stored.float(), (x / scale[..., None]).to(torch.float8_e4m3fn).float())
    restored = dequantize_kv_fp8(stored, scale)
    # E4M3 keeps 3 mantissa bits: within 1/16 of each value, and subnormals within 2^-10 of the scale.
    bound = torch.maximum(x.abs() / 16, scale[..., None] * 2.0 ** -10)
    assert ((restored - x).abs() <= bound + 1e-12).all()
    assert (stored.float().abs().amax(-1)[amax > 0] == 448).all()


def test_nvfp4_kv_rounding_is_two_level_per_token_and_head():
    """E8M0 exponent per (token, head) puts the row's amax at <= 6 * 448; E4M3 scale per 16; E2M1 codes."""
    x = torch.randn(6, 3, 64) * torch.tensor([1e-3, 1.0, 300.0])[None, :, None]
    x[2, 1] = 0
    x[4, 0, 16:32] *= 1e-4  # a block far below the row's max keeps a normal E4M3 scale
    rows, exponent = quantize_kv_nvfp4(x)
    assert rows.dtype == torch.uint8 and rows.shape == (6, 3, nvfp4_kv_row_bytes(64)) == (6, 3, 36)
    assert exponent.dtype == torch.uint8 and exponent.shape == (6, 3)
    e = exponent.int() - 127
    amax = x.abs().amax(-1)
    live = amax > 0
    pow2 = torch.ldexp(torch.ones_like(amax), e)
    assert (amax[live] / pow2[live] <= 2688).all() and (amax[live] / pow2[live] > 1344).all()
    assert e[2, 1] == -100
    scales = rows[..., 32:].contiguous().view(torch.float8_e4m3fn).float()
    assert (scales.amax(-1)[live] >= 224).all() and (scales <= 448).all()
    restored = dequantize_kv_nvfp4(rows, exponent)
    assert (restored[2, 1] == 0).all()
    # E2M1 keeps 1 mantissa bit: within half a step of the block's grid, the step at most s * 2^e (values 4..6);
    # the scale's own E4M3 rounding (1/16) can push the block max past 6 * s: saturation costs at most amax / 16.
    step = (scales * pow2[..., None]).repeat_interleave(16, dim=-1)
    assert ((restored - x).abs() <= step + x.abs() / 16 + 1e-30).all()
    block_err = ((restored - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-30))[live]
    assert block_err.max() < 0.15  # ~9% RMS for Gaussian rows (FP8: ~2.5%)
    small = x[4, 0, 16:32]
    # the tiny block is quantized on its own scale, not flushed to 0
    assert (restored[4, 0, 16:32] - small).norm() < 0.2 * small.norm()


def test_nvfp4_kv_bytes_are_the_spec():
    """Codes, nibble order and the scale bytes, checked against adaq.formats.nvfp4's codec."""
    x = torch.tensor([[[0.5, -1.0, 6.0, -6.0] + [0.0] * 12 + [3.0] * 16]])  # [1, 1, 32]
    rows, exponent = quantize_kv_nvfp4(x)
    # amax 6 -> e = -8 (6 / 2^-8 = 1536 <= 2688 < 3072); block 0 scale (6/6) * 2^8 = 256, block 1 (3/6) * 2^8 = 128
    assert int(exponent) == 127 - 8
    assert rows[0, 0, 16:].view(torch.float8_e4m3fn).float().tolist() == [256.0, 128.0]
    # step 256 * 2^-8 = 1: 0.5 -> code 1, -1 -> 8 | 2; 6 -> 7, -6 -> 8 | 7 (element 2j in the low nibble)
    assert rows[0, 0, :3].tolist() == [0x1 | 0xA << 4, 0x7 | 0xF << 4, 0]
    assert rows[0, 0, 8:16].tolist() == [0x77] * 8  # 3.0 on step 128 * 2^-8 = 0.5: 6, code 7
    torch.testing.assert_close(dequantize_kv_nvfp4(rows, exponent), x, rtol=0, atol=0)


def test_store_kv_nvfp4_writes_slots_and_skips_minus_one():
    blocks, block_size, heads, dim = 5, 4, 2, 32
    k, v = torch.randn(6, heads, dim), torch.randn(6, heads, dim) * 0.01
    slots = torch.tensor([3, 17, -1, 0, 9, -1])
    width = nvfp4_kv_row_bytes(dim)
    k_cache = torch.full((blocks, block_size, heads, width), 7, dtype=torch.uint8)
    v_cache = k_cache.clone()
    k_scale = torch.full((blocks, block_size, heads), 7, dtype=torch.uint8)
    v_scale = k_scale.clone()
    store_kv_reference(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    written = slots >= 0
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows, exponent = quantize_kv_nvfp4(x[written])
        assert torch.equal(cache.view(-1, heads, width)[slots[written]], rows)
        assert torch.equal(scales.view(-1, heads)[slots[written]], exponent)
        untouched = torch.ones(blocks * block_size, dtype=torch.bool)
        untouched[slots[written]] = False
        assert (cache.view(-1, heads, width)[untouched] == 7).all() and (scales.view(-1, heads)[untouched] == 7).all()


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32])
def test_store_kv_writes_slots_and_skips_minus_one(kv_dtype):
    blocks, block_size, heads, dim = 5, 4, 2, 16
    k, v = torch.randn(6, heads, dim), torch.randn(6, heads, dim)
    slots = torch.tensor([3, 17, -1, 0, 9, -1])
    k_cache = torch.full((blocks, block_size, heads, dim), 7.0).to(kv_dtype)
    v_cache = k_cache.clone()
    fp8 = kv_dtype == torch.float8_e4m3fn
    k_scale = torch.full((blocks, block_size, heads), -1.0) if fp8 else None
    v_scale = k_scale.clone() if fp8 else None
    store_kv_reference(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    flat_k = k_cache.view(-1, heads, dim).float()
    written = slots >= 0
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        flat = cache.view(-1, heads, dim)
        values = dequantize_kv_fp8(flat[slots[written]], scales.view(-1, heads)[slots[written]]) if fp8 \
            else flat[slots[written]].float()
        expected = dequantize_kv_fp8(*quantize_kv_fp8(x[written])) if fp8 else x[written].to(kv_dtype).float()
        torch.testing.assert_close(values, expected, rtol=0, atol=0)
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots[written]] = False
    assert (flat_k[untouched] == 7.0).all()


def naive_attention(q, keys, values, first_position, scale, window=None, softcap=None):
    """One sequence, one head at a time, straight from the definition."""
    out = torch.zeros_like(q)
    group = q.shape[1] // keys.shape[1]
    for i in range(q.shape[0]):
        p = first_position + i
        lo = 0 if window is None else max(0, p - window + 1)
        for h in range(q.shape[1]):
            s = keys[lo:p + 1, h // group] @ q[i, h] * scale
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            out[i, h] = torch.softmax(s, 0) @ values[lo:p + 1, h // group]
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn, torch.uint8])
def test_paged_attention_mixed_prefill_chunks_and_decode(window, softcap, kv_dtype):
    """Three sequences in one step: a fresh prompt, a chunk after a cached prefix, one decode token."""
    heads, kv_heads, dim, block_size = 4, 2, 16, 4
    totals, q_lens = [11, 14, 9], [11, 6, 1]
    blocks_per_seq = 4
    table = torch.tensor([list(reversed(range(b * blocks_per_seq, (b + 1) * blocks_per_seq))) for b in range(3)],
                         dtype=torch.int32)
    keys = [torch.randn(n, kv_heads, dim) for n in totals]
    values = [torch.randn(n, kv_heads, dim) for n in totals]
    nvfp4_kv = kv_dtype == torch.uint8  # the NVFP4 cache: packed rows + E8M0 exponents
    shape = (3 * blocks_per_seq, block_size, kv_heads, nvfp4_kv_row_bytes(dim) if nvfp4_kv else dim)
    k_cache, v_cache = torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype)
    fp8 = kv_dtype == torch.float8_e4m3fn
    scale_dtype = torch.uint8 if nvfp4_kv else torch.float32
    k_scale, v_scale = (torch.zeros(shape[:-1], dtype=scale_dtype), torch.zeros(shape[:-1], dtype=scale_dtype)) \
        if fp8 or nvfp4_kv else (None, None)
    for b in range(3):
        slots = torch.tensor([int(table[b, p // block_size]) * block_size + p % block_size for p in range(totals[b])])
        store_kv_reference(keys[b], values[b], k_cache, v_cache, k_scale, v_scale, slots)
    q = torch.randn(sum(q_lens), heads, dim)
    cu = torch.tensor([0, 11, 17, 18], dtype=torch.int32)
    ctx = Context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=11, context_lens=torch.tensor(totals,
                  dtype=torch.int32), slot_mapping=None, block_tables=table, max_context_len=14)
    out = get_backend("reference", "cpu").attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=0.3,
                                                    sliding_window=window, softcap=softcap)
    for b in range(3):
        seen_k, seen_v = keys[b], values[b]
        if fp8:
            seen_k, seen_v = dequantize_kv_fp8(*quantize_kv_fp8(seen_k)), dequantize_kv_fp8(*quantize_kv_fp8(seen_v))
        if nvfp4_kv:
            seen_k = dequantize_kv_nvfp4(*quantize_kv_nvfp4(seen_k))
            seen_v = dequantize_kv_nvfp4(*quantize_kv_nvfp4(seen_v))
        expected = naive_attention(q[cu[b]:cu[b + 1]], seen_k, seen_v, totals[b] - q_lens[b], 0.3, window, softcap)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], expected, rtol=1e-5, atol=1e-5)


def test_decode_context_without_cu_seqlens_is_one_query_per_sequence():
    ctx = Context(is_prefill=False, context_lens=torch.tensor([3, 8], dtype=torch.int32))
    assert ctx.query_offsets().tolist() == [0, 1, 2]


def test_attention_without_cache_attends_over_the_step():
    k, v, q = torch.randn(7, 1, 8), torch.randn(7, 1, 8), torch.randn(7, 2, 8)
    ctx = Context(is_prefill=True, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen_q=4)
    out = get_backend("reference", "cpu").attention(q, None, None, None, None, ctx, scale=0.5, k=k, v=v)
    torch.testing.assert_close(out[3:], naive_attention(q[3:], k[3:], v[3:], 0, 0.5))


def test_get_backend_names():
    assert get_backend("reference", "cpu").name == "reference"
    with pytest.raises(AdaqError, match="unknown backend"):
        get_backend("triton")
    if not torch.cuda.is_available():
        assert get_backend("auto").name == "reference"
        with pytest.raises(AdaqError, match="backend 'cuda' cannot run"):
            get_backend("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "gemma3"])
def test_reference_backend_on_gpu_agrees_with_cpu(tmp_path, arch):
    """The reference on the GPU (bf16 compute, FP8 KV) against the CPU spec (fp32, fp32 KV)."""
    from helpers.paged import prefill_logits
    from helpers.tiny_models import make_checkpoint

    from adaq.formats.checkpoint import open_checkpoint
    from adaq.models import build_model, load_weights

    checkpoint = open_checkpoint(make_checkpoint(arch, tmp_path) / "nvfp4")
    tokens = list(range(3, 40, 2))
    logits = {}
    for device, dtype, kv_dtype in (("cpu", torch.float32, torch.float32), ("cuda", torch.bfloat16,
                                                                             torch.float8_e4m3fn)):
        model = load_weights(build_model(checkpoint.config, get_backend("reference", device), dtype), checkpoint)
        logits[device] = prefill_logits(model, tokens, kv_dtype=kv_dtype, device=device).cpu()
    error = (logits["cuda"] - logits["cpu"]).abs().max() / logits["cpu"].abs().max()
    assert error < 5e-2, f"GPU reference differs from the CPU spec by {error:.2e} of max |logit|"
