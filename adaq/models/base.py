"""What every model shares: the CausalLM interface the engine drives, and the reader that feeds weights in."""

from collections.abc import Callable

import torch
from torch import nn

from adaq.errors import CheckpointError
from adaq.formats.architectures import DECODER_PREFIXES
from adaq.formats.nvfp4 import NVFP4Weight
from adaq.formats.shards import Cols, Rows, rows_of, slice_nvfp4, slice_tensor
from adaq.layers.attention import PagedAttention
from adaq.backends.handles import Weight


class WeightReader:
    """Reads a checkpoint (or any source with its methods) by module prefix, in the model's compute dtype."""

    def __init__(self, source, dtype: torch.dtype, progress: Callable[[int, int], None] | None = None):
        self.source = source
        self.dtype = dtype
        self.progress = progress  # called with (layers loaded, layers in all) after each decoder layer
        self.quantized = set(source.quantized_prefixes())
        self.names = set(source.tensor_names())
        self.where = getattr(source, "path", "checkpoint")

    def linear(self, prefix: str, rows: Rows = None, cols: Cols = None) -> Weight:
        """The weight of Linear `prefix`, or (tensor parallelism) its `rows` (output features) and `cols` (input
        features) only."""
        if prefix in self.quantized:
            return self._read(self.source.nvfp4, prefix, rows, cols)
        return self.tensor(f"{prefix}.weight", rows, cols)

    def bias(self, prefix: str, rows: Rows = None) -> torch.Tensor | None:
        name = f"{prefix}.bias"
        return self._read(self.source.tensor, name, rows, None) if name in self.names else None

    def tensor(self, name: str, rows: Rows = None, cols: Cols = None) -> torch.Tensor:
        if name not in self.names:
            raise CheckpointError(f"{self.where}: tensor {name} is missing")
        return self._read(self.source.tensor, name, rows, cols)

    def _read(self, read, key: str, rows: Rows, cols: Cols):
        """A checkpoint reads only the part asked for; a source that cannot (random synthetic weights, made in
        memory anyway) gives the whole tensor and the part is cut from it."""
        rows = rows_of(rows)
        if rows is None and cols is None:
            return read(key)
        if getattr(self.source, "reads_slices", False):
            return read(key, rows=rows, cols=cols)
        whole = read(key)
        if isinstance(whole, NVFP4Weight):
            return slice_nvfp4(whole, rows, cols, key)
        return slice_tensor(whole, rows, cols)

    def layer_loaded(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def decoder_prefix(self) -> str:
        for prefix in DECODER_PREFIXES:
            if f"{prefix}embed_tokens.weight" in self.names:
                return prefix.removesuffix(".")
        raise CheckpointError(f"{self.where}: no embed_tokens.weight under {', '.join(DECODER_PREFIXES)}")


class CausalLM(nn.Module):
    """forward(input_ids [T], positions [T]) -> hidden [T, H] over the packed tokens of a step (the step context
    tells attention where each sequence starts and which cache slots it owns); compute_logits(hidden [S, H]) ->
    fp32 [S, V]."""

    def __init__(self, config, backend, dtype: torch.dtype):
        super().__init__()
        self.config = config  # the transformers config object (text config for multimodal checkpoints)
        self.backend = backend
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.config.max_position_embeddings

    def attention_layers(self) -> list[PagedAttention]:
        """One per decoder layer, in order: the runner sets their k_cache/v_cache (and FP8 scales)."""
        return [module for module in self.modules() if isinstance(module, PagedAttention)]

    tie_word_embeddings_default = False  # what the architecture assumes when config.json does not say

    def load(self, reader: WeightReader) -> None:
        prefix = reader.decoder_prefix()
        vocab_rows = self.embed_tokens.vocab_rows()
        self.embed_tokens.load(reader.tensor(f"{prefix}.embed_tokens.weight", vocab_rows), reader.dtype)
        for i, layer in enumerate(self.layers):
            layer.load(reader, f"{prefix}.layers.{i}")
            reader.layer_loaded(i + 1, len(self.layers))
        self.norm.load(reader.tensor(f"{prefix}.norm.weight"), reader.dtype)
        tied = getattr(self.config, "tie_word_embeddings", self.tie_word_embeddings_default)
        self.lm_head.load(self.embed_tokens.weight if tied else reader.linear("lm_head", vocab_rows), reader.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        positions = positions.clone()  # a new object per forward: the backend memoises RoPE tables by identity
        delta = None
        for layer in self.layers:
            hidden, delta = layer(positions, hidden, delta)
        return self.norm.add(hidden, delta)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
