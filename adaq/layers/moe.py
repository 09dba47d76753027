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

from adaq.backends.handles import ExpertsHandle, Weight, weight_shape
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
        gate_up, down = self.read_experts(reader, prefix)
        self.experts = self.backend.prepare_experts(gate_up, down, dtype=reader.dtype)

    def read_experts(self, reader, prefix: str) -> tuple[list[list[Weight]], list[Weight]]:
        gate_up: list[list[Weight]] = []
        down: list[Weight] = []
        for e in range(self.num_experts):
            pair, down_weight = self.read_mlp(reader, f"{prefix}.{e}")
            gate_up.append(pair)
            down.append(down_weight)
        return gate_up, down

    def read_mlp(self, reader, prefix: str) -> tuple[list[Weight], Weight]:
        """`{prefix}.{gate,up}_proj` split by this rank's share of the intermediate size, `down_proj` likewise."""
        return ([reader.linear(f"{prefix}.gate_proj", self.share), reader.linear(f"{prefix}.up_proj", self.share)],
                reader.linear(f"{prefix}.down_proj", cols=self.share))

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
    """Qwen3.5-MoE / Qwen3-Next: routed experts plus one shared expert scaled by sigmoid(shared_expert_gate(x)).

    When the shared expert has the routed experts' width, activation and weight kind, and the router and its gate
    are dense, the shared expert is loaded as expert E of the stacked experts and shared_expert_gate as row E of the
    router (`self.gate` then has E + 1 outputs): the backend's MoE runs it as one more slot of every token
    (adaq.backends.numerics.moe.moe_shared_reference; the cuda backend's decode MoE stays at three launches). Else
    it keeps its own MLP and gate (`shared_expert`, `shared_expert_gate`), and `moe_shared` adds it."""

    def __init__(self, backend: Backend, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, shared_intermediate_size: int, activation: str):
        super().__init__(backend, hidden_size, intermediate_size, num_experts, top_k, renormalize)
        from adaq.layers.mlp import GatedMLP

        self.shared_activation = activation_kind(activation)
        self.shared_expert = GatedMLP(backend, hidden_size, shared_intermediate_size, activation, reduce=False)
        self.shared_expert_gate = Linear(backend, hidden_size, 1)
        self.shared_in_experts = False

    def load(self, reader, prefix: str) -> None:
        router = reader.linear(f"{prefix}.gate")
        shared_gate = reader.linear(f"{prefix}.shared_expert_gate")
        gate_up, down = self.read_experts(reader, f"{prefix}.experts")
        shared_pair, shared_down = self.read_mlp(reader, f"{prefix}.shared_expert")
        if self._joins_experts(router, shared_gate, gate_up[0] + [down[0]], shared_pair + [shared_down]):
            self.gate = Linear(self.backend, self.hidden_size, [self.num_experts, 1])
            self.gate.load([router, shared_gate], reader.dtype)
            self.experts = self.backend.prepare_experts(gate_up + [shared_pair], down + [shared_down],
                                                        dtype=reader.dtype)
            self.shared_expert = self.shared_expert_gate = None
            self.shared_in_experts = True
            return
        self.gate.load(router, reader.dtype)
        self.experts = self.backend.prepare_experts(gate_up, down, dtype=reader.dtype)
        self.shared_expert.load(reader, f"{prefix}.shared_expert")
        self.shared_expert_gate.load(shared_gate, reader.dtype)

    def _joins_experts(self, router: Weight, shared_gate: Weight, expert: list[Weight], shared: list[Weight]) -> bool:
        dense = isinstance(router, torch.Tensor) and isinstance(shared_gate, torch.Tensor)
        return dense and self.shared_activation == self.activation and all(map(_same_kind, expert, shared))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """routed + sigmoid(gate) * shared is linear in both partial sums: one all-reduce for the two."""
        if self.shared_in_experts:
            mixed = self.backend.moe(x, self.gate(x), self.experts, self.top_k, self.renormalize,
                                     activation=self.activation, shared_expert=True)
        else:
            mixed = self.backend.moe_shared(self.partial(x), self.shared_expert(x), self.shared_expert_gate(x))
        return self.backend.tp.all_reduce(mixed)


def _same_kind(a: Weight, b: Weight) -> bool:
    """Whether b can sit beside a in one stacked expert layout: same shape, same format (W4A4 or not)."""
    activations = getattr(a, "input_global_scale", None) is None, getattr(b, "input_global_scale", None) is None
    return type(a) is type(b) and weight_shape(a) == weight_shape(b) and activations[0] == activations[1]
