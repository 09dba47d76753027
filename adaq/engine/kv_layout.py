"""How the KV cache is laid out and sized: one rule for the engine's allocation (model_runner.py) and for
`adaq validate`'s VRAM budget (adaq.validate.budget), so the two cannot drift apart.

Each attention layer is a `LayerKV`: its KV heads, head_dim and sliding window (None: a global layer). The layers
go into one pool, or, with window-sized KV on and both kinds present, two: the global layers' and the sliding
layers' (block_manager.py). A pool is one tensor `[2 (K, V), layers, blocks, block_size, kv_heads, row]` in the
cache dtype, plus for FP8 and NVFP4 one scale tensor `[2, layers, blocks, block_size, kv_heads]`; its per-layer
slot is as wide as its widest layer's K or V (Gemma 4 without window-sized KV: the global layers' 4 x 512 sit in
slots of 16 x 256, twice their size). The sliding pool holds what `max_num_seqs` windows and one step's chunks
need (`sliding_pool_blocks`), never more blocks than the global pool, plus its null block.
"""

from dataclasses import dataclass

import torch

from adaq.backends.numerics.attention import NVFP4_KV_DTYPE, nvfp4_kv_row_bytes
from adaq.engine.block_manager import sliding_pool_blocks


@dataclass(frozen=True)
class LayerKV:
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None  # None or 0: a global layer


@dataclass
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def nvfp4(self) -> bool:
        return self.dtype == NVFP4_KV_DTYPE

    @property
    def has_scales(self) -> bool:
        return self.dtype == torch.float8_e4m3fn or self.nvfp4

    @property
    def row_width(self) -> int:
        """Last dimension of the cache: head_dim values, or an NVFP4 row's bytes (values, then block scales)."""
        return nvfp4_kv_row_bytes(self.head_dim) if self.nvfp4 else self.head_dim

    @property
    def scale_dtype(self) -> torch.dtype:
        """fp32 per (token, head) for FP8, the E8M0 exponent byte for NVFP4."""
        return torch.uint8 if self.nvfp4 else torch.float32

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.row_width)

    def bytes_per_block(self) -> int:
        values = self.num_kv_heads * self.row_width * self.dtype.itemsize
        scales = self.num_kv_heads * self.scale_dtype.itemsize if self.has_scales else 0
        return 2 * self.num_layers * self.block_size * (values + scales)

    @classmethod
    def of(cls, layers: list[LayerKV], block_size: int, dtype: torch.dtype) -> "KVGeometry":
        """One pool's geometry: the most KV heads of its layers and a head_dim that makes the slot as wide as the
        widest layer's K or V."""
        num_kv_heads = max(layer.kv_heads for layer in layers)
        head_dim = -(-max(layer.kv_heads * layer.head_dim for layer in layers) // num_kv_heads)
        return cls(len(layers), num_kv_heads, head_dim, block_size, dtype)


def split_pools(windows: list[int | None], window_kv: bool) -> tuple[list[int], list[int]]:
    """(indices of the global pool's layers, of the sliding pool's): the sliding-window layers get a pool of their own
    when window_kv is on and the model has global layers too (a model of sliding layers only keeps one pool)."""
    sliding = [index for index, window in enumerate(windows) if window]
    if not window_kv or not sliding or len(sliding) == len(windows):
        return list(range(len(windows))), []
    return [index for index, window in enumerate(windows) if not window], sliding


@dataclass(frozen=True)
class KVPools:
    geometry: KVGeometry  # the global pool: every layer when there is no sliding pool
    sliding: KVGeometry | None
    sliding_window: int | None
    max_num_seqs: int
    max_step_tokens: int  # max_num_batched_tokens: the chunks a step adds to the sliding pool

    @classmethod
    def plan(cls, layers: list[LayerKV], *, window_kv: bool, block_size: int, dtype: torch.dtype,
             max_num_seqs: int, max_step_tokens: int) -> "KVPools":
        global_, sliding = split_pools([layer.sliding_window for layer in layers], window_kv)
        windowed = [layers[index] for index in sliding]
        return cls(KVGeometry.of([layers[index] for index in global_], block_size, dtype),
                   KVGeometry.of(windowed, block_size, dtype) if windowed else None,
                   max((layer.sliding_window for layer in windowed), default=None), max_num_seqs, max_step_tokens)

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    def sliding_need(self) -> int:
        return sliding_pool_blocks(self.sliding_window, self.block_size, self.max_num_seqs, self.max_step_tokens)

    def sliding_blocks_beside(self, num_blocks: int) -> int:
        """The sliding pool next to `num_blocks` global blocks: what it needs, never more than the global pool
        (a sequence never holds more sliding blocks than global ones), plus the null block; 0 without one."""
        return min(num_blocks, self.sliding_need()) + 1 if self.sliding else 0

    def global_blocks_in(self, budget: int) -> int:
        """Global blocks when `budget` bytes hold both pools: the sliding pool takes what it needs (or as many blocks
        as the global pool, when the budget is too small for that), the global pool the rest."""
        global_bytes = self.geometry.bytes_per_block()
        if self.sliding is None:
            return budget // global_bytes
        sliding_bytes = self.sliding.bytes_per_block()
        equal = (budget - sliding_bytes) // (global_bytes + sliding_bytes)
        need = self.sliding_need()
        if equal <= need:
            return max(equal, 0)
        return (budget - (need + 1) * sliding_bytes) // global_bytes

    def nbytes(self, num_blocks: int) -> int:
        """Both pools' bytes (values and scales) with `num_blocks` global blocks."""
        sliding = self.sliding_blocks_beside(num_blocks) * self.sliding.bytes_per_block() if self.sliding else 0
        return num_blocks * self.geometry.bytes_per_block() + sliding

    def bytes_per_token(self) -> int:
        """One token in every pool's every layer (slots included), as if each held the whole context."""
        pools = [self.geometry] + ([self.sliding] if self.sliding else [])
        return sum(pool.bytes_per_block() for pool in pools) // self.block_size
