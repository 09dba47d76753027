"""Block manager and scheduler: budgets, chunked prefill, admission limits, preemption by recompute."""

import pytest

from adaq.engine.block_manager import BlockManager
from adaq.engine.sampling_params import SamplingParams
from adaq.engine.scheduler import Scheduler
from adaq.engine.sequence import Sequence, SequenceStatus


def make_seq(name: str, prompt_len: int, max_tokens: int = 8) -> Sequence:
    seq = Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, temperature=0))
    seq.max_tokens = max_tokens
    return seq


def complete_step(batch) -> None:
    """What the engine does after a step: the computed tokens are cached, a sampled token is appended."""
    for seq, count in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += count
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(0)


def test_block_manager_grows_by_blocks_and_frees():
    manager = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", 5)
    assert manager.grow(seq, 5) and len(seq.block_table) == 2
    assert manager.grow(seq, 8) and len(seq.block_table) == 2
    assert manager.slot(seq, 5) == seq.block_table[1] * 4 + 1
    assert not manager.grow(seq, 17) and len(seq.block_table) == 2, "a failed grow must take nothing"
    manager.free(seq)
    assert manager.num_free_blocks == 4 and seq.block_table == []


def test_chunked_prefill_respects_the_token_budget():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    seq = make_seq("long", 50)
    scheduler.add(seq)
    chunks = []
    while seq.num_computed_tokens < seq.num_prompt_tokens:
        batch = scheduler.schedule()
        chunks.append(batch.num_new_tokens[0])
        assert not batch.is_decode
        complete_step(batch)
    assert chunks == [16, 16, 16, 2]
    batch = scheduler.schedule()
    assert batch.is_decode and batch.num_new_tokens == [1]


def test_decodes_and_a_new_prompt_share_a_step():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    first = make_seq("first", 3)
    scheduler.add(first)
    complete_step(scheduler.schedule())
    scheduler.add(make_seq("second", 20))
    batch = scheduler.schedule()
    assert [seq.request_id for seq in batch.seqs] == ["first", "second"]
    assert batch.num_new_tokens == [1, 9]


def test_max_num_seqs_limits_admission():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for name in "abc":
        scheduler.add(make_seq(name, 3))
    batch = scheduler.schedule()
    assert [seq.request_id for seq in batch.seqs] == ["a", "b"]
    assert [seq.request_id for seq in scheduler.waiting] == ["c"]


def test_preemption_frees_the_latest_sequence_and_requeues_it_first():
    manager = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make_seq("old", 8), make_seq("new", 8)
    scheduler.add(old)
    scheduler.add(new)
    complete_step(scheduler.schedule())  # both prompts fill 2 blocks each: the cache is full
    assert manager.num_free_blocks == 0
    batch = scheduler.schedule()  # old needs a third block for its 9th token: new is preempted
    assert [seq.request_id for seq in batch.seqs] == ["old"]
    assert new.status == SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert scheduler.waiting[0] is new and scheduler.num_preemptions == 1
    complete_step(batch)
    scheduler.finish(old)
    batch = scheduler.schedule()  # recomputed from all its tokens, the sampled one included
    assert batch.seqs == [new] and batch.num_new_tokens == [new.num_tokens] == [9]


def test_a_lone_sequence_that_outgrows_the_cache_preempts_itself():
    manager = BlockManager(num_blocks=2, block_size=4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    seq = make_seq("alone", 8)
    scheduler.add(seq)
    complete_step(scheduler.schedule())
    assert scheduler.schedule() is None
    assert seq.status == SequenceStatus.WAITING and manager.num_free_blocks == 2


@pytest.mark.parametrize("where", ["waiting", "running"])
def test_finish_removes_and_frees(where):
    manager = BlockManager(8, 4)
    scheduler = Scheduler(manager, max_num_seqs=1, max_num_batched_tokens=100)
    running, waiting = make_seq("r", 5), make_seq("w", 5)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    scheduler.finish(running if where == "running" else waiting)
    assert manager.num_free_blocks == (8 if where == "running" else 6)
    assert len(scheduler.running) + len(scheduler.waiting) == 1


def test_prefix_blocks_are_shared_reference_counted_and_evicted_last():
    manager = BlockManager(num_blocks=6, block_size=4)
    first = make_seq("first", 10)
    assert manager.grow(first, 10)
    first.num_computed_tokens = 10
    manager.register_computed_blocks(first)  # two full blocks registered; the third holds 2 tokens
    second = make_seq("second", 10)
    manager.reuse_prefix(second, second.max_reusable_tokens())
    assert second.block_table == first.block_table[:2] and second.num_computed_tokens == 8
    manager.free(first)
    assert manager.num_free_blocks == 4, "the shared blocks are still held by the second sequence"
    manager.free(second)
    assert manager.num_free_blocks == 6
    third = make_seq("third", 9)
    manager.reuse_prefix(third, third.max_reusable_tokens())
    assert third.num_computed_tokens == 8, "unreferenced blocks stay cached"
    manager.free(third)
    hog = make_seq("hog", 24)
    assert manager.grow(hog, 24)  # needs every block: the cached ones are evicted
    fourth = make_seq("fourth", 9)
    manager.reuse_prefix(fourth, fourth.max_reusable_tokens())
    assert fourth.num_computed_tokens == 0 and fourth.block_table == []


def test_reuse_leaves_the_tokens_whose_outputs_are_needed():
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", 8)
    manager.grow(seq, 8)
    seq.num_computed_tokens = 8
    manager.register_computed_blocks(seq)
    same = make_seq("same", 8)  # all 8 tokens cached, but the last one must run to give logits
    manager.reuse_prefix(same, same.max_reusable_tokens())
    assert same.num_computed_tokens == 4
    scored = Sequence("scored", list(range(1, 13)), SamplingParams(max_tokens=0, prompt_logprobs=True))
    scored.score_from = 5  # log p of token 5 needs the hidden state at position 4
    manager.reuse_prefix(scored, scored.max_reusable_tokens())
    assert scored.num_computed_tokens == 4
