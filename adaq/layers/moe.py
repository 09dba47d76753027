"""Sparse mixture of experts (Qwen3-MoE): softmax router, top-k experts, optional renormalised top-k weights."""

import torch
from torch import nn

from adaq.backends.handles import ExpertsHandle, Weight
from adaq.backends.interface import Backend
from adaq.layers.linear import Linear


class SparseMoE(nn.Module):
    def __init__(self, backend: Backend, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
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


class SharedExpertMoE(SparseMoE):
    """Qwen3.5-MoE / Qwen3-Next: routed experts plus one shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, backend: Backend, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, shared_intermediate_size: int, activation: str):
        super().__init__(backend, hidden_size, intermediate_size, num_experts, top_k, renormalize)
        from adaq.layers.mlp import GatedMLP

        self.shared_expert = GatedMLP(backend, hidden_size, shared_intermediate_size, activation)
        self.shared_expert_gate = Linear(backend, hidden_size, 1)

    def load(self, reader, prefix: str) -> None:
        super().load(reader, prefix)
        self.shared_expert.load(reader, f"{prefix}.shared_expert")
        self.shared_expert_gate.load(reader.linear(f"{prefix}.shared_expert_gate"), reader.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = super().forward(x)
        return self.backend.moe_shared(routed, self.shared_expert(x), self.shared_expert_gate(x))
