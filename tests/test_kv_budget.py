"""`adaq validate`'s KV and state-cache bytes against what the engine allocates (issue 16): the model runner is
built on the CPU (no weights needed) for tiny Gemma 4 (mixed KV heads and head_dims, k_eq_v), Gemma 4 MoE, Gemma 3,
Qwen3, a hybrid Qwen3.5 and the real Gemma3-27B / Gemma4-31B shapes, for every KV dtype, window-sized KV on and off;
the bytes of the tensors it allocates must equal what the budget predicts from config.json alone."""

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import hf_config

from adaq.backends import get_backend
from adaq.engine.config import EngineConfig
from adaq.engine.model_runner import ModelRunner
from adaq.formats.shapes import ModelShape
from adaq.models import build_model
from adaq.validate.budget import (Gpu, KV_BLOCK_SIZE, estimate_weight_bytes, kv_cache_bytes, kv_pools, plan,
                                  state_bytes_per_sequence)

CONFIGS = Path(__file__).resolve().parents[1] / "adaq" / "bench" / "configs"
TINY = ("gemma4", "gemma4_moe", "gemma3", "qwen3", "qwen3_5")
KV_DTYPES = ("fp8", "nvfp4", "bf16")
SEQS, STEP = 3, 40  # max_num_seqs = the budget's batch; max_num_batched_tokens = its prefill chunk


def tiny_config(arch: str) -> dict:
    return hf_config(arch, sliding_window=8).to_dict() if arch.startswith("gemma") else hf_config(arch).to_dict()


def real_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def runner_for(config: dict, kv_dtype: str, window_kv: bool, **memory) -> ModelRunner:
    model = build_model(config, get_backend("reference", "cpu"), torch.bfloat16, "cpu")  # no weights: shapes only
    settings = EngineConfig(model="shapes-only", device="cpu", dtype="bf16", kv_cache_dtype=kv_dtype,
                            window_kv=window_kv, max_num_seqs=SEQS, max_num_batched_tokens=STEP, max_model_len=48,
                            block_size=KV_BLOCK_SIZE, skip_tokenizer=True, **memory)
    return ModelRunner(model, config, settings)


def allocated_kv_bytes(runner: ModelRunner) -> int:
    tensors = (runner.kv_cache, runner.kv_scales, runner.sliding_kv_cache, runner.sliding_kv_scales)
    return sum(tensor.nbytes for tensor in tensors if tensor is not None)


def check_against_the_engine(config: dict, kv_dtype: str, window_kv: bool, memory: int = 3 * 2**20 + 12345) -> None:
    """`memory`: a kv_cache_memory that the engine splits into state slots and both pools."""
    shape = ModelShape.from_config(config)
    context = 5 * KV_BLOCK_SIZE + 3  # the global pool of SEQS sequences: SEQS x 6 blocks
    blocks = SEQS * -(-context // KV_BLOCK_SIZE)
    exact = runner_for(config, kv_dtype, window_kv, num_kv_blocks=blocks)
    assert allocated_kv_bytes(exact) == kv_cache_bytes(shape, SEQS, context, kv_dtype, window_kv, STEP)
    assert exact.state_cache_bytes == SEQS * state_bytes_per_sequence(shape)
    budget = plan(shape, estimate_weight_bytes(shape), Gpu.parse("h100"), SEQS, context, kv_dtype,
                  window_kv=window_kv, batched_tokens=STEP)
    assert budget.kv_cache + budget.state_cache == allocated_kv_bytes(exact) + exact.state_cache_bytes

    sized = runner_for(config, kv_dtype, window_kv, kv_cache_memory=memory)
    pools = kv_pools(shape, kv_dtype, window_kv, SEQS, STEP)
    assert sized.num_blocks == pools.global_blocks_in(memory - sized.state_cache_bytes)
    assert allocated_kv_bytes(sized) == pools.nbytes(sized.num_blocks) <= memory - sized.state_cache_bytes
    assert (sized.sliding_geometry is None) == (pools.sliding is None)


@pytest.mark.parametrize("window_kv", (True, False))
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("arch", TINY)
def test_budget_kv_equals_the_engine_allocation(arch, kv_dtype, window_kv):
    check_against_the_engine(tiny_config(arch), kv_dtype, window_kv)


@pytest.mark.parametrize("window_kv", (True, False))
@pytest.mark.parametrize("name", ("gemma3-27b", "gemma4-31b"))
def test_budget_kv_equals_the_engine_allocation_for_the_real_shapes(name, window_kv):
    check_against_the_engine(real_config(name), "fp8", window_kv, memory=64 * 2**20 + 12345)


def test_gemma4_31b_global_layers_get_their_own_slots_only_with_window_kv():
    """Window-sized KV: global layers in 4 x 512 slots, sliding layers in 16 x 256; without it every layer in
    16 x 256, twice what a global layer needs."""
    shape = ModelShape.from_config(real_config("gemma4-31b"))
    pools = kv_pools(shape, "fp8", True, 1, 2048)
    assert (pools.geometry.num_layers, pools.geometry.num_kv_heads, pools.geometry.head_dim) == (10, 4, 512)
    assert (pools.sliding.num_layers, pools.sliding.num_kv_heads, pools.sliding.head_dim) == (50, 16, 256)
    full = kv_pools(shape, "fp8", False, 1, 2048)
    assert (full.geometry.num_layers, full.geometry.num_kv_heads, full.geometry.head_dim) == (60, 16, 256)
    assert full.sliding is None
    context = 32768
    global_fp8 = 10 * 2 * 4 * (512 + 4) * context  # the global layers' KV at 32k, one sequence
    assert kv_cache_bytes(shape, 1, context, "fp8", True, 2048) - 50 * 2 * 16 * 260 * 16 * (
        pools.sliding_blocks_beside(context // 16)) == global_fp8
    assert kv_cache_bytes(shape, 1, context, "fp8", False, 2048) == 60 * 2 * 16 * 260 * context


def test_activations_follow_the_prefill_chunk():
    """Chunked prefill: a 32k prompt is computed max_num_batched_tokens tokens at a time, so the activation reserve
    is that of one chunk, whatever the context; a step never holds more than batch x context."""
    from adaq.validate.budget import activation_bytes

    shape = ModelShape.from_config(real_config("gemma3-27b"))
    assert activation_bytes(shape, 1, 32768, 8192) == activation_bytes(shape, 1, 8192, 8192)
    assert activation_bytes(shape, 1, 32768, 2048) == activation_bytes(shape, 1, 2048, 2048)
    smaller, larger = (sum(activation_bytes(shape, 1, 32768, chunk).values()) for chunk in (2048, 8192))
    assert smaller < larger
    budget = plan(shape, estimate_weight_bytes(shape), Gpu.parse("h100"), 1, 32768, batched_tokens=2048)
    assert budget.step_tokens == 2048 and any("chunks of max_num_batched_tokens 2048" in n for n in budget.notes)


def test_the_committed_context_fit_table_is_what_adaq_validate_prints(capsys, monkeypatch):
    """bench/results/window_kv: one row rerun through the command line it names (`adaq validate CONFIG --json`,
    from the repository root)."""
    from test_run_cli import adaq

    results = Path(__file__).resolve().parents[1] / "bench" / "results" / "window_kv"
    rows = json.loads((results / "context_fit.json").read_text())["rows"]
    row = next(r for r in rows if (r["model"], r["kv_cache_dtype"], r["max_num_batched_tokens"], r["window_kv"]) ==
               ("gemma4-31b", "fp8", 2048, True))
    monkeypatch.chdir(results.parents[2])
    code, out, err = adaq(row["command"].split()[1:], capsys, monkeypatch)
    budget = json.loads(out)["budget"]
    assert code == 1 and not budget["fits"]  # batch 1 x 32768 tokens does not fit: the report says how much does
    assert budget["max_context_by_batch"] == row["max_context_by_batch"]
    assert budget["kv_cache_bytes"] == row["kv_cache_bytes_32k_batch1"]
    assert row["max_context_by_batch"]["1"]["max_context"] == 28_608


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunk,most", ((8192, 0.41), (2048, 0.25)))
def test_gemma3_27b_32k_kv_as_the_engine_allocates_it_on_a_gpu(chunk, most):
    """Issue 16: Gemma3-27B (all 62 layers' shapes, no weights needed), FP8 KV, one sequence of 32k tokens: the bytes
    the runner allocates on the GPU are the budget's, and window-sized KV takes at most `most` of the full
    allocation (a quarter with a 2048-token prefill chunk)."""
    config = real_config("gemma3-27b")
    shape = ModelShape.from_config(config)
    device = torch.device("cuda")
    measured = {}
    for window_kv in (False, True):
        model = build_model(config, get_backend("reference", device), torch.bfloat16, device)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        settings = EngineConfig(model="shapes-only", device=device, kv_cache_dtype="fp8", window_kv=window_kv,
                                max_num_seqs=1, max_num_batched_tokens=chunk, max_model_len=32768,
                                num_kv_blocks=32768 // KV_BLOCK_SIZE, skip_tokenizer=True, enforce_eager=True)
        runner = ModelRunner(model, config, settings)
        measured[window_kv] = torch.cuda.memory_allocated(device) - before
        expected = kv_cache_bytes(shape, 1, 32768, "fp8", window_kv, chunk)
        assert 0 <= measured[window_kv] - expected < 2**20, (measured[window_kv], expected)
        print(json.dumps({"chunk": chunk, "window_kv": window_kv, "allocated_bytes": measured[window_kv],
                          "budget_bytes": expected}))
        del runner, model
        torch.cuda.empty_cache()
    assert measured[True] <= most * measured[False]
