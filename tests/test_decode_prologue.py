"""The fused decode prologue (backend op qk_norm_rope_store): q/k RMSNorm + RoPE + KV store. CPU: the reference is
the composition of the existing ops, and the attention layer through it gives what it gave before. GPU: the one-launch
kernel against that reference for every cache format, head size and norm flavour; caches and outputs poisoned."""

import pytest
import torch

from adaq.backends.context import reset_context, set_context
from adaq.backends.numerics.attention import dequantize_kv_fp8, dequantize_kv_nvfp4, nvfp4_kv_row_bytes
from adaq.backends.reference import ReferenceBackend
from adaq.layers.attention import SelfAttention

BLOCKS, BLOCK_SIZE = 8, 16


def inv_freq(dim: int, device="cpu") -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def make_caches(fmt: str, kv_heads: int, dim: int, device) -> list:
    """(k_cache, v_cache, k_scale, v_scale), poisoned: NaN values / 0xFF bytes wherever nothing is written."""
    shape = (BLOCKS, BLOCK_SIZE, kv_heads)
    if fmt == "bf16":
        return [torch.full((*shape, dim), float("nan"), dtype=torch.bfloat16, device=device) for _ in range(2)] + [
            None, None]
    if fmt == "fp8":
        caches = [torch.full((*shape, dim), 0x7F, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
                  for _ in range(2)]
        return caches + [torch.full(shape, float("nan"), device=device) for _ in range(2)]
    caches = [torch.full((*shape, nvfp4_kv_row_bytes(dim)), 0xFF, dtype=torch.uint8, device=device) for _ in range(2)]
    return caches + [torch.full(shape, 0xFF, dtype=torch.uint8, device=device) for _ in range(2)]


def step_inputs(tokens: int, heads: int, kv_heads: int, dim: int, unit_offset: bool, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator) * 3).bfloat16().to(device)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    views = (q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim))
    spread = torch.randn(2, dim, generator=generator) * 0.3
    weights = (spread if unit_offset else spread + 1.0).bfloat16().to(device)
    positions = torch.randint(0, 40_000, (tokens,), generator=generator).to(device)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=generator)[:tokens]
    slots[1::4] = -1  # padded rows of a graph bucket: nothing stored (a one-token step stores its row)
    return views, weights, positions, slots.to(device)


def test_reference_is_the_composition():
    backend = ReferenceBackend("cpu")
    (q, k, v), weights, positions, slots = step_inputs(5, 4, 2, 64, False, "cpu")
    caches = make_caches("fp8", 2, 64, "cpu")
    got = backend.qk_norm_rope_store(q, k, v, weights[0], weights[1], 1e-6, False, positions, inv_freq(64),
                                     *caches, slots)
    expected_caches = make_caches("fp8", 2, 64, "cpu")
    q2, k2 = backend.rotary(backend.rms_norm(q, weights[0], 1e-6), backend.rms_norm(k, weights[1], 1e-6), positions,
                            inv_freq(64))
    backend.store_kv(k2, v, *expected_caches, slots)
    assert torch.equal(got, q2)
    for ours, theirs in zip(caches, expected_caches):
        assert torch.equal(ours.view(torch.uint8) if ours.dtype != torch.float32 else ours.nan_to_num(7),
                           theirs.view(torch.uint8) if theirs.dtype != torch.float32 else theirs.nan_to_num(7))


@pytest.mark.parametrize("unit_offset", [False, True])
def test_attention_layer_through_the_prologue_is_unchanged(unit_offset):
    """The layer's fused branch (a cache set) against its unfused one (the same ops called one by one)."""
    torch.manual_seed(0)
    backend = ReferenceBackend("cpu")
    layer = SelfAttention(backend, 64, 4, 2, 32, inv_freq(32), 1e-6, 32 ** -0.5, unit_offset_norm=unit_offset)
    layer.qkv_proj.load([torch.randn(n, 64) * 0.1 for n in (128, 64, 64)], torch.float32)
    layer.o_proj.load(torch.randn(64, 128) * 0.1, torch.float32)
    layer.q_norm.load(torch.randn(32) * 0.1 + 1, torch.float32)
    layer.k_norm.load(torch.randn(32) * 0.1 + 1, torch.float32)
    hidden, positions = torch.randn(6, 64), torch.arange(6)
    calls = []
    composition = backend.qk_norm_rope_store
    backend.qk_norm_rope_store = lambda *args: calls.append(1) or composition(*args)
    outputs = []
    for fused in (True, False):
        layer.attn.k_cache, layer.attn.v_cache = (torch.zeros(2, 4, 2, 32) for _ in range(2))
        set_context(True, torch.tensor([0, 6], dtype=torch.int32), 6, torch.tensor([6], dtype=torch.int32),
                    torch.arange(6), torch.tensor([[0, 1]], dtype=torch.int32), 6)
        if not fused:
            layer.attn.forward_prologue = None  # the branch must not be taken
            layer.q_norm.eps = layer.q_norm.eps * (1 + 1e-9)  # eps differs from k_norm's: the unfused branch
        try:
            outputs.append(layer(positions, hidden))
        finally:
            reset_context()
    assert calls == [1]  # the fused branch ran once, the unfused one never called it
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


# ---- GPU -----------------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = [(1, 32, 8, 128), (5, 16, 8, 128), (33, 4, 1, 256), (7, 8, 2, 64), (64, 4, 4, 256), (3, 2, 1, 64)]


def _rows(caches, slots, fmt):
    """Dequantized K and V rows of the written slots, fp32 [n, Hkv, D] each, with their FP8 scales [n, Hkv] (None
    for the other formats)."""
    kept = slots[slots >= 0].long()
    rows = []
    for cache, scale in ((caches[0], caches[2]), (caches[1], caches[3])):
        flat = cache.view(-1, *cache.shape[2:])[kept]
        if fmt == "bf16":
            rows.append((flat.float(), None))
        elif fmt == "fp8":
            scales = scale.view(-1, scale.shape[-1])[kept]
            rows.append((dequantize_kv_fp8(flat, scales), scales))
        else:
            rows.append((dequantize_kv_nvfp4(flat, scale.view(-1, scale.shape[-1])[kept]), None))
    return rows


def _assert_fp8_rows_close(ours, theirs, ours_scale, theirs_scale):
    """FP8 rows from keys one bf16 ulp apart here and there (the norm's sum-of-squares order): the per-row scale
    amax / 448 moves with the row's amax (all of its values then differ a little) and a value may round to the
    neighbouring E4M3 code, one step = 1/8 of its binade. So: scales within 2^-6, every value within one E4M3 step
    (or the subnormal step), and the rows close as a whole; a wrong row, head or position is an O(1) error."""
    assert torch.isfinite(ours_scale).all() and (ours_scale > 0).all()
    assert ((ours_scale - theirs_scale).abs() <= 2.0 ** -6 * theirs_scale).all()
    magnitude = torch.maximum(ours.abs(), theirs.abs())
    step = 0.13 * magnitude + 2.0 ** -9 * theirs_scale[..., None] * 1.01
    assert ((ours - theirs).abs() <= step).all()
    assert float((ours - theirs).norm() / theirs.norm()) < 0.05  # each rounding alone is ~2.5 % RMS


def test_fp8_row_tolerance_takes_ulp_moves_and_refuses_wrong_rows():
    """The FP8 criterion of the GPU test: keys a bf16 ulp apart in a few values (the amax among them) pass; a
    swapped row, a wrong position's RoPE or a doubled value fail."""
    from adaq.backends.numerics.attention import quantize_kv_fp8

    generator = torch.Generator().manual_seed(0)
    keys = (torch.randn(40, 4, 128, generator=generator) * 3).bfloat16()
    moved = keys.clone()
    flat = moved.view(-1)
    picks = torch.randperm(flat.numel(), generator=generator)[:flat.numel() // 50]
    flat[picks] = torch.nextafter(flat[picks].float(), torch.tensor(float("inf"))).bfloat16()
    amax_at = keys.float().abs().view(-1, 128).argmax(-1) + torch.arange(160) * 128
    flat[amax_at] = (flat[amax_at].float() * (1 + 2.0 ** -7)).bfloat16()  # every row's scale moves too

    def rows(x):
        codes, scales = quantize_kv_fp8(x)
        return dequantize_kv_fp8(codes, scales), scales

    theirs, theirs_scale = rows(keys)
    ours, ours_scale = rows(moved)
    _assert_fp8_rows_close(ours, theirs, ours_scale, theirs_scale)
    for wrong in (moved.roll(1, dims=0), moved.flip(-1), moved * 2):
        bad, bad_scale = rows(wrong)
        with pytest.raises(AssertionError):
            _assert_fp8_rows_close(bad, theirs, bad_scale, theirs_scale)


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("tokens,heads,kv_heads,dim", SHAPES)
def test_gpu_fused_prologue_matches_reference(fmt, unit_offset, tokens, heads, kv_heads, dim):
    """The fused kernel itself (ops.qk_norm_rope_store), every cache format, against the reference composition."""
    from adaq.backends.cuda import CudaBackend
    from adaq.kernels import ops

    backend, reference = CudaBackend("cuda"), ReferenceBackend("cuda")
    (q, k, v), weights, positions, slots = step_inputs(tokens, heads, kv_heads, dim, unit_offset, "cuda",
                                                        seed=tokens + dim)
    freqs = inv_freq(dim, "cuda")
    ours, theirs = make_caches(fmt, kv_heads, dim, "cuda"), make_caches(fmt, kv_heads, dim, "cuda")
    torch.cuda.empty_cache()
    got = ops.qk_norm_rope_store(q, k, v, weights[0], weights[1], 1e-6, unit_offset, positions, freqs, *ours, slots)
    expected = reference.qk_norm_rope_store(q, k, v, weights[0], weights[1], 1e-6, unit_offset, positions, freqs,
                                            *theirs, slots)
    assert not backend.fallbacks.as_dicts(), backend.fallbacks.as_dicts()
    assert got.shape == (tokens, heads, dim) and torch.isfinite(got.float()).all()
    # Sum-of-squares order differs from torch's mean: a value may round to the neighbouring bf16 (and then RoPE's).
    assert (got.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()
    assert (got != expected).float().mean() < 0.02
    for ((ours_rows, ours_scale), (theirs_rows, theirs_scale)) in zip(_rows(ours, slots, fmt),
                                                                          _rows(theirs, slots, fmt)):
        if theirs_rows.numel() == 0:  # one token on a padded row (slot -1): nothing stored, checked below
            continue
        assert torch.isfinite(ours_rows).all()
        if fmt == "fp8":
            _assert_fp8_rows_close(ours_rows, theirs_rows, ours_scale, theirs_scale)
            continue
        scale = theirs_rows.abs().amax().item()
        assert (ours_rows - theirs_rows).abs().max() <= (0.02 if fmt != "nvfp4" else 0.2) * scale
        assert (ours_rows != theirs_rows).float().mean() < (0.02 if fmt != "nvfp4" else 0.05)
    unwritten = torch.ones(BLOCKS * BLOCK_SIZE, dtype=torch.bool, device="cuda")
    unwritten[slots[slots >= 0]] = False
    for cache in ours[:2]:  # slot -1 rows and unused slots keep their poison
        raw = cache.view(torch.uint8).view(BLOCKS * BLOCK_SIZE, -1)[unwritten]
        poison = cache.view(torch.uint8).view(BLOCKS * BLOCK_SIZE, -1)[unwritten][:1]
        assert torch.equal(raw, poison.expand_as(raw))


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
def test_gpu_backend_takes_the_fused_kernel(fmt):
    """The cuda backend's op is the one launch for every cache format (no fallback reported): the same outputs and
    cache bytes as ops.qk_norm_rope_store itself."""
    from adaq.backends.cuda import CudaBackend
    from adaq.kernels import ops

    backend = CudaBackend("cuda")
    (q, k, v), weights, positions, slots = step_inputs(5, 16, 8, 128, False, "cuda", seed=3)
    freqs = inv_freq(128, "cuda")
    ours, theirs = make_caches(fmt, 8, 128, "cuda"), make_caches(fmt, 8, 128, "cuda")
    got = backend.qk_norm_rope_store(q, k, v, weights[0], weights[1], 1e-6, False, positions, freqs, *ours, slots)
    expected = ops.qk_norm_rope_store(q, k, v, weights[0], weights[1], 1e-6, False, positions, freqs, *theirs, slots)
    assert not backend.fallbacks.as_dicts(), backend.fallbacks.as_dicts()
    assert torch.equal(got, expected)
    for a, b in zip(ours, theirs):
        if a is None:  # a bf16 cache has no scales
            continue
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype != torch.float32 else \
            torch.equal(a.nan_to_num(7), b.nan_to_num(7))


@gpu
@needs_cuda
def test_gpu_unsupported_head_dim_falls_back_to_the_composition():
    from adaq.backends.cuda import CudaBackend

    backend = CudaBackend("cuda")
    (q, k, v), weights, positions, slots = step_inputs(3, 2, 1, 96, False, "cuda")
    caches = make_caches("bf16", 1, 96, "cuda")
    got = backend.qk_norm_rope_store(q, k, v, weights[0], weights[1], 1e-6, False, positions, inv_freq(96, "cuda"),
                                     *caches, slots)
    assert got.shape == (3, 2, 96) and backend.fallbacks.as_dicts()  # RoPE/KV store report their fallbacks
