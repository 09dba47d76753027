"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a budget of `max_num_batched_tokens` tokens. Running sequences come first, in arrival order: a
decoding sequence asks for one token, a sequence still in its prompt for the rest of it (cut to the budget). When
the cache has no block left for one of them, the most recently admitted running sequence is preempted: its blocks
are freed and it goes back to the head of the queue, to be recomputed from its tokens later. Waiting sequences
are admitted while the budget, `max_num_seqs` and the free blocks allow, and not in a step that preempted; an
admitted sequence first takes the cached blocks of its longest known prefix (block_manager.py). A step
can mix prompt chunks and decode tokens; it is a decode step when every sequence in it computes one token.
"""

from collections import deque
from dataclasses import dataclass

from adaq.engine.block_manager import BlockManager
from adaq.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes in this step, starting at its num_computed_tokens

    @property
    def is_decode(self) -> bool:
        return all(count == 1 for count in self.num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        budget -= batch.num_tokens
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch if batch.seqs else None

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.grow(seq, seq.num_computed_tokens + count):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(count)
            budget -= count
            index += 1
        return preempted

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.reuse_prefix(seq, seq.max_reusable_tokens())
            count = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.grow(seq, seq.num_computed_tokens + count):
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(count)
            budget -= count

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
