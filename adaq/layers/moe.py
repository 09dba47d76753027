"""Sparse mixture of experts (Qwen3-MoE): softmax router, top-k experts, optional renormalised top-k weights."""

from dataclasses import dataclass

import torch
from torch import nn

from adaq.layers.linear import Linear, Weight


@dataclass
class ExpertsHandle:
    """Reference layout: per expert, the gate|up handles (one when fused) and the down handle."""

    gate_up: list[list]
    down: list
    intermediate_size: int


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, top-k, optional renormalisation, weights back in the logits' dtype (as transformers)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


def moe_reference(backend, x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertsHandle, top_k: int,
                  renormalize: bool) -> torch.Tensor:
    """x [T, H] -> [T, H]: each routed expert runs on its tokens; outputs summed in ascending expert order."""
    weights, chosen = route(router_logits, top_k, renormalize)
    out = torch.zeros_like(x)
    for expert in torch.unique(chosen).tolist():
        tokens, slot = torch.where(chosen == expert)
        hidden = x[tokens]
        gate_up = [backend.linear(hidden, handle) for handle in experts.gate_up[expert]]
        gate_up = gate_up[0] if len(gate_up) == 1 else torch.cat(gate_up, dim=-1)
        y = backend.linear(backend.silu_and_mul(gate_up), experts.down[expert])
        out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
    return out


class SparseMoE(nn.Module):
    def __init__(self, backend, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool):
        super().__init__()
        self.backend = backend
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(backend, hidden_size, num_experts)
        self.experts: ExpertsHandle | None = None

    def load(self, reader, prefix: str) -> None:
        self.gate.load(reader.linear(f"{prefix}.gate"), reader.dtype)
        gate_up: list[list[Weight]] = []
        down: list[Weight] = []
        for e in range(self.num_experts):
            expert = f"{prefix}.experts.{e}"
            gate_up.append([reader.linear(f"{expert}.gate_proj"), reader.linear(f"{expert}.up_proj")])
            down.append(reader.linear(f"{expert}.down_proj"))
        self.experts = self.backend.prepare_experts(gate_up, down, dtype=reader.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.moe(x, self.gate(x), self.experts, self.top_k, self.renormalize)
