"""CPU checks of the GPU path of hybrid models (issue 15): the vectorised prefill conv the cuda backend runs equals
the reference's per-sequence conv; a decode graph's state slots land in the bucket's view, padded with -1; the
graph blocker names GDN layers the kernels do not take and lets through those they do."""

import pytest
import torch

from adaq.backends.context import Context
from adaq.backends.numerics import gated_delta as gd

# (query lengths, context lengths): fresh, continued, shorter than the conv history, one token, mixed.
CONV_STEPS = [([7], [7]), ([5, 1, 2, 9], [5, 8, 6, 12]), ([1, 1, 1], [1, 4, 2]), ([3, 64, 2], [3, 70, 2]),
              ([13], [40])]


def packed_step(q_lens: list[int], context_lens: list[int], slots: list[int]) -> Context:
    offsets = torch.tensor([0] + q_lens).cumsum(0).int()
    return Context(is_prefill=True, cu_seqlens_q=offsets, context_lens=torch.tensor(context_lens, dtype=torch.int32),
                   state_slots=torch.tensor(slots))


@pytest.mark.parametrize("q_lens, context_lens", CONV_STEPS)
@pytest.mark.parametrize("width", [2, 4])
def test_packed_conv_equals_the_per_sequence_conv(q_lens, context_lens, width):
    torch.manual_seed(len(q_lens) * 10 + width)
    channels, slots = 24, torch.randperm(8)[:len(q_lens)].tolist()
    x, weight = torch.randn(sum(q_lens), channels), torch.randn(channels, width)
    states = torch.randn(8, channels, width - 1)
    fresh = [b for b, (q, c) in enumerate(zip(q_lens, context_lens)) if q == c]
    states[[slots[b] for b in fresh]] = float("nan")  # a fresh sequence never reads its slot
    expected_states = states.clone()
    ctx = packed_step(q_lens, context_lens, slots)
    expected = gd.conv_step(x, weight, expected_states, ctx)
    out = gd.conv_packed(x, weight, states, ctx)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states, expected_states, atol=0, rtol=0, equal_nan=True)


def test_packed_conv_without_a_state_cache_starts_from_zeros():
    x, weight = torch.randn(10, 16, dtype=torch.bfloat16), torch.randn(16, 4, dtype=torch.bfloat16)
    ctx = packed_step([4, 6], [4, 6], [0, 1])
    ctx.state_slots = None
    torch.testing.assert_close(gd.conv_packed(x, weight, None, ctx), gd.conv_step(x, weight, None, ctx))


def test_packed_conv_takes_the_projections_strided_slice():
    """The layer hands the conv the q|k|v columns of the fused in_proj output as they are (a strided view, no copy):
    the prefill conv and the decode conv give what they give a contiguous copy."""
    torch.manual_seed(3)
    wide, weight = torch.randn(9, 40), torch.randn(24, 4)
    view = wide[:, 8:32]
    assert not view.is_contiguous()
    ctx = packed_step([4, 5], [6, 5], [2, 0])
    states = torch.randn(3, 24, 3)
    states_copy = states.clone()
    torch.testing.assert_close(gd.conv_packed(view, weight, states, ctx),
                               gd.conv_packed(view.contiguous(), weight, states_copy, ctx), atol=0, rtol=0)
    torch.testing.assert_close(states, states_copy, atol=0, rtol=0)
    slots, continued = torch.tensor([1, 2]), torch.tensor([True, False])
    decode_states = torch.randn(3, 24, 3)
    copy_states = decode_states.clone()
    torch.testing.assert_close(gd.conv_decode(view[:2], weight, decode_states, slots, continued),
                               gd.conv_decode(view[:2].contiguous(), weight, copy_states, slots, continued),
                               atol=0, rtol=0)


def test_decode_graph_state_slots_land_in_their_view():
    from adaq.engine.cuda_graph import _Bucket, pack_decode_inputs

    longs, ints = pack_decode_inputs(4, 2, [11, 12, 13], [5, 9, 2], [21, 37, 8], [6, 10, 3], [[1], [2], [7]],
                                     sliding_slots=[1, 2, 3], sliding_tables=[[0], [1], [2]], state_slots=[3, 0, 5])
    bucket = _Bucket(4, None, torch.tensor(longs), torch.tensor(ints, dtype=torch.int32), None, sliding=True,
                     hybrid=True)
    assert bucket.state_slots.tolist() == [3, 0, 5, -1]
    assert bucket.sliding_slot_mapping.tolist() == [1, 2, 3, -1]
    assert bucket.slot_mapping.tolist() == [21, 37, 8, -1]
    plain, _ = pack_decode_inputs(2, 1, [1], [0], [4], [1], [[0]], state_slots=[6])
    assert _Bucket(2, None, torch.tensor(plain), torch.zeros(4, dtype=torch.int32), None,
                   hybrid=True).state_slots.tolist() == [6, -1]


class _Layer(torch.nn.Module):
    def __init__(self, dk: int, dv: int, kernel: int, dtype: torch.dtype):
        super().__init__()
        self.ssm_state = None
        self.head_k_dim, self.head_v_dim, self.conv_kernel = dk, dv, kernel
        self.conv_weight = torch.zeros(4, kernel, dtype=dtype)


@pytest.mark.parametrize("layer, blocked", [
    (_Layer(128, 128, 4, torch.bfloat16), None),
    (_Layer(16, 16, 4, torch.bfloat16), "head dims 16 / 16"),
    (_Layer(128, 48, 4, torch.bfloat16), "head dims 128 / 48"),
    (_Layer(128, 128, 5, torch.bfloat16), "conv kernel width 5"),
    (_Layer(128, 128, 4, torch.float32), "compute dtype torch.float32"),
])
def test_graph_blocker_names_the_gdn_layers_the_kernels_do_not_take(layer, blocked):
    from adaq.engine.cuda_graph import graph_blocker

    cause = graph_blocker(torch.nn.Sequential(layer))
    assert cause is None if blocked is None else (blocked in cause and "Gated DeltaNet" in cause)


def test_a_step_hands_every_gdn_layer_the_same_offsets_tensor():
    """gdn_prefill passes fla one int64 cu_seqlens per step (fla caches its chunk indices by tensor identity)."""
    from adaq.backends.context import get_context, reset_context, set_context

    offsets = torch.tensor([0, 3, 7], dtype=torch.int32)
    step = set_context(True, offsets, 4, torch.tensor([3, 4], dtype=torch.int32))
    try:
        first = get_context().query_offsets_long()
        assert first is step.query_offsets_long() and first.dtype == torch.int64
        assert torch.equal(first, offsets.long())
        assert first is step.for_sliding_pool().query_offsets_long()
        assert set_context(True, offsets, 4, torch.tensor([3, 4], dtype=torch.int32)).query_offsets_long() is not first
    finally:
        reset_context()
