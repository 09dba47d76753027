"""Qwen3.5, Qwen3.5-MoE and Qwen3-Next (hybrid Gated DeltaNet models) on tiny random NVFP4 checkpoints against
transformers' forward on the same decompressed weights (fp32 compute, bf16 KV cache, reference backend; fla is not
installed, so transformers runs its plain-PyTorch GDN fallbacks), plus the GDN numerics' two forms against each
other."""

import json
import warnings

import pytest
import torch
from helpers.paged import PagedRunner, prefill_logits
from helpers.tiny_models import HYBRIDS, make_checkpoint
from safetensors.torch import load_file, save_file

from adaq.backends.numerics import gated_delta as gd
from adaq.formats.checkpoint import open_checkpoint
from adaq.backends import get_backend
from adaq.models import build_model, load_weights

TOLERANCE = 1e-3  # max |delta logit| <= TOLERANCE * max |logit|
KV = torch.bfloat16
torch.manual_seed(1234)
TOKENS = torch.randint(0, 256, (90,)).tolist()  # > one 64-token chunk of the chunked form
PROMPT_LEN = 10
DECODE_STEPS = 40


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: make_checkpoint(arch, tmp_path_factory.mktemp(arch)) for arch in HYBRIDS}


@pytest.fixture(scope="module")
def references(checkpoints):
    """transformers' logits for the whole TOKENS sequence, per architecture (a causal model: row p is the logits
    after TOKENS[:p + 1])."""
    return {arch: hf_logits(checkpoints[arch] / "decompressed", TOKENS) for arch in HYBRIDS}


def ours(folder, dtype=torch.float32):
    checkpoint = open_checkpoint(folder)
    backend = get_backend("reference", "cpu")
    return load_weights(build_model(checkpoint.config, backend, dtype), checkpoint)


def hf_logits(folder, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    error = relative_error(actual, expected)
    assert error <= tolerance, f"max |delta logit| is {error:.2e} of max |logit|"
    return error


# ---- numerics: the two forms of the gated delta rule and of the conv agree ---------------------------------------
def random_gdn(length: int, hk: int = 2, hv: int = 4, dk: int = 16, dv: int = 8):
    q, k = torch.randn(length, hk, dk), torch.randn(length, hk, dk)
    v = torch.randn(length, hv, dv)
    g, beta = gd.gdn_gates(torch.randn(length, hv), torch.randn(length, hv), torch.randn(hv) * 0.5, torch.ones(hv))
    return q, k, v, g, beta, torch.randn(hv, dk, dv)


@pytest.mark.parametrize("length", [1, 5, 64, 150])
def test_chunked_and_recurrent_delta_rule_agree(length):
    q, k, v, g, beta, state = random_gdn(length)
    chunked, chunked_state = gd.chunk_gated_delta_rule(q, k, v, g, beta, state)
    recurrent, recurrent_state = gd.recurrent_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None],
                                                               state[None])
    torch.testing.assert_close(chunked, recurrent[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked_state, recurrent_state[0], atol=1e-5, rtol=1e-4)


def test_delta_rule_matches_transformers_fallbacks():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    q, k, v, g, beta, state = random_gdn(100)
    ours_out, ours_state = gd.chunk_gated_delta_rule(q, k, v, g, beta, state)
    expand = lambda x: gd.expand_heads(x, v.shape[1])[None]  # noqa: E731
    for form in (hf.torch_chunk_gated_delta_rule, hf.torch_recurrent_gated_delta_rule):
        out, final = form(expand(q), expand(k), v[None], g=g[None], beta=beta[None], initial_state=state[None],
                          output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(ours_out, out[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours_state, final[0], atol=1e-5, rtol=1e-4)


def test_chunked_delta_rule_across_calls_equals_one_call():
    q, k, v, g, beta, state = random_gdn(130)
    whole, whole_state = gd.chunk_gated_delta_rule(q, k, v, g, beta, state)
    first, mid = gd.chunk_gated_delta_rule(q[:70], k[:70], v[:70], g[:70], beta[:70], state)
    second, last = gd.chunk_gated_delta_rule(q[70:], k[70:], v[70:], g[70:], beta[70:], mid)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(last, whole_state, atol=1e-5, rtol=1e-4)


def test_conv_chunk_with_state_equals_token_updates():
    channels, kernel = 12, 4
    x, weight = torch.randn(9, channels), torch.randn(channels, kernel)
    state = torch.randn(channels, kernel - 1)
    chunk_out, chunk_state = gd.causal_conv1d(x, weight, state)
    states, outs = state[None], []
    for t in range(x.shape[0]):
        out, states = gd.causal_conv1d_update(x[t:t + 1], weight, states)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs), chunk_out)
    torch.testing.assert_close(states[0], chunk_state)
    short_out, short_state = gd.causal_conv1d(x[:2], weight, state)  # fewer tokens than the state holds
    torch.testing.assert_close(short_state, torch.cat([state[:, 2:], x[:2].T], dim=1))
    torch.testing.assert_close(short_out, chunk_out[:2])


# ---- whole models against transformers ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", HYBRIDS)
def test_prefill_matches_transformers(checkpoints, references, arch):
    got = prefill_logits(ours(checkpoints[arch] / "nvfp4"), TOKENS, kv_dtype=KV)
    assert_close(got, references[arch])


@pytest.mark.parametrize("arch", HYBRIDS)
def test_prefill_then_decode_matches_transformers(checkpoints, references, arch, capsys):
    """A 10-token prefill, then 40 decode steps of one token (the recurrent form, states carried in slots)."""
    model = ours(checkpoints[arch] / "nvfp4")
    runner = PagedRunner(model, 1, PROMPT_LEN + DECODE_STEPS, kv_dtype=KV)
    logits = [runner.step({0: TOKENS[:PROMPT_LEN]}, logits_for_all=True)]
    logits += [runner.step({0: [token]}) for token in TOKENS[PROMPT_LEN:PROMPT_LEN + DECODE_STEPS]]
    error = assert_close(torch.cat(logits), references[arch][:PROMPT_LEN + DECODE_STEPS])
    with capsys.disabled():
        print(f"\n{arch}: prefill {PROMPT_LEN} + {DECODE_STEPS} decode steps (bf16 KV), max |dlogit| / max |logit| "
              f"= {error:.2e}")


@pytest.mark.parametrize("arch", HYBRIDS)
def test_chunked_prefill_equals_one_shot(checkpoints, references, arch):
    """Chunks of 30 (the state carried across chunks, each chunk longer than one 64-token block or not)."""
    model = ours(checkpoints[arch] / "nvfp4")
    one_shot = prefill_logits(model, TOKENS, kv_dtype=KV)
    chunked = prefill_logits(model, TOKENS, kv_dtype=KV, chunk=30)
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=1e-5)
    assert_close(chunked, references[arch])


@pytest.mark.parametrize("arch", HYBRIDS)
def test_batch_of_different_lengths_matches_each_alone(checkpoints, arch):
    """Three sequences of different lengths prefilled in one step, then 34 decode steps of all three together."""
    model = ours(checkpoints[arch] / "nvfp4")
    starts, lengths, steps = [0, 20, 7], [13, 3, 24], 34
    sequences = [TOKENS[s:s + n + steps] for s, n in zip(starts, lengths)]
    runner = PagedRunner(model, 3, max(lengths) + steps, kv_dtype=KV)
    first = runner.step({i: seq[:n] for i, (seq, n) in enumerate(zip(sequences, lengths))})
    decoded = [runner.step({i: [seq[n + t]] for i, (seq, n) in enumerate(zip(sequences, lengths))})
               for t in range(steps - 1)]
    for i, (seq, n) in enumerate(zip(sequences, lengths)):
        reference = hf_logits(checkpoints[arch] / "decompressed", seq)
        assert_close(first[i], reference[n - 1])
        assert_close(torch.stack([step[i] for step in decoded]), reference[n:n + steps - 1])


def test_state_matters(checkpoints, references):
    """Dropping the carried state changes the logits: the decode test above cannot pass by accident."""
    model = ours(checkpoints["qwen3_5"] / "nvfp4")
    runner = PagedRunner(model, 1, 20, kv_dtype=KV)
    runner.step({0: TOKENS[:PROMPT_LEN]})
    for layer in model.state_layers():
        layer.ssm_state.zero_()
    stale = runner.step({0: [TOKENS[PROMPT_LEN]]})
    assert relative_error(stale[0], references["qwen3_5"][PROMPT_LEN]) > 10 * TOLERANCE


def test_layers_and_kept_tensors(checkpoints):
    model = ours(checkpoints["qwen3_next"] / "nvfp4")
    kinds = [layer.layer_type for layer in model.layers]
    assert kinds == ["linear_attention"] * 3 + ["full_attention"]
    assert len(model.state_layers()) == 3 and len(model.attention_layers()) == 1
    gdn = model.layers[0].linear_attn
    assert gdn.in_proj.fused and gdn.in_proj.handles[0].packed is None  # linear_attn stays bf16
    attention = model.layers[3].self_attn
    assert attention.qkv_proj.handles[0].packed is not None and attention.rotary_dim == 8
    assert model.layers[0].mlp.shared_expert.gate_up_proj.handles[0].packed is not None
    assert model.layers[2].mlp.gate_up_proj.fused  # mlp_only_layers: a dense MLP


# ---- checkpoint packaging ----------------------------------------------------------------------------------------
def vision_language_folder(text_folder, out, arch: str):
    """The text checkpoint repackaged as transformers' Qwen3.5 VL layout: nested text_config, the decoder under
    model.language_model, plus a vision tower and MTP weights that must be ignored."""
    config = json.loads((text_folder / "config.json").read_text())
    quantization = config.pop("quantization_config")
    outer = {"architectures": [arch], "model_type": config["model_type"].removesuffix("_text"),
             "text_config": config, "vision_config": {"depth": 1, "hidden_size": 32, "num_heads": 2,
                                                      "out_hidden_size": config["hidden_size"]},
             "tie_word_embeddings": False, "quantization_config": quantization}
    tensors = {name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name: t
               for name, t in load_file(text_folder / "model.safetensors").items()}
    tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(32, 3, 2, 16, 16)
    tensors["mtp.layers.0.input_layernorm.weight"] = torch.zeros(config["hidden_size"])
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(outer))
    return out


@pytest.mark.parametrize("arch,packaged", [("qwen3_5", "Qwen3_5ForConditionalGeneration"),
                                           ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")])
def test_vision_language_checkpoint_runs_its_text_model(checkpoints, references, tmp_path, arch, packaged):
    folder = vision_language_folder(checkpoints[arch] / "nvfp4", tmp_path / "vl", packaged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ours(folder)
    assert any("vision tower" in str(w.message) for w in caught)
    assert_close(prefill_logits(model, TOKENS[:30], kv_dtype=KV), references[arch][:30])


def test_modelopt_copy_runs_the_same(checkpoints, references, tmp_path):
    """A ModelOpt-layout NVFP4 Qwen3.5 folder (the same weights) loads and gives the same logits."""
    from adaq.formats.modelopt import save_modelopt

    ct = open_checkpoint(checkpoints["qwen3_5"] / "nvfp4")
    quantized = {prefix: ct.nvfp4(prefix) for prefix in ct.quantized_prefixes()}
    kept = {name: ct.tensor(name) for name in ct.tensor_names()}
    config = {k: v for k, v in ct.config.items() if k != "quantization_config"}
    save_modelopt(tmp_path / "modelopt", config, "nvfp4a16", ["lm_head", "*linear_attn*"], quantized, kept)
    assert open_checkpoint(tmp_path / "modelopt").format == "modelopt"
    tokens = TOKENS[:30]
    expected = prefill_logits(ours(checkpoints["qwen3_5"] / "nvfp4"), tokens, kv_dtype=KV)
    torch.testing.assert_close(prefill_logits(ours(tmp_path / "modelopt"), tokens, kv_dtype=KV), expected,
                               atol=0, rtol=0)
    assert_close(expected, references["qwen3_5"][:30])


def test_batched_decode_skips_padded_rows_and_zeroes_fresh_ones():
    """The decode form a graph will run: slot -1 (a padded row) is neither read nor written; a sequence with no
    cached tokens starts from zeros even when its slot holds NaN."""
    q, k, v, g, beta, _ = random_gdn(3)
    states = torch.randn(4, 4, 16, 8)
    states[2] = float("nan")
    before = states.clone()
    slots, cached = torch.tensor([1, -1, 2]), torch.tensor([True, True, False])
    out = gd.delta_rule_decode(q, k, v, g, beta, states, slots, cached)
    assert torch.isfinite(out[[0, 2]]).all()
    torch.testing.assert_close(states[[0, 3]], before[[0, 3]])
    expected, _ = gd.recurrent_gated_delta_rule(q[2:, None], k[2:, None], v[2:, None], g[2:, None], beta[2:, None],
                                                torch.zeros(1, 4, 16, 8))
    torch.testing.assert_close(out[2], expected[0, 0])
    conv_states = torch.full((4, 12, 3), float("nan"))
    conv_out = gd.conv_decode(torch.randn(3, 12), torch.randn(12, 4), conv_states, slots, torch.tensor([False] * 3))
    assert torch.isfinite(conv_out[[0, 2]]).all() and torch.isnan(conv_states[[0, 3]]).all()
