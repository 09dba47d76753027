"""Bench shapes of the hybrid models (issue 15) on the CPU: the bundled Qwen3.5 / Qwen3.6 / Qwen3-Next configs give
the tensors a real checkpoint of that architecture holds (parameter counts near the models' names), the roofline
counts the Gated DeltaNet states and only the full-attention layers' KV, and tiny versions of each config build and
generate on the CPU from synthetic NVFP4 weights with linear_attn kept in bf16."""

import pytest
import torch

from adaq.bench import roofline
from adaq.bench.shapes import (gdn_state_bytes, hybrid_layer_types, load_model_config, model_tensors, text_config)

HYBRID_BENCH = {"qwen3.5-27b": 27e9, "qwen3.6-35b-a3b": 35e9, "qwen3-next-80b-a3b": 80e9}


@pytest.mark.parametrize("name, params", HYBRID_BENCH.items())
def test_hybrid_bench_shapes_hold_the_models_parameters(name, params):
    config = load_model_config(name)
    specs = model_tensors(config)
    assert abs(sum(spec.numel for spec in specs) - params) < 0.05 * params, name
    types = hybrid_layer_types(config)
    assert types.count("full_attention") * 4 == len(types) == text_config(config)["num_hidden_layers"]
    linear_attn = [spec for spec in specs if ".linear_attn." in spec.name]
    assert linear_attn and not any(spec.quantizable for spec in linear_attn)  # llm-compressor's ignore list
    text = text_config(config)
    q_proj = next(spec for spec in specs if spec.name.endswith("self_attn.q_proj"))
    assert q_proj.quantizable and q_proj.shape == (2 * text["num_attention_heads"] * 256, text["hidden_size"])


def test_roofline_counts_gdn_states_and_full_attention_kv_only():
    config = load_model_config("qwen3.6-35b-a3b")
    # 30 GDN layers x (conv [2*16*128 + 32*128, 3] bf16 + recurrent [32, 128, 128] fp32)
    per_seq = 30 * ((2 * 16 * 128 + 32 * 128) * 3 * 2 + 32 * 128 * 128 * 4)
    assert gdn_state_bytes(config) == per_seq
    per_layer = roofline.kv_bytes_per_layer(config, "bf16")
    assert per_layer == [0, 0, 0, 2 * 2 * 256 * 2] * 10
    weights = roofline.weight_bytes(model_tensors(config), config, quantized=True)
    traffic = roofline.decode_traffic(weights, config, batch=3, input_len=10, output_len=2, kv_cache_dtype="bf16")
    assert traffic.state == 3 * 2 * per_seq
    assert traffic.kv_write == 3 * 10 * 2048 and traffic.kv_read == 3 * 10 * 2048 * 11
    assert traffic.total == traffic.weights + traffic.kv_read + traffic.kv_write + traffic.state
    assert traffic.to_dict()["state"] == traffic.state
    dense_attn = roofline.weight_bytes(model_tensors(config), config, quantized=False).linear
    assert weights.linear < dense_attn  # attention and shared experts NVFP4, linear_attn bf16 in both


TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
            moe_intermediate_size=64, shared_expert_intermediate_size=64, vocab_size=512, num_hidden_layers=4,
            max_position_embeddings=512)


def tiny_version(name: str) -> dict:
    config = dict(load_model_config(name))
    config.update({key: value for key, value in TINY.items() if key in config or not key.startswith("moe")})
    config["layer_types"] = config["layer_types"][:TINY["num_hidden_layers"]]
    if "num_experts" in config:
        config.update(num_experts=8, num_experts_per_tok=2)
    return config


@pytest.mark.parametrize("name", HYBRID_BENCH)
def test_tiny_versions_build_and_generate_on_the_cpu(name):
    from adaq.backends import get_backend
    from adaq.bench.synthetic import SyntheticCheckpoint
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine
    from adaq.engine.sampling_params import SamplingParams
    from adaq.models import build_model, load_weights

    source = SyntheticCheckpoint(tiny_version(name), quantized=True, device="cpu", name=name)
    ignore = source.config["quantization_config"]["ignore"]
    assert "re:.*linear_attn.*" in ignore and not any("linear_attn" in p for p in source.quantized_prefixes())
    model = build_model(source.config, get_backend("reference", torch.device("cpu")), torch.bfloat16,
                        torch.device("cpu"))
    load_weights(model, source)
    config = EngineConfig(source.path, backend="reference", device="cpu", dtype="bf16", max_model_len=128,
                          max_num_seqs=4, num_kv_blocks=32, skip_tokenizer=True, kv_cache_dtype="bf16")
    engine = LLMEngine(config, model=model, model_config=source.config)
    assert engine.runner.state_cache is not None
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompt, params) for prompt in ([1, 2, 3, 4, 5], [7, 8])]
    done = {}
    while engine.has_unfinished():
        done.update({out.request_id: out.token_ids for out in engine.step() if out.finished})
    assert [len(done[i]) for i in ids] == [4, 4]
