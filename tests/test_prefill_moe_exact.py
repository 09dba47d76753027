"""MoE prefill on the exact grouped path (adaq.backends.prefill_moe_exact): its reference against the reference
backend, the orchestration with the kernels emulated and the routing (CPU), and the GPU path against the reference."""

import pytest
import torch
from test_prefill_fp8_moe import QWEN3_30B_A3B, random_experts, routed_inputs

from adaq.backends import prefill_moe_exact, prefill_route
from adaq.backends.numerics import activation, moe
from adaq.backends.reference import ReferenceBackend
from adaq.kernels import fp8_gemm, layout, ops
from helpers.moe_emulation import combine_emulated


def test_exact_reference_is_the_reference_backend_up_to_bf16_rounding():
    gate_up, down = random_experts(6, 64, 32, distinct_up_scale=True)
    x, logits = routed_inputs(20, 64, 6)
    got = prefill_moe_exact.moe_exact_reference(x, logits, gate_up, down, top_k=3, renormalize=True)
    backend = ReferenceBackend("cpu")
    handle = backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)
    expected = backend.moe(x, logits, handle, 3, True)
    assert got.dtype == torch.bfloat16
    error = float((got.float() - expected.float()).norm() / expected.float().norm())
    assert 0 < error < 1e-2, error  # not the same computation (one rounding fewer), the same result


# ---- the orchestration with the kernels emulated (CPU) -------------------------------------------------------------

def _dequantize_emulated(weight, out):
    """gemm_dequantize's spec from the layout: e2m1 x block_scale, no global scale."""
    n, k = weight.out_features, weight.in_features
    n16, kst = -(-n // layout.TILE_N), -(-k // layout.TILE_K)
    unit = layout.PackedNVFP4(weight.wq.view(n16, kst, -1), weight.ws.view(n16, kst, -1),
                              torch.full((n16 * 16,), 2.0 ** layout.SCALE_EXPONENT_SHIFT), n, k)
    out[:n * k].copy_(layout.dequantize(unit, torch.bfloat16).reshape(-1))
    return out[:n * k].view(n, k)



def _stacked(gate_up, down):
    columns = [torch.cat([w.global_scale.float().reshape(1).expand(w.out_features) for w in pair]) for pair in gate_up]
    fused = [layout.repack(type(pair[0])(torch.cat([w.packed for w in pair]), torch.cat([w.block_scale for w in pair]),
                                         pair[0].global_scale), "cpu", column_global_scales=c)
             for pair, c in zip(gate_up, columns)]
    return ops.StackedExperts(fused, [layout.repack(w, "cpu") for w in down])


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(ops, "router_topk", lambda logits, k, renorm: (lambda w, e: (w, e.int()))(
        *moe.route(logits, k, renorm)))
    monkeypatch.setattr(ops, "silu_and_mul", activation.silu_and_mul)
    monkeypatch.setattr(ops, "gelu_tanh_and_mul", activation.gelu_tanh_and_mul)
    monkeypatch.setattr(ops, "moe_combine", combine_emulated)
    monkeypatch.setattr(ops, "nvfp4_dequantize", _dequantize_emulated)
    monkeypatch.setattr(prefill_moe_exact, "bmm_fp32", lambda a, b: a.float() @ b.float())  # CPU: no bmm.dtype


@pytest.mark.parametrize("tokens,experts,hidden,intermediate,chunk", [(1, 6, 128, 64, None), (13, 6, 128, 64, 4),
                                                                      (40, 5, 128, 48, None), (70, 8, 64, 32, 1)])
@pytest.mark.parametrize("distinct", [False, True])  # up 3x larger than gate
@pytest.mark.parametrize("batched", [True, False])
def test_orchestration_with_emulated_kernels_is_the_exact_reference(emulated, monkeypatch, tokens, experts, hidden,
                                                                     intermediate, chunk, distinct, batched):
    if chunk is not None:
        monkeypatch.setattr(prefill_moe_exact, "WORKSPACE_ELEMENTS", chunk * 2 * intermediate * hidden)
    gate_up, down = random_experts(experts, hidden, intermediate, seed=tokens, distinct_up_scale=distinct)
    x, logits = routed_inputs(tokens, hidden, experts)
    handle = prefill_moe_exact.ExactExperts.of(_stacked(gate_up, down), batched)
    assert len(handle.gate_up.segments[0]) == 2  # gate and up quantized apart: two global scales, two alphas
    fp8_gemm.reserve_dense_workspace(torch.device("cpu"), handle.workspace_elements(), 1).fill_(float("nan"))
    got = prefill_moe_exact.exact_moe_forward(x, logits, handle, 3, True)
    expected = prefill_moe_exact.moe_exact_reference(x, logits, gate_up, down, 3, True)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def skewed_inputs(tokens: int, hidden: int, experts: int, hot: int, share: float, seed: int = 1,
                  device: str = "cpu"):
    """routed_inputs, but expert `hot` ranks first for the first `share` of the tokens (a hot expert, as a random
    model's collapsed hidden states or a repetitive prompt give)."""
    x, logits = routed_inputs(tokens, hidden, experts, seed=seed)
    favoured = int(tokens * share)
    logits[:favoured, hot] = logits.max() + 1.0 / 16  # still distinct: above every other logit, exact in bf16
    return x.to(device), logits.to(device)


@pytest.mark.parametrize("counts,width", [
    ([], 0), ([0, 0], 0), ([5], 5), ([10, 10, 10, 10], 10),
    ([3, 4, 500, 2], 4),  # one hot expert runs alone: 4 x 4 + 500 + 64 rows against 4 x 500
    ([100, 90, 110, 95], 110),  # even routing: one slab as wide as the busiest
    ([1, 200], 1),  # 2 x 1 + 200 + 64 = 266 < 2 x 200
    ([60, 70], 70)])  # 2 x 70 = 140 < 2 x 60 + 70 + 64
def test_slab_width(counts, width):
    assert prefill_moe_exact.slab_width(counts, launch_rows=64) == width


def test_slab_width_minimises_the_rows_multiplied():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts = torch.randint(0, 300, (int(torch.randint(1, 12, (1,), generator=generator)),),
                               generator=generator).tolist()
        cost = lambda w: len(counts) * w + sum(c + prefill_moe_exact.LAUNCH_ROWS for c in counts if c > w)
        assert cost(prefill_moe_exact.slab_width(counts)) == min(cost(w) for w in range(0, max(counts) + 1))


@pytest.mark.parametrize("share,chunk", [(0.9, None), (0.6, 3), (1.0, 2)])
def test_orchestration_with_a_hot_expert_is_the_exact_reference(emulated, monkeypatch, share, chunk):
    """A hot expert runs alone beside its chunk's slab: the same numbers as the reference."""
    tokens, experts, hidden, intermediate = 300, 8, 128, 128  # K % 128 == 0: experts back to back, chunks > 1
    if chunk is not None:
        monkeypatch.setattr(prefill_moe_exact, "WORKSPACE_ELEMENTS", chunk * 2 * intermediate * hidden)
    gate_up, down = random_experts(experts, hidden, intermediate, seed=5, distinct_up_scale=True)
    x, logits = skewed_inputs(tokens, hidden, experts, hot=2, share=share)
    handle = prefill_moe_exact.ExactExperts.of(_stacked(gate_up, down), batched=True)
    calls = []
    monkeypatch.setattr(prefill_moe_exact, "_expert_gemm", _recording(prefill_moe_exact._expert_gemm, calls))
    got = prefill_moe_exact.exact_moe_forward(x, logits, handle, 3, True)
    expected = prefill_moe_exact.moe_exact_reference(x, logits, gate_up, down, 3, True)
    assert calls and max(calls) >= int(tokens * share)  # the hot expert took the lone launch
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _recording(function, calls: list):
    def record(x, *args):
        calls.append(x.shape[0])
        return function(x, *args)
    return record


def test_orchestration_gelu_and_expert_scale(emulated):
    gate_up, down = random_experts(5, 64, 32, seed=3)
    x, logits = routed_inputs(9, 64, 5)
    scale = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5])
    handle = prefill_moe_exact.ExactExperts.of(_stacked(gate_up, down))
    got = prefill_moe_exact.exact_moe_forward(x, logits, handle, 2, False, "gelu_tanh", scale)
    weights, ids = moe.route(logits, 2, False)
    weights = weights * scale[ids].to(weights.dtype)  # as the decode path applies Gemma 4's scale (bf16)
    monkey_route = moe.route
    try:
        moe.route = lambda *args, **kwargs: (weights, ids)
        expected = prefill_moe_exact.moe_exact_reference(x, logits, gate_up, down, 2, False, "gelu_tanh")
    finally:
        moe.route = monkey_route
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- routing (CPU) --------------------------------------------------------------------------------------------------

MOE_EXACT = prefill_route.MOE_EXACT_MIN_TOKENS
FP8 = prefill_route.MIN_TOKENS


@pytest.fixture
def no_mid_kernel(monkeypatch):
    """The route as it was before the mid-size kernel (its thresholds absent): exact, FP8 or decode."""
    monkeypatch.delenv(prefill_route.MOE_MID_MIN_TOKENS_ENV, raising=False)
    monkeypatch.setattr(prefill_route, "MOE_MID_MIN_TOKENS", None)


@pytest.mark.parametrize("path,tokens,fp8,expected", [
    ("auto", 1, True, "decode"), ("auto", MOE_EXACT - 1, True, "decode"), ("auto", MOE_EXACT, True, "exact"),
    ("auto", MOE_EXACT, False, "exact"), ("exact", MOE_EXACT, True, "exact"), ("nvfp4", MOE_EXACT, True, "decode"),
    ("fp8", FP8, True, "fp8"), ("fp8", MOE_EXACT, False, "exact"), ("fp8", FP8 - 1, True, "decode")])
def test_moe_route(monkeypatch, no_mid_kernel, path, tokens, fp8, expected):
    monkeypatch.setenv(prefill_route.PATH_ENV, path)
    monkeypatch.setattr(prefill_route, "fp8_enabled", lambda device: fp8 and path in ("auto", "fp8"))
    assert prefill_route.moe_route(tokens, torch.device("cpu")) == expected


@pytest.mark.parametrize("path", ["auto", "exact", "nvfp4"])
def test_moe_route_takes_the_shipped_mid_threshold(monkeypatch, path):
    monkeypatch.delenv(prefill_route.MOE_MID_MIN_TOKENS_ENV, raising=False)
    monkeypatch.setenv(prefill_route.PATH_ENV, path)
    mid = prefill_route.MOE_MID_MIN_TOKENS
    assert mid is not None and mid < MOE_EXACT
    assert [prefill_route.moe_route(m, torch.device("cpu")) for m in (mid - 1, mid)] == ["decode", "mid"]


def test_moe_threshold_env(monkeypatch, no_mid_kernel):
    monkeypatch.setenv(prefill_route.MOE_EXACT_MIN_TOKENS_ENV, "100")
    monkeypatch.setenv(prefill_route.PATH_ENV, "auto")
    assert prefill_route.moe_route(100, torch.device("cpu")) == "exact"
    assert prefill_route.moe_route(99, torch.device("cpu")) == "decode"


# ---- GPU ------------------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check_exact(tokens, experts, top_k, hidden, intermediate, distinct=False, seed=0, act="silu", scale=None,
                 batched=True, skew=None):
    import dataclasses

    from adaq.backends.cuda import CudaBackend

    torch.backends.cuda.matmul.allow_tf32 = False
    gate_up, down = random_experts(experts, hidden, intermediate, seed=seed, device="cuda",
                                   distinct_up_scale=distinct)
    x, logits = (routed_inputs(tokens, hidden, experts, seed=seed + tokens, device="cuda") if skew is None else
                 skewed_inputs(tokens, hidden, experts, hot=experts // 3, share=skew, seed=seed, device="cuda"))
    handle = CudaBackend("cuda").prepare_experts(gate_up, down, dtype=torch.bfloat16)
    assert handle.exact.batched  # torch on the device has bmm(out_dtype=)
    exact = dataclasses.replace(handle.exact, batched=batched)
    fp8_gemm.reserve_dense_workspace(torch.device("cuda"), exact.workspace_elements(), 1).fill_(float("nan"))
    got = prefill_moe_exact.exact_moe_forward(x, logits, exact, top_k, True, act, scale)
    weights, ids = ops.router_topk(logits, top_k, True)
    if scale is not None:
        weights = weights * scale[ids.long()].to(weights.dtype)
    original = moe.route
    try:  # the reference on the fused router's choices and weights (as the decode path's tests do)
        moe.route = lambda *args, **kwargs: (weights, ids.long())
        expected = prefill_moe_exact.moe_exact_reference(x, logits, gate_up, down, top_k, True, act).float()
        backend = ReferenceBackend("cuda")
        plain = backend.moe(x, logits, backend.prepare_experts(gate_up, down, dtype=torch.bfloat16), top_k, True,
                            activation=act).float()
    finally:
        moe.route = original
    assert got.shape == x.shape and got.dtype == torch.bfloat16 and not torch.isnan(got).any()
    # The same numerics as the exact reference: cuBLAS's fp32 sums differ in the last bits, so a few values round to
    # the other bf16 neighbour (and so may the activation's input); a wrong row, expert or scale is an O(1) error.
    error = float((got.float() - expected).norm() / expected.norm())
    assert error < 4e-3, error
    error_plain = float((got.float() - plain).norm() / plain.norm())
    assert error_plain < 1e-2, error_plain  # the reference backend's MoE: one bf16 rounding of the weights apart


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7, 64, 129, 513])
@pytest.mark.parametrize("distinct", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_gpu_exact_moe_matches_reference_small(tokens, distinct, batched):
    _check_exact(tokens, experts=16, top_k=4, hidden=256, intermediate=128, distinct=distinct, batched=batched)


@gpu
@needs_cuda
def test_gpu_exact_moe_odd_shapes_and_gemma4_options():
    _check_exact(37, experts=6, top_k=2, hidden=272, intermediate=80)  # per-expert launches (not back to back)
    scale = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5, 0.75], device="cuda")
    _check_exact(50, experts=6, top_k=2, hidden=256, intermediate=128, act="gelu_tanh", scale=scale)


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens,batched", [(600, True), (2048, True), (2048, False)])
def test_gpu_exact_moe_matches_reference_qwen3_30b_a3b(tokens, batched):
    _check_exact(tokens, batched=batched, **QWEN3_30B_A3B)


@gpu
@needs_cuda
@pytest.mark.parametrize("share", [0.5, 0.95])
def test_gpu_exact_moe_with_a_hot_expert(share):
    _check_exact(2048, skew=share, **QWEN3_30B_A3B)


@gpu
@needs_cuda
def test_gpu_cuda_backend_routes_large_moe_prefill_through_exact(monkeypatch, no_mid_kernel):
    from adaq.backends.cuda import CudaBackend

    monkeypatch.setenv(prefill_route.PATH_ENV, "auto")
    gate_up, down = random_experts(16, 256, 128)
    backend = CudaBackend("cuda")
    handle = backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)
    assert getattr(handle, "fp8", None) is None  # the grouped FP8 path stays opt-in
    threshold = prefill_route.moe_exact_min_tokens()
    x, logits = routed_inputs(threshold, 256, 16, device="cuda")
    assert torch.equal(backend.moe(x, logits, handle, 4, True),
                       prefill_moe_exact.exact_moe_forward(x, logits, handle.exact, 4, True))
    few = backend.moe(x[:threshold - 1], logits[:threshold - 1], handle, 4, True)  # below: the decode kernels
    assert torch.equal(few, ops.moe_forward(x[:threshold - 1], logits[:threshold - 1], handle.stacked, 4, True))
