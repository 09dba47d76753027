"""The step context: what the model runner tells attention about the packed tokens of one step.

The runner calls `set_context(...)` before a forward and `reset_context()` after it; attention layers read
`get_context()`. Model code never builds or changes it.

Token layout of a step: the T query tokens of B sequences, packed one sequence after another.
- `cu_seqlens_q` [B + 1] int32: query token offsets of each sequence (prefill; decode may leave it None: one
  query per sequence).
- `context_lens` [B] int32: tokens of each sequence in the KV cache *after* this step's tokens are stored, so a
  sequence's queries sit at positions `context_lens[b] - q_len_b ... context_lens[b] - 1` (chunked prefill: a
  cached prefix before them).
- `slot_mapping` [T] int64: cache slot (block * block_size + offset) of each token's K/V; -1 = do not store.
- `block_tables` [B, max_blocks] int32: the cache blocks of each sequence, padded with -1.
- `sliding_slot_mapping` [T], `sliding_block_tables` [B, max_blocks]: the same for the layers whose KV lives in the
  sliding-window pool (None: those layers use the tables above). Entries of blocks wholly before a sequence's window
  hold a null block that attention never reads (adaq/engine/block_manager.py).
- `state_slots` [B] int64 (hybrid models only): each sequence's slot in the per-sequence state cache (Gated
  DeltaNet conv and recurrent states); a sequence with no cached tokens before this step starts from a zero state.
"""

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Context:
    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 0
    context_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_context_len: int = 0
    state_slots: torch.Tensor | None = None
    sliding_slot_mapping: torch.Tensor | None = None
    sliding_block_tables: torch.Tensor | None = None
    _sliding_view: "Context | None" = field(default=None, repr=False, compare=False)
    _offsets_long: "torch.Tensor | None" = field(default=None, repr=False, compare=False)

    def for_sliding_pool(self) -> "Context":
        """This step as the sliding-pool layers see it: the sliding slots and tables in place of the global ones.
        Made once per step, so what a backend keeps on a context (prefill maps) is shared by those layers too."""
        if self.sliding_block_tables is None:
            return self
        if self._sliding_view is None:
            self._sliding_view = replace(self, slot_mapping=self.sliding_slot_mapping,
                                         block_tables=self.sliding_block_tables, sliding_slot_mapping=None,
                                         sliding_block_tables=None)
        return self._sliding_view

    def query_offsets_long(self) -> torch.Tensor:
        """query_offsets() as int64, made once per step: every layer of the step gets the same tensor, so caches
        keyed by tensor identity (fla's chunk indices, each a host sync to build) are built once per step, not once
        per layer."""
        if self._offsets_long is None:
            self._offsets_long = self.query_offsets().long()
        return self._offsets_long

    @property
    def num_seqs(self) -> int:
        if self.context_lens is not None:
            return self.context_lens.numel()
        return 0 if self.cu_seqlens_q is None else self.cu_seqlens_q.numel() - 1

    def query_offsets(self) -> torch.Tensor:
        """[B + 1] query offsets; decode without cu_seqlens_q means one query per sequence."""
        if self.cu_seqlens_q is not None:
            return self.cu_seqlens_q
        device = self.context_lens.device
        return torch.arange(self.num_seqs + 1, dtype=torch.int32, device=device)


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(
    is_prefill: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    context_lens: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    max_context_len: int = 0,
    sliding_slot_mapping: torch.Tensor | None = None,
    sliding_block_tables: torch.Tensor | None = None,
    state_slots: torch.Tensor | None = None,
) -> Context:
    global _CONTEXT
    _CONTEXT = Context(is_prefill, cu_seqlens_q, max_seqlen_q, context_lens, slot_mapping, block_tables,
                       max_context_len, state_slots, sliding_slot_mapping, sliding_block_tables)
    return _CONTEXT


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()
