"""Tensor parallelism on the CPU (gloo): every family's sharded model equals the whole one, and the engine's worker
ranks run, agree and fail loudly.

- One spawned group of 4 ranks (tests/helpers/tp_ranks.py) runs each tiny NVFP4 model at TP = 1, 2 and 4: logits
  equal within fp32 reduction-order tolerance, greedy tokens identical over 32 decode steps.
- `LLM(tensor_parallel_size=2)`: the same greedy tokens and prompt log-probabilities as one rank.
- A worker that raises, or is killed, ends `generate` with an AdaqError naming the rank, within a timeout.
"""

import os
import signal
import time

import pytest
import torch
from helpers.tiny_models import make_checkpoint

from adaq.engine.api import LLM
from adaq.engine.sampling_params import SamplingParams
from adaq.engine.tensor_parallel import FAIL_ENV, free_port
from adaq.errors import AdaqError

# Shapes that split over 4 ranks with 16-column NVFP4 blocks on every rank (the defaults' 32-wide experts do not).
TP4 = {
    "qwen3": {},
    "qwen3_moe": dict(moe_intermediate_size=64),
    "gemma3": {},
    "gemma4": dict(intermediate_size=128),
    "gemma4_moe": dict(intermediate_size=128, moe_intermediate_size=64),
    "qwen3_5": dict(linear_num_key_heads=4, linear_num_value_heads=8),
    "qwen3_5_moe": dict(linear_num_key_heads=4, linear_num_value_heads=8, moe_intermediate_size=64,
                        shared_expert_intermediate_size=64),
    "qwen3_next": dict(linear_num_key_heads=4, linear_num_value_heads=8, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64),
}
SCHEME = {"qwen3": "nvfp4"}  # W4A4 (activation quantization on sharded inputs) for one; NVFP4A16 for the rest
TOLERANCE = 1e-5  # max |delta logit| / max |logit|: fp32 sums in another order


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {arch: make_checkpoint(arch, root / arch, SCHEME.get(arch, "nvfp4a16"), **overrides) / "nvfp4"
            for arch, overrides in TP4.items()}


@pytest.fixture(scope="module")
def sharded_runs(folders, tmp_path_factory):
    import torch.multiprocessing as mp
    from helpers.tp_ranks import rank_main

    out = tmp_path_factory.mktemp("tp-runs") / "results.pt"
    mp.spawn(rank_main, args=(4, free_port(), {a: str(f) for a, f in folders.items()}, str(out)), nprocs=4)
    return torch.load(out)


@pytest.mark.parametrize("arch", list(TP4))
@pytest.mark.parametrize("size", [2, 4])
def test_sharded_model_equals_whole(sharded_runs, arch, size):
    whole, sharded = sharded_runs[(arch, 1)], sharded_runs[(arch, size)]
    error = ((sharded["logits"] - whole["logits"]).abs().max() / whole["logits"].abs().max()).item()
    assert error <= TOLERANCE, f"{arch} TP={size}: max |delta logit| is {error:.1e} of max |logit|"
    assert torch.equal(sharded["tokens"], whole["tokens"]), f"{arch} TP={size}: greedy tokens differ"
    assert len(set(whole["tokens"].flatten().tolist())) > 1  # the greedy tokens are not one repeated id


PROMPTS = [[1, 5, 9, 22, 7], [3, 4, 100, 200, 17, 18, 19]]
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def engine(folder, size: int) -> LLM:
    return LLM(folder, device="cpu", skip_tokenizer=True, tensor_parallel_size=size, num_kv_blocks=64,
               kv_cache_dtype="bf16", max_model_len=128)


def test_engine_ranks_generate_what_one_rank_does(folders):
    folder = folders["qwen3_next"]  # hybrid: GDN state slots, MoE, gated attention through the worker protocol
    with engine(folder, 1) as llm:
        expected = [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]
        expected_logprobs = llm.prompt_logprobs([PROMPTS[1]])[0]
    with engine(folder, 2) as llm:
        assert [out.token_ids for out in llm.generate(PROMPTS, GREEDY)] == expected
        torch.testing.assert_close(llm.prompt_logprobs([PROMPTS[1]])[0], expected_logprobs, rtol=0, atol=1e-5)
        memory = llm.engine.memory_per_rank()
    assert [m["rank"] for m in memory] == [0, 1]
    assert all(m["weight_bytes"] > 0 and m["state_cache_bytes"] > 0 for m in memory)


def test_a_worker_that_raises_ends_the_command(folders, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1:3")  # rank 1 raises at its third step
    started = time.monotonic()
    llm = engine(folders["qwen3"], 2)
    with pytest.raises(AdaqError, match=r"tensor-parallel rank 1 died: RuntimeError: injected failure at step 3"):
        llm.generate(PROMPTS, GREEDY)
    assert time.monotonic() - started < 60
    with pytest.raises(AdaqError, match="rank 1 died"):  # and stays failed, without hanging
        llm.generate(PROMPTS, GREEDY)
    llm.close()


def test_a_killed_worker_ends_the_command(folders):
    llm = engine(folders["gemma3"], 2)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0))
    worker = llm.engine.workers.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    started = time.monotonic()
    with pytest.raises(AdaqError, match=r"tensor-parallel rank 1 died: the process ended \(exit code -9\)"):
        llm.generate(PROMPTS, GREEDY)
    assert time.monotonic() - started < 30
    llm.close()


def test_tensor_parallel_size_is_checked(folders):
    with pytest.raises(AdaqError, match="--tensor-parallel-size 0"):
        engine(folders["qwen3"], 0)


def test_validate_names_the_linear_a_split_cuts_inside_a_block(tmp_path):
    from adaq.validate import validate_checkpoint

    folder = make_checkpoint("qwen3_moe", tmp_path) / "nvfp4"  # experts of 32 columns: 16 per rank at TP=2, 8 at 4
    one, two, four = (validate_checkpoint(folder, gpu="rtx4090", tp=n, level="layout") for n in (1, 2, 4))
    assert one.valid and two.valid
    assert not four.valid
    finding = next(f for f in four.errors if f.rule == "tp-split-16")
    assert finding.tensor == "model.layers.0.mlp.experts.0.down_proj"
    assert "input column 8 of 32" in finding.message
    assert two.budget.weights.total < one.budget.weights.total
    assert any("tensor parallel over 2 GPUs" in note for note in two.budget.notes)
    three = validate_checkpoint(folder, gpu="rtx4090", tp=3, level="layout")
    assert any(f.rule == "tp-split" and "num_attention_heads 4" in f.message for f in three.errors)


def test_bench_reports_each_rank_and_the_scaling(folders):
    from adaq.bench.runner import Workload
    from adaq.bench.suite import BenchOptions, run_bench

    options = BenchOptions(str(folders["qwen3"]), False, Workload((1,), 8, 4, 1), baselines=(), backend="reference",
                           device="cpu", tensor_parallel_size=2)
    report = run_bench(options)
    single, sharded = report["variants"]
    assert (single["variant"], sharded["variant"]) == ("nvfp4", "nvfp4-tp2")
    assert not single["error"] and not sharded["error"], sharded.get("error_detail")
    assert [rank["rank"] for rank in sharded["rank_memory"]] == [0, 1]
    assert all(rank["weight_bytes"] > 0 and rank["kv_cache_bytes"] > 0 for rank in sharded["rank_memory"])
    scaling = sharded["results"][0]["tp_scaling"]
    assert scaling["over"] == "nvfp4" and scaling["ranks"] == 2 and scaling["decode"] > 0


def test_loading_refuses_a_cut_inside_an_nvfp4_block(tmp_path):
    from adaq.backends import get_backend
    from adaq.backends.parallel import TPGroup
    from adaq.formats.checkpoint import open_checkpoint
    from adaq.models import build_model, load_weights

    checkpoint = open_checkpoint(make_checkpoint("qwen3_moe", tmp_path) / "nvfp4")  # 32-wide experts
    backend = get_backend("reference", "cpu", tp=TPGroup(1, 4))  # loading runs no collective: no group needed
    model = build_model(checkpoint.config, backend, torch.float32)
    with pytest.raises(AdaqError, match=r"experts\.0\.down_proj: a tensor-parallel split at input column 8 is not "
                                        r"a multiple of 16"):
        load_weights(model, checkpoint)
    with pytest.raises(AdaqError, match=r"\(32\) does not split over --tensor-parallel-size 3"):
        build_model(checkpoint.config, get_backend("reference", "cpu", tp=TPGroup(0, 3)), torch.float32)
