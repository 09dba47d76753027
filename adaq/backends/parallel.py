"""Tensor parallelism's process group as the layers see it: who this rank is, how a dimension splits, and the two
collectives a sharded model needs (an all-reduce after each row-parallel Linear, an all-gather of the vocabulary
shards of the logits).

The all-reduce is a plain `torch.distributed.all_reduce` on the group: NCCL records it into a CUDA graph like any
kernel, so decode graphs capture a sharded step whole. With one rank every call is the identity.
"""

from dataclasses import dataclass

import torch

from adaq.errors import CheckpointError


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object = None  # a torch.distributed ProcessGroup; None with one rank

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside a group of {self.size}")

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of `total` items; refused when they do not split evenly."""
        if total % self.size:
            raise CheckpointError(f"{what} ({total}) does not split over --tensor-parallel-size {self.size}")
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share

    def padded_split(self, total: int) -> tuple[int, int, int]:
        """(start, stop, share) for a vocabulary: shares of ceil(total / size), the last rank's cut short."""
        share = -(-total // self.size)
        start = min(self.rank * share, total)
        return start, min(start + share, total), share

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (capture-safe under NCCL)."""
        if self.sharded:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's [S, share] block side by side, cut to `total` columns (a vocabulary's padded shares)."""
        if not self.sharded:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :total]


SINGLE = TPGroup()


def kv_head_share(num_kv_heads: int, tp: TPGroup, what: str) -> tuple[int, int]:
    """[first, stop) of the KV heads this rank holds: its share when they split evenly, else (fewer KV heads than
    ranks) the one KV head its query heads read, replicated over size / num_kv_heads ranks, as vLLM does."""
    if num_kv_heads >= tp.size:
        return tp.split(num_kv_heads, f"{what} KV heads")
    if tp.size % num_kv_heads:
        raise CheckpointError(f"{what}: {num_kv_heads} KV heads cannot be replicated over --tensor-parallel-size "
                              f"{tp.size} (the size must be a multiple of the KV heads)")
    head = tp.rank // (tp.size // num_kv_heads)
    return head, head + 1
