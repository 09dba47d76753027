"""Token embedding (optionally scaled, as Gemma does) and the output layer that makes fp32 logits.

Tensor parallelism splits the vocabulary of both into shares of ceil(V / N) rows (the last rank's cut short): a
rank embeds the ids in its share and zeros elsewhere, and an all-reduce (a sum with one non-zero term: exact) makes
the embedding whole; the output layer computes its share of the logits and an all-gather joins them.
"""

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
        self.start, self.stop, _ = backend.tp.padded_split(vocab_size)

    def vocab_rows(self) -> tuple[int, int] | None:
        """This rank's rows of the embedding (and of the output layer); None: all of them."""
        return (self.start, self.stop) if self.backend.tp.sharded else None

    def load(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        if tuple(weight.shape) != (self.stop - self.start, self.hidden_size):
            from adaq.errors import CheckpointError

            whole = "" if self.vocab_rows() is None else f" (rows {self.start}..{self.stop} of {self.vocab_size})"
            raise CheckpointError(f"embedding of shape {tuple(weight.shape)} where "
                                  f"{(self.stop - self.start, self.hidden_size)} was expected{whole}")
        self.weight = weight.to(device=self.backend.device, dtype=dtype)
        if self.scale is not None:
            self.scale_tensor = torch.tensor(self.scale, dtype=dtype, device=self.backend.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.weight) if self.vocab_rows() is None else self._sharded(input_ids)
        if self.scale is None:
            return hidden
        return hidden * self.scale_tensor.to(hidden.dtype)

    def _sharded(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.start) & (input_ids < self.stop)
        local = (input_ids - self.start).clamp(0, max(self.stop - self.start - 1, 0))
        hidden = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.backend.tp.all_reduce(hidden)


class LMHead(nn.Module):
    """hidden [S, H] -> fp32 logits [S, V]: the GEMM in the compute dtype (as transformers), softcap in fp32."""

    def __init__(self, backend: Backend, hidden_size: int, vocab_size: int, softcap: float | None = None):
        super().__init__()
        self.tp = backend.tp
        self.vocab_size = vocab_size
        start, stop, self.share = self.tp.padded_split(vocab_size)
        self.linear = Linear(backend, hidden_size, stop - start)
        self.softcap = softcap

    def load(self, weight: Weight, dtype: torch.dtype) -> None:
        self.linear.load(weight, dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden).float()
        if self.tp.sharded:
            logits = self.tp.gather_columns(F.pad(logits, (0, self.share - logits.shape[-1])), self.vocab_size)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
