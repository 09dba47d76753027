"""CPU checks of the three-launch decode MoE's spec: the route kernel's tables (adaq.backends.numerics.moe
.route_tables) and the in-order combine reproduce the reference MoE, the shared expert appended as expert E
(moe_shared_reference) is the old routed + sigmoid(gate) * shared composition, and SharedExpertMoE joins the
shared expert to the experts exactly when it can."""

import pytest
import torch

from adaq.backends.handles import ExpertsHandle
from adaq.backends.numerics import activation, moe
from adaq.backends.reference import ReferenceBackend
from adaq.formats import nvfp4
from adaq.layers.moe import SharedExpertMoE

# (tokens, experts, top_k, hidden, inter, shared, gelu + expert_scale): odd batches, Qwen3-30B-A3B / Qwen3.6 /
# Gemma 4 layouts at a small hidden size.
CASES = [(1, 8, 2, 64, 32, False, False), (3, 16, 4, 64, 32, True, False), (7, 32, 8, 64, 48, True, False),
         (16, 16, 8, 64, 32, False, True), (5, 12, 3, 48, 16, True, False), (13, 128, 8, 32, 16, False, False)]


def random_weight(n: int, k: int, gen: torch.Generator) -> nvfp4.NVFP4Weight:
    return nvfp4.quantize(torch.randn(n, k, generator=gen) * 0.2)


def make_experts(backend, count, hidden, inter, gen):
    gate_up = [[random_weight(inter, hidden, gen), random_weight(inter, hidden, gen)] for _ in range(count)]
    down = [random_weight(hidden, inter, gen) for _ in range(count)]
    return gate_up, down, backend.prepare_experts(gate_up, down, dtype=torch.bfloat16)


def mlp_outputs(backend, x, experts, ids, act):
    """y [T * S, H]: every (token, slot) row through its expert, each linear as the reference backend runs it."""
    rows = [moe.expert_mlp(backend, x[t:t + 1], experts, int(e), act) for t in range(x.shape[0]) for e in ids[t]]
    return torch.cat(rows)


@pytest.mark.parametrize("tokens,count,top_k,hidden,inter,shared,gemma", CASES)
def test_tables_and_ordered_combine_are_the_reference(tokens, count, top_k, hidden, inter, shared, gemma):
    gen = torch.Generator().manual_seed(tokens * 7 + count)
    backend = ReferenceBackend("cpu")
    _, _, experts = make_experts(backend, count + int(shared), hidden, inter, gen)
    x = (torch.randn(tokens, hidden, generator=gen) * 0.5).to(torch.bfloat16)
    logits = torch.randn(tokens, count + int(shared), generator=gen).to(torch.bfloat16)
    scale = torch.rand(count, generator=gen).to(torch.bfloat16) + 0.5 if gemma else None
    act = "gelu_tanh" if gemma else "silu"
    weights, ids, order, (offsets, group_expert, row_ids) = moe.route_tables(logits, top_k, True, shared, scale)
    slots = top_k + int(shared)
    assert weights.dtype == torch.float32 and weights.shape == ids.shape == order.shape == (tokens, slots)
    assert torch.equal(ids.gather(1, order), ids.sort(dim=1).values)  # order: ascending experts
    flat = ids.reshape(-1)
    assert torch.equal(flat[row_ids], flat[row_ids].sort().values)  # rows grouped by expert, stable inside
    for g, e in enumerate(group_expert.tolist()):
        group_rows = row_ids[offsets[g]:offsets[g + 1]]
        assert (flat[group_rows] == e).all() and torch.equal(group_rows, group_rows.sort().values)
    out = moe.combine_in_order(mlp_outputs(backend, x, experts, ids, act), weights, order)
    if shared:
        ref = moe.moe_shared_reference(backend, x, logits, experts, top_k, True, act)
    else:
        ref = moe.moe_reference(backend, x, logits, experts, top_k, True, act, scale)
    assert torch.equal(out, ref)


def test_shared_reference_is_the_old_composition():
    gen = torch.Generator().manual_seed(3)
    backend = ReferenceBackend("cpu")
    count, hidden, inter = 8, 64, 32
    _, _, experts = make_experts(backend, count + 1, hidden, inter, gen)
    x = (torch.randn(5, hidden, generator=gen) * 0.5).to(torch.bfloat16)
    logits = torch.randn(5, count + 1, generator=gen).to(torch.bfloat16)
    routed = moe.moe_reference(backend, x, logits[:, :count],
                               ExpertsHandle(experts.gate_up[:count], experts.down[:count], inter), 2, True)
    gate_up = torch.cat([backend.linear(x, h) for h in experts.gate_up[count]], dim=-1)
    shared = backend.linear(activation.silu_and_mul(gate_up), experts.down[count])
    expected = backend.moe_shared(routed, shared, logits[:, count:])
    assert torch.equal(backend.moe(x, logits, experts, 2, True, shared_expert=True), expected)


class DictReader:
    """The reader interface SharedExpertMoE.load uses, over a dict of weights."""

    def __init__(self, weights: dict):
        self.weights = weights
        self.dtype = torch.bfloat16

    def linear(self, name: str, rows=None, cols=None):
        return self.weights[name]


def shared_layer_weights(count, hidden, inter, shared_inter, gen):
    weights = {"mlp.gate": torch.randn(count, hidden, generator=gen).to(torch.bfloat16),
               "mlp.shared_expert_gate": torch.randn(1, hidden, generator=gen).to(torch.bfloat16)}
    for prefix, width in [*((f"mlp.experts.{e}", inter) for e in range(count)), ("mlp.shared_expert", shared_inter)]:
        weights[f"{prefix}.gate_proj"] = random_weight(width, hidden, gen)
        weights[f"{prefix}.up_proj"] = random_weight(width, hidden, gen)
        weights[f"{prefix}.down_proj"] = random_weight(hidden, width, gen)
    return weights


@pytest.mark.parametrize("shared_inter,joined", [(32, True), (48, False)])
def test_shared_expert_joins_the_experts_when_it_can(shared_inter, joined):
    gen = torch.Generator().manual_seed(shared_inter)
    count, hidden, inter = 8, 64, 32
    reader = DictReader(shared_layer_weights(count, hidden, inter, shared_inter, gen))
    layer = SharedExpertMoE(ReferenceBackend("cpu"), hidden, inter, count, 2, True, shared_inter, "silu")
    layer.load(reader, "mlp")
    assert layer.shared_in_experts == joined
    assert layer.gate.out_features == count + int(joined)
    x = (torch.randn(4, hidden, generator=gen) * 0.5).to(torch.bfloat16)
    separate = SharedExpertMoE(ReferenceBackend("cpu"), hidden, inter, count, 2, True, shared_inter, "silu")
    separate._joins_experts = lambda *args: False
    separate.load(reader, "mlp")
    assert not separate.shared_in_experts
    torch.testing.assert_close(layer(x), separate(x), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 130, 2048])
def test_one_expert_table_covers_every_row_in_order(rows):
    """ops.expert_forward's tables (made on any device): groups of at most 64 rows, in order, all naming the expert,
    as the grouped GEMM reads them (group g: rows row_ids[offsets[g]:offsets[g + 1]] through group_expert[g])."""
    from adaq.kernels import ops

    offsets, group_expert, row_ids, num_groups = ops.one_expert_table(rows, 5, torch.device("cpu"))
    groups = int(num_groups.item())
    assert groups == -(-rows // 64) == group_expert.numel() and (group_expert == 5).all()
    sizes = offsets[1:] - offsets[:-1]
    assert int(offsets[0]) == 0 and int(offsets[-1]) == rows and (sizes >= 1).all() and (sizes <= 64).all()
    assert torch.equal(row_ids, torch.arange(rows, dtype=torch.int32))
    assert all(t.dtype == torch.int32 for t in (offsets, group_expert, row_ids, num_groups))
