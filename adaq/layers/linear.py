"""Linear layers: NVFP4 or dense weights behind a backend handle."""

import torch
from torch import nn

from adaq.backends.interface import Backend
from adaq.backends.handles import Weight, can_fuse, check_shapes, fuse


class Linear(nn.Module):
    """y = x W^T (+ b) through the backend, for one weight or several stacked along N (q/k/v, gate/up).

    Stacked weights become one handle (one GEMM) when `can_fuse` allows, else one handle each and the outputs
    are concatenated. Weights arrive at load time; the module holds no parameters before.

    Tensor parallelism (`backend.tp`): the sizes given are this rank's. A column-parallel Linear holds a share of the
    output features and needs nothing more; a row-parallel one (`reduce=True`) holds a share of the input features,
    so its output is a partial sum that one all-reduce completes (its bias is added once, after the sum).
    `reduce=False` leaves the partial sum to a caller that sums several before reducing once (an MoE).
    """

    def __init__(self, backend: Backend, in_features: int, out_sizes: int | list[int], role: str | None = None,
                 reduce: bool = False):
        super().__init__()
        self.backend = backend
        self.role = role  # the projection's name (qkv_proj, down_proj, ...): backends may treat roles differently
        self.reduce = reduce and backend.tp.sharded
        self.in_features = in_features
        self.out_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        self.out_features = sum(self.out_sizes)
        self.handles: list = []
        self.biases: list[torch.Tensor | None] = []

    @property
    def fused(self) -> bool:
        return len(self.handles) == 1

    def load(self, weights: Weight | list[Weight], dtype: torch.dtype,
             biases: list[torch.Tensor | None] | None = None) -> None:
        weights = weights if isinstance(weights, list) else [weights]
        biases = biases or [None] * len(weights)
        check_shapes(weights, self.in_features, self.out_sizes)
        if can_fuse(weights):
            weights = [fuse(weights)]
            biases = [None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(n) if b is None else b.float() for b, n in zip(biases, self.out_sizes)])]
        self.handles = [self.backend.prepare_linear(w, dtype=dtype, role=self.role) for w in weights]
        self.biases = [None if b is None else b.to(device=self.backend.device, dtype=dtype) for b in biases]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce:
            return self._reduced(x)
        outputs = [self.backend.linear(x, h, b) for h, b in zip(self.handles, self.biases)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def _reduced(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.backend.linear(x, h) for h in self.handles]
        out = self.backend.tp.all_reduce(outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1))
        if any(b is not None for b in self.biases):
            out = out + torch.cat([torch.zeros(n, dtype=out.dtype, device=out.device) if b is None else b
                                   for b, n in zip(self.biases, self.out_sizes)])
        return out


