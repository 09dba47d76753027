"""The paged KV cache's bookkeeping: which cache blocks belong to which sequence, and which full blocks can be
shared (automatic prefix caching, as in vLLM).

A full block is known by the hash of its tokens and of every token before it; once computed it is registered
under that hash. A new sequence starts from the longest chain of registered blocks that matches its tokens
(shared, reference-counted) and computes only the rest. Blocks nobody references stay cached in a least recently
freed order and are reused (their hash forgotten) only when no never-used block is left.
"""

from collections import OrderedDict

from adaq.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evicted first = first
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks to hold `num_tokens` tokens; False (and nothing taken) if there are too few."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > len(self._free):
            return False
        for _ in range(max(missing, 0)):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        # Last blocks first: they are the least likely to be shared, so they are evicted first.
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot (block * block_size + offset) of the token at `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- prefix caching ---------------------------------------------------------------------------------------
    def reuse_prefix(self, seq: Sequence, max_tokens: int) -> None:
        """Attach the registered blocks that hold `seq`'s first tokens (at most `max_tokens` of them) and mark
        those tokens computed. Only for a sequence that holds no blocks."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        self.prefix_queried_tokens += seq.num_tokens
        for block_hash in seq.block_hashes(max_tokens // self.block_size, self.block_size):
            block = self._cached.get(block_hash)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
            seq.block_table.append(block)
        seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        self.prefix_hit_tokens += seq.num_computed_tokens

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that became full of computed tokens, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = seq.block_hashes(full, self.block_size)
        for index in range(seq.num_registered_blocks, full):
            block = seq.block_table[index]
            if hashes[index] not in self._cached and self._block_hash[block] is None:
                self._cached[hashes[index]] = block
                self._block_hash[block] = hashes[index]
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def _forget(self, block: int) -> None:
        block_hash = self._block_hash[block]
        if block_hash is not None:
            del self._cached[block_hash]
            self._block_hash[block] = None
