"""The GPU's chunked gated delta rule for prefill steps: fla-core's Triton kernel (`fla.ops.gated_delta_rule.
chunk_gated_delta_rule`, fla-core 0.6.0), an optional dependency. One call per step: the packed sequences go in as
one varlen batch (`cu_seqlens`: one int64 tensor per step, so fla's identity-keyed chunk indices are built once per
step; a single sequence goes in without it, as a batch of one), each starting from its slot's state (zeros when it
has no cached tokens) and leaving its final state there. Without fla the cuda backend runs the reference's chunked
form and reports it.

fla normalises q and k inside its kernel (`use_qk_l2norm_in_kernel`, eps 1e-6 as the reference) and scales q by
Dk^-0.5; it takes the grouped key heads as they are (GVA: Hv a multiple of Hk) and the log-decay g in fp32. Its
`fused_recurrent_gated_delta_rule` is not used (it gave NaN outputs on the H100 in our runs); decode runs on
adaq's own kernel (csrc/gated_delta.cu).
"""

import torch

INSTALL_HINT = "pip install fla-core==0.6.0 einops"
_chunk = None
_import_error: str | None = None


def fla_chunk():
    """fla's chunk_gated_delta_rule, or None (then `unavailable()` says why)."""
    global _chunk, _import_error
    if _chunk is None and _import_error is None:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            _chunk = chunk_gated_delta_rule
        except Exception as error:  # ImportError, or Triton failing to initialise
            _import_error = f"fla-core not importable ({type(error).__name__}: {str(error).strip()[:200]})"
    return _chunk


def unavailable() -> str | None:
    return None if fla_chunk() is not None else _import_error


def initial_states(states: torch.Tensor | None, ctx, num_seqs: int, shape: tuple[int, int, int],
                   device: torch.device) -> torch.Tensor:
    """[N, Hv, Dk, Dv] fp32: each sequence's slot state, or zeros where it has no cached tokens (torch.where: a
    fresh slot may hold NaN)."""
    if states is None or ctx.state_slots is None:
        return torch.zeros((num_seqs, *shape), dtype=torch.float32, device=device)
    offsets = ctx.query_offsets_long()
    cached = ctx.context_lens.long() > offsets[1:] - offsets[:-1]
    return torch.where(cached[:, None, None, None], states[ctx.state_slots.long()], 0.0)


def chunk_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  states: torch.Tensor | None, ctx) -> torch.Tensor:
    """Packed q, k [T, Hk, Dk], v [T, Hv, Dv], g fp32 / beta [T, Hv] -> [T, Hv, Dv]; states as the backend op's."""
    chunk = fla_chunk()
    offsets = ctx.query_offsets_long()
    initial = initial_states(states, ctx, offsets.numel() - 1, (v.shape[1], q.shape[2], v.shape[2]), v.device)
    out, final = chunk(q.contiguous()[None], k.contiguous()[None], v.contiguous()[None], g.float().contiguous()[None],
                       beta.contiguous()[None], initial_state=initial, output_final_state=True,
                       use_qk_l2norm_in_kernel=True, cu_seqlens=offsets if offsets.numel() > 2 else None)
    if states is not None and ctx.state_slots is not None:
        states.index_copy_(0, ctx.state_slots.long(), final.float())
    return out[0]
