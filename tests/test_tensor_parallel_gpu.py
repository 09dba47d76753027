"""Tensor parallelism on GPUs (NCCL), every engine under --strict: skipped without CUDA; the sharded tests need 2.

- TP=1 through the new code path (the layers' sharding hooks at one rank) on one GPU: decode graphs captured,
  greedy tokens equal to eager.
- TP=2 over two GPUs, per family: the decode graphs capture the all-reduces (NCCL inside the graph) and replay;
  graph and eager decode give the same tokens; prompt log-probabilities equal one GPU's within bf16 rounding of
  the partial sums; each rank reports its memory.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_prefill")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from helpers.tiny_models import make_checkpoint  # noqa: E402

from adaq.engine.sampling_params import SamplingParams  # noqa: E402

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
SHAPES = {  # kernel-friendly widths that still split over 2 ranks on 16-column blocks
    "qwen3": dict(hidden_size=128, intermediate_size=256, head_dim=64),
    "qwen3_moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=64),
    "gemma3": dict(hidden_size=128, intermediate_size=256, head_dim=64, query_pre_attn_scalar=64),
}
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 8, 9], list(range(20, 53))]
MAX_TOKENS = 24
LOGPROB_TOLERANCE = 0.05  # nats: bf16 partial sums all-reduced against one bf16 GEMM


def llm(folder, size: int, **settings):
    from adaq.engine.api import LLM

    return LLM(folder, backend="cuda", dtype="bf16", device="cuda:0", max_model_len=128, max_num_seqs=4,
               num_kv_blocks=64, skip_tokenizer=True, strict=True, tensor_parallel_size=size, **settings)


def greedy(model) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in model.generate(PROMPTS, params)]


def test_one_rank_through_the_sharding_hooks_captures_and_matches_eager(tmp_path):
    folder = make_checkpoint("qwen3", tmp_path, **SHAPES["qwen3"]) / "nvfp4"
    with llm(folder, 1) as graphs:
        assert graphs.engine.runner.decode_graphs is not None and graphs.engine.runner.tp.size == 1
        tokens = greedy(graphs)
        assert graphs.engine.runner.decode_graphs.replays >= MAX_TOKENS - 1
    with llm(folder, 1, enforce_eager=True) as eager:
        assert greedy(eager) == tokens


@TWO_GPUS
@pytest.mark.parametrize("arch", list(SHAPES))
def test_two_gpus_capture_the_all_reduce_and_match_one(arch, tmp_path):
    folder = make_checkpoint(arch, tmp_path, **SHAPES[arch]) / "nvfp4"
    with llm(folder, 1) as one:
        expected = one.prompt_logprobs([PROMPTS[2]])[0]
    with llm(folder, 2) as two:
        graphs = two.engine.runner.decode_graphs
        assert graphs is not None, f"{arch}: no decode graphs at TP=2"
        tokens = greedy(two)
        assert graphs.replays >= MAX_TOKENS - 1
        assert len(two.engine.fallbacks) == 0
        logprobs = two.prompt_logprobs([PROMPTS[2]])[0]
        memory = two.engine.memory_per_rank()
    assert (logprobs - expected).abs().max().item() < LOGPROB_TOLERANCE
    assert [m["device"] for m in memory] == ["cuda:0", "cuda:1"]
    assert all(m["peak_allocated_bytes"] and m["kv_cache_bytes"] for m in memory)
    with llm(folder, 2, enforce_eager=True) as eager:
        assert greedy(eager) == tokens, f"{arch}: graph and eager decode differ at TP=2"
