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
    gated = backend.silu_and_mul if activation == "silu" else backend.gelu_tanh_and_mul
    out = torch.zeros_like(x)
    for expert in torch.unique(chosen).tolist():
        tokens, slot = torch.where(chosen == expert)
        hidden = x[tokens]
        gate_up = [backend.linear(hidden, handle) for handle in experts.gate_up[expert]]
        gate_up = gate_up[0] if len(gate_up) == 1 else torch.cat(gate_up, dim=-1)
        y = backend.linear(gated(gate_up), experts.down[expert])
        out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
    return out


def add_shared_expert(routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Qwen3.5-MoE / Qwen3-Next: routed [T, H] + sigmoid(shared_expert_gate(x)) [T, 1] * shared expert [T, H]."""
    return routed + torch.sigmoid(gate_logits) * shared
