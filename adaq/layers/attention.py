"""Self-attention over the paged KV cache (numerics of the cache and of attention: adaq.backends.numerics.attention)."""

import torch
from torch import nn

from adaq.backends.interface import Backend
from adaq.backends.context import get_context
from adaq.backends.parallel import kv_head_share
from adaq.layers.linear import Linear
from adaq.layers.norm import RMSNorm


class PagedAttention(nn.Module):
    """Stores this step's K/V into the layer's cache views and attends over the cache, as the context says.

    The model runner sets k_cache, v_cache (and k_scale, v_scale for FP8) after it allocates the cache, and
    `in_sliding_pool` when this layer's cache is the sliding-window pool (it then reads the step's sliding tables).
    """

    def __init__(self, backend: Backend, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        super().__init__()
        self.backend = backend
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.in_sliding_pool = False

    @property
    def has_cache(self) -> bool:
        return self.k_cache is not None and self.k_cache.numel() > 0

    def context(self):
        ctx = get_context()
        return ctx.for_sliding_pool() if self.in_sliding_pool else ctx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = self.context()
        has_cache = self.has_cache
        if has_cache:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, self.k_scale, self.v_scale, ctx.slot_mapping)
        caches = (self.k_cache, self.v_cache, self.k_scale, self.v_scale) if has_cache else (None,) * 4
        return self.backend.attention(q, *caches, ctx, scale=self.scale, sliding_window=self.sliding_window,
                                      softcap=self.softcap, k=k, v=v)

    def forward_prologue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                         positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Raw q [T, H, D], k and v [T, Hkv, D] (a cache must be set): q/k RMSNorm, RoPE and the K/V store as one
        backend op (one launch on the cuda backend instead of four), then attention over the cache."""
        ctx = self.context()
        q = self.backend.qk_norm_rope_store(q, k, v, q_norm.weight, k_norm.weight, q_norm.eps, q_norm.unit_offset,
                                            positions, inv_freq, self.k_cache, self.v_cache, self.k_scale,
                                            self.v_scale, ctx.slot_mapping)
        return self.backend.attention(q, self.k_cache, self.v_cache, self.k_scale, self.v_scale, ctx,
                                      scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap)


class SelfAttention(nn.Module):
    """q/k/v projection (fused when it can be), per-head q/k RMSNorm, RoPE, paged attention, output projection.

    Gemma 4 options: `value_from_key` (no v_proj: the key projection, before its norm and RoPE, is the value) and
    `value_norm` (a scale-free RMSNorm on the values).

    Tensor parallelism (`backend.tp`, N ranks): each rank holds H / N query heads (q/k/v column-parallel) and the KV
    heads they read: Hkv / N of them, or, with fewer KV heads than ranks, the one its query heads share, replicated
    (vLLM's rule); o_proj is row-parallel (one all-reduce). Head counts below are this rank's."""

    def __init__(self, backend: Backend, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 inv_freq: torch.Tensor, eps: float, scale: float, unit_offset_norm: bool = False,
                 sliding_window: int | None = None, softcap: float | None = None, value_from_key: bool = False,
                 value_norm: bool = False):
        super().__init__()
        self.backend = backend
        tp = backend.tp
        self.q_heads = tp.split(num_heads, "attention heads") if tp.sharded else (0, num_heads)
        self.kv_heads = kv_head_share(num_kv_heads, tp, "attention") if tp.sharded else (0, num_kv_heads)
        num_heads, num_kv_heads = self.q_heads[1] - self.q_heads[0], self.kv_heads[1] - self.kv_heads[0]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.projections = "qk" if value_from_key else "qkv"
        kv_size = num_kv_heads * head_dim
        self.qkv_proj = Linear(backend, hidden_size, [num_heads * head_dim] + [kv_size] * (len(self.projections) - 1),
                               role="qkv_proj")
        self.o_proj = Linear(backend, num_heads * head_dim, hidden_size, role="o_proj", reduce=True)
        self.q_norm = RMSNorm(backend, head_dim, eps, unit_offset_norm)
        self.k_norm = RMSNorm(backend, head_dim, eps, unit_offset_norm)
        self.v_norm = RMSNorm(backend, head_dim, eps) if value_norm else None
        self.inv_freq = inv_freq  # fp32 [D/2] on the backend's device, shared by the layers of one RoPE base
        self.attn = PagedAttention(backend, num_heads, num_kv_heads, head_dim, scale, sliding_window, softcap)

    def head_rows(self, heads: tuple[int, int], rows_per_head: int) -> tuple[int, int] | None:
        """Rows of a projection for the heads [first, stop) (None: one rank holds them all)."""
        if not self.backend.tp.sharded:
            return None
        return heads[0] * rows_per_head, heads[1] * rows_per_head

    def q_rows(self) -> tuple[int, int] | None:
        return self.head_rows(self.q_heads, self.head_dim)

    def load(self, reader, prefix: str) -> None:
        names = [f"{prefix}.{p}_proj" for p in self.projections]
        rows = [self.q_rows()] + [self.head_rows(self.kv_heads, self.head_dim)] * (len(names) - 1)
        self.qkv_proj.load([reader.linear(n, r) for n, r in zip(names, rows)], reader.dtype,
                           [reader.bias(n, r) for n, r in zip(names, rows)])
        o_cols = self.head_rows(self.q_heads, self.head_dim)
        self.o_proj.load(reader.linear(f"{prefix}.o_proj", cols=o_cols), reader.dtype,
                         [reader.bias(f"{prefix}.o_proj")])
        self.q_norm.load(reader.tensor(f"{prefix}.q_norm.weight"), reader.dtype)
        self.k_norm.load(reader.tensor(f"{prefix}.k_norm.weight"), reader.dtype)
        if self.v_norm is not None:  # scale-free: a unit weight
            self.v_norm.load(torch.ones(self.head_dim), reader.dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, *v = self.qkv_proj(hidden).split(self.qkv_proj.out_sizes, dim=-1)
        v = (v[0] if v else k).reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.v_norm is None and self.attn.has_cache and self.q_norm.eps == self.k_norm.eps:
            out = self.attn.forward_prologue(q.reshape(tokens, self.num_heads, self.head_dim),
                                             k.reshape(tokens, self.num_kv_heads, self.head_dim), v, self.q_norm,
                                             self.k_norm, positions, self.inv_freq)
            return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
        q = self.q_norm(q.reshape(tokens, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(tokens, self.num_kv_heads, self.head_dim))
        if self.v_norm is not None:
            v = self.v_norm(v)
        q, k = self.backend.rotary(q, k, positions, self.inv_freq)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


class GatedSelfAttention(SelfAttention):
    """Qwen3.5 / Qwen3-Next full attention: q_proj is twice as wide (per head: D query dims, then D gate dims) and
    the attention output is multiplied by sigmoid(gate); (1 + w) q/k norms; RoPE on the first `rotary_dim` dims."""

    def __init__(self, backend: Backend, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 inv_freq: torch.Tensor, eps: float, scale: float):
        super().__init__(backend, hidden_size, num_heads, num_kv_heads, head_dim, inv_freq, eps, scale,
                         unit_offset_norm=True)
        self.qkv_proj = Linear(backend, hidden_size, [2 * self.num_heads * head_dim, self.num_kv_heads * head_dim,
                                                      self.num_kv_heads * head_dim], role="qkv_proj")
        self.rotary_dim = 2 * inv_freq.numel()

    def q_rows(self) -> tuple[int, int] | None:
        return self.head_rows(self.q_heads, 2 * self.head_dim)  # per head: D query rows, then D gate rows

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.shape[0]
        q_gate, k, v = self.qkv_proj(hidden).split(self.qkv_proj.out_sizes, dim=-1)
        q, gate = q_gate.reshape(tokens, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q.contiguous())
        k = self.k_norm(k.reshape(tokens, self.num_kv_heads, self.head_dim))
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        q, k = self.partial_rotary(q, k, positions)
        out = self.attn(q, k, v).reshape(tokens, self.num_heads * self.head_dim)
        out = self.backend.sigmoid_gate(out, gate.reshape(tokens, self.num_heads * self.head_dim))
        return self.o_proj(out)

    def partial_rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        r = self.rotary_dim
        if r == self.head_dim:
            return self.backend.rotary(q, k, positions, self.inv_freq)
        q_rot, k_rot = self.backend.rotary(q[..., :r].contiguous(), k[..., :r].contiguous(), positions,
                                           self.inv_freq)
        return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)
