"""The gated MLP of every supported model: down(act(gate(x)) * up(x)), gate and up fused when they can be.

Tensor parallelism: gate/up column-parallel and down row-parallel over the intermediate dimension, one all-reduce
(none with `reduce=False`: the caller sums this partial output with others first, as a shared expert does)."""

import torch
from torch import nn

from adaq.backends.interface import Backend
from adaq.backends.numerics.activation import activation_kind
from adaq.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, backend: Backend, hidden_size: int, intermediate_size: int, activation: str,
                 reduce: bool = True):
        super().__init__()
        self.backend = backend
        self.activation = activation_kind(activation)
        tp = backend.tp
        self.share = tp.split(intermediate_size, "the MLP's intermediate size") if tp.sharded else None
        local = intermediate_size // tp.size
        self.gate_up_proj = Linear(backend, hidden_size, [local, local], role="gate_up_proj")
        self.down_proj = Linear(backend, local, hidden_size, role="down_proj", reduce=reduce)

    def load(self, reader, prefix: str) -> None:
        share = self.share
        self.gate_up_proj.load([reader.linear(f"{prefix}.gate_proj", share), reader.linear(f"{prefix}.up_proj", share)],
                               reader.dtype)
        self.down_proj.load(reader.linear(f"{prefix}.down_proj", cols=share), reader.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.activation == "silu":
            return self.down_proj(self.backend.silu_and_mul(gate_up))
        return self.down_proj(self.backend.gelu_tanh_and_mul(gate_up))
