"""The reference numerics of the paged KV cache (FP8 E4M3 per token and head, or bf16) and of attention over it.

KV cache per layer: [num_blocks, block_size, num_kv_heads, head_dim]; slot s is (block s // block_size, offset
s % block_size). FP8 caches carry fp32 scales [num_blocks, block_size, num_kv_heads] beside them.
"""

import torch

from adaq.backends.context import Context

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
        if is_fp8(cache):
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
