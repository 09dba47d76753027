"""The reference numerics of the paged KV cache (FP8 E4M3 per token and head, NVFP4, or bf16) and of attention over it.

KV cache per layer: [num_blocks, block_size, num_kv_heads, head_dim]; slot s is (block s // block_size, offset
s % block_size). FP8 caches carry fp32 scales [num_blocks, block_size, num_kv_heads] beside them.
NVFP4 caches are uint8 [num_blocks, block_size, num_kv_heads, D/2 + D/16]: per (token, head) a row of D/2 bytes of
E2M1 pairs (element 2j in the low nibble) then D/16 E4M3 block scales, with a uint8 E8M0 exponent per (token, head)
[num_blocks, block_size, num_kv_heads] in the scale tensor (docs/ARCHITECTURE.md, "NVFP4 KV cache").
"""

import torch

from adaq.backends.context import Context
from adaq.formats.nvfp4 import FP4_MAX, FP8_MAX, GROUP_SIZE, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0
FP8_KV_MIN_SCALE = 1e-12


def quantize_kv_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, Hkv, D] -> (e4m3 [T, Hkv, D], fp32 scale [T, Hkv]); scale = max(amax / 448, 1e-12) per token and head.

    The clamp to +-448 only guards against x / s landing one fp32 ulp above 448, which would turn into NaN.
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_KV_MAX).clamp(min=FP8_KV_MIN_SCALE)
    stored = (xf / scale.unsqueeze(-1)).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)
    return stored, scale


def dequantize_kv_fp8(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return stored.float() * scale.unsqueeze(-1)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


# ---- NVFP4: E2M1 values, E4M3 scale per 16 along head_dim, a power-of-two (E8M0) scale per token and head ----------
NVFP4_KV_DTYPE = torch.uint8  # the cache's storage dtype: packed rows (values, then block scales)
NVFP4_KV_EXP_BIAS = 127  # E8M0: stored byte b means 2^(b - 127)
NVFP4_KV_EXP_MIN, NVFP4_KV_EXP_MAX = -100, 100  # far from fp32's limits: 2^e * e4m3 * e2m1 never under/overflows


def kv_bytes_per_token_head(kv_cache_dtype: str, head_dim: int) -> int:
    """Bytes of one token's K (or V) for one KV head, scales included: bf16 2D, fp8 D + 4 (fp32 scale), nvfp4
    D/2 + D/16 + 1 (E8M0 exponent)."""
    if kv_cache_dtype == "nvfp4":
        return nvfp4_kv_row_bytes(head_dim) + 1
    return {"bf16": 2 * head_dim, "fp8": head_dim + 4}[kv_cache_dtype]


KV_CACHE_DTYPE_NAMES = ("fp8", "bf16", "nvfp4")


def nvfp4_kv_row_bytes(head_dim: int) -> int:
    """Bytes of one (token, head) row of an NVFP4 cache: D/2 of E2M1 pairs + D/16 E4M3 block scales."""
    if head_dim % GROUP_SIZE:
        raise ValueError(f"an NVFP4 KV cache needs head_dim % {GROUP_SIZE} == 0, got {head_dim}")
    return head_dim // 2 + head_dim // GROUP_SIZE


def nvfp4_kv_head_dim(row_bytes: int) -> int:
    return row_bytes * GROUP_SIZE // (GROUP_SIZE // 2 + 1)


def is_nvfp4(cache: torch.Tensor) -> bool:
    return cache.dtype == NVFP4_KV_DTYPE


def nvfp4_kv_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The smallest e with amax / 2^e <= 6 * 448 (int32, clamped to [-100, 100]): the token's largest block then has
    an E4M3 scale in [224, 448] and every block down to 2^-15 of it keeps a normal E4M3 scale."""
    ratio = amax.float() / (FP4_MAX * FP8_MAX)
    mantissa, exponent = torch.frexp(ratio)  # r = m * 2^k, m in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # r exactly 2^(k-1)
    e = torch.where(ratio > 0, e, torch.full_like(e, NVFP4_KV_EXP_MIN))  # 0, or amax so small the ratio is 0
    return e.clamp(NVFP4_KV_EXP_MIN, NVFP4_KV_EXP_MAX)


def quantize_kv_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, Hkv, D] -> (rows uint8 [T, Hkv, D/2 + D/16], E8M0 exponent uint8 [T, Hkv]).

    e per (token, head) from `nvfp4_kv_exponent`; per 16 values s = e4m3((amax(block) / 6) * 2^-e) (a zero scale
    becomes 0.125, as for weights); codes = e2m1(x / (float(s) * 2^e)) in fp32 (ties to even, saturating at 6).
    Every product here is exact in fp32 (a power of two times an E4M3), so kernels reproduce the bytes exactly.
    """
    xf = x.float()
    e = nvfp4_kv_exponent(xf.abs().amax(dim=-1))
    pow2 = torch.ldexp(torch.ones_like(xf[..., 0]), e).unsqueeze(-1)
    blocks = xf.unflatten(-1, (-1, GROUP_SIZE))
    local = (blocks.abs().amax(dim=-1) / FP4_MAX) / pow2
    scale = local.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    scale = torch.where(scale == 0, torch.full_like(scale, 0.125), scale)
    step = (scale * pow2).unsqueeze(-1)
    codes = e2m1_encode(blocks / step).flatten(-2)
    rows = torch.cat([pack_nibbles(codes), scale.to(torch.float8_e4m3fn).view(torch.uint8)], dim=-1)
    return rows, (e + NVFP4_KV_EXP_BIAS).to(torch.uint8)


def dequantize_kv_nvfp4(rows: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """rows uint8 [..., D/2 + D/16], exponent uint8 [...] -> fp32 [..., D] = e2m1 * float(s) * 2^e (exact)."""
    dim = nvfp4_kv_head_dim(rows.shape[-1])
    values = e2m1_decode(unpack_nibbles(rows[..., :dim // 2])).unflatten(-1, (-1, GROUP_SIZE))
    scale = rows[..., dim // 2:].contiguous().view(torch.float8_e4m3fn).float()
    pow2 = torch.ldexp(torch.ones_like(scale[..., 0]), exponent.int() - NVFP4_KV_EXP_BIAS)
    return (values * (scale * pow2.unsqueeze(-1)).unsqueeze(-1)).flatten(-2)


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                       slot_mapping: torch.Tensor) -> None:
    """Write K/V [T, Hkv, D] into their slots; tokens with slot -1 are skipped."""
    keep = slot_mapping >= 0
    skip_some = not bool(keep.all())
    slots = (slot_mapping[keep] if skip_some else slot_mapping).long()
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = x[keep] if skip_some else x
        flat = cache.view(-1, *cache.shape[2:])
        if is_nvfp4(cache):
            rows, exponent = quantize_kv_nvfp4(x)
            flat[slots] = rows
            scales.view(-1, scales.shape[-1])[slots] = exponent
        elif is_fp8(cache):
            stored, scale = quantize_kv_fp8(x)
            # index_put is not implemented for float8 everywhere: write the raw bytes.
            flat.view(torch.uint8)[slots] = stored.view(torch.uint8)
            scales.view(-1, scales.shape[-1])[slots] = scale
        else:
            flat[slots] = x.to(cache.dtype)


def gather_kv(cache: torch.Tensor, scales: torch.Tensor | None, block_table: torch.Tensor,
              length: int, start: int = 0) -> torch.Tensor:
    """Tokens [start, length) of one sequence from the paged cache, dequantized to fp32: [length - start, Hkv, D].
    Blocks wholly before `start` are not read (a sliding-window pool gives them back: their entries are null)."""
    block_size = cache.shape[1]
    first, num_blocks = start // block_size, -(-length // block_size)
    blocks = block_table[first:num_blocks].long()
    slots = (blocks[:, None] * block_size + torch.arange(block_size, device=cache.device)).flatten()
    slots = slots[start - first * block_size:length - first * block_size]
    flat = cache.view(-1, *cache.shape[2:])
    if is_nvfp4(cache):
        return dequantize_kv_nvfp4(flat[slots], scales.view(-1, scales.shape[-1])[slots])
    if is_fp8(cache):
        stored = flat.view(torch.uint8)[slots].view(FP8_KV_DTYPE)
        return dequantize_kv_fp8(stored, scales.view(-1, scales.shape[-1])[slots])
    return flat[slots].float()


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_position: int, scale: float,
           sliding_window: int | None, softcap: float | None, first_key: int = 0) -> torch.Tensor:
    """q [L, H, D] at positions first_position.., keys/values [N, Hkv, D] at first_key..first_key+N-1, fp32 ->
    [L, H, D] fp32.

    Causal (key j <= query position p) and, with a window W, only keys j > p - W (transformers' convention).
    """
    length, heads, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.float().view(length, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("lhgd,nhd->hgln", grouped, keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    query_pos = first_position + torch.arange(length, device=q.device)[:, None]
    key_pos = first_key + torch.arange(keys.shape[0], device=q.device)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window:
        allowed &= key_pos > query_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hgln,nhd->lhgd", probs, values).reshape(length, heads, dim)


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                        k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, ctx: Context, *,
                        scale: float, sliding_window: int | None = None, softcap: float | None = None,
                        k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the packed queries q [T, H, D] over each sequence's cached keys; fp32 math, output in q.dtype.

    Without a cache (k_cache None, e.g. a warm-up pass) a prefill attends over the step's own k/v [T, Hkv, D].
    With a window, keys before the first query's window are not read, as the kernels do.
    """
    offsets = ctx.query_offsets().tolist()
    lengths = None if ctx.context_lens is None else ctx.context_lens.tolist()
    out = torch.empty_like(q)
    for b in range(len(offsets) - 1):
        start, end = offsets[b], offsets[b + 1]
        first_key = 0
        if k_cache is None:
            keys, values, length = k[start:end].float(), v[start:end].float(), end - start
        else:
            length = lengths[b]
            first_key = max(0, length - (end - start) + 1 - sliding_window) if sliding_window else 0
            keys = gather_kv(k_cache, k_scale, ctx.block_tables[b], length, first_key)
            values = gather_kv(v_cache, v_scale, ctx.block_tables[b], length, first_key)
        first = length - (end - start)
        out[start:end] = attend(q[start:end], keys, values, first, scale, sliding_window, softcap,
                                first_key).to(q.dtype)
    return out
