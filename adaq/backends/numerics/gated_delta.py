"""Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention), reference numerics: the causal conv1d with its conv
state, the gated delta rule in its chunked (prefill) and recurrent (decode) forms, the output's gated RMSNorm.

State per sequence and layer (docs/ARCHITECTURE.md, "Hybrid models"):
- conv state [C, K-1] in the compute dtype: the last K-1 inputs of the conv (C = 2 key_dim + value_dim);
- recurrent state S [Hv, Dk, Dv] in fp32.
The recurrent update of one token, per value head (q and k L2-normalised in fp32, q scaled by Dk^-0.5):
    S <- S * exp(g);  delta = beta * (v - S^T k);  S <- S + k delta^T;  o = S^T q
The chunked form computes the same (transformers' `torch_chunk_gated_delta_rule`, chunks of 64) up to fp32 rounding.
"""

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def expand_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """[..., Hk, D] -> [..., Hv, D]: value head h reads key head h // (Hv / Hk)."""
    repeats = num_v_heads // x.shape[-2]
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=-2)


def prepare_qk(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32, heads expanded, L2-normalised; q scaled by Dk^-0.5."""
    q = l2norm(expand_heads(q, num_v_heads).float())
    k = l2norm(expand_heads(k, num_v_heads).float())
    return q * q.shape[-1] ** -0.5, k


def gdn_gates(a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor,
              dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [T, Hv] -> (log-decay g fp32 = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) in b's dtype)."""
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    return g, b.sigmoid()


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g, beta [B, T, Hv], state fp32 [B, Hv, Dk, Dv]
    -> (out [B, T, Hv, Dv] in v's dtype, new state fp32)."""
    q, k = prepare_qk(q, k, v.shape[-2])
    values, g, beta = v.float(), g.float(), beta.float()
    state = state.float().clone()
    out = torch.empty_like(values)
    for t in range(values.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        remembered = (state * k[:, t, :, :, None]).sum(dim=-2)
        delta = (values[:, t] - remembered) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out[:, t] = (state * q[:, t, :, :, None]).sum(dim=-2)
    return out.to(v.dtype), state


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in chunks (the UT transform within a chunk, a scan over chunks). q, k [T, Hk, Dk],
    v [T, Hv, Dv], g, beta [T, Hv], state fp32 [Hv, Dk, Dv] -> (out [T, Hv, Dv] in v's dtype, new state fp32)."""
    length = v.shape[0]
    q, k = prepare_qk(q, k, v.shape[-2])
    pad = (chunk_size - length % chunk_size) % chunk_size
    # [Hv, chunks, C, D] (fp32); padded tokens have beta 0 and g 0: they change nothing.
    q, k, values = (F.pad(x.float().transpose(0, 1), (0, 0, 0, pad)).unflatten(1, (-1, chunk_size))
                    for x in (q, k, v))
    g, beta = (F.pad(x.float().transpose(0, 1), (0, pad)).unflatten(1, (-1, chunk_size)) for x in (g, beta))
    k_beta, v_beta = k * beta[..., None], values * beta[..., None]
    cum = g.cumsum(dim=-1)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).triu(1)
    pair_decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pair_decay
    intra = (q @ k.transpose(-1, -2)) * pair_decay
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False,
                                               unitriangular=True)
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    state = state.float().clone()
    out = torch.empty_like(values)
    for i in range(values.shape[1]):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ state
        out[:, i] = q_decayed[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ v_new
    out = out.flatten(1, 2)[:, :length].transpose(0, 1)
    return out.to(v.dtype), state


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of one sequence: x [L, C] after the conv state [C, K-1] (zeros for a new sequence), weight [C, K]
    -> (silu(depthwise causal conv) [L, C] in x's dtype, new state [C, K-1]: the last K-1 inputs). fp32 inside."""
    window = torch.cat([state.to(x.dtype), x.transpose(0, 1)], dim=1)  # [C, K-1+L]
    out = F.conv1d(window.float()[None], weight.float()[:, None, :], groups=weight.shape[0])[0]
    return F.silu(out).transpose(0, 1).to(x.dtype), window[:, -state.shape[1]:]


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor,
                         states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences: x [B, C], states [B, C, K-1] -> (out [B, C], new states [B, C, K-1])."""
    window = torch.cat([states.to(x.dtype), x[:, :, None]], dim=2)  # [B, C, K]
    out = (window.float() * weight.float()[None]).sum(dim=-1)
    return F.silu(out).to(x.dtype), window[:, :, 1:]


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GDN output norm over [N, Dv]: w * rms_norm(x) (rounded to the dtype as transformers), then x silu(z) in
    fp32, rounded once."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return ((weight * normed) * F.silu(z.float())).to(x.dtype)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The gated attention's output: x * sigmoid(gate), in x's dtype (Qwen3.5 / Qwen3-Next full attention)."""
    return x * torch.sigmoid(gate)


# ---- one packed step of several sequences (the step context says where each starts and which state slot it owns)
def sequence_spans(ctx) -> list[tuple[int, int, bool]]:
    """(first packed token, token count, continues a cached state) per sequence of the step."""
    offsets = ctx.query_offsets().tolist()
    context_lens = ctx.context_lens.tolist()
    return [(offsets[b], offsets[b + 1] - offsets[b], context_lens[b] > offsets[b + 1] - offsets[b])
            for b in range(len(offsets) - 1)]


def conv_step(x: torch.Tensor, weight: torch.Tensor, states: torch.Tensor | None, ctx) -> torch.Tensor:
    """x [T, C] packed -> silu(conv) [T, C]; each sequence starts from its slot's conv state (zeros when it has no
    cached tokens, or `states` is None) and its new state is written back (not when `states` is None)."""
    spans = sequence_spans(ctx)
    slots = state_slots(ctx, len(spans))
    out = torch.empty_like(x)
    zeros = torch.zeros(x.shape[1], weight.shape[1] - 1, dtype=x.dtype, device=x.device)
    for (first, count, cached), slot in zip(spans, slots):
        state = states[slot] if cached and states is not None else zeros
        out[first:first + count], new_state = causal_conv1d(x[first:first + count], weight, state)
        if states is not None:
            states[slot] = new_state
    return out


def conv_packed(x: torch.Tensor, weight: torch.Tensor, states: torch.Tensor | None, ctx) -> torch.Tensor:
    """`conv_step` for every sequence of a packed step at once, in device ops only (no host sync, no per-sequence
    loop): the GPU's prefill conv. Each output tap reads the token K-1-j places back, or the sequence's conv state
    (zeros when it has no cached tokens) before its first token; sum over taps in fp32 in tap order. The new
    states (the last K-1 inputs of each sequence) go to the step's slots, which a prefill step never pads (no -1)."""
    tokens, width = x.shape[0], weight.shape[1]
    history = width - 1
    offsets = ctx.query_offsets().long()
    q_lens = offsets[1:] - offsets[:-1]
    rows = torch.arange(tokens, device=x.device)
    seq = torch.repeat_interleave(torch.arange(q_lens.numel(), device=x.device), q_lens, output_size=tokens)
    local = rows - offsets[:-1][seq]
    previous = _previous_states(x, states, ctx, q_lens, history)  # [B, C, K-1]
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for j in range(width):
        back = history - j  # this tap reads the input `back` tokens before the current one
        tap = torch.where((local >= back)[:, None], x[(rows - back).clamp(min=0)],
                          previous[seq, :, (local - back + history).clamp(0, history - 1)])
        acc = acc + tap.float() * weight[:, j].float()
    if states is not None and ctx.state_slots is not None:
        states.index_copy_(0, ctx.state_slots.long(), _last_inputs(x, previous, offsets, q_lens, history))
    return F.silu(acc).to(x.dtype)


def _previous_states(x: torch.Tensor, states: torch.Tensor | None, ctx, q_lens: torch.Tensor,
                     history: int) -> torch.Tensor:
    if states is None or ctx.state_slots is None:
        return x.new_zeros(q_lens.numel(), x.shape[1], history)
    cached = ctx.context_lens.long() > q_lens
    return torch.where(cached[:, None, None], states[ctx.state_slots.long()], 0).to(x.dtype)  # where: NaN-safe


def _last_inputs(x: torch.Tensor, previous: torch.Tensor, offsets: torch.Tensor, q_lens: torch.Tensor,
                 history: int) -> torch.Tensor:
    """[B, C, K-1]: each sequence's last K-1 window values (its tokens, or the state before them if it is short)."""
    seqs = torch.arange(q_lens.numel(), device=x.device)
    columns = []
    for m in range(history):
        source = q_lens - history + m  # the window value's index within the sequence's tokens
        columns.append(torch.where((source >= 0)[:, None], x[(offsets[1:] - history + m).clamp(min=0)],
                                   previous[seqs, :, (q_lens + m).clamp(max=history - 1)]))
    return torch.stack(columns, dim=-1)


def conv_decode(x: torch.Tensor, weight: torch.Tensor, states: torch.Tensor, slots: torch.Tensor,
                cached: torch.Tensor) -> torch.Tensor:
    """One token per sequence, batched: x [B, C], the states at `slots` [B] (zeroed where not `cached` [B]; slot -1:
    a padded row, whose state is neither read nor written)."""
    current = torch.where((cached & (slots >= 0))[:, None, None], states[slots.clamp(min=0)], 0)  # where, not *:
    out, new_states = causal_conv1d_update(x, weight, current)  # a fresh slot may hold NaN
    write_states(states, slots, new_states)
    return out


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    states: torch.Tensor | None, ctx) -> torch.Tensor:
    """Packed q, k [T, Hk, Dk], v [T, Hv, Dv], g, beta [T, Hv] -> [T, Hv, Dv]: the chunked form for each sequence
    with more than one token, the recurrent form for one token; states as in `conv_step`."""
    spans = sequence_spans(ctx)
    slots = state_slots(ctx, len(spans))
    out = torch.empty_like(v)
    zeros = torch.zeros(v.shape[1], q.shape[2], v.shape[2], dtype=torch.float32, device=v.device)
    for (first, count, cached), slot in zip(spans, slots):
        state = states[slot] if cached and states is not None else zeros
        part = slice(first, first + count)
        if count == 1:
            o, new_state = recurrent_gated_delta_rule(q[None, part], k[None, part], v[None, part], g[None, part],
                                                      beta[None, part], state[None])
            o, new_state = o[0], new_state[0]
        else:
            o, new_state = chunk_gated_delta_rule(q[part], k[part], v[part], g[part], beta[part], state)
        out[part] = o
        if states is not None:
            states[slot] = new_state
    return out


def delta_rule_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      states: torch.Tensor, slots: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """One token per sequence, batched: q, k [B, Hk, Dk], v [B, Hv, Dv], g, beta [B, Hv] -> [B, Hv, Dv]; states
    as in `conv_decode`."""
    current = torch.where((cached & (slots >= 0))[:, None, None, None], states[slots.clamp(min=0)], 0)
    out, new_states = recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                                 current)
    write_states(states, slots, new_states)
    return out[:, 0]


def write_states(states: torch.Tensor, slots: torch.Tensor, new_states: torch.Tensor) -> None:
    """states[slots] = new_states, skipping slot -1 (padded rows of a decode graph's bucket)."""
    keep = slots >= 0
    states[slots[keep]] = new_states[keep]


def state_slots(ctx, num_seqs: int) -> list[int]:
    return ctx.state_slots.tolist() if ctx.state_slots is not None else [0] * num_seqs
