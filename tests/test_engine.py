"""The engine end to end on tiny random NVFP4 checkpoints (reference backend, CPU), against transformers."""

import sys

import pytest
import torch
from helpers.engine_runs import run_with_staggered_arrivals
from helpers.tiny_models import make_checkpoint
from helpers.tiny_tokenizer import write_tokenizer

from adaq.engine.api import LLM
from adaq.engine.sampling_params import InvalidSamplingParams, SamplingParams
from adaq.errors import AdaqError, UnsupportedArchitecture

DECODE_STEPS = 32
PROMPT = [249, 17, 200, 3, 96, 45, 150, 7, 88, 230, 61, 12, 5, 140]  # 14 tokens: past Gemma's window of 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for arch in ("qwen3", "qwen3_moe", "gemma3"):
        root = make_checkpoint(arch, tmp_path_factory.mktemp(arch))
        write_tokenizer(root / "nvfp4")
        folders[arch] = root
    return folders


def make_llm(folder, **settings) -> LLM:
    defaults = dict(backend="reference", kv_cache_dtype="bf16", dtype="fp32", device="cpu", block_size=4,
                    max_model_len=128)
    return LLM(folder, **{**defaults, **settings})


def record_logits(llm: LLM) -> list[torch.Tensor]:
    """Every logits row the engine computes, in order (the model's compute_logits, wrapped)."""
    rows = []
    model = llm.engine.runner.model
    compute = model.compute_logits

    def recording(hidden):
        logits = compute(hidden)
        rows.extend(logits.detach().clone())
        return logits

    model.compute_logits = recording
    return rows


def bf16_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention with K and V rounded through bf16, as a bf16 KV cache stores them."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key.bfloat16().float(), value.bfloat16().float(), attention_mask, **kwargs)


def transformers_logits(folder, token_ids: list[int], kv_bf16: bool = True) -> torch.Tensor:
    """fp32 logits of transformers' forward; kv_bf16: K/V rounded to bf16 (what the engine's bf16 cache does)."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("adaq_bf16_kv", bf16_kv_attention)
    AttentionMaskInterface.register("adaq_bf16_kv", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    attention = "adaq_bf16_kv" if kv_bf16 else "eager"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "gemma3"])
def test_prefill_and_decode_match_transformers(checkpoints, arch, capsys):
    # Chunks of 5 tokens: the prompt's later chunks read the earlier ones from the paged cache.
    llm = make_llm(checkpoints[arch] / "nvfp4", max_num_batched_tokens=5)
    rows = record_logits(llm)
    out = llm.generate(PROMPT, greedy(DECODE_STEPS + 1))[0]
    assert len(rows) == DECODE_STEPS + 1
    reference = transformers_logits(checkpoints[arch] / "decompressed", PROMPT + out.token_ids[:-1])
    expected = reference[len(PROMPT) - 1:]
    error = (torch.stack(rows) - expected).abs().max() / expected.abs().max()
    with capsys.disabled():
        print(f"\n{arch}: prefill + {DECODE_STEPS} decode steps, max |dlogit| / max |logit| = {error:.2e}")
    assert error <= 1e-3, f"{arch}: max |dlogit| / max |logit| = {error:.2e}"
    assert out.token_ids == expected.argmax(-1).tolist()


def test_batch_invariance_with_preemption(checkpoints):
    """A prompt's greedy tokens alone equal its tokens among 7 others of different lengths that arrive one per
    step, with chunked prefill (16 tokens a step) and a cache so small that sequences get preempted."""
    target = PROMPT[:9]
    alone = make_llm(checkpoints["qwen3"] / "nvfp4").generate(target, greedy(24))[0].token_ids
    llm = make_llm(checkpoints["qwen3"] / "nvfp4", num_kv_blocks=40, max_model_len=64, max_num_batched_tokens=16)
    engine = llm.engine
    target_id, finished = run_with_staggered_arrivals(engine, target, greedy)
    assert engine.scheduler.num_preemptions > 0, "the tiny cache should have forced preemption"
    assert len(finished) == 8 and all(output.finished for output in finished.values())
    assert finished[target_id].token_ids == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_fp8_and_nvfp4_kv_cache_error_is_bounded(checkpoints, arch, capsys):
    """Teacher-forced logits at 53 positions (prefill in chunks of 8, so most keys come from the cache) against
    transformers in fp32 with an unrounded cache: E4M3 keeps 3 mantissa bits to bf16's 8, so its error may be up
    to 2^5 times bf16's (twice that as slack), and stays under an absolute bound. NVFP4 (E2M1: 1 mantissa bit,
    ~9 % RMS per row against E4M3's ~2.5 %) may be up to 8x FP8's and under 0.25 of max |logit|."""
    folder = checkpoints[arch]
    tokens = PROMPT + [(31 * i + 7) % 240 + 1 for i in range(40)]
    reference = transformers_logits(folder / "decompressed", tokens, kv_bf16=False)[:-1]
    errors, agreement = {}, {}
    for kv_dtype in ("bf16", "fp8", "nvfp4"):
        llm = make_llm(folder / "nvfp4", kv_cache_dtype=kv_dtype, max_num_batched_tokens=8)
        rows = record_logits(llm)
        llm.prompt_logprobs([tokens])
        logits = torch.stack(rows)
        errors[kv_dtype] = ((logits - reference).abs().max() / reference.abs().max()).item()
        agreement[kv_dtype] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n{arch}: max |dlogit| / max |logit| against transformers fp32: bf16 KV {errors['bf16']:.2e}, "
              f"fp8 KV {errors['fp8']:.2e}, nvfp4 KV {errors['nvfp4']:.2e}; top-1 agreement bf16 "
              f"{agreement['bf16']:.1%}, fp8 {agreement['fp8']:.1%}, nvfp4 {agreement['nvfp4']:.1%}")
    assert errors["bf16"] <= 1e-2
    assert errors["bf16"] < errors["fp8"] <= min(64 * errors["bf16"], 0.15)
    assert errors["fp8"] < errors["nvfp4"] <= min(8 * errors["fp8"], 0.25)
    assert agreement["fp8"] >= 0.9 and agreement["nvfp4"] >= 0.75


def test_prompt_logprobs_match_transformers(checkpoints):
    folder = checkpoints["qwen3"]
    lists = [PROMPT, PROMPT[:5], [249, 100, 101, 102] * 10]
    starts = [1, 3, 21]
    llm = make_llm(folder / "nvfp4", max_num_batched_tokens=16)
    rows = record_logits(llm)
    results = llm.prompt_logprobs(lists, with_greedy=True, start=starts)
    assert len(rows) == sum(len(t) - s for t, s in zip(lists, starts)), "the output layer ran only where needed"
    for tokens, start, (logprobs, is_greedy) in zip(lists, starts, results):
        reference = transformers_logits(folder / "decompressed", tokens).log_softmax(-1)[:-1]
        expected = reference.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
        assert logprobs.shape == (len(tokens) - 1,)
        assert logprobs[:start - 1].isnan().all()
        assert (logprobs[start - 1:] - expected[start - 1:]).abs().max() < 1e-3
        assert torch.equal(is_greedy[start - 1:], (reference.argmax(-1) == torch.tensor(tokens[1:]))[start - 1:])


def test_prefix_cache_is_reused_and_exact(checkpoints):
    folder = checkpoints["gemma3"]
    shared = [(13 * i + 5) % 240 + 1 for i in range(30)]
    lists = [shared + [7, 8, 9, 10], shared + [11, 12]]
    llm = make_llm(folder / "nvfp4", max_num_batched_tokens=64)
    first = llm.prompt_logprobs(lists[:1], start=[30])
    second = llm.prompt_logprobs(lists[1:], start=[30])
    manager = llm.engine.block_manager
    assert manager.prefix_hit_tokens == 28, "the second request computed only its last blocks"
    for tokens, (logprobs,) in zip(lists, (first, second)):
        reference = transformers_logits(folder / "decompressed", tokens).log_softmax(-1)[:-1]
        expected = reference.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
        assert (logprobs[29:] - expected[29:]).abs().max() < 1e-3
    again = llm.generate(shared, greedy(8))[0].token_ids
    assert again == make_llm(folder / "nvfp4", enable_prefix_caching=False).generate(shared, greedy(8))[0].token_ids


def test_next_token_logprobs_match_transformers(checkpoints):
    folder = checkpoints["gemma3"]
    lists, candidates = [PROMPT, PROMPT[:1]], [[5, 17, 100], [3]]
    llm = make_llm(folder / "nvfp4", max_num_batched_tokens=6)
    for tokens, cands, (logprobs, argmax) in zip(lists, candidates, llm.next_token_logprobs(lists, candidates)):
        reference = transformers_logits(folder / "decompressed", tokens).log_softmax(-1)[-1]
        assert (logprobs - reference[cands]).abs().max() < 1e-3
        assert argmax == int(reference.argmax())


def test_stop_strings_stop_ids_and_streaming(checkpoints):
    llm = make_llm(checkpoints["qwen3"] / "nvfp4")
    free = llm.engine.block_manager.num_free_blocks
    full = llm.generate("Hello", greedy(40))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    assert "".join(llm.stream("Hello", greedy(40))) == full.text
    start = next(k for k in range(3, len(full.text) - 2) if full.text[k:k + 2].isascii()
                 and full.text[k:k + 2].isprintable() and full.text.find(full.text[k:k + 2]) == k)
    stop = full.text[start:start + 2]
    stopped = llm.generate("Hello", greedy(40, stop=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full.text[:start]
    assert "".join(llm.stream("Hello", greedy(40, stop=[stop]))) == stopped.text
    by_id = llm.generate("Hello", greedy(40, stop_token_ids=[full.token_ids[5]]))[0]
    first = full.token_ids.index(full.token_ids[5])
    assert by_id.token_ids == full.token_ids[:first + 1] and by_id.stop_reason == full.token_ids[5]
    assert llm.engine.block_manager.num_free_blocks == free


def test_eos_ends_generation_unless_ignored(checkpoints):
    llm = make_llm(checkpoints["qwen3"] / "nvfp4")
    full = llm.generate("Hi", greedy(30))[0]
    llm.engine.eos_token_ids = {full.token_ids[3]}
    first = full.token_ids.index(full.token_ids[3])
    stopped = llm.generate("Hi", SamplingParams(max_tokens=30, temperature=0))[0]
    assert stopped.token_ids == full.token_ids[:first + 1] and stopped.finish_reason == "stop"
    assert llm.generate("Hi", greedy(30))[0].token_ids == full.token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(checkpoints):
    llm = make_llm(checkpoints["qwen3"] / "nvfp4")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, seed=123,
                            ignore_eos=True)
    alone = llm.generate("Hello", params)[0].token_ids
    crowd = llm.generate(["Hello", "Other prompt", "Hello"],
                         [params, SamplingParams(max_tokens=25, seed=5, ignore_eos=True),
                          SamplingParams(max_tokens=20, temperature=0.9, seed=124, ignore_eos=True)])
    assert crowd[0].token_ids == alone
    assert crowd[2].token_ids != alone


def test_abort_frees_blocks(checkpoints):
    llm = make_llm(checkpoints["qwen3"] / "nvfp4")
    engine = llm.engine
    request_id = engine.add_request("Hello there", greedy(50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request(request_id)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [(request_id, "abort")]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_decode_look_ahead_changes_nothing(checkpoints, monkeypatch):
    """Decode look-ahead (the next step launched before the host reads this one's tokens) gives the same tokens,
    stops and freed blocks as reading every step first, with sequences ending by EOS, stop strings and aborts
    while a step is in flight; and it did run."""
    folder = checkpoints["qwen3"] / "nvfp4"
    prompts = ["Hello", "Other prompt", "A third one", "Hi"]

    def run(look_ahead: bool, **settings):
        monkeypatch.setenv("ADAQ_DECODE_LOOKAHEAD", "1" if look_ahead else "0")
        llm = make_llm(folder, **settings)
        engine = llm.engine
        launches = []
        launch = engine.runner.launch
        engine.runner.launch = lambda batch, tokens=None: launches.append(tokens is not None) or launch(batch, tokens)
        free = engine.block_manager.num_free_blocks
        first = llm.generate(prompts, greedy(24))
        engine.eos_token_ids = {first[0].token_ids[5], first[2].token_ids[9]}
        params = [SamplingParams(max_tokens=24, temperature=0), greedy(24, stop=[first[1].text[4:6]]), greedy(30),
                  SamplingParams(max_tokens=24, temperature=0.8, seed=7)]
        stopped = llm.generate(prompts, params)
        request = engine.add_request("Hello there", greedy(50))
        for _ in range(4):
            engine.step()
        engine.abort_request(request)
        while engine.has_unfinished():
            engine.step()
        assert engine.block_manager.num_free_blocks == free
        outputs = [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in first + stopped]
        return outputs, sum(launches)

    eager, eager_ahead = run(False)
    pipelined, ahead = run(True)
    assert eager_ahead == 0 and ahead > 20
    assert pipelined == eager
    assert {reason for _, _, reason, _ in eager} == {"length", "stop"}
    tight, tight_ahead = run(True, num_kv_blocks=20, max_model_len=64)  # look-ahead waits for blocks, never preempts
    assert tight == eager and 0 < tight_ahead < ahead


def test_decode_graph_inputs_land_in_the_bucket_views():
    """The two flat buffers a decode step is copied into read back, through the graph's views, as the step's inputs
    padded to the bucket (padded rows: slot -1, one key of block 0)."""
    from adaq.engine.cuda_graph import _Bucket, pack_decode_inputs

    longs, ints = pack_decode_inputs(4, 3, [11, 12, 13], [5, 9, 2], [21, 37, 8], [6, 10, 3], [[1], [2, 4, 5], [7]])
    bucket = _Bucket(4, None, torch.tensor(longs), torch.tensor(ints, dtype=torch.int32), None)
    assert bucket.input_ids.tolist() == [11, 12, 13, 0] and bucket.positions.tolist() == [5, 9, 2, 0]
    assert bucket.slot_mapping.tolist() == [21, 37, 8, -1] and bucket.context_lens.tolist() == [6, 10, 3, 1]
    assert bucket.block_tables.tolist() == [[1, 0, 0], [2, 4, 5], [7, 0, 0], [0, 0, 0]]


def test_chat_uses_the_tokenizer_template(checkpoints):
    llm = make_llm(checkpoints["qwen3"] / "nvfp4")
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(4))[0]
    expected = llm.tokenizer.encode("<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>assistant\n",
                                    add_special_tokens=False)
    assert out.prompt_token_ids == expected


def test_max_model_len_caps_generation(checkpoints):
    llm = make_llm(checkpoints["qwen3"] / "nvfp4", max_model_len=20)
    out = llm.generate(PROMPT, greedy(100))[0]
    assert len(out.token_ids) == 20 - len(PROMPT) and out.finish_reason == "length"


@pytest.mark.parametrize("settings,match", [
    (dict(num_kv_blocks=2, max_model_len=64), "--num-kv-blocks"),
    (dict(kv_cache_memory="1KiB", max_model_len=64), "--kv-cache-memory"),
    (dict(max_model_len=100_000), "--max-model-len"),
    (dict(kv_cache_dtype="int4"), "--kv-cache-dtype"),
])
def test_bad_settings_name_the_setting(checkpoints, settings, match):
    with pytest.raises(AdaqError, match=match):
        make_llm(checkpoints["qwen3"] / "nvfp4", **settings)


def test_bad_requests(checkpoints, tmp_path):
    llm = make_llm(checkpoints["qwen3"] / "nvfp4", max_model_len=32)
    with pytest.raises(AdaqError, match="--max-model-len"):
        llm.generate("x" * 40)
    with pytest.raises(AdaqError, match="empty"):
        llm.generate([[]])
    with pytest.raises(InvalidSamplingParams, match="top_p"):
        llm.generate("x", SamplingParams(top_p=2))
    assert not llm.engine.has_unfinished()


def test_missing_tokenizer_and_unsupported_architecture(checkpoints, tmp_path):
    with pytest.raises(AdaqError, match="no tokenizer"):
        make_llm(checkpoints["qwen3"] / "decompressed")
    import json
    import shutil

    folder = shutil.copytree(checkpoints["qwen3"] / "nvfp4", tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM"):
        make_llm(folder)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cache_sizing_and_greedy_parity(tmp_path):
    """On a GPU the cache takes what gpu_memory_utilization leaves after a warm-up step; tokens match the CPU."""
    from helpers.tiny_models import random_model

    random_model("gemma3").save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    settings = dict(backend="reference", dtype="fp32", kv_cache_dtype="bf16", max_model_len=256)
    gpu = LLM(tmp_path, device="cuda", gpu_memory_utilization=0.3, **settings)
    free, total = torch.cuda.mem_get_info()
    assert torch.cuda.memory_reserved() <= 0.3 * total
    assert gpu.engine.runner.num_blocks * gpu.engine.config.block_size > 100_000, "most of 30% should be KV cache"
    cpu = LLM(tmp_path, device="cpu", **settings)
    prompts = [PROMPT, PROMPT[:3], PROMPT * 3]
    on_gpu = [out.token_ids for out in gpu.generate(prompts, greedy(32))]
    assert on_gpu == [out.token_ids for out in cpu.generate(prompts, greedy(32))]


def test_nvfp4_kv_cache_geometry_and_tokens_per_gib(checkpoints):
    """The engine's NVFP4 cache: uint8 rows of D/2 + D/16 bytes and a uint8 exponent per (token, head); a block
    costs 73/132 of FP8's at D = 128, so >= 1.8x the tokens per GiB (tiny qwen3: D = 16, 10 bytes against 20)."""
    llm = make_llm(checkpoints["qwen3"] / "nvfp4", kv_cache_dtype="nvfp4", kv_cache_memory="1MiB")
    runner = llm.engine.runner
    g = runner.geometry
    assert runner.kv_cache.dtype == torch.uint8 and runner.kv_cache.shape[-1] == g.head_dim // 2 + g.head_dim // 16
    assert runner.kv_scales.dtype == torch.uint8 and runner.kv_scales.shape == runner.kv_cache.shape[:-1]
    per_token_head = g.head_dim // 2 + g.head_dim // 16 + 1
    assert g.bytes_per_block() == 2 * g.num_layers * g.block_size * g.num_kv_heads * per_token_head
    fp8 = make_llm(checkpoints["qwen3"] / "nvfp4", kv_cache_dtype="fp8", kv_cache_memory="1MiB").engine.runner
    assert fp8.geometry.bytes_per_block() / g.bytes_per_block() == (g.head_dim + 4) / per_token_head
    assert runner.num_blocks >= 1.8 * fp8.num_blocks
    out = llm.generate([PROMPT], greedy(8))[0]
    assert len(out.token_ids) == 8
