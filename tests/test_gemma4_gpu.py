"""Gemma 4 on the cuda backend (issue 16): head_dim 512 attention and per-layer KV shapes on the GPU. Skipped
without CUDA; the head_dim 512 cases of the plain kernel tests are in test_kernels_gpu.py and
test_kernels_gpu_kv_nvfp4.py (their shape lists).

- A layer's view into a cache slot wider than its own rows (adaq.engine.model_runner.layer_view: a 4 x 512 global
  layer inside a 16 x 256 slot, as Gemma4-31B's layers share one pool with window-sized KV off): the store kernel
  writes the reference's bytes into the view and nothing outside it, and decode/prefill attention over the view
  equal the reference's, for FP8, bf16 and NVFP4 caches; outputs poisoned before each run.
- Decode attention at head_dim 512 with its splits merged in the kernel (variant 3) and captured in a CUDA graph.
- Tiny Gemma 4 models (dense with k_eq_v global layers, MoE; sliding layers of 256, global of 512, fewer KV heads
  on global layers) on the cuda backend decode through CUDA graphs under --strict (no fallback); every logits row
  is close to the reference backend's and the greedy tokens are the same (or diverge after a near-tie).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_prefill")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from helpers.tiny_models import make_checkpoint  # noqa: E402

from helpers.paged import decode_context  # noqa: E402
from helpers.gpu_checks import check_divergences, poison_allocator, rel_error, run_requests  # noqa: E402
from adaq.backends.numerics import attention  # noqa: E402
from adaq.engine.model_runner import layer_view  # noqa: E402
from adaq.engine.sampling_params import SamplingParams  # noqa: E402
from adaq.kernels import ops  # noqa: E402

DEV = torch.device("cuda")
BOUND = 4e-3  # the bf16 output's rounding and f16 P (tests/test_kernels_gpu.py)
NEAR_TIE_NATS = 0.1
SLOT_HEADS, SLOT_DIM = 16, 256  # Gemma4-31B's sliding layers: the slot a global layer's view lives in
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "nvfp4": torch.uint8}


def wide_slots(num_blocks: int, block_size: int, kind: str):
    """(cache, scales) of a pool whose slots hold SLOT_HEADS x SLOT_DIM, filled with a sentinel byte (0x7E: a finite
    E4M3 / bf16 pattern, a large NVFP4 code) so that a write outside a view, or a read of the sentinel, shows."""
    width = attention.nvfp4_kv_row_bytes(SLOT_DIM) if kind == "nvfp4" else SLOT_DIM
    cache = torch.empty(2, num_blocks, block_size, SLOT_HEADS, width, dtype=KV_DTYPES[kind], device=DEV)
    cache.view(torch.uint8).fill_(0x7E)
    scale_dtype = {"fp8": torch.float32, "nvfp4": torch.uint8}.get(kind)
    scales = None if scale_dtype is None else torch.full((2, num_blocks, block_size, SLOT_HEADS), 3,
                                                         dtype=scale_dtype, device=DEV)
    return cache, scales


def views(cache, scales, heads: int, dim: int, kind: str):
    """K and V views (and their scales) of a layer of `heads` x `dim` inside the wide slots."""
    width = attention.nvfp4_kv_row_bytes(dim) if kind == "nvfp4" else dim
    k, v = (layer_view(cache[i], heads, width) for i in (0, 1))
    ks, vs = (None, None) if scales is None else (scales[0, ..., :heads], scales[1, ..., :heads])
    return k, v, ks, vs


def fill_layer(heads: int, dim: int, kind: str, num_blocks: int, block_size: int, gen):
    """Wide slots with a (heads, dim) layer's K/V written by the reference store into every slot of its view."""
    cache, scales = wide_slots(num_blocks, block_size, kind)
    k_view, v_view, ks, vs = views(cache, scales, heads, dim, kind)
    slots = torch.arange(num_blocks * block_size, device=DEV)
    k = torch.randn(slots.numel(), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    v = torch.randn(slots.numel(), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    attention.store_kv_reference(k, v, k_view, v_view, ks, vs, slots)
    return cache, scales, (k_view, v_view, ks, vs)



# ---- a layer's view into a wider slot ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fp8", "bf16", "nvfp4"])
@pytest.mark.parametrize("heads,dim", [(4, 512), (2, 512), (8, 128), (16, 256)])
def test_store_kv_into_a_layer_view(kind, heads, dim):
    """The store kernel writes the reference's bytes into the view (slot -1 skipped) and nothing beyond it."""
    gen = torch.Generator(device=DEV).manual_seed(heads * dim)
    blocks, block_size, tokens = 6, 16, 45
    k = (torch.randn(tokens, heads, dim, device=DEV, generator=gen) * 3).to(torch.bfloat16)
    v = torch.randn(tokens, 2 * heads, dim, device=DEV, generator=gen).to(torch.bfloat16)[:, :heads]  # strided
    slots = torch.randperm(blocks * block_size, device=DEV, generator=gen)[:tokens]
    slots[::7] = -1
    results = []
    for store in ("reference", "kernel"):
        cache, scales = wide_slots(blocks, block_size, kind)
        target = views(cache, scales, heads, dim, kind)
        if store == "reference":  # on CPU copies: the spec divides by true division (test_kernels_gpu.py says why)
            cpu = [None if t is None else t.cpu() for t in target]
            attention.store_kv_reference(k.cpu(), v.cpu(), *cpu, slots.cpu())
            for dst, src in zip(target, cpu):
                if dst is not None:
                    dst.copy_(src)
        else:
            ops.store_kv(k, v, *target, slots)
        results.append((cache.view(torch.uint8), None if scales is None else scales.view(torch.uint8)))
    (ref_cache, ref_scales), (out_cache, out_scales) = results
    assert torch.equal(ref_cache, out_cache), "cache bytes differ (inside the view, or written outside it)"
    if ref_scales is not None:
        assert torch.equal(ref_scales, out_scales)


@pytest.mark.parametrize("kind", ["fp8", "bf16", "nvfp4"])
@pytest.mark.parametrize("heads,kv_heads,dim,window", [(32, 4, 512, None), (16, 2, 512, 100), (32, 16, 256, 100)])
def test_attention_over_a_layer_view(kind, heads, kv_heads, dim, window):
    """Decode (odd batch, one context over several splits) and packed prefill (a chunk after a cached prefix, a
    fresh odd prompt) over the view equal the reference over the same view."""
    from adaq.backends.cuda import CudaBackend

    gen = torch.Generator(device=DEV).manual_seed(heads + dim + (window or 0))
    block_size, lens = 16, [3001, 17, 1, 640, 95]
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    _, _, (k_view, v_view, ks, vs) = fill_layer(kv_heads, dim, kind, num_blocks, block_size, gen)
    backend = CudaBackend(DEV)
    assert backend._kv_kernel_ok(torch.empty(1, 1, dim, dtype=torch.bfloat16, device=DEV), k_view)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = torch.randn(len(lens), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
    for prefill in (False, True):
        if prefill:
            q_lens = [301, 17, 1, 0, 95]
            ctx.is_prefill = True
            ctx.cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                                            device=DEV)
            q = torch.randn(sum(q_lens), heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
        ref = attention.attention_reference(q, k_view, v_view, ks, vs, ctx, scale=1.0, sliding_window=window,
                                            softcap=None)
        poison_allocator()
        out = backend.attention(q, k_view, v_view, ks, vs, ctx, scale=1.0, sliding_window=window, softcap=None)
        assert torch.isfinite(out).all()
        assert rel_error(out, ref) < BOUND, ("prefill" if prefill else "decode", rel_error(out, ref))
    assert len(backend.fallbacks) == 0


# ---- head_dim 512: in-kernel split merge, CUDA graph ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["fp8", "bf16", "nvfp4"])
def test_head_dim_512_splits_merged_in_kernel_and_graph_replay(kind):
    """Variant 3 (the last split block merges) at head_dim 512, eager and replayed from a CUDA graph over fresh
    queries: equal to the reference, and the replay equal to eager bit for bit."""
    gen = torch.Generator(device=DEV).manual_seed(512)
    block_size, lens = 16, [8192, 100, 1500]
    num_blocks = sum(-(-n // block_size) for n in lens)
    _, _, (k_view, v_view, ks, vs) = fill_layer(4, 512, kind, num_blocks, block_size, gen)
    ctx = decode_context(lens, block_size, num_blocks, gen)
    q = torch.randn(len(lens), 32, 512, device=DEV, generator=gen).to(torch.bfloat16)
    splits = ops.attention_splits(len(lens), 4, max(lens), head_dim=512, group=8, fp8=kind == "fp8",
                                  block_size=block_size, nvfp4=kind == "nvfp4")
    assert splits > 1

    def run():
        return ops.paged_attention(q, k_view, v_view, ks, vs, ctx.block_tables, ctx.context_lens, scale=1.0,
                                   softcap=30.0, splits=splits)

    with ops.attention_variant(3):
        poison_allocator()
        eager = run()
        ref = attention.attention_reference(q, k_view, v_view, ks, vs, ctx, scale=1.0, softcap=30.0)
        assert rel_error(eager, ref) < BOUND
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        for _ in range(2):
            q.copy_(torch.randn(q.shape, device=DEV, generator=gen).to(torch.bfloat16))
            graph.replay()
            assert torch.equal(out, run())


# ---- tiny Gemma 4 models on the engine -------------------------------------------------------------------------

# The tiny checkpoints (tests/helpers/tiny_models.py) in the kernels' shapes: sliding layers 4 KV heads of 256,
# global layers 1 KV head of 512 (8 query heads: groups 2 and 8, as Gemma4-31B's 32 over 16 and 4).
GPU_SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=256, global_head_dim=512, num_global_key_value_heads=1)
MOE_SHAPES = dict(moe_intermediate_size=64)
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def gemma4_folders(tmp_path_factory):
    return {arch: make_checkpoint(arch, tmp_path_factory.mktemp(arch), **GPU_SHAPES,
                                  **(MOE_SHAPES if arch == "gemma4_moe" else {})) / "nvfp4"
            for arch in ("gemma4", "gemma4_moe")}



def engine_for(folder, backend: str, kv: str, window_kv: bool):
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine

    config = EngineConfig(folder, backend=backend, dtype="bf16", device=DEV, kv_cache_dtype=kv, window_kv=window_kv,
                          max_model_len=256, max_num_seqs=8, max_num_batched_tokens=512, num_kv_blocks=96,
                          skip_tokenizer=True, strict=backend == "cuda")
    return LLMEngine(config)


def record_logits(engine) -> list[torch.Tensor]:
    """Every logits row the engine computes, in order (graph decode steps included: logits come after the graph)."""
    rows, model = [], engine.runner.model
    compute = model.compute_logits

    def recording(hidden):
        logits = compute(hidden)
        rows.extend(logits.detach().float().clone())
        return logits

    model.compute_logits = recording
    return rows


# Logits of the cuda backend (NVFP4 GEMM kernels, bf16 activations) against the reference backend's (dequantized
# weights, cuBLAS) on the same tiny model: bf16 roundings along 6 layers, relative to the largest logit.
LOGIT_BOUND = 3e-2


@pytest.mark.parametrize("kv,window_kv", [("fp8", True), ("bf16", True), ("nvfp4", True), ("fp8", False),
                                          ("nvfp4", False)])
@pytest.mark.parametrize("arch", ["gemma4", "gemma4_moe"])
def test_tiny_gemma4_decodes_through_graphs_and_matches_reference(gemma4_folders, arch, kv, window_kv):
    """Prompts of 5, 17 and 40 tokens (window 8: the sliding layers' pool recycles blocks), 32 greedy tokens:
    graphs captured and replayed, no fallback under --strict; every logits row (prefill and each decode step) close
    to the reference backend's, and the same greedy tokens (a random tiny Gemma repeats its last prompt token, so
    the logits carry the check; a token divergence must follow a near-tie of the reference's top two)."""
    from adaq.engine.cuda_graph import graph_blocker

    folder = gemma4_folders[arch]
    generator = torch.Generator().manual_seed(len(arch))
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (5, 17, 40)]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    cuda = engine_for(folder, "cuda", kv, window_kv)
    graphs = cuda.runner.decode_graphs
    assert graphs is not None and graph_blocker(cuda.runner.model) is None
    dims = {layer.head_dim for layer in cuda.runner.attention_layers}
    assert dims == {256, 512}, dims
    cuda_rows = record_logits(cuda)
    cuda_tokens = [o.token_ids for o in run_requests(cuda, prompts, greedy)]
    assert graphs.replays >= MAX_TOKENS - 1 and len(cuda.fallbacks) == 0
    reference = engine_for(folder, "reference", kv, window_kv)
    ref_rows = record_logits(reference)
    ref_tokens = [o.token_ids for o in run_requests(reference, prompts, greedy)]
    assert len(cuda_rows) == len(ref_rows) and all(torch.isfinite(row).all() for row in cuda_rows)
    errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(cuda_rows, ref_rows)]
    assert max(errors) < LOGIT_BOUND, f"logits row {errors.index(max(errors))}: {max(errors):.2e}"
    report = [f"max |delta logit| / max |logit| {max(errors):.2e} over {len(errors)} rows"]
    report += check_divergences(reference, prompts, ref_tokens, cuda_tokens, NEAR_TIE_NATS)
    print(f"{arch} {kv} window_kv={window_kv}: cuda vs reference:", "; ".join(report))
