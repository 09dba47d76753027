"""MoE prefill on the grouped mid-size kernel (adaq.backends.prefill_moe_mid): the group splitting on the CPU, the
path against the reference backend and the decode kernels' MoE on the GPU."""

import pytest
import torch
from test_prefill_fp8_moe import random_experts, routed_inputs

from adaq.backends import prefill_route
from adaq.backends.numerics import moe
from adaq.backends.reference import ReferenceBackend
from adaq.kernels import ops


def aligned(counts: list[int], spare_groups: int = 0):
    """moe_align's tables for these rows per expert (every expert a group), `spare_groups` unused groups after."""
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    rows = offsets[-1]
    as_int = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return (as_int(offsets + [-7] * spare_groups), as_int(list(range(len(counts))) + [99] * spare_groups),
            torch.arange(rows, dtype=torch.int32), as_int([len(counts)])), rows


def pieces_expected(counts: list[int], size: int) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for expert, count in enumerate(counts):
        out += [(expert, start + first, start + min(count, first + size)) for first in range(0, count, size)]
        start += count
    return out


@pytest.mark.parametrize("seed", range(6))
def test_split_groups_cuts_every_expert_into_pieces_of_64(seed):
    gen = torch.Generator().manual_seed(seed)
    experts = int(torch.randint(1, 40, (1,), generator=gen))
    counts = torch.randint(0, 200, (experts,), generator=gen)
    counts[torch.rand(experts, generator=gen) < 0.3] = 0
    counts = counts.tolist()
    align, rows = aligned(counts, spare_groups=seed % 3)
    offsets, group_expert, row_ids, num_groups = ops.split_groups(align, max(rows, 1))
    used = int(num_groups)
    got = [(int(group_expert[g]), int(offsets[g]), int(offsets[g + 1])) for g in range(used)]
    assert got == pieces_expected(counts, 64)
    assert offsets.numel() == group_expert.numel() + 1 >= used + 1 and torch.equal(row_ids, align[2])
    assert (offsets[used:] == rows).all()  # groups past the count: empty, at the end


def test_split_groups_small_pieces():
    align, rows = aligned([5, 0, 3])
    offsets, group_expert, _, num_groups = ops.split_groups(align, rows, max_rows=2)
    used = int(num_groups)
    assert [(int(group_expert[g]), int(offsets[g]), int(offsets[g + 1])) for g in range(used)] == \
        pieces_expected([5, 0, 3], 2)


@pytest.mark.parametrize("rows,experts,cut", [(16, 128, 16), (1024, 128, 16), (2048, 128, 16), (2049, 128, 32),
                                               (4096, 128, 32), (4097, 128, 64), (16384, 128, 64), (1024, 256, 16),
                                               (300, 12, 32), (7, 1, 16)])
def test_group_rows_holds_an_experts_mean_share(rows, experts, cut):
    from adaq.backends.prefill_moe_mid import group_rows

    assert group_rows(rows, experts) == cut


def random_ids(tokens: int, top_k: int, experts: int, skew: bool, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per token; skew: half the tokens pick among the first top_k + 1 experts (hot experts)."""
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=-1)[:, :top_k]
    if skew:
        hot = torch.rand(tokens // 2, top_k + 1, generator=gen).argsort(dim=-1)[:, :top_k]
        ids[: tokens // 2] = hot
    return ids.int()


@pytest.mark.parametrize("tokens,top_k,experts,size,skew", [(1, 1, 1, 16, False), (5, 2, 8, 16, False),
                                                            (33, 4, 16, 16, True), (64, 8, 128, 32, False),
                                                            (129, 8, 128, 64, True), (7, 3, 257, 16, False)])
def test_expert_pieces_reference_cuts_the_sorted_rows_per_expert(tokens, top_k, experts, size, skew):
    gen = torch.Generator().manual_seed(tokens * experts + size)
    ids = random_ids(tokens, top_k, experts, skew, gen)
    offsets, group_expert, row_ids, num_groups = ops.expert_pieces_reference(ids, experts, size)
    rows, used = ids.numel(), int(num_groups)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=experts).tolist()
    got = [(int(group_expert[g]), int(offsets[g]), int(offsets[g + 1])) for g in range(used)]
    assert got == pieces_expected(counts, size)
    assert group_expert.numel() == -(-rows // size) + experts == offsets.numel() - 1
    assert (offsets[used:] == rows).all() and (group_expert[used:] == experts - 1).all()
    flat = ids.reshape(-1)
    assert torch.equal(flat[row_ids.long()], flat.sort(stable=True).values)  # sorted by expert
    for expert in range(experts):  # ascending rows within an expert (the stable sort)
        mine = row_ids[flat[row_ids.long()] == expert]
        assert torch.equal(mine, mine.sort().values)


# ---- GPU ------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check_mid(tokens, experts, top_k, hidden, intermediate, act="silu", scale=None, seed=0, max_group_rows=None):
    from adaq.backends.cuda import CudaBackend
    from adaq.backends.prefill_moe_mid import mid_moe_forward

    gate_up, down = random_experts(experts, hidden, intermediate, seed=seed, device="cuda")
    x, logits = routed_inputs(tokens, hidden, experts, seed=seed + tokens, device="cuda")
    handle = CudaBackend("cuda").prepare_experts(gate_up, down, dtype=torch.bfloat16)
    got = mid_moe_forward(x, logits, handle.stacked, top_k, True, act, scale, max_group_rows)
    weights, ids = ops.router_topk(logits, top_k, True)
    if scale is not None:
        weights = weights * scale[ids.long()].to(weights.dtype)
    original = moe.route
    try:  # the reference on the fused router's choices and weights
        moe.route = lambda *args, **kwargs: (weights, ids.long())
        backend = ReferenceBackend("cuda")
        expected = backend.moe(x, logits, backend.prepare_experts(gate_up, down, dtype=torch.bfloat16), top_k, True,
                               activation=act).float()
    finally:
        moe.route = original
    assert got.shape == x.shape and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    error = float((got.float() - expected).norm() / expected.norm())
    assert error < 1e-2, error  # the reference rounds the weights to bf16 first; a wrong row or expert is O(1)


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 17, 64, 129, 513])
@pytest.mark.parametrize("max_group_rows", [None, 16, 32, 64])
def test_gpu_mid_moe_matches_reference(tokens, max_group_rows):
    _check_mid(tokens, experts=16, top_k=4, hidden=256, intermediate=128, max_group_rows=max_group_rows)


@gpu
@needs_cuda
def test_gpu_mid_moe_odd_shapes_gelu_and_expert_scale():
    scale = torch.rand(12, device="cuda") + 0.5
    _check_mid(300, experts=12, top_k=3, hidden=272, intermediate=144, act="gelu_tanh", scale=scale, seed=3)


@gpu
@needs_cuda
def test_gpu_mid_moe_qwen3_30b_a3b_shape():
    _check_mid(2048, experts=128, top_k=8, hidden=2048, intermediate=768, seed=5)


@gpu
@needs_cuda
def test_gpu_cuda_backend_routes_moe_prefill_to_the_mid_kernel(monkeypatch):
    """From ADAQ_PREFILL_MOE_MID_MIN_TOKENS tokens (below the exact path's) the backend takes the mid-size path;
    the decode kernels' MoE gives the same layer up to summation order."""
    from adaq.backends import prefill_moe_mid
    from adaq.backends.cuda import CudaBackend

    gate_up, down = random_experts(16, 256, 128, device="cuda")
    x, logits = routed_inputs(200, 256, 16, device="cuda")
    backend = CudaBackend("cuda")
    handle = backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)
    monkeypatch.setenv(prefill_route.PATH_ENV, "nvfp4")
    monkeypatch.delenv(prefill_route.MOE_MID_MIN_TOKENS_ENV, raising=False)
    monkeypatch.setattr(prefill_route, "MOE_MID_MIN_TOKENS", None)
    decode = backend.moe(x, logits, handle, 4, True).float()
    calls = []
    original = prefill_moe_mid.mid_moe_forward
    monkeypatch.setattr(prefill_moe_mid, "mid_moe_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv(prefill_route.MOE_MID_MIN_TOKENS_ENV, "128")
    mid = backend.moe(x, logits, handle, 4, True).float()
    assert calls, "the mid-size path did not run"
    assert float((mid - decode).norm() / decode.norm()) < 1e-2



@gpu
@needs_cuda
@pytest.mark.parametrize("tokens,top_k,experts,size,skew", [
    (1, 1, 1, 16, False), (1, 8, 128, 16, False), (5, 8, 128, 64, True), (16, 8, 128, 16, False),
    (33, 10, 257, 16, True), (128, 8, 128, 16, True), (300, 4, 512, 32, False), (513, 8, 128, 32, True),
    (2048, 8, 128, 64, False), (4097, 8, 128, 64, True), (1000, 1, 2048, 16, False), (77, 2, 3, 16, True)])
def test_gpu_expert_pieces_match_their_reference(tokens, top_k, experts, size, skew):
    """moe.cu moe_piece_table against the plain-torch tables, every element (unused pieces too), the allocator's
    free memory poisoned first so an element the kernel leaves unwritten shows."""
    from helpers.gpu_checks import poison_allocator

    gen = torch.Generator().manual_seed(tokens + experts + size)
    ids = random_ids(tokens, top_k, experts, skew, gen)
    want = ops.expert_pieces_reference(ids, experts, size)
    poison_allocator(1 << 20)  # 1 MB: the small-block pool the tables come from
    got = ops.expert_pieces(ids.cuda(), experts, size)
    for name, g, w in zip(("offsets", "group_expert", "row_ids", "num_groups"), got, want):
        assert g.dtype == torch.int32 and torch.equal(g.cpu(), w), name
