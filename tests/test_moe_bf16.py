"""The bf16 engine's MoE on the GPU (adaq.kernels.moe_bf16, adaq.backends.dense_moe): the expert-sorted layout, the
block-by-block emulation of the kernel against the plain reference, the orchestration against the reference MoE
(CPU), and the Triton kernel against its reference on fresh random data, outputs poisoned (GPU)."""

import pytest
import torch

from adaq.backends import dense_moe
from adaq.backends.handles import ExpertsHandle
from adaq.backends.numerics import moe as moe_numerics
from adaq.backends.reference import ReferenceBackend
from adaq.kernels import moe_bf16

# (tokens, top_k, experts)
LAYOUTS = [(1, 1, 4), (1, 8, 128), (3, 2, 8), (5, 8, 257), (17, 4, 16), (64, 8, 128), (200, 8, 32), (33, 10, 512)]
# (tokens, top_k, experts, hidden, intermediate)
SHAPES = [(1, 2, 4, 64, 32), (3, 2, 8, 72, 48), (7, 4, 6, 136, 80), (16, 8, 16, 128, 64), (70, 2, 4, 96, 40)]


def random_chosen(tokens: int, top_k: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(tokens, experts, generator=gen).argsort(dim=-1)[:, :top_k]


@pytest.mark.parametrize("tokens,top_k,experts", LAYOUTS)
@pytest.mark.parametrize("block_m", [16, 64])
def test_every_slot_lands_once_in_a_block_of_its_expert(tokens, top_k, experts, block_m):
    chosen = random_chosen(tokens, top_k, experts, torch.Generator().manual_seed(tokens * experts))
    sorted_slots, block_experts = moe_bf16.align_slots(chosen, experts, block_m)
    slots = chosen.numel()
    assert sorted_slots.numel() == moe_bf16.padded_slots(slots, experts, block_m) == block_experts.numel() * block_m
    real = sorted_slots[sorted_slots < slots].long()
    assert sorted(real.tolist()) == list(range(slots))
    blocks = sorted_slots.reshape(-1, block_m)
    for block, expert in zip(blocks, block_experts.tolist()):
        ids = block[block < slots].long()
        if expert == moe_bf16.SENTINEL_EXPERT:
            assert ids.numel() == 0
        else:
            assert (chosen.reshape(-1)[ids] == expert).all()


def random_experts(experts: int, hidden: int, inter: int, gen: torch.Generator):
    gate_up = [[(torch.randn(inter, hidden, generator=gen) * 0.1).bfloat16() for _ in range(2)]
               for _ in range(experts)]
    down = [(torch.randn(hidden, inter, generator=gen) * 0.1).bfloat16() for _ in range(experts)]
    return gate_up, down


@pytest.mark.parametrize("tokens,top_k,experts,hidden,inter", SHAPES)
def test_the_sorted_emulation_matches_the_plain_reference(tokens, top_k, experts, hidden, inter):
    gen = torch.Generator().manual_seed(hidden + tokens)
    weights = (torch.randn(experts, inter, hidden, generator=gen) * 0.1).bfloat16()
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    chosen = random_chosen(tokens, top_k, experts, gen)
    scale = torch.rand(tokens, top_k, generator=gen)
    block_m = moe_bf16.block_rows(chosen.numel(), experts)
    layout = (*moe_bf16.align_slots(chosen, experts, block_m), block_m, chosen.numel())
    got = moe_bf16.grouped_gemm_sorted(x, weights, *layout, rows_per_input=top_k, slot_scale=scale)
    want = moe_bf16.grouped_gemm_reference(x, weights, chosen, top_k, scale)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def reference_moe(backend, x, logits, gate_up, down, top_k, activation, scale, shared):
    handle = backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)
    assert isinstance(handle, ExpertsHandle)
    if shared:
        return moe_numerics.moe_shared_reference(backend, x, logits, handle, top_k, True, activation)
    return moe_numerics.moe_reference(backend, x, logits, handle, top_k, True, activation=activation,
                                      expert_scale=scale)


@pytest.mark.parametrize("activation,scaled,shared", [("silu", False, False), ("gelu_tanh", True, False),
                                                      ("silu", False, True)])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_the_dense_moe_matches_the_reference_moe(activation, scaled, shared, tokens):
    experts, top_k, hidden, inter = 8, 2, 64, 48
    gen = torch.Generator().manual_seed(tokens)
    gate_up, down = random_experts(experts + int(shared), hidden, inter, gen)
    backend = ReferenceBackend("cpu")
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    logits = torch.randn(tokens, experts + int(shared), generator=gen).bfloat16()
    scale = (torch.rand(experts, generator=gen) + 0.5) if scaled else None
    got = dense_moe.dense_moe_forward(backend, x, logits, dense_moe.DenseExperts.of(gate_up, down, "cpu"), top_k,
                                      True, activation, scale, shared, gemm=moe_bf16.grouped_gemm_sorted)
    want = reference_moe(backend, x, logits, gate_up, down, top_k, activation, scale, shared)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_bf16_experts_do_not_block_decode_graphs_and_reference_experts_do():
    from adaq.engine.cuda_graph import graph_blocker

    gate_up, down = random_experts(4, 32, 16, torch.Generator().manual_seed(0))
    layer = torch.nn.Module()
    layer.experts = dense_moe.DenseExperts.of(gate_up, down, "cpu")
    assert graph_blocker(torch.nn.Sequential(layer)) is None
    layer.experts = ReferenceBackend("cpu").prepare_experts(gate_up, down, dtype=torch.bfloat16)
    assert "MoE experts on the reference path" in graph_blocker(torch.nn.Sequential(layer))


needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and moe_bf16.triton is not None),
                               reason="needs a CUDA GPU and Triton")
GPU_SHAPES = SHAPES + [(1, 8, 128, 2048, 768), (16, 8, 256, 2048, 512), (9, 8, 128, 2816, 704),
                       (300, 8, 128, 2048, 768)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens,top_k,experts,hidden,inter", GPU_SHAPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_gpu_grouped_gemm_matches_its_reference(tokens, top_k, experts, hidden, inter, scaled):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(tokens * 7 + hidden)
    weights = (torch.randn(experts, 2 * inter, hidden, device=dev, generator=gen) * 0.05).bfloat16()
    x = torch.randn(tokens, hidden, device=dev, generator=gen).bfloat16()
    chosen = torch.rand(tokens, experts, device=dev, generator=gen).argsort(dim=-1)[:, :top_k]
    scale = torch.rand(tokens, top_k, device=dev, generator=gen) if scaled else None
    block_m = moe_bf16.block_rows(chosen.numel(), experts)
    layout = (*moe_bf16.align_slots(chosen, experts, block_m), block_m, chosen.numel())
    out = torch.full((chosen.numel(), 2 * inter), float("nan"), dtype=torch.bfloat16, device=dev)
    moe_bf16.grouped_gemm(x, weights, *layout, rows_per_input=top_k, slot_scale=scale, out=out)
    want = moe_bf16.grouped_gemm_reference(x, weights, chosen, top_k, scale)
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation,scaled,shared", [("silu", False, False), ("gelu_tanh", True, False),
                                                      ("silu", False, True)])
@pytest.mark.parametrize("tokens", [1, 16, 129])
def test_gpu_backend_runs_bf16_experts_without_fallback_and_in_a_graph(activation, scaled, shared, tokens):
    from adaq.backends.cuda import CudaBackend

    dev = torch.device("cuda")
    experts, top_k, hidden, inter = 16, 4, 256, 128
    gen = torch.Generator().manual_seed(tokens + len(activation))
    gate_up, down = random_experts(experts + int(shared), hidden, inter, gen)
    backend = CudaBackend(dev)
    handle = backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)
    assert isinstance(handle, dense_moe.DenseExperts) and len(backend.fallbacks) == 0
    x = torch.randn(tokens, hidden, generator=gen).bfloat16().to(dev)
    logits = torch.randn(tokens, experts + int(shared), generator=gen).bfloat16().to(dev)
    scale = (torch.rand(experts, generator=gen) + 0.5).to(dev) if scaled else None
    options = dict(activation=activation, expert_scale=scale, shared_expert=shared)
    eager = backend.moe(x, logits, handle, top_k, True, **options)
    want = reference_moe(ReferenceBackend(dev), x, logits, gate_up, down, top_k, activation, scale, shared)
    # both sides round to bf16 at different points (the kernel scales a slot in fp32 before its bf16 store)
    torch.testing.assert_close(eager.float(), want.float(), rtol=0, atol=1e-2 * want.float().abs().max().item())
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = backend.moe(x, logits, handle, top_k, True, **options)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    assert len(backend.fallbacks) == 0
