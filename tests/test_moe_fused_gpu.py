"""The three-launch decode MoE's kernels against their references on fresh random data, outputs poisoned (NaN)
before each run: the route kernel against route_tables, the gated gate|up epilogue and the down + combine epilogue
bit for bit against the unfused kernels they replace, the whole layer against the reference backend. Qwen3-30B-A3B,
Qwen3.6-35B-A3B (shared expert as expert E) and Gemma4-26B-A4B (gelu-tanh, expert_scale) shapes, 1..16 tokens."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from adaq.backends.numerics import moe  # noqa: E402
from adaq.kernels import ops  # noqa: E402

DEV = torch.device("cuda")
TOKENS = [1, 2, 3, 5, 7, 8, 9, 13, 16]
# name: (experts, top_k, hidden, inter, shared, activation, expert_scale)
MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768, False, "silu", False),
          "qwen3.6-35b-a3b": (256, 8, 2048, 512, True, "silu", False),
          "gemma4-26b-a4b": (128, 8, 2816, 704, False, "gelu_tanh", True),
          "qwen3-next-80b-a3b": (512, 10, 2048, 512, True, "silu", False)}


def poison_allocator(nbytes: int = 1 << 28) -> None:
    junk = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV)
    junk.fill_(float("nan"))
    del junk


def random_stacked(count: int, hidden: int, inter: int, gen: torch.Generator):
    from adaq.backends.cuda import CudaBackend
    from test_kernels_gpu import random_nvfp4

    gate_up = [[random_nvfp4(inter, hidden, gen), random_nvfp4(inter, hidden, gen)] for _ in range(count)]
    for pair in gate_up:
        pair[1].global_scale = pair[0].global_scale
    down = [random_nvfp4(hidden, inter, gen) for _ in range(count)]
    backend = CudaBackend(DEV)
    return backend, gate_up, down, backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)


@pytest.fixture(scope="module", params=sorted(MODELS))
def layer(request):
    experts, top_k, hidden, inter, shared, act, scaled = MODELS[request.param]
    gen = torch.Generator(device=DEV).manual_seed(len(request.param))
    backend, gate_up, down, handle = random_stacked(experts + int(shared), hidden, inter, gen)
    scale = (torch.rand(experts, device=DEV, generator=gen) + 0.5).to(torch.bfloat16) if scaled else None
    return dict(backend=backend, handle=handle, gate_up=gate_up, down=down, top_k=top_k, hidden=hidden, shared=shared, act=act, scale=scale,
                experts=experts, gen=gen)


def inputs(layer, tokens):
    gen = layer["gen"]
    x = (torch.randn(tokens, layer["hidden"], device=DEV, generator=gen) * 0.05).to(torch.bfloat16)
    return x, distinct_logits(tokens, layer["experts"] + int(layer["shared"]), gen)


def distinct_logits(tokens: int, columns: int, gen: torch.Generator) -> torch.Tensor:
    """Random logits without ties in a row (a random permutation of k/32, exact in bf16 for |k| <= 256): with ties
    the kernel and the reference may pick different experts of equal logit, whose expert_scale differs."""
    ranks = torch.rand(tokens, columns, device=DEV, generator=gen).argsort(dim=1)
    return ((ranks - columns // 2).float() / 32).to(torch.bfloat16)


def fused_route(layer, logits):
    scale = None if layer["scale"] is None else layer["scale"].float()
    stacked = layer["handle"].stacked
    rows = logits.shape[0] * (layer["top_k"] + int(layer["shared"]))
    return ops.moe_route_fused(logits, layer["experts"], layer["top_k"], True, layer["shared"], scale,
                               min(stacked.num_experts, rows))


@pytest.mark.parametrize("tokens", TOKENS)
def test_route_fused_tables(layer, tokens):
    _, logits = inputs(layer, tokens)
    poison_allocator()
    weights, ids, order, offsets, group_expert, row_ids, num_groups = fused_route(layer, logits)
    ref_w, ref_ids, ref_order, (ref_offsets, ref_groups, ref_rows) = moe.route_tables(
        logits, layer["top_k"], True, layer["shared"], layer["scale"])
    assert torch.equal(ids.long(), ref_ids.long())
    assert torch.equal(ids.gather(1, order.long()), ids.sort(dim=1).values)
    assert (weights - ref_w).abs().max() <= 2 ** -8 * ref_w.abs().max()
    groups = int(num_groups.item())
    assert torch.equal(group_expert[:groups].cpu(), ids.reshape(-1).unique().int().cpu())
    flat = ids.reshape(-1)
    for g in range(groups):
        rows = row_ids[offsets[g]:offsets[g + 1]]
        assert (flat[rows.long()] == group_expert[g]).all() and torch.equal(rows, rows.sort().values)
    assert int(offsets[groups]) == flat.numel()


@pytest.mark.parametrize("tokens", TOKENS)
def test_gate_up_act_is_gemm_then_activation(layer, tokens):
    """Bit for bit: variant 5 (the paired kernels' ring and k-slicing) sums each column in the same order."""
    x, logits = inputs(layer, tokens)
    stacked, slots = layer["handle"].stacked, layer["top_k"] + int(layer["shared"])
    _, _, _, *align = fused_route(layer, logits)
    default = ops.gemm_variant()
    ops.set_gemm_variant(5)
    try:
        poison_allocator()
        fused = ops.moe_gate_up_act(x, slots, stacked, align, layer["act"], tokens * slots, tokens)
        gate_up = ops.grouped_linear(x, slots, stacked, "gate_up", align, tokens * slots, tokens)
    finally:
        ops.set_gemm_variant(default)
    unfused = ops.silu_and_mul(gate_up) if layer["act"] == "silu" else ops.gelu_tanh_and_mul(gate_up)
    assert torch.isfinite(fused).all()
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("splits", [0, 3])
def test_down_combine_is_gemm_then_ordered_combine(layer, tokens, splits):
    x, logits = inputs(layer, tokens)
    stacked, slots = layer["handle"].stacked, layer["top_k"] + int(layer["shared"])
    weights, ids, order, *align = fused_route(layer, logits)
    hidden = (torch.randn(tokens * slots, stacked.intermediate, device=DEV, generator=layer["gen"]) * 0.5
              ).to(torch.bfloat16)
    poison_allocator()
    out = ops.moe_down_combine(hidden, stacked, align, weights, order, tokens, splits)
    y = ops.grouped_linear(hidden, 1, stacked, "down", align, tokens * slots, tokens, splits)
    assert torch.isfinite(out).all()
    assert torch.equal(out, moe.combine_in_order(y, weights, order.long()))


@pytest.mark.parametrize("tokens", TOKENS + [17, 33])
def test_moe_layer_against_the_reference(layer, tokens, monkeypatch):
    """The backend's decode MoE (three launches up to 16 tokens, five above) against the reference's arithmetic
    (moe_reference / moe_shared_reference on the exactly dequantized weights)."""
    from adaq.backends.reference import ReferenceBackend

    monkeypatch.setenv("ADAQ_PREFILL_PATH", "nvfp4")
    x, logits = inputs(layer, tokens)
    backend, handle = layer["backend"], layer["handle"]
    poison_allocator()
    out = backend.moe(x, logits, handle, layer["top_k"], True, activation=layer["act"], expert_scale=layer["scale"],
                      shared_expert=layer["shared"])
    reference = ReferenceBackend(DEV)
    ref_handle = reference.prepare_experts(layer["gate_up"], layer["down"], dtype=torch.bfloat16)
    ref = reference.moe(x, logits, ref_handle, layer["top_k"], True, activation=layer["act"],
                        expert_scale=layer["scale"], shared_expert=layer["shared"])
    assert torch.isfinite(out).all()
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert error < 2e-2, f"MoE relative error {error:.2e}"


@pytest.mark.parametrize("tokens", [1, 16])
def test_three_launches_capture_in_a_graph(layer, tokens, monkeypatch):
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "nvfp4")
    x, logits = inputs(layer, tokens)
    backend, handle = layer["backend"], layer["handle"]
    options = dict(activation=layer["act"], expert_scale=layer["scale"], shared_expert=layer["shared"])
    eager = backend.moe(x, logits, handle, layer["top_k"], True, **options)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = backend.moe(x, logits, handle, layer["top_k"], True, **options)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 130, 2048])
def test_expert_forward_runs_every_row_through_one_expert(layer, tokens):
    """ops.expert_forward (the shared expert beside the prefill paths): 64-row groups of one expert in one launch
    per projection, against the reference expert MLP on the exactly dequantized weights."""
    from adaq.backends.numerics.moe import expert_mlp
    from adaq.backends.reference import ReferenceBackend

    x = (torch.randn(tokens, layer["hidden"], device=DEV, generator=layer["gen"]) * 0.05).to(torch.bfloat16)
    last = layer["handle"].stacked.num_experts - 1
    poison_allocator()
    out = ops.expert_forward(x, layer["handle"].stacked, last, layer["act"])
    reference = ReferenceBackend(DEV)
    ref_handle = reference.prepare_experts(layer["gate_up"], layer["down"], dtype=torch.bfloat16)
    ref = expert_mlp(reference, x, ref_handle, last, layer["act"])
    assert out.shape == ref.shape and torch.isfinite(out).all()
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert error < 2e-2, f"expert relative error {error:.2e} at {tokens} rows"


@pytest.mark.parametrize("tokens", [300, 1000])
@pytest.mark.parametrize("path", ["exact", "nvfp4"])
def test_prefill_moe_against_the_reference(layer, tokens, path, monkeypatch):
    """Prefill-sized MoE (the exact grouped path, or the decode kernels in 64-token chunks), the shared expert
    through expert_forward beside them, against the reference backend."""
    from adaq.backends.reference import ReferenceBackend

    monkeypatch.setenv("ADAQ_PREFILL_PATH", path)
    x, logits = inputs(layer, tokens)
    options = dict(activation=layer["act"], expert_scale=layer["scale"], shared_expert=layer["shared"])
    poison_allocator()
    out = layer["backend"].moe(x, logits, layer["handle"], layer["top_k"], True, **options)
    reference = ReferenceBackend(DEV)
    ref_handle = reference.prepare_experts(layer["gate_up"], layer["down"], dtype=torch.bfloat16)
    ref = reference.moe(x, logits, ref_handle, layer["top_k"], True, **options)
    assert torch.isfinite(out).all()
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert error < 2e-2, f"{path} MoE relative error {error:.2e} at {tokens} tokens"
