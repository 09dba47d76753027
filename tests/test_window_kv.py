"""Window-sized KV for sliding-window layers (issue 16): a tiny Gemma3 (window 16, blocks of 4 tokens) run over a
context several windows long gives the logits of the full allocation and of transformers, gives its sliding blocks
back as the window moves, and stays exact under chunked prefill, batching, preemption and prefix caching."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import make_checkpoint
from test_engine import record_logits, transformers_logits

from adaq.engine.api import LLM
from adaq.engine.block_manager import NULL_BLOCK, BlockManager, sliding_pool_blocks
from adaq.engine.sampling_params import SamplingParams
from adaq.engine.sequence import Sequence

WINDOW, BLOCK, CHUNK = 16, 4, 12
PROMPT = [(37 * i + 11) % 250 + 1 for i in range(70)]  # 4.4 windows
CONFIGS = Path(__file__).resolve().parents[1] / "adaq" / "bench" / "configs"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3_window"), sliding_window=WINDOW)


def make_llm(folder, **settings) -> LLM:
    defaults = dict(backend="reference", kv_cache_dtype="bf16", dtype="fp32", device="cpu", block_size=BLOCK,
                    max_model_len=160, max_num_batched_tokens=CHUNK, max_num_seqs=4, skip_tokenizer=True,
                    enable_prefix_caching=False)
    return LLM(folder / "nvfp4", **{**defaults, **settings})


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)


def held_blocks(manager: BlockManager) -> tuple[int, int]:
    return (manager.num_blocks - manager.num_free_blocks,
            manager.sliding.num_usable - manager.num_free_sliding_blocks)


def test_several_windows_match_the_full_allocation_and_transformers(gemma):
    runs = {}
    for window_kv in (True, False):
        llm = make_llm(gemma, window_kv=window_kv)
        runner = llm.engine.runner
        if window_kv:  # the null block (and the released blocks' entries) must never be read
            assert runner.num_sliding_blocks and runner.sliding_kv_cache.shape[1] == 2
            runner.sliding_kv_cache[:, :, NULL_BLOCK] = float("nan")
        else:
            assert runner.sliding_geometry is None and runner.kv_cache.shape[1] == 3
        rows = record_logits(llm)
        out = llm.generate(PROMPT, greedy(24))[0]
        runs[window_kv] = (torch.stack(rows), out.token_ids)
    (windowed, tokens), (full, full_tokens) = runs[True], runs[False]
    assert tokens == full_tokens
    assert (windowed - full).abs().max() <= 1e-5 * full.abs().max()
    reference = transformers_logits(gemma / "decompressed", PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    error = (windowed - reference).abs().max() / reference.abs().max()
    assert error <= 1e-3, f"max |dlogit| / max |logit| = {error:.2e}"


def test_sliding_blocks_are_given_back_as_the_window_moves(gemma):
    llm = make_llm(gemma)
    engine = llm.engine
    manager = engine.block_manager
    engine.add_request(PROMPT, greedy(40))
    most_sliding, most_global = 0, 0
    while engine.has_unfinished():
        engine.step()
        held_global, held_sliding = held_blocks(manager)
        most_global, most_sliding = max(most_global, held_global), max(most_sliding, held_sliding)
        # after a step: the blocks of the window behind the next query, at most ceil((W - 1) / bs) + 1
        assert held_sliding <= -(-(WINDOW - 1) // BLOCK) + 1 or held_global == 0
    assert most_global == -(-(len(PROMPT) + 40 - 1) // BLOCK)  # the global layers keep the whole context
    assert most_sliding <= -(-(WINDOW - 1) // BLOCK) + 1
    assert held_blocks(manager) == (0, 0)


def test_batching_preemption_and_chunked_prefill_stay_exact(gemma):
    """Prompts of several lengths (shorter and longer than the window) arriving one per step, in a cache small
    enough to force preemption: every sequence's greedy tokens equal its tokens alone with the full allocation."""
    prompts = [PROMPT[:5 + 13 * i] for i in range(5)]
    alone = make_llm(gemma, window_kv=False)
    expected = [alone.generate(prompt, greedy(20 + i))[0].token_ids for i, prompt in enumerate(prompts)]
    llm = make_llm(gemma, num_kv_blocks=36, max_model_len=96)
    engine = llm.engine
    assert engine.block_manager.sliding.num_usable < engine.block_manager.num_blocks
    ids = [engine.add_request(prompts[0], greedy(20))]
    finished = {}
    for step in itertools.count():
        if step + 1 < len(prompts):
            ids.append(engine.add_request(prompts[step + 1], greedy(21 + step)))
        for output in engine.step():
            finished[output.request_id] = output
        if not engine.has_unfinished():
            break
    assert engine.scheduler.num_preemptions > 0, "the small cache should have forced preemption"
    assert [finished[request].token_ids for request in ids] == expected
    assert held_blocks(engine.block_manager) == (0, 0)


def test_prefix_cache_hits_are_exact(gemma):
    shared = PROMPT[:50]
    lists = [shared + [7, 8, 9, 10], shared + [11, 12, 13]]
    llm = make_llm(gemma, enable_prefix_caching=True)
    first = llm.prompt_logprobs(lists[:1], start=[50])[0]
    second = llm.prompt_logprobs(lists[1:], start=[50])[0]
    assert llm.engine.block_manager.prefix_hit_tokens == 48, "the window's blocks were still cached"
    plain = make_llm(gemma, window_kv=False)
    for tokens, logprobs in zip(lists, (first, second)):
        expected = plain.prompt_logprobs([tokens], start=[50])[0]
        assert (logprobs[49:] - expected[49:]).abs().max() < 1e-5


def make_seq(tokens: list[int]) -> Sequence:
    seq = Sequence("s", tokens, SamplingParams(max_tokens=1))
    seq.max_tokens = 1
    return seq


def compute(manager: BlockManager, seq: Sequence, tokens: int) -> None:
    assert manager.grow(seq, tokens)
    seq.num_computed_tokens = tokens
    manager.register_computed_blocks(seq)
    manager.release_behind_window(seq)


def test_prefix_hit_only_where_the_sliding_pool_holds_the_window():
    manager = BlockManager(64, 4, enable_prefix_caching=True, sliding_window=8, num_sliding_blocks=12)
    tokens = list(range(1, 34))
    first = make_seq(tokens)
    compute(manager, first, 32)
    assert first.sliding_table[:6] == [NULL_BLOCK] * 6 and NULL_BLOCK not in first.sliding_table[6:]
    manager.free(first)
    second = make_seq(tokens)
    manager.reuse_prefix(second, second.max_reusable_tokens())
    assert second.num_computed_tokens == 32  # blocks 6, 7 (keys 25..31, the window of position 32) still cached
    assert second.sliding_table[:6] == [NULL_BLOCK] * 6 and len(second.block_table) == 8
    manager.free(second)
    filler = make_seq([200 + i for i in range(44)])
    assert manager.grow(filler, 44)  # takes every sliding block: the cached ones are evicted
    manager.free(filler)
    third = make_seq(tokens)
    manager.reuse_prefix(third, third.max_reusable_tokens())
    assert third.num_computed_tokens == 0 and third.block_table == [] and third.sliding_table == []


def test_a_failed_grow_takes_nothing_from_either_pool():
    manager = BlockManager(16, 4, sliding_window=8, num_sliding_blocks=4)
    seq = make_seq(list(range(1, 30)))
    assert manager.grow(seq, 12) and len(seq.sliding_table) == 3
    assert not manager.grow(seq, 16), "the sliding pool (3 usable blocks) is full"
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 13
    seq.num_computed_tokens = 12  # the window of position 12 starts at key 5: block 0 goes back
    assert manager.grow(seq, 16) and seq.sliding_table[0] == NULL_BLOCK


def test_decode_graph_inputs_carry_the_sliding_tables():
    from adaq.engine.cuda_graph import _Bucket, pack_decode_inputs

    longs, ints = pack_decode_inputs(3, 3, [11, 12], [5, 9], [21, 37], [6, 10], [[1, 2], [3, 4, 5]],
                                     [41, 13], [[NULL_BLOCK, 9], [NULL_BLOCK, 2, 3]])
    bucket = _Bucket(3, None, torch.tensor(longs), torch.tensor(ints, dtype=torch.int32), None, sliding=True)
    assert bucket.slot_mapping.tolist() == [21, 37, -1] and bucket.sliding_slot_mapping.tolist() == [41, 13, -1]
    assert bucket.block_tables.tolist() == [[1, 2, 0], [3, 4, 5], [0, 0, 0]]
    assert bucket.sliding_block_tables.tolist() == [[0, 9, 0], [0, 2, 3], [0, 0, 0]]
    assert bucket.context_lens.tolist() == [6, 10, 1]


def test_engine_allocation_matches_the_bench_and_budget_formula(gemma):
    from adaq.bench import roofline

    config = json.loads((gemma / "nvfp4" / "config.json").read_text())
    for seqs, blocks in ((1, 40), (2, 8)):
        settings = dict(block_size=16, num_kv_blocks=blocks, max_num_seqs=seqs, max_model_len=128)
        expected = roofline.kv_cache_bytes(config, "bf16", blocks * 16, num_seqs=seqs, step_tokens=CHUNK)
        assert make_llm(gemma, **settings).engine.runner.kv_cache_bytes == expected
        full = roofline.kv_cache_bytes(config, "bf16", blocks * 16, window_kv=False)
        assert make_llm(gemma, window_kv=False, **settings).engine.runner.kv_cache_bytes == full


def gemma3_27b():
    from adaq.validate.budget import estimate_weight_bytes
    from adaq.formats.shapes import ModelShape

    shape = ModelShape.from_config(json.loads((CONFIGS / "gemma3-27b.json").read_text()))
    return shape, estimate_weight_bytes(shape)


def test_gemma3_27b_kv_at_32k_is_a_quarter_with_a_2k_step():
    from adaq.validate.budget import kv_cache_bytes

    shape, _ = gemma3_27b()
    full = kv_cache_bytes(shape, 1, 32768, "fp8", False, 2048)
    assert full == 62 * 32768 * 2 * 16 * (128 + 4)
    windowed = kv_cache_bytes(shape, 1, 32768, "fp8", True, 2048)
    assert windowed <= full / 4
    sliding_tokens = (sliding_pool_blocks(1024, 16, 1, 2048) + 1) * 16
    assert windowed == 2 * 16 * 132 * (10 * 32768 + 52 * sliding_tokens)
    assert kv_cache_bytes(shape, 1, 32768, "fp8", True, 8192) < 0.4 * full  # 8192-token steps: window + 8k


def test_budget_fits_a_longer_context_and_says_why():
    from adaq.validate.budget import Gpu, plan

    shape, weights = gemma3_27b()
    gpu = Gpu.parse("rtx4090")
    before = plan(shape, weights, gpu, 1, 4096, window_kv=False)
    after = plan(shape, weights, gpu, 1, 4096, batched_tokens=2048)
    assert after.max_context > before.max_context and after.kv_cache < before.kv_cache
    assert any("52 sliding-window layers (window 1024)" in note and "window-sized" in note for note in after.notes)
    assert any("window-sized KV off" in note for note in before.notes)
    short = plan(shape, weights, gpu, 16, 512)  # contexts within the window: nothing to save
    assert short.kv_cache == plan(shape, weights, gpu, 16, 512, window_kv=False).kv_cache + 52 * 2 * 16 * 132 * 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_and_decode_graphs_give_the_full_allocations_tokens(tmp_path):
    """The cuda backend (paged-attention kernels, prefill and decode, and decode CUDA graphs with the sliding
    tables as inputs): the same tokens and logits as the full allocation, with the null block poisoned (NaN)."""
    from adaq.kernels import available

    if not available():
        pytest.skip("adaq's CUDA kernels are not built")
    folder = make_checkpoint("gemma3", tmp_path, head_dim=128, sliding_window=32)
    settings = dict(backend="cuda", kv_cache_dtype="fp8", dtype="bf16", device="cuda", block_size=16, max_model_len=512,
                    max_num_batched_tokens=64, max_num_seqs=4, num_kv_blocks=128)
    prompts = [PROMPT * 3, PROMPT[:40], PROMPT[:7]]
    runs = {}
    for window_kv in (True, False):
        llm = make_llm(folder, window_kv=window_kv, **settings)
        runner = llm.engine.runner
        assert runner.decode_graphs is not None
        if window_kv:
            runner.sliding_kv_cache[:, :, NULL_BLOCK].view(torch.uint8).fill_(0x7F)  # E4M3 NaN
            runner.sliding_kv_scales[:, :, NULL_BLOCK] = float("nan")
        rows = record_logits(llm)
        tokens = [out.token_ids for out in llm.generate(prompts, greedy(40))]
        runs[window_kv] = (torch.stack(rows).float(), tokens)
    (windowed, tokens), (full, full_tokens) = runs[True], runs[False]
    assert tokens == full_tokens
    assert torch.isfinite(windowed).all()
    assert (windowed - full).abs().max() <= 1e-3 * full.abs().max()
