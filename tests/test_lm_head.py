"""--lm-head bf16 | fp8 | nvfp4: the output layer quantized at load, its reference numerics, the engine and bench
plumbing (CPU), and the cuda backend against the reference (GPU)."""

import pytest
import torch
from helpers.tiny_models import make_checkpoint

from adaq.backends.reference import ReferenceBackend
from adaq.bench import roofline
from adaq.engine.api import LLM
from adaq.engine.config import LM_HEADS, EngineConfig
from adaq.errors import AdaqError
from adaq.formats import fp8_prefill, nvfp4
from adaq.formats.fp8_prefill import FP8Weight
from adaq.formats.nvfp4 import NVFP4Weight
from adaq.layers import embedding
from adaq.layers.embedding import LM_HEAD_FORMATS, quantize_output_layer

SHAPES = [(1, 64, 48), (5, 160, 96), (17, 272, 512), (64, 33 * 16, 16)]  # (rows M, vocab N, hidden K): odd M, N


def test_formats_agree_across_floors():
    assert LM_HEADS == LM_HEAD_FORMATS == roofline.LM_HEAD_FORMATS


@pytest.mark.parametrize("weight_format", ["fp8", "nvfp4"])
def test_slabs_change_nothing(monkeypatch, weight_format):
    weight = torch.randn(1000, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    whole = quantize_output_layer(weight, weight_format)
    monkeypatch.setattr(embedding, "QUANTIZE_ROWS", 96)
    sliced = quantize_output_layer(weight, weight_format)
    if weight_format == "nvfp4":
        reference = nvfp4.quantize(weight)  # one global scale over the whole tensor, as RTN
        for got in (whole, sliced):
            assert torch.equal(got.packed, reference.packed)
            assert torch.equal(got.block_scale.view(torch.uint8), reference.block_scale.view(torch.uint8))
            assert torch.equal(got.global_scale, reference.global_scale)
    else:
        assert torch.equal(whole.values.view(torch.uint8), sliced.values.view(torch.uint8))
        assert torch.equal(whole.col_scale, sliced.col_scale)


def test_fp8_per_channel_scales():
    weight = torch.randn(40, 32, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 2, 40)[:, None]
    weight[7] = 0  # a zero row keeps a finite scale
    fp8 = fp8_prefill.quantize_per_channel(weight)
    assert fp8.values.dtype == torch.float8_e4m3fn and fp8.col_scale.dtype == torch.float32
    assert torch.equal(fp8.col_scale, (weight.abs().amax(1) / 448).clamp(min=1e-12))
    assert fp8.values.float().abs().amax(1)[weight.abs().amax(1) > 0].eq(448).all()  # each row's max maps to 448
    back = fp8_prefill.dequantize_expanded(fp8)
    assert torch.all((back - weight).abs() <= weight.abs().amax(1, keepdim=True) / 448 * 16 + 1e-30)
    assert back[7].eq(0).all()


def test_hidden_not_multiple_of_16_is_refused():
    with pytest.raises(AdaqError, match="--lm-head nvfp4 needs the hidden size"):
        quantize_output_layer(torch.randn(8, 24), "nvfp4")


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_linear_fp8(m, n, k):
    generator = torch.Generator().manual_seed(m * n + k)
    weight, x = torch.randn(n, k, generator=generator), torch.randn(m, k, generator=generator)
    fp8 = fp8_prefill.quantize_per_channel(weight)
    for cache in (0, None):  # the widened fp32 copy kept or not
        backend = ReferenceBackend("cpu", dequant_cache_bytes=cache)
        handle = backend.prepare_linear(fp8, dtype=torch.float32, role="lm_head")
        expected = fp8_prefill.fp8_linear_reference(x, fp8)
        assert torch.equal(backend.linear(x, handle), expected)
    x8, row_scale = fp8_prefill.quantize_activation(x)  # the spec written out: W8A8, fp32 epilogue
    manual = ((x8.float() @ fp8.values.float().T) * row_scale[:, None]) * fp8.col_scale[None, :]
    torch.testing.assert_close(backend.linear(x, handle), manual, rtol=1e-6, atol=1e-6)
    assert torch.equal(handle.weight(), fp8_prefill.dequantize_expanded(fp8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {arch: make_checkpoint(arch, tmp_path_factory.mktemp(arch)) / "nvfp4" for arch in ("qwen3", "gemma3")}


def make_llm(folder, **settings) -> LLM:
    return LLM(folder, backend="reference", kv_cache_dtype="bf16", dtype="fp32", device="cpu", block_size=4,
               max_model_len=64, skip_tokenizer=True, **settings)


def hidden_and_logits(llm: LLM, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    model = llm.engine.runner.model
    compute = model.compute_logits

    def recording(hidden):
        seen["hidden"], seen["logits"] = hidden.clone(), compute(hidden)
        return seen["logits"]

    model.compute_logits = recording
    llm.next_token_logprobs([tokens], [[0]])
    return seen["hidden"], seen["logits"]


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])  # gemma3: tied embeddings
def test_engine_output_layer(tiny, arch):
    tokens = [5, 17, 200, 3, 96, 45]
    bf16 = make_llm(tiny[arch])
    dense = bf16.engine.runner.model.lm_head.linear.handles[0].weight().clone()
    for weight_format in ("fp8", "nvfp4"):
        llm = make_llm(tiny[arch], lm_head=weight_format)
        model = llm.engine.runner.model
        assert llm.engine.config.lm_head == weight_format
        handle = model.lm_head.linear.handles[0]
        hidden, logits = hidden_and_logits(llm, tokens)
        if weight_format == "nvfp4":
            assert handle.packed is not None
            expected = hidden @ nvfp4.dequantize(nvfp4.quantize(dense)).T
        else:
            assert handle.channel_fp8 is not None
            expected = fp8_prefill.fp8_linear_reference(hidden, fp8_prefill.quantize_per_channel(dense))
        if model.lm_head.softcap:
            expected = torch.tanh(expected / model.lm_head.softcap) * model.lm_head.softcap
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(logits, hidden @ dense.T)  # quantized: not the bf16 output layer
        assert torch.equal(model.embed_tokens.weight, bf16.engine.runner.model.embed_tokens.weight)  # input side


def test_quantized_checkpoint_lm_head_runs_as_stored():
    head = embedding.LMHead(ReferenceBackend("cpu"), 32, 48)
    head.weight_format = "fp8"
    stored = nvfp4.quantize(torch.randn(48, 32))
    head.load(stored, torch.float32)
    assert torch.equal(head.linear.handles[0].packed.packed, stored.packed)


def test_invalid_lm_head_is_one_line(tiny):
    with pytest.raises(AdaqError, match="invalid setting --lm-head int4"):
        EngineConfig(tiny["qwen3"], lm_head="int4", device="cpu")


def test_cli_refuses_bad_lm_head(tiny):
    from typer.testing import CliRunner

    from adaq.cli import app

    result = CliRunner().invoke(app, ["run", str(tiny["qwen3"]), "hi", "--lm-head", "int4", "--device", "cpu"])
    assert isinstance(result.exception, AdaqError)  # adaq.cli.main prints it as one line
    assert "--lm-head int4" in str(result.exception)


def test_roofline_counts_the_bytes_read():
    config = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 1}
    weights = roofline.WeightBytes(linear=0, expert=0, router=0, lm_head=1000 * 64 * 2, embedding=1000 * 64 * 2,
                                   embedding_row=128, norm=0)
    assert roofline.with_lm_head(weights, config, "bf16").lm_head == 128_000
    assert roofline.with_lm_head(weights, config, "fp8").lm_head == 64_000 + 4_000
    assert roofline.with_lm_head(weights, config, "nvfp4").lm_head == 32_000 + 4_000 + 4  # 0.5625 B + global
    stored_nvfp4 = roofline.WeightBytes(0, 0, 0, 36_004, 128_000, 128, 0)
    assert roofline.with_lm_head(stored_nvfp4, config, "fp8").lm_head == 36_004  # already quantized: as stored


# ---- GPU: the cuda backend's output layer against the reference -----------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_SHAPES = [(1, 151936 // 8, 4096), (3, 4096, 640), (16, 2064, 1024), (129, 1024, 2048)]


def _poisoned(shape, device):
    return torch.full(shape, float("nan"), device=device)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_cuda_fp8_lm_head_matches_reference(m, n, k):
    from adaq.backends.cuda import CudaBackend

    generator = torch.Generator().manual_seed(m + n + k)
    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
    x = torch.randn(m, k, generator=generator).bfloat16()
    fp8 = quantize_output_layer(weight.cuda(), "fp8")
    backend = CudaBackend("cuda")
    handle = backend.prepare_linear(fp8, dtype=torch.bfloat16, role="lm_head")
    assert handle.fp8_kind is not None, backend.fallbacks.as_dicts()
    out = _poisoned((m, n), "cuda")
    out.copy_(backend.linear(x.cuda(), handle).float())
    expected = fp8_prefill.fp8_linear_reference(x.cuda(), fp8_prefill.FP8Weight(fp8.values, fp8.col_scale)).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp8_lm_head_off_alignment_is_reported_and_exact():
    """A vocabulary that is not a multiple of 16 cannot take the FP8 GEMM: the reference emulation runs, said."""
    from adaq.backends.cuda import CudaBackend

    generator = torch.Generator().manual_seed(7)
    weight = (torch.randn(1000 + 4, 640, generator=generator) * 0.05).bfloat16()
    x = torch.randn(3, 640, generator=generator).bfloat16().cuda()
    fp8 = quantize_output_layer(weight.cuda(), "fp8")
    backend = CudaBackend("cuda")
    handle = backend.prepare_linear(fp8, dtype=torch.bfloat16, role="lm_head")
    out = backend.linear(x, handle).float()
    assert any("FP8 linear" in f["what"] for f in backend.fallbacks.as_dicts()), backend.fallbacks.as_dicts()
    expected = fp8_prefill.fp8_linear_reference(x, fp8_prefill.FP8Weight(fp8.values, fp8.col_scale)).float()
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_cuda_nvfp4_lm_head_matches_reference(m, n, k):
    from adaq.backends.cuda import CudaBackend

    generator = torch.Generator().manual_seed(m * 3 + n + k)
    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
    x = torch.randn(m, k, generator=generator).bfloat16().cuda()
    quantized = quantize_output_layer(weight.cuda(), "nvfp4")
    backend = CudaBackend("cuda")
    handle = backend.prepare_linear(quantized, dtype=torch.bfloat16, role="lm_head")
    assert getattr(handle, "exact_plan", None) is None and getattr(handle, "fp8_scales", None) is None
    out = _poisoned((m, n), "cuda")
    out.copy_(backend.linear(x, handle).float())
    expected = (x.float() @ nvfp4.dequantize(quantized, torch.float32).T)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("weight_format", ["fp8", "nvfp4"])
def test_cuda_engine_lm_head_greedy(tmp_path, weight_format):
    """A tiny model on the GPU with a quantized lm_head: its logits follow the reference backend's."""
    folder = make_checkpoint("qwen3", tmp_path) / "nvfp4"
    tokens = [5, 17, 200, 3, 96, 45]
    logits = {}
    for backend in ("cuda", "reference"):
        llm = LLM(folder, backend=backend, device="cuda", dtype="bf16", kv_cache_dtype="bf16", max_model_len=64,
                  skip_tokenizer=True, lm_head=weight_format, gpu_memory_utilization=0.3)
        logits[backend] = hidden_and_logits(llm, tokens)[1].float()
        # the tiny model's head_dim 16 sends attention to the reference; the output layer must not fall back
        assert not [f for f in llm.engine.fallbacks.as_dicts() if "FP8 linear" in f["what"] or "NVFP4" in f["what"]]
        del llm
    scale = logits["reference"].abs().max().item()
    torch.testing.assert_close(logits["cuda"], logits["reference"], rtol=0.05, atol=0.03 * scale)


def test_bench_counts_the_quantized_head_for_nvfp4_variants_only():
    from adaq.bench.runner import Workload
    from adaq.bench.shapes import load_model_config
    from adaq.bench.suite import BenchOptions, variant_weights

    config = load_model_config("qwen3-8b")
    workload = Workload((1,), 16, 16, 1)
    plain = BenchOptions("qwen3-8b", True, workload, device="cpu")
    nvfp4_head = BenchOptions("qwen3-8b", True, workload, device="cpu", lm_head="nvfp4")
    assert variant_weights("nvfp4", config, plain).lm_head == 151936 * 4096 * 2  # 1.24 GB of bf16
    assert variant_weights("nvfp4", config, nvfp4_head).lm_head == roofline.nvfp4_bytes(151936, 4096)
    assert variant_weights("bf16", config, nvfp4_head).lm_head == 151936 * 4096 * 2  # baselines keep bf16
    with pytest.raises(AdaqError, match="--lm-head"):
        BenchOptions("qwen3-8b", True, workload, device="cpu", lm_head="int4")


def test_eval_applies_lm_head_to_the_checkpoint_not_the_baseline():
    from adaq.commands.eval import _settings_for

    settings = {"backend": "reference"}
    assert _settings_for("baseline", settings, "nvfp4") == settings
    assert _settings_for("nvfp4a16", settings, "nvfp4") == {"backend": "reference", "lm_head": "nvfp4"}
