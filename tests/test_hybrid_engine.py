"""The engine on tiny random NVFP4 hybrid (Gated DeltaNet) checkpoints: the state cache through continuous batching,
chunked prefill and preemption, against transformers and against each sequence alone; `adaq run` end to end."""

import warnings

import pytest
import torch
from helpers.engine_runs import run_with_staggered_arrivals
from helpers.tiny_models import make_checkpoint
from helpers.tiny_tokenizer import write_tokenizer
from test_engine import greedy, make_llm, record_logits, transformers_logits
from test_run_cli import FAST, adaq

from adaq.engine.api import LLM

DECODE_STEPS = 33
PROMPT = [249, 17, 200, 3, 96, 45, 150, 7, 88, 230, 61, 12, 5, 140]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for arch in ("qwen3_5", "qwen3_next"):
        root = make_checkpoint(arch, tmp_path_factory.mktemp(arch))
        write_tokenizer(root / "nvfp4")
        folders[arch] = root
    return folders


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_chunked_prefill_and_decode_match_transformers(checkpoints, arch, capsys):
    """Prompt chunks of 5 tokens (the states carried from chunk to chunk), then 33 decode steps."""
    llm = make_llm(checkpoints[arch] / "nvfp4", max_num_batched_tokens=5)
    rows = record_logits(llm)
    out = llm.generate(PROMPT, greedy(DECODE_STEPS + 1))[0]
    reference = transformers_logits(checkpoints[arch] / "decompressed", PROMPT + out.token_ids[:-1])
    expected = reference[len(PROMPT) - 1:]
    error = ((torch.stack(rows) - expected).abs().max() / expected.abs().max()).item()
    with capsys.disabled():
        print(f"\n{arch}: engine prefill + {DECODE_STEPS} decode steps, max |dlogit| / max |logit| = {error:.2e}")
    assert error <= 1e-3
    assert out.token_ids == expected.argmax(-1).tolist()


def test_state_cache_sized_and_attached(checkpoints):
    runner = make_llm(checkpoints["qwen3_5"] / "nvfp4", max_num_seqs=5).engine.runner
    assert runner.num_state_slots == 5 and runner.state_cache.conv.shape[:2] == (3, 5)
    assert runner.state_cache.ssm.dtype == torch.float32
    assert all(layer.ssm_state.data_ptr() == runner.state_cache.ssm[i].data_ptr()
               for i, layer in enumerate(runner.state_layers))


@pytest.mark.parametrize("cache", [dict(num_kv_blocks=40), dict(kv_cache_memory=110_000)],
                         ids=["preempting", "three-state-slots"])
def test_batch_invariance_with_preemption_and_few_state_slots(checkpoints, cache):
    """A prompt's greedy tokens alone equal its tokens among 7 others of different lengths arriving one per step,
    with chunked prefill, and either a KV cache small enough to force preemption (states dropped and rebuilt) or a
    budget that leaves 3 state slots for 8 sequences (admission waits for a slot)."""
    folder = checkpoints["qwen3_5"] / "nvfp4"
    target = PROMPT[:9]
    alone = make_llm(folder).generate(target, greedy(24))[0].token_ids
    llm = make_llm(folder, max_model_len=64, max_num_batched_tokens=16, **cache)
    engine = llm.engine
    assert engine.runner.num_state_slots == (3 if "kv_cache_memory" in cache else 32)

    def within_state_slots(engine):
        assert len(engine.scheduler.running) <= engine.runner.num_state_slots

    target_id, finished = run_with_staggered_arrivals(engine, target, greedy, within_state_slots)
    if "num_kv_blocks" in cache:
        assert engine.scheduler.num_preemptions > 0, "the tiny cache should have forced preemption"
    assert len(finished) == 8 and all(output.finished for output in finished.values())
    assert finished[target_id].token_ids == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.runner.state_slots.num_free == engine.runner.num_state_slots


def test_prefix_caching_is_off_with_a_notice(checkpoints):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = make_llm(checkpoints["qwen3_5"] / "nvfp4", enable_prefix_caching=True)
    assert any("prefix caching is off" in str(w.message) for w in caught)
    assert not llm.engine.block_manager.enable_prefix_caching


def test_adaq_run_end_to_end(checkpoints, capsys, monkeypatch):
    from adaq.engine.api import LLM, SamplingParams

    folder = checkpoints["qwen3_next"] / "nvfp4"
    code, out, err = adaq(["run", folder, "Hello", "--no-chat", "--temperature", "0", "--max-tokens", "12",
                           "--kv-cache-dtype", "bf16", *FAST], capsys, monkeypatch)
    assert code == 0, err
    llm = LLM(folder, backend="reference", device="cpu", kv_cache_dtype="bf16", max_model_len=256)
    expected = llm.generate("Hello", SamplingParams(max_tokens=12, temperature=0))[0]
    assert out == expected.text + "\n" and len(expected.token_ids) == 12


def test_decode_graphs_refused_with_a_reason(checkpoints):
    from adaq.engine.cuda_graph import graph_blocker, graph_safe

    model = make_llm(checkpoints["qwen3_5"] / "nvfp4").engine.runner.model
    assert not graph_safe(model) and "Gated DeltaNet" in graph_blocker(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_state_cache_sizing_and_greedy_parity(checkpoints, capsys):
    """On a GPU the state slots and KV blocks share what gpu_memory_utilization leaves; the reference backend's
    tokens there equal the CPU's; the auto backend (cuda kernels where they exist, reference GDN ops) runs eagerly."""
    folder = checkpoints["qwen3_next"] / "nvfp4"
    settings = dict(dtype="fp32", kv_cache_dtype="bf16", max_model_len=128)
    gpu = LLM(folder, backend="reference", device="cuda", gpu_memory_utilization=0.3, **settings)
    runner = gpu.engine.runner
    assert runner.num_state_slots == runner.config.max_num_seqs
    assert runner.state_cache.ssm.device.type == "cuda"
    prompts = [PROMPT, PROMPT[:3], PROMPT * 3]
    on_gpu = [out.token_ids for out in gpu.generate(prompts, greedy(32))]
    cpu = LLM(folder, backend="reference", device="cpu", **settings)
    assert on_gpu == [out.token_ids for out in cpu.generate(prompts, greedy(32))]
    del gpu, runner  # the runner holds the KV cache: both go before the next engine measures free memory
    fast = LLM(folder, backend="auto", device="cuda", gpu_memory_utilization=0.3, kv_cache_dtype="bf16",
               max_model_len=128)
    assert fast.engine.runner.decode_graphs is None
    tokens = [out.token_ids for out in fast.generate(prompts, greedy(32))]
    agreement = sum(a == b for x, y in zip(tokens, on_gpu) for a, b in zip(x, y)) / sum(map(len, on_gpu))
    with capsys.disabled():
        print(f"\nbackend {fast.engine.runner.model.backend.name} (bf16) vs reference (fp32): "
              f"{agreement:.0%} of greedy tokens equal")
    assert all(len(t) == 32 for t in tokens)
