"""Sparse mixture of experts, reference numerics: softmax router, top-k experts, optional renormalised weights."""

import torch

from adaq.backends.handles import ExpertsHandle


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          expert_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, top-k, optional renormalisation, weights back in the logits' dtype (as transformers).

    With `expert_scale` [E] (Gemma 4) the weights stay fp32 and each is multiplied by its expert's scale, as
    transformers' Gemma4TextRouter does after renormalising."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if expert_scale is not None:
        return weights * expert_scale[experts], experts
    return weights.to(router_logits.dtype), experts


def moe_reference(backend, x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertsHandle, top_k: int,
                  renormalize: bool, activation: str = "silu",
                  expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> [T, H]: each routed expert runs on its tokens; outputs summed in ascending expert order."""
    weights, chosen = route(router_logits, top_k, renormalize, expert_scale)
    out = torch.zeros_like(x)
    for expert in torch.unique(chosen).tolist():
        tokens, slot = torch.where(chosen == expert)
        y = expert_mlp(backend, x[tokens], experts, expert, activation)
        out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
    return out


def gated_activation(backend, activation: str):
    """The backend's act(gate) * up op: SiLU for "silu", else gelu-tanh."""
    return backend.silu_and_mul if activation == "silu" else backend.gelu_tanh_and_mul


def expert_mlp(backend, x: torch.Tensor, experts: ExpertsHandle, expert: int, activation: str = "silu") -> torch.Tensor:
    """down(act(gate(x)) * up(x)) of one expert, each linear through the backend."""
    gated = gated_activation(backend, activation)
    gate_up = [backend.linear(x, handle) for handle in experts.gate_up[expert]]
    gate_up = gate_up[0] if len(gate_up) == 1 else torch.cat(gate_up, dim=-1)
    return backend.linear(gated(gate_up), experts.down[expert])


def moe_shared_reference(backend, x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertsHandle, top_k: int,
                         renormalize: bool, activation: str = "silu", shared_backend=None) -> torch.Tensor:
    """Qwen3.5/3.6-MoE and Qwen3-Next with the shared expert as one more expert: router_logits [T, E + 1] (column E
    = shared_expert_gate(x), the router's weight carrying that gate as row E), experts E + 1 (the last the shared
    expert). The routed experts as moe_reference, then routed + bf16(bf16(sigmoid(logit E)) * shared(x)) rounded
    to bf16: the shared expert is the last term of the combine's ascending expert order, with routing weight
    sigmoid(logit E), so a kernel that combines every slot in expert order computes exactly this.
    `shared_backend` runs the shared expert's linears when they differ from the routed ones' (the FP8 prefill
    emulation: the GPU runs the shared expert on the NVFP4 kernels beside the grouped FP8 path)."""
    shared = len(experts.down) - 1
    routed_experts = ExpertsHandle(experts.gate_up[:shared], experts.down[:shared], experts.intermediate_size)
    routed = moe_reference(backend, x, router_logits[:, :shared], routed_experts, top_k, renormalize, activation)
    shared_out = expert_mlp(shared_backend or backend, x, experts, shared, activation)
    return add_shared_expert(routed, shared_out, router_logits[:, shared:])


def add_shared_expert(routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Qwen3.5-MoE / Qwen3-Next: routed [T, H] + sigmoid(shared_expert_gate(x)) [T, 1] * shared expert [T, H]."""
    return routed + torch.sigmoid(gate_logits) * shared


def route_tables(router_logits: torch.Tensor, top_k: int, renormalize: bool, shared: bool = False,
                 expert_scale: torch.Tensor | None = None):
    """What the decode route kernel (csrc/moe.cu moe_route_fused) writes, in plain PyTorch: per token S = top_k
    (+ 1 with a shared expert) slots of (fp32 weight, expert id), the slots' ascending expert order, and the rows
    t * S + s grouped by expert (group_offsets [G + 1], group_expert [G], row_ids, stable within an expert).
    Weights: route()'s (bf16 values, or Gemma 4's fp32 products), the shared slot bf16(sigmoid(logit E))."""
    experts = router_logits.shape[1] - int(shared)
    weights, ids = route(router_logits[:, :experts], top_k, renormalize, expert_scale)
    weights = weights.float()
    if shared:
        gate = torch.sigmoid(router_logits[:, experts:].to(torch.bfloat16)).float()
        weights = torch.cat([weights, gate], dim=1)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], experts)], dim=1)
    order = torch.argsort(ids, dim=1, stable=True)
    flat = ids.reshape(-1)
    row_ids = torch.argsort(flat, stable=True)
    group_expert, counts = torch.unique(flat, return_counts=True)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return weights, ids, order, (offsets, group_expert, row_ids)


def combine_in_order(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """out [T, H] from per-slot outputs y [T * S, H] (bf16): each token's slots in `order`, bf16(y * w) added to a
    bf16 sum one at a time (moe_reference's index_add_ into bf16; the fused down GEMM's combine)."""
    tokens, slots = weights.shape
    y = y.view(tokens, slots, -1)
    out = torch.zeros(tokens, y.shape[-1], dtype=torch.bfloat16, device=y.device)
    for j in range(slots):
        slot = order[:, j]
        rows = torch.arange(tokens, device=y.device)
        out = (out.float() + (y[rows, slot].float() * weights[rows, slot, None]).to(torch.bfloat16).float()
               ).to(torch.bfloat16)
    return out
