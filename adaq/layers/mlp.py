"""The gated MLP of every supported model: down(act(gate(x)) * up(x)), gate and up fused when they can be."""

import torch
from torch import nn

from adaq.backends.interface import Backend
from adaq.backends.numerics.activation import activation_kind
from adaq.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, backend: Backend, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.backend = backend
        self.activation = activation_kind(activation)
        self.gate_up_proj = Linear(backend, hidden_size, [intermediate_size, intermediate_size], role="gate_up_proj")
        self.down_proj = Linear(backend, intermediate_size, hidden_size, role="down_proj")

    def load(self, reader, prefix: str) -> None:
        self.gate_up_proj.load([reader.linear(f"{prefix}.gate_proj"), reader.linear(f"{prefix}.up_proj")],
                               reader.dtype)
        self.down_proj.load(reader.linear(f"{prefix}.down_proj"), reader.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.activation == "silu":
            return self.down_proj(self.backend.silu_and_mul(gate_up))
        return self.down_proj(self.backend.gelu_tanh_and_mul(gate_up))
