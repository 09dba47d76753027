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
from adaq.formats import fp8_prefill, nvfp4
from adaq.formats.fp8_prefill import FP8Weight
from adaq.formats.nvfp4 import NVFP4Weight
from adaq.layers.linear import Linear

# How a dense output layer runs (--lm-head): as stored (bf16, what llm-compressor writes), or quantized at load.
LM_HEAD_FORMATS = ("bf16", "fp8", "nvfp4")
QUANTIZE_ROWS = 16384  # rows quantized at a time: the fp32 temporaries of a 150k x 4k vocabulary stay small


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
        self.linear = Linear(backend, hidden_size, stop - start, role="lm_head")
        self.softcap = softcap
        self.weight_format = "bf16"  # LM_HEAD_FORMATS; set by build_model before load

    def load(self, weight: Weight, dtype: torch.dtype) -> None:
        """A dense weight (a tied embedding included: the embedding keeps its own copy) is quantized here when
        `weight_format` asks; a checkpoint's quantized lm_head runs as stored."""
        if isinstance(weight, torch.Tensor) and self.weight_format != "bf16":
            weight = quantize_output_layer(weight.to(self.linear.backend.device), self.weight_format)
        self.linear.load(weight, dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden).float()
        if self.tp.sharded:
            logits = self.tp.gather_columns(F.pad(logits, (0, self.share - logits.shape[-1])), self.vocab_size)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def quantize_output_layer(weight: torch.Tensor, weight_format: str) -> NVFP4Weight | FP8Weight:
    """RTN NVFP4 (one global scale from the whole tensor, adaq.formats.nvfp4.quantize) or E4M3 per output channel
    (adaq.formats.fp8_prefill.quantize_per_channel), computed a slab of rows at a time."""
    from adaq.errors import AdaqError

    if weight.shape[1] % nvfp4.GROUP_SIZE:
        raise AdaqError(f"--lm-head {weight_format} needs the hidden size to be a multiple of {nvfp4.GROUP_SIZE}, "
                        f"got {weight.shape[1]}")
    slabs = weight.split(QUANTIZE_ROWS)
    if weight_format == "fp8":
        parts = [fp8_prefill.quantize_per_channel(slab) for slab in slabs]
        return FP8Weight(torch.cat([p.values for p in parts]), torch.cat([p.col_scale for p in parts]))
    if weight_format != "nvfp4":
        raise AdaqError(f"invalid --lm-head {weight_format}: choose one of {', '.join(LM_HEAD_FORMATS)}")
    global_scale = nvfp4.global_scale_from_amax(nvfp4.tensor_amax(weight))
    parts = [nvfp4.quantize(slab, global_scale) for slab in slabs]
    return NVFP4Weight(torch.cat([p.packed for p in parts]), torch.cat([p.block_scale for p in parts]), global_scale)
