"""Sparse mixture of experts: softmax router, top-k experts, optional renormalised top-k weights (Qwen3-MoE), and
the experts alone for models whose router is their own (Gemma 4: a per-expert scale on the routing weights).

Tensor parallelism splits every expert by its intermediate dimension (vLLM's default), not the experts over ranks:
each rank routes every token (the router is replicated), runs its share of each chosen expert's gate/up rows and
down columns, and one all-reduce sums the ranks' partial outputs, the shared expert's included. The work per rank
is the same whatever the routing (expert parallelism leaves ranks idle when tokens pick a few experts, and needs a
token exchange before and after), and a batch-1 decode reads 1/N of every chosen expert on each rank. It requires
the intermediate size to split into shares of 16 columns for NVFP4 down projections (Qwen3-30B-A3B: 768 / 8 = 96;
Qwen3.5-35B-A3B: 512 / 8 = 64)."""

import torch
from torch import nn

from adaq.backends.handles import ExpertsHandle, Weight
from adaq.backends.interface import Backend
from adaq.backends.numerics.activation import activation_kind
from adaq.layers.linear import Linear


class SparseMoE(nn.Module):
    def __init__(self, backend: Backend, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, activation: str = "silu", router: bool = True):
        super().__init__()
        self.backend = backend
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        tp = backend.tp
        self.share = tp.split(intermediate_size, "the experts' intermediate size") if tp.sharded else None
        self.top_k = top_k
        self.renormalize = renormalize
        self.activation = activation_kind(activation)
        self.gate = Linear(backend, hidden_size, num_experts) if router else None
        self.experts: ExpertsHandle | None = None

    def load(self, reader, prefix: str) -> None:
        self.gate.load(reader.linear(f"{prefix}.gate"), reader.dtype)
        self.load_experts(reader, f"{prefix}.experts")

    def load_experts(self, reader, prefix: str) -> None:
        """Per-expert weights `{prefix}.{e}.{gate,up,down}_proj`."""
        gate_up: list[list[Weight]] = []
        down: list[Weight] = []
        for e in range(self.num_experts):
            gate_up.append([reader.linear(f"{prefix}.{e}.gate_proj", self.share),
                            reader.linear(f"{prefix}.{e}.up_proj", self.share)])
            down.append(reader.linear(f"{prefix}.{e}.down_proj", cols=self.share))
        self.experts = self.backend.prepare_experts(gate_up, down, dtype=reader.dtype)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor | None = None,
                expert_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H]; router_logits [T, E] from the model's own router, else from `gate(x)`."""
        return self.backend.tp.all_reduce(self.partial(x, router_logits, expert_scale))

    def partial(self, x: torch.Tensor, router_logits: torch.Tensor | None = None,
                expert_scale: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of the output (the whole output with one rank)."""
        logits = self.gate(x) if router_logits is None else router_logits
        return self.backend.moe(x, logits, self.experts, self.top_k, self.renormalize, activation=self.activation,
                                expert_scale=expert_scale)


class SharedExpertMoE(SparseMoE):
    """Qwen3.5-MoE / Qwen3-Next: routed experts plus one shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, backend: Backend, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, shared_intermediate_size: int, activation: str):
        super().__init__(backend, hidden_size, intermediate_size, num_experts, top_k, renormalize)
        from adaq.layers.mlp import GatedMLP

        self.shared_expert = GatedMLP(backend, hidden_size, shared_intermediate_size, activation, reduce=False)
        self.shared_expert_gate = Linear(backend, hidden_size, 1)

    def load(self, reader, prefix: str) -> None:
        super().load(reader, prefix)
        self.shared_expert.load(reader, f"{prefix}.shared_expert")
        self.shared_expert_gate.load(reader.linear(f"{prefix}.shared_expert_gate"), reader.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """routed + sigmoid(gate) * shared is linear in both partial sums: one all-reduce for the two."""
        mixed = self.backend.moe_shared(self.partial(x), self.shared_expert(x), self.shared_expert_gate(x))
        return self.backend.tp.all_reduce(mixed)
