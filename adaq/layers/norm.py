"""RMSNorm, in the two flavours the supported models use."""

import torch
from torch import nn

from adaq.backends.interface import Backend


class RMSNorm(nn.Module):
    def __init__(self, backend: Backend, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.backend = backend
        self.dim = dim
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight: torch.Tensor | None = None

    def load(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        if tuple(weight.shape) != (self.dim,):
            from adaq.errors import CheckpointError

            raise CheckpointError(f"norm weight of shape {tuple(weight.shape)} where ({self.dim},) was expected")
        self.weight = weight.to(device=self.backend.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.rms_norm(x, self.weight, self.eps, unit_offset=self.unit_offset)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)), fused where the backend can; no delta: (x, norm(x))."""
        if delta is None:
            return x, self(x)
        return self.backend.add_rms_norm(x, delta, self.weight, self.eps, unit_offset=self.unit_offset)
