"""FP8 ceiling harness and MoE prefill on the FP8 path: the ceiling kernel's machine code (CPU), the MoE reference
and the stacked expansion (CPU), and (GPU) the grouped FP8 GEMM and the whole MoE against the reference."""

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.sass import cuobjdump, sass_of

from adaq.backends import prefill_moe, prefill_route
from adaq.backends.numerics import moe
from adaq.backends.reference import ReferenceBackend
from adaq.formats import fp8_prefill, nvfp4
from adaq.kernels import fp8_gemm
from helpers.moe_emulation import combine_emulated

KERNELS = Path(__file__).resolve().parent.parent / "adaq" / "kernels"
QWEN3_30B_A3B = {"experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768}


@functools.lru_cache(maxsize=4)
def random_experts(experts: int, hidden: int, intermediate: int, seed: int = 0, device: str = "cpu",
                   distinct_up_scale: bool = False):
    """Per expert [gate, up] and down NVFP4 weights (rows of different magnitudes)."""
    generator = torch.Generator().manual_seed(seed)

    def weight(n, k, scale=1.0):
        w = torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator) * 0.1 * scale
        return nvfp4.quantize(w.to(device))

    gate_up = [[weight(intermediate, hidden), weight(intermediate, hidden, 3.0 if distinct_up_scale else 1.0)]
               for _ in range(experts)]
    down = [weight(hidden, intermediate) for _ in range(experts)]
    return gate_up, down


def routed_inputs(tokens: int, hidden: int, experts: int, seed: int = 1, device: str = "cpu"):
    """x and router logits; the logits of a token are distinct multiples of 1/16 (exact in bf16), so no two experts
    tie and the fused router and torch.topk pick the same experts."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    ranks = torch.stack([torch.randperm(experts, generator=generator) for _ in range(tokens)])
    logits = ((ranks - experts // 2) / 16.0).to(torch.bfloat16)
    return x.to(device), logits.to(device)


# ---- CPU: the ceiling harness's machine code ----------------------------------------------------------------------

def _loop_bodies(sass: str) -> list[list[str]]:
    """Instruction lists of each loop (a backward branch back to its target)."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);", sass)
    addresses = [int(a, 16) for a, _ in lines]
    bodies = []
    for index, (_, text) in enumerate(lines):
        match = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if match and int(match.group(1), 16) < addresses[index]:
            start = addresses.index(int(match.group(1), 16))
            bodies.append([t for _, t in lines[start:index + 1]])
    return bodies


@pytest.fixture(scope="module")
def peak_sass(tmp_path_factory) -> dict[str, str]:
    if shutil.which("nvcc") is None or cuobjdump() is None:
        pytest.skip("needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump)")
    tmp = tmp_path_factory.mktemp("peak")
    source = KERNELS / "csrc" / "fp8_mma_peak.cu"
    common = ["nvcc", "-std=c++17", "-O3", f"-I{KERNELS / 'csrc'}", str(source)]
    subprocess.run([*common, "-arch=sm_89", "-cubin", "-o", str(tmp / "sm89.cubin")], check=True, timeout=300)
    # What an H100 runs: the compute_89 PTX, compiled for sm_90 the way the driver's JIT does.
    subprocess.run([*common, "-arch=compute_89", "-ptx", "-o", str(tmp / "peak.ptx")], check=True, timeout=300)
    subprocess.run(["ptxas", "-arch=sm_90", "-O3", str(tmp / "peak.ptx"), "-o", str(tmp / "sm90.cubin")], check=True,
                   timeout=300)
    return {arch: sass_of(tmp / f"{arch}.cubin") for arch in ("sm89", "sm90")}


def test_ceiling_loop_issues_every_mma_natively_on_ada(peak_sass):
    body = max(_loop_bodies(peak_sass["sm89"]), key=lambda b: sum("QMMA" in i for i in b))
    mmas = sum("QMMA.16832.F32.E4M3.E4M3" in i for i in body)
    assert mmas and mmas % 16 == 0  # 16 MMAs per k-step (4x4 fragments), possibly unrolled
    # operands change every k-step: about one integer op per fragment register (24) per 16 MMAs
    assert sum(i.split()[0].startswith(("LOP3", "IADD3")) for i in body) >= 20 * mmas // 16


def test_ceiling_loop_keeps_every_mma_in_the_loop_through_the_sm90_jit(peak_sass):
    """The 1576 TFLOP/s bug: on sm_90 the e4m3 MMA becomes F2FP + 2 HMMA + FADDs, and loop-invariant operands let
    ptxas hoist the HMMAs out of the loop. Every MMA's two HMMAs and its operand unpacks must stay inside."""
    body = max(_loop_bodies(peak_sass["sm90"]), key=lambda b: sum("HMMA" in i for i in b))
    hmma = sum("HMMA.16816.F32" in i for i in body)
    assert hmma and hmma % 32 == 0
    assert sum("F2FP" in i for i in body) >= hmma  # 48 unpacks per 16 MMAs (24 registers x 2 halves) in the loop
    assert sum(i.startswith("FADD") for i in body) >= 2 * hmma  # 4 accumulator adds per emulated MMA


# ---- CPU: reference and stacked expansion ------------------------------------------------------------------------

@pytest.mark.parametrize("distinct", [False, True])
def test_stacked_expansion_equals_each_expert_alone(distinct):
    gate_up, down = random_experts(3, 64, 32, distinct_up_scale=distinct)
    stacked = prefill_moe.StackedNVFP4.stack(gate_up, "cpu")
    got = prefill_moe.expand_stacked_reference(stacked)
    alone = [fp8_prefill.expand_weight(w) for pair in gate_up for w in pair]
    assert torch.equal(got.values.view(torch.uint8), torch.cat([e.values for e in alone]).view(torch.uint8))
    assert torch.equal(got.col_scale, torch.cat([e.col_scale for e in alone]))


def test_moe_fp8_reference_is_the_fp8_linear_per_expert():
    gate_up, down = random_experts(4, 64, 32)
    x, logits = routed_inputs(9, 64, 4)
    got = prefill_moe.moe_fp8_reference(x, logits, gate_up, down, top_k=2, renormalize=True)
    weights, chosen = moe.route(logits, 2, True)
    expected = torch.zeros_like(x)
    for expert in range(4):
        tokens, slot = torch.where(chosen == expert)
        if tokens.numel():
            gu = torch.cat([fp8_prefill.fp8_linear_reference(x[tokens], fp8_prefill.expand_weight(w))
                            for w in gate_up[expert]], dim=-1)
            h = torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:]
            y = fp8_prefill.fp8_linear_reference(h, fp8_prefill.expand_weight(down[expert]))
            expected.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(x.dtype))
    assert torch.equal(got, expected)


def test_moe_fp8_reference_error_against_exact_nvfp4():
    gate_up, down = random_experts(8, 256, 128)
    x, logits = routed_inputs(40, 256, 8)
    backend = ReferenceBackend("cpu", prefill_fp8=False, dequant_cache_bytes=0)
    exact = backend.moe(x.float(), logits, backend.prepare_experts(gate_up, down, dtype=torch.float32), 2, True)
    approx = prefill_moe.moe_fp8_reference(x.float(), logits, gate_up, down, top_k=2, renormalize=True)
    error = float((approx - exact).norm() / exact.norm())
    assert 1e-3 < error < 0.06  # the two E4M3 roundings of each linear, twice


@pytest.mark.parametrize("tokens,top_k,experts", [(1, 2, 4), (7, 3, 5), (50, 8, 128)])
def test_sorted_alignment_is_moe_align_layout(tokens, top_k, experts):
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).int()
    offsets, group_expert, row_ids, num_groups = prefill_moe.align_rows_sorted(ids, experts)
    flat = ids.reshape(-1)
    assert int(num_groups) == experts and torch.equal(group_expert, torch.arange(experts, dtype=torch.int32))
    for expert in range(experts):
        rows = row_ids[offsets[expert]:offsets[expert + 1]]
        assert torch.equal(rows.long(), torch.where(flat == expert)[0])  # ascending rows within the expert


def test_grouped_tile_choice(monkeypatch):
    from adaq.kernels.fp8_gemm import tiles

    assert tiles()[prefill_moe.choose_grouped_tile(2048 * 8, 128)]["name"] == "64x128_64x4"
    monkeypatch.setenv(prefill_moe.MOE_TILE_ENV, "2")
    assert prefill_moe.choose_grouped_tile(16, 128) == 2


class _KernelsEmulated:
    """The FP8 extension's ops as the reference computes them: runs prefill_moe's orchestration (grouping, gathers,
    stacked expansion, scatter, combine) on the CPU."""

    @staticmethod
    def quantize_rows(x, norm, eps, unit_offset, out, row_scale):
        x8, scale = fp8_prefill.quantize_activation(x)
        out.view(torch.uint8).copy_(x8.view(torch.uint8))
        row_scale.copy_(scale)

    @staticmethod
    def expand_nvfp4(packed, block_scale, global_scale, values, col_scale):
        expanded = fp8_prefill.expand_weight(nvfp4.NVFP4Weight(packed, block_scale, global_scale))
        values.view(torch.uint8).copy_(expanded.values.view(torch.uint8))
        col_scale.copy_(expanded.col_scale)

    @staticmethod
    def fp8_grouped_gemm(a, w8, row_scale, col_scale, offsets, group_expert, num_groups, out, tile):
        for group in range(int(num_groups)):
            start, end, expert = int(offsets[group]), int(offsets[group + 1]), int(group_expert[group])
            out[start:end] = fp8_prefill.scaled_mm_reference(a[start:end], row_scale[start:end], w8[expert],
                                                             col_scale[expert], torch.bfloat16)



@pytest.mark.parametrize("tokens", [1, 13, 70])
def test_moe_orchestration_with_emulated_kernels_is_the_reference(monkeypatch, tokens):
    from adaq.kernels import ops

    monkeypatch.setattr(fp8_gemm, "ext", lambda: _KernelsEmulated)
    monkeypatch.setattr(ops, "router_topk", lambda logits, k, renorm: (lambda w, e: (w, e.int()))(
        *moe.route(logits, k, renorm)))
    monkeypatch.setattr(ops, "silu_and_mul", lambda x: torch.nn.functional.silu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1])
    monkeypatch.setattr(ops, "moe_combine", combine_emulated)
    gate_up, down = random_experts(6, 64, 32, distinct_up_scale=True)
    x, logits = routed_inputs(tokens, 64, 6)
    fp8 = prefill_moe.Fp8Experts.from_weights(gate_up, down, "cpu")
    got = prefill_moe.fp8_moe_forward(x, logits, fp8, top_k=3, renormalize=True, tile=0)
    expected = prefill_moe.moe_fp8_reference(x, logits, gate_up, down, top_k=3, renormalize=True)
    assert torch.equal(got, expected)


# ---- GPU: grouped GEMM and the MoE against the reference -------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _assert_gemm_close(got: torch.Tensor, expected: torch.Tensor):
    assert not torch.isnan(got).any()
    scale = expected.abs().amax().clamp(min=1e-30)
    torch.testing.assert_close(got.float(), expected.to(got.device), rtol=2 ** -7, atol=float(scale) * 1e-4)


def _take(x8: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x8.view(torch.uint8)[rows].contiguous().view(fp8_prefill.E4M3)


@gpu
@needs_cuda
@pytest.mark.parametrize("tile", [0, 1, 2])
@pytest.mark.parametrize("sizes,n,k", [([0, 1, 63, 64, 65, 0, 129, 7], 128, 64), ([300, 0, 5, 257], 1536, 2048),
                                        ([1] * 17 + [200], 2048, 768)])
@pytest.mark.parametrize("aligner", ["moe_align", "sorted"])
def test_gpu_grouped_gemm_matches_reference_per_group(tile, sizes, n, k, aligner):
    torch.backends.cuda.matmul.allow_tf32 = False
    experts = len(sizes)
    generator = torch.Generator().manual_seed(sum(sizes) + n)
    ids = torch.cat([torch.full((s,), e, dtype=torch.int32) for e, s in enumerate(sizes)])
    ids = ids[torch.randperm(ids.numel(), generator=generator)].view(-1, 1).cuda()  # top_k = 1: one row per token
    align = prefill_moe.align_rows(ids, experts) if aligner == "moe_align" else prefill_moe.align_rows_sorted(
        ids, experts)
    rows = ids.numel()
    a, row_scale = fp8_prefill.quantize_activation(torch.randn(rows, k, generator=generator).cuda())
    w = [fp8_prefill.expand_weight(nvfp4.quantize(torch.randn(n, k, generator=generator).cuda() * 0.05))
         for _ in range(experts)]
    w8 = torch.stack([e.values.view(torch.uint8) for e in w]).view(fp8_prefill.E4M3)
    col_scale = torch.stack([e.col_scale for e in w])
    out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned
    sorted_rows = align[2].long()
    prefill_moe.grouped_gemm(_take(a, sorted_rows), row_scale[sorted_rows].contiguous(), w8, col_scale, align, tile,
                             out)
    expected = torch.empty(rows, n, device="cuda")
    expected_ids = ids.view(-1)[sorted_rows]
    for expert in range(experts):
        mine = torch.where(expected_ids == expert)[0]
        if mine.numel():
            source = sorted_rows[mine]
            expected[mine] = fp8_prefill.scaled_mm_reference(_take(a, source), row_scale[source], w8[expert],
                                                             col_scale[expert], torch.float32)
    _assert_gemm_close(out, expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("distinct", [False, True])
def test_gpu_stacked_expansion_is_bit_identical(distinct):
    gate_up, down = random_experts(4, 256, 128, distinct_up_scale=distinct)
    for weights in (gate_up, [[w] for w in down]):
        stacked = prefill_moe.StackedNVFP4.stack(weights, "cuda")
        values, col_scale = prefill_moe.expand_stacked(stacked, torch.device("cuda"))
        expected = [fp8_prefill.expand_weight(w) for parts in weights for w in parts]
        assert torch.equal(values.reshape(-1, values.shape[-1]).cpu().view(torch.uint8),
                           torch.cat([e.values for e in expected]).view(torch.uint8))
        assert torch.equal(col_scale.reshape(-1).cpu(), torch.cat([e.col_scale for e in expected]))



def _decode_layout_experts(gate_up, down):
    from adaq.backends.cuda import CudaBackend

    return CudaBackend("cuda").prepare_experts(gate_up, down, dtype=torch.bfloat16).stacked


@gpu
@needs_cuda
@pytest.mark.parametrize("distinct", [False, True])
def test_gpu_expansion_from_the_decode_layout_matches_the_stacked_copy(distinct):
    """Experts expanded from the decode kernels' layout (no second copy of their bytes): the same E4M3 bytes and
    column scales as the stacked-copy path (gate and up with different global scales included); shapes the layout
    cannot serve as one weight are refused."""
    gate_up, down = random_experts(4, 256, 128, distinct_up_scale=distinct)
    stacked = _decode_layout_experts(gate_up, down)
    layout = prefill_moe.Fp8Experts.from_layout(stacked, gate_up, down, torch.device("cuda"))
    copy = prefill_moe.Fp8Experts.from_weights(gate_up, down, "cuda")
    for ours, theirs in ((layout.gate_up, copy.gate_up), (layout.down, copy.down)):
        values, col_scale = (t.clone() for t in prefill_moe.expand_projection(ours, torch.device("cuda")))
        expected_values, expected_scale = prefill_moe.expand_projection(theirs, torch.device("cuda"))
        assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
        assert torch.equal(col_scale, expected_scale)
    assert layout.nbytes < copy.nbytes / 10
    odd_gate_up, odd_down = random_experts(2, 256, 80)  # K of down = 80: not a multiple of 128
    assert prefill_moe.Fp8Experts.from_layout(_decode_layout_experts(odd_gate_up, odd_down), odd_gate_up, odd_down,
                                              torch.device("cuda")) is None

def _check_moe(tokens: int, experts: int, top_k: int, hidden: int, intermediate: int, tile=None, seed=0):
    torch.backends.cuda.matmul.allow_tf32 = False
    gate_up, down = random_experts(experts, hidden, intermediate, seed=seed, device="cuda")
    x, logits = routed_inputs(tokens, hidden, experts, seed=seed + tokens, device="cuda")
    fp8 = prefill_moe.Fp8Experts.from_weights(gate_up, down, "cuda")
    got = prefill_moe.fp8_moe_forward(x, logits, fp8, top_k, True, tile=tile)
    from_layout = prefill_moe.Fp8Experts.from_layout(_decode_layout_experts(gate_up, down), gate_up, down,
                                                     torch.device("cuda"))
    if from_layout is not None:  # the cuda backend's form: the same operands, so the same output bit for bit
        assert torch.equal(prefill_moe.fp8_moe_forward(x, logits, from_layout, top_k, True, tile=tile), got)
    expected = prefill_moe.moe_fp8_reference(x, logits, gate_up, down, top_k, True).float()
    assert got.shape == x.shape and got.dtype == torch.bfloat16 and not torch.isnan(got).any()
    # Same numerics, two quantizations in a row: the tensor cores' fp32 sums differ from the reference's in the last
    # bits, a few gate|up values round to the other bf16 neighbour, and where that moves an E4M3 rounding of the
    # down projection's input (or a row's amax, hence its scale) the output moves by up to one E4M3 step of those
    # values. Measured on the H100: 0.4-1.4 % relative (Frobenius). The stages are checked tightly on their own
    # (grouped GEMM per group, expansion bit for bit, the orchestration exactly on the CPU); a wrong row, expert or
    # scale shows here as an O(1) error in some token.
    error = float((got.float() - expected).norm() / expected.norm())
    assert error < 3e-2, error
    per_token = (got.float() - expected).norm(dim=1) / expected.norm(dim=1).clamp(min=1e-30)
    assert float(per_token.max()) < 0.15, per_token.max()


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7, 33, 64, 129, 300])
def test_gpu_fp8_moe_matches_reference_small(tokens):
    _check_moe(tokens, experts=16, top_k=4, hidden=256, intermediate=128)


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens,tile", [(65, None), (513, None), (2048, 0), (2048, 1)])
def test_gpu_fp8_moe_matches_reference_qwen3_30b_a3b(tokens, tile):
    _check_moe(tokens, tile=tile, **QWEN3_30B_A3B)


@gpu
@needs_cuda
def test_gpu_cuda_backend_routes_prefill_moe_through_fp8(monkeypatch):
    from adaq.backends.cuda import CudaBackend

    monkeypatch.setenv("ADAQ_PREFILL_PATH", "fp8")
    gate_up, down = random_experts(16, 256, 128)
    backend = CudaBackend("cuda")
    handle = backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)
    assert getattr(handle, "fp8", None) is not None
    x, logits = routed_inputs(max(100, prefill_route.min_tokens()), 256, 16, device="cuda")
    got = backend.moe(x, logits, handle, 4, True)
    expected = prefill_moe.fp8_moe_forward(x, logits, handle.fp8, 4, True)
    assert torch.equal(got, expected)
    few = backend.moe(x[:5], logits[:5], handle, 4, True)  # below min tokens: the decode kernels
    from adaq.kernels import ops

    assert torch.equal(few, ops.moe_forward(x[:5], logits[:5], handle.stacked, 4, True))
