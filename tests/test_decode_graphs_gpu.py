"""Decode CUDA graphs on the GPU (issue 23), every check under --strict (any fallback fails the test):

- per supported family (Qwen3, Qwen3-MoE, Gemma3: tiny random NVFP4 checkpoints in shapes the kernels take), the
  graphs are captured and replayed (counted), and eager decode (`enforce_eager`, `ADAQ_CUDA_GRAPHS=0`) gives the
  same greedy tokens;
- every synthetic config `adaq bench --synthetic` knows (adaq/bench/configs/, fewer layers) captures under strict
  and decodes through its graphs; the real Gemma3-270M too.

Prefill runs the exact path (ADAQ_PREFILL_PATH=exact): graphs are decode-only, and the FP8 path's own availability
(nvidia-cutlass on the machine) would otherwise be what a strict run reports. Skipped without CUDA.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_prefill")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from helpers.tiny_models import make_checkpoint  # noqa: E402

from adaq.engine.sampling_params import SamplingParams  # noqa: E402

DEV = torch.device("cuda")
MAX_NUM_SEQS = 8  # buckets 1, 2, 4, 8
MAX_TOKENS = 24
PROMPT_LENGTHS = (5, 17, 33)  # three sequences: bucket 4, one padded row
# The tiny checkpoints' shapes with head_dim and widths the kernels take (tests/helpers/tiny_models.py has 16/32).
GPU_SHAPES = {
    "qwen3": dict(hidden_size=128, intermediate_size=256, head_dim=64),
    "qwen3_moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=64),
    "gemma3": dict(hidden_size=128, intermediate_size=256, head_dim=64, query_pre_attn_scalar=64),
}



@pytest.fixture
def fixed_splits(monkeypatch):
    """One split for attention and the NVFP4 GEMMs, in graphs and eager alike. Both pick their split counts from
    the step's shape: attention from the context bound (a graph's is fixed at capture for max_model_len, an eager
    step's is its longest sequence), the GEMMs from the rows (a graph runs its bucket's, padding included), and a
    different split count sums in another fp32 order. Fixed, the graph must give the eager step's bits exactly."""
    from adaq.kernels import ops

    gemm, grouped = ops.nvfp4_linear, ops.grouped_linear
    monkeypatch.setattr(ops, "attention_splits", lambda *args, **kwargs: 1)
    monkeypatch.setattr(ops, "nvfp4_linear", lambda x, w, bias=None, splits=0: gemm(x, w, bias, 1))
    monkeypatch.setattr(ops, "grouped_linear", lambda *args, splits=0: grouped(*args, splits=1))


def engine_for(folder, **settings):
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine

    config = EngineConfig(folder, backend="cuda", dtype="bf16", device=DEV, max_model_len=128,
                          max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=512, num_kv_blocks=64,
                          skip_tokenizer=True, strict=True, **settings)
    return LLMEngine(config)


def greedy(engine, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    final = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output.token_ids
    return [final[request_id] for request_id in ids]


def random_prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "gemma3"])
def test_decode_graphs_are_captured_replayed_and_match_eager(arch, tmp_path, monkeypatch, fixed_splits):
    from adaq.engine.cuda_graph import default_buckets, graph_safe

    folder = make_checkpoint(arch, tmp_path, **GPU_SHAPES[arch]) / "nvfp4"
    prompts = random_prompts(256)
    graphs = engine_for(folder)
    decode_graphs = graphs.runner.decode_graphs
    assert decode_graphs is not None and graph_safe(graphs.runner.model), f"{arch}: no decode graphs"
    assert [bucket.size for bucket in decode_graphs.buckets] == default_buckets(MAX_NUM_SEQS)
    assert decode_graphs.replays == 0

    batched = greedy(graphs, prompts)  # one prefill step, then MAX_TOKENS - 1 decode steps of 3 rows (bucket 4)
    assert decode_graphs.replays >= MAX_TOKENS - 1, f"{arch}: {decode_graphs.replays} replays"
    replays = decode_graphs.replays
    alone = greedy(graphs, prompts[:1])  # bucket 1
    assert decode_graphs.replays >= replays + MAX_TOKENS - 1
    assert len(graphs.fallbacks) == 0 and all(len(tokens) == MAX_TOKENS for tokens in batched)

    eager = engine_for(folder, enforce_eager=True)
    assert eager.runner.decode_graphs is None and len(eager.fallbacks) == 0
    assert greedy(eager, prompts) == batched, f"{arch}: graph and eager decode differ"
    assert greedy(eager, prompts[:1]) == alone
    del eager

    monkeypatch.setenv("ADAQ_CUDA_GRAPHS", "0")
    debug_eager = engine_for(folder)
    assert debug_eager.runner.decode_graphs is None and len(debug_eager.fallbacks) == 0
    assert greedy(debug_eager, prompts) == batched


def scaled_down(name: str) -> dict:
    """A bundled config with few layers (a Gemma 3 keeps one global layer after its five sliding ones)."""
    from adaq.bench.shapes import load_model_config

    config = dict(load_model_config(name))
    text = config.get("text_config", config)
    hybrid = "linear_attention" in text.get("layer_types", [])  # Qwen3.5 / Qwen3-Next: 3 GDN layers, 1 full
    layers = 4 if hybrid else 6 if "layer_types" in text else 2
    text["num_hidden_layers"] = layers
    if hybrid:
        text["layer_types"] = text["layer_types"][:layers]
        assert text["layer_types"].count("full_attention") == 1
    elif "layer_types" in text:
        text["layer_types"] = text["layer_types"][:layers]
        assert "full_attention" in text["layer_types"] and "sliding_attention" in text["layer_types"]
    if "mlp_only_layers" in text:
        text["mlp_only_layers"] = [layer for layer in text["mlp_only_layers"] if layer < layers]
    return config


def _bundled_names() -> list[str]:
    from adaq.bench.shapes import bundled_names

    return bundled_names()


# Bench configs whose decode cannot be captured yet, and why (each an xfail that must keep failing until fixed).
# Empty since Gemma 4's head_dim 512 global layers got their kernels (tests/test_gemma4_gpu.py).
NO_GRAPHS_YET: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(reason=NO_GRAPHS_YET[name], strict=True)) if name in NO_GRAPHS_YET
    else name for name in _bundled_names()])
@pytest.mark.parametrize("quantized", [True, False], ids=["nvfp4", "bf16"])
def test_every_bench_config_captures_under_strict(name, quantized):
    """NVFP4, and the bf16 engine the bench sets beside it (bf16 MoE experts: adaq.backends.dense_moe)."""
    from adaq.backends import get_backend
    from adaq.backends.fallbacks import Fallbacks
    from adaq.bench.shapes import text_config
    from adaq.bench.synthetic import SyntheticCheckpoint
    from adaq.engine.config import EngineConfig
    from adaq.engine.cuda_graph import graph_blocker
    from adaq.engine.llm_engine import LLMEngine
    from adaq.models import build_model, load_weights

    source = SyntheticCheckpoint(scaled_down(name), quantized=quantized, device=DEV, name=name)
    model = build_model(source.config, get_backend("cuda", DEV, fallbacks=Fallbacks(strict=True)), torch.bfloat16,
                        DEV)
    load_weights(model, source)
    assert graph_blocker(model) is None
    config = EngineConfig(source.path, backend="cuda", device=DEV, max_model_len=256, max_num_seqs=16,
                          max_num_batched_tokens=512, num_kv_blocks=64, skip_tokenizer=True, strict=True)
    engine = LLMEngine(config, model=model, model_config=source.config)  # captures every bucket; strict: no fallback
    graphs = engine.runner.decode_graphs
    assert graphs is not None and len(engine.fallbacks) == 0
    outputs = greedy(engine, random_prompts(text_config(source.config)["vocab_size"], (7, 40)), max_tokens=8)
    assert [len(tokens) for tokens in outputs] == [8, 8]
    assert graphs.replays >= 7 and len(engine.fallbacks) == 0
    del engine, model


@pytest.mark.slow
def test_real_gemma3_270m_captures_and_graph_decode_matches_eager(gemma3_270m_nvfp4, fixed_splits):
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine

    def engine(**settings):
        return LLMEngine(EngineConfig(gemma3_270m_nvfp4, backend="cuda", device=DEV, max_model_len=256,
                                      max_num_seqs=4, num_kv_blocks=64, strict=True, **settings))

    graphs = engine()
    assert graphs.runner.decode_graphs is not None and len(graphs.fallbacks) == 0
    prompts = [graphs.encode(text) for text in ("The capital of France is", "def fibonacci(n):",
                                                "Once upon a time")]
    batched = greedy(graphs, prompts)
    assert graphs.runner.decode_graphs.replays >= MAX_TOKENS - 1
    assert greedy(engine(enforce_eager=True), prompts) == batched
