"""The paged KV cache's bookkeeping: which cache blocks belong to which sequence, and which full blocks can be
shared (automatic prefix caching, as in vLLM).

A full block is known by the hash of its tokens and of every token before it; once computed it is registered
under that hash. A new sequence starts from the longest chain of registered blocks that matches its tokens
(shared, reference-counted) and computes only the rest. Blocks nobody references stay cached in a least recently
freed order and are reused (their hash forgotten) only when no never-used block is left.

Window-sized KV (as vLLM's hybrid allocator and llama.cpp's SWA cache do it): a model whose sliding-window layers
get their own pool keeps two tables per sequence. `block_table` (global layers) holds every block of the context;
`sliding_table` has the same length (index = absolute block position) but its blocks wholly before the window of
the sequence's next query are given back to the sliding pool and replaced by NULL_BLOCK, which the attention
kernels never read (they start at the window's first key). So a sliding layer holds at most its window plus the
chunk being computed. A prefix-cache hit counts only where the sliding pool still holds the window's blocks.
"""

from collections import OrderedDict

from adaq.engine.sequence import Sequence

NULL_BLOCK = 0  # the sliding pool's block 0: stands for a released block; never handed out, never written


def sliding_pool_blocks(window: int, block_size: int, max_num_seqs: int, max_step_tokens: int) -> int:
    """Blocks the sliding pool needs so that it never runs out before the global pool does: after a step a
    sequence keeps the blocks of the window behind its next query, at most ceil((W - 1) / bs) + 1, and one step adds
    its chunk (at most one more partial block per sequence); the chunks of a step add up to `max_step_tokens`."""
    behind = -(-(window - 1) // block_size) + 2
    return max_num_seqs * behind + -(-max_step_tokens // block_size)


class BlockPool:
    """One group's cache blocks: the free list (least recently freed first), reference counts and the prefix
    cache's registry of full blocks by hash. The first `reserved` blocks are never handed out."""

    def __init__(self, num_blocks: int, reserved: int = 0):
        self.num_blocks = num_blocks
        self.reserved = reserved
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(reserved, num_blocks))
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - self.reserved

    def take(self) -> int:
        block, _ = self._free.popitem(last=False)
        self._forget(block)
        self._ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._free[block]
        self._ref_counts[block] += 1

    def release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free[block] = None

    def cached(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def register(self, block: int, block_hash: int) -> None:
        if block_hash not in self._cached and self._block_hash[block] is None:
            self._cached[block_hash] = block
            self._block_hash[block] = block_hash

    def _forget(self, block: int) -> None:
        block_hash = self._block_hash[block]
        if block_hash is not None:
            del self._cached[block_hash]
            self._block_hash[block] = None


class BlockManager:
    """Blocks of the global pool (every layer, or the full-attention layers when a sliding pool exists) and, with
    `sliding_window`, of the sliding pool (`num_sliding_blocks`, block NULL_BLOCK reserved)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, num_sliding_blocks: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.sliding_window = sliding_window
        self.sliding = BlockPool(num_sliding_blocks, reserved=NULL_BLOCK + 1) if sliding_window else None
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_free_sliding_blocks(self) -> int:
        return self.sliding.num_free if self.sliding else 0

    @property
    def usage(self) -> float:
        pools = [self.pool] + ([self.sliding] if self.sliding else [])
        return max(1.0 - pool.num_free / pool.num_usable if pool.num_usable else 0.0 for pool in pools)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks to hold `num_tokens` tokens; False (and nothing taken) if there are too few.
        Sliding blocks behind the window of the next query (at num_computed_tokens) go back first."""
        self.release_behind_window(seq)
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > self.pool.num_free or (self.sliding and missing > self.sliding.num_free):
            return False
        for _ in range(max(missing, 0)):
            seq.block_table.append(self.pool.take())
            if self.sliding:
                seq.sliding_table.append(self.sliding.take())
        return True

    def new_blocks_needed(self, seq: Sequence, num_tokens: int) -> tuple[int, int]:
        """(global, sliding) blocks that `grow(seq, num_tokens)` would take, net of what it gives back first."""
        missing = max(0, self.blocks_for(num_tokens) - len(seq.block_table))
        if not self.sliding:
            return missing, 0
        released = self._first_kept_block(seq) - seq.num_released_blocks
        return missing, max(0, missing - max(released, 0))

    def free(self, seq: Sequence) -> None:
        # Last blocks first: they are the least likely to be shared, so they are evicted first.
        for block in reversed(seq.block_table):
            self.pool.release(block)
        if self.sliding:
            for block in reversed(seq.sliding_table[seq.num_released_blocks:]):
                self.sliding.release(block)
        seq.block_table, seq.sliding_table = [], []
        seq.num_registered_blocks = seq.num_released_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot (block * block_size + offset) of the token at `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def sliding_slot(self, seq: Sequence, position: int) -> int:
        return seq.sliding_table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- the sliding window ----------------------------------------------------------------------------------
    def _window_start(self, next_position: int) -> int:
        """First key that the query at `next_position` (or any later one) reads: keys j > p - W."""
        return max(0, next_position + 1 - self.sliding_window)

    def _first_kept_block(self, seq: Sequence) -> int:
        return min(self._window_start(seq.num_computed_tokens) // self.block_size, len(seq.sliding_table))

    def release_behind_window(self, seq: Sequence) -> None:
        """Give back the sliding blocks that lie wholly before the window of `seq`'s next query: no query of this
        sequence reads them again (a preempted sequence recomputes from its tokens)."""
        if not self.sliding:
            return
        first_kept = self._first_kept_block(seq)
        for index in range(seq.num_released_blocks, first_kept):
            self.sliding.release(seq.sliding_table[index])
            seq.sliding_table[index] = NULL_BLOCK
        seq.num_released_blocks = max(seq.num_released_blocks, first_kept)

    # ---- prefix caching ---------------------------------------------------------------------------------------
    def reuse_prefix(self, seq: Sequence, max_tokens: int) -> None:
        """Attach the registered blocks that hold `seq`'s first tokens (at most `max_tokens` of them) and mark
        those tokens computed. Only for a sequence that holds no blocks. With a sliding pool, the hit stops where
        the sliding pool no longer holds every block of the window behind it."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        self.prefix_queried_tokens += seq.num_tokens
        hashes = seq.block_hashes(max_tokens // self.block_size, self.block_size)
        hits = []
        for block_hash in hashes:
            block = self.pool.cached(block_hash)
            if block is None:
                break
            hits.append(block)
        count = self._sliding_hit_length(hashes, len(hits)) if self.sliding else len(hits)
        for block in hits[:count]:
            self.pool.share(block)
            seq.block_table.append(block)
        if self.sliding:
            self._attach_sliding_prefix(seq, hashes, count)
        seq.num_registered_blocks = count
        seq.num_computed_tokens = count * self.block_size
        self.prefix_hit_tokens += seq.num_computed_tokens

    def _sliding_hit_length(self, hashes: list[int], count: int) -> int:
        """The longest hit of at most `count` blocks whose window (the blocks the next query reads) is cached."""
        while count > 0:
            first = self._window_start(count * self.block_size) // self.block_size
            if all(self.sliding.cached(h) is not None for h in hashes[first:count]):
                return count
            count -= 1
        return 0

    def _attach_sliding_prefix(self, seq: Sequence, hashes: list[int], count: int) -> None:
        first = self._window_start(count * self.block_size) // self.block_size
        seq.sliding_table = [NULL_BLOCK] * first
        for block_hash in hashes[first:count]:
            block = self.sliding.cached(block_hash)
            self.sliding.share(block)
            seq.sliding_table.append(block)
        seq.num_released_blocks = first

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that became full of computed tokens, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = seq.block_hashes(full, self.block_size)
        for index in range(seq.num_registered_blocks, full):
            self.pool.register(seq.block_table[index], hashes[index])
            # A released block may already serve another sequence: only blocks still in the table are registered.
            if self.sliding and index >= seq.num_released_blocks:
                self.sliding.register(seq.sliding_table[index], hashes[index])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)
