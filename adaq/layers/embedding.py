"""Token embedding (optionally scaled, as Gemma does) and the output layer that makes fp32 logits."""

import torch
import torch.nn.functional as F
from torch import nn

from adaq.backends.interface import Backend
from adaq.backends.handles import Weight
from adaq.layers.linear import Linear


class Embedding(nn.Module):
    def __init__(self, backend: Backend, vocab_size: int, hidden_size: int, scale: float | None = None):
        super().__init__()
        self.backend = backend
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.scale = scale  # Gemma: sqrt(hidden), rounded to the model dtype before the multiply
        self.weight: torch.Tensor | None = None
        self.scale_tensor: torch.Tensor | None = None  # made at load: a CUDA-graph capture cannot copy it from the host

    def load(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
            from adaq.errors import CheckpointError

            raise CheckpointError(f"embedding of shape {tuple(weight.shape)} where "
                                  f"{(self.vocab_size, self.hidden_size)} was expected")
        self.weight = weight.to(device=self.backend.device, dtype=dtype)
        if self.scale is not None:
            self.scale_tensor = torch.tensor(self.scale, dtype=dtype, device=self.backend.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.weight)
        if self.scale is None:
            return hidden
        return hidden * self.scale_tensor.to(hidden.dtype)


class LMHead(nn.Module):
    """hidden [S, H] -> fp32 logits [S, V]: the GEMM in the compute dtype (as transformers), softcap in fp32."""

    def __init__(self, backend: Backend, hidden_size: int, vocab_size: int, softcap: float | None = None):
        super().__init__()
        self.linear = Linear(backend, hidden_size, vocab_size)
        self.softcap = softcap

    def load(self, weight: Weight, dtype: torch.dtype) -> None:
        self.linear.load(weight, dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
