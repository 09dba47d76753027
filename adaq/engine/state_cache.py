"""The per-sequence state cache of hybrid models (Gated DeltaNet layers), beside the paged KV cache.

Each GDN layer keeps, per sequence, a conv state [C, Kc-1] (compute dtype) and a recurrent state [Hv, Dk, Dv]
(fp32) whatever the sequence's length. They live in slots: one tensor per kind for all layers, `conv [layers,
slots, C, Kc-1]` and `ssm [layers, slots, Hv, Dk, Dv]`, whose per-layer views the runner sets on the layers
(`conv_state`, `ssm_state`). A sequence takes a slot when the scheduler first gives it blocks (admission) and
gives it back with its blocks (finish, abort, preemption), so `HybridBlockManager` wraps the block manager and
nothing else in the scheduler changes. A slot is never cleared: a sequence with no cached tokens starts from zero
states (the step context's `context_lens` says so), so a preempted sequence's recompute rebuilds its state.
The runner puts the step's slot of each sequence in the step context (`state_slots`).

Prefix caching is off for hybrid models (a notice says so): a block of KV does not carry the recurrent state of
the tokens before it, and no per-block state snapshots are kept yet.
"""

import warnings
from dataclasses import dataclass

import torch

from adaq.engine.block_manager import BlockManager
from adaq.engine.sequence import Sequence
from adaq.errors import AdaqNotice

MAX_STATE_SHARE = 0.5  # of the cache budget: the rest stays for the KV cache


@dataclass
class StateGeometry:
    num_layers: int
    conv_shape: tuple[int, int]  # [C, Kc-1] per layer and slot
    ssm_shape: tuple[int, int, int]  # [Hv, Dk, Dv] per layer and slot
    conv_dtype: torch.dtype  # the model's compute dtype; recurrent states are fp32

    @classmethod
    def of(cls, layers: list, dtype: torch.dtype) -> "StateGeometry":
        return cls(len(layers), layers[0].conv_state_shape(), layers[0].ssm_state_shape(), dtype)

    def bytes_per_slot(self) -> int:
        conv = self.conv_shape[0] * self.conv_shape[1] * self.conv_dtype.itemsize
        ssm = self.ssm_shape[0] * self.ssm_shape[1] * self.ssm_shape[2] * 4
        return self.num_layers * (conv + ssm)

    def slots_within(self, budget: int, max_num_seqs: int) -> int:
        """Slots for up to max_num_seqs sequences, taking at most MAX_STATE_SHARE of `budget` bytes (at least 1)."""
        return max(1, min(max_num_seqs, int(budget * MAX_STATE_SHARE) // self.bytes_per_slot()))


class StateCache:
    def __init__(self, layers: list, geometry: StateGeometry, num_slots: int, device: torch.device):
        g = geometry
        self.layers = layers
        self.num_slots = num_slots
        self.conv = torch.zeros((g.num_layers, num_slots, *g.conv_shape), dtype=g.conv_dtype, device=device)
        self.ssm = torch.zeros((g.num_layers, num_slots, *g.ssm_shape), dtype=torch.float32, device=device)
        self.attach()

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def attach(self) -> None:
        for index, layer in enumerate(self.layers):
            layer.conv_state, layer.ssm_state = self.conv[index], self.ssm[index]


class StateSlots:
    """Which state slot each sequence holds."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._slot_of: dict[Sequence, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def holds(self, seq: Sequence) -> bool:
        return seq in self._slot_of

    def take(self, seq: Sequence) -> None:
        if seq not in self._slot_of:
            self._slot_of[seq] = self._free.pop()

    def release(self, seq: Sequence) -> None:
        slot = self._slot_of.pop(seq, None)
        if slot is not None:
            self._free.append(slot)

    def slot_of(self, seq: Sequence) -> int:
        return self._slot_of[seq]


class HybridBlockManager(BlockManager):
    """The block manager, plus one state slot per sequence that holds blocks: a sequence is admitted only when a
    slot is free too, and its slot goes back whenever its blocks do. No prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, slots: StateSlots):
        super().__init__(num_blocks, block_size, enable_prefix_caching=False)
        self.slots = slots

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        if not self.slots.holds(seq) and self.slots.num_free == 0:
            return False
        if not super().grow(seq, num_tokens):
            return False
        self.slots.take(seq)
        return True

    def free(self, seq: Sequence) -> None:
        super().free(seq)
        self.slots.release(seq)


def make_block_manager(runner, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                       sliding_window: int | None = None, num_sliding_blocks: int = 0) -> BlockManager:
    """A HybridBlockManager when the runner has a state cache (prefix caching then off, with a notice); else the
    block manager, with a window-sized pool for sliding layers when the runner has one."""
    slots = getattr(runner, "state_slots", None)
    if slots is None:
        return BlockManager(num_blocks, block_size, enable_prefix_caching, sliding_window, num_sliding_blocks)
    if enable_prefix_caching:
        warnings.warn("prefix caching is off for hybrid (Gated DeltaNet) models: their recurrent state is not "
                      "snapshotted per block", AdaqNotice, stacklevel=2)
    return HybridBlockManager(num_blocks, block_size, slots)
