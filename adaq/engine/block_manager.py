"""The paged KV cache's bookkeeping: which cache blocks belong to which sequence."""

from collections import deque

from adaq.engine.sequence import Sequence


class BlockManager:
    """A free list of `num_blocks` blocks of `block_size` token slots; sequences grow one block at a time."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

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
        seq.block_table.extend(self._free.popleft() for _ in range(max(missing, 0)))
        return True

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot (block * block_size + offset) of the token at `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
