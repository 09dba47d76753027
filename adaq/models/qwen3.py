"""Qwen3 dense: GQA with per-head q/k RMSNorm before RoPE, SiLU gated MLP, optionally tied embeddings."""

import torch
from torch import nn

from adaq.layers.attention import SelfAttention
from adaq.layers.embedding import Embedding, LMHead
from adaq.layers.mlp import GatedMLP
from adaq.layers.norm import RMSNorm
from adaq.layers.rotary import RopeTables
from adaq.models.base import CausalLM, WeightReader


def sliding_window_of(config, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_idx] == "sliding_attention":
        return config.sliding_window
    return None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config, backend, layer_idx: int, mlp: nn.Module, rope: RopeTables):
        super().__init__()
        head_dim = head_dim_of(config)
        inv_freq, attention_factor = rope(head_dim)
        self.input_layernorm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(
            backend, config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
            inv_freq, config.rms_norm_eps, head_dim ** -0.5 * attention_factor ** 2,
            sliding_window=sliding_window_of(config, layer_idx))
        self.post_attention_layernorm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def load(self, reader: WeightReader, prefix: str) -> None:
        self.input_layernorm.load(reader.tensor(f"{prefix}.input_layernorm.weight"), reader.dtype)
        self.self_attn.load(reader, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(reader.tensor(f"{prefix}.post_attention_layernorm.weight"), reader.dtype)
        self.mlp.load(reader, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, config, backend, dtype: torch.dtype):
        super().__init__(config, backend, dtype)
        self.embed_tokens = Embedding(backend, config.vocab_size, config.hidden_size)
        rope = RopeTables(config, backend.device)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, backend, i, self.make_mlp(i), rope) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps)
        self.lm_head = LMHead(backend, config.hidden_size, config.vocab_size)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return GatedMLP(self.backend, self.config.hidden_size, self.config.intermediate_size, self.config.hidden_act)

    def load(self, reader: WeightReader) -> None:
        prefix = reader.decoder_prefix()
        self.embed_tokens.load(reader.tensor(f"{prefix}.embed_tokens.weight"), reader.dtype)
        for i, layer in enumerate(self.layers):
            layer.load(reader, f"{prefix}.layers.{i}")
            reader.layer_loaded(i + 1, len(self.layers))
        self.norm.load(reader.tensor(f"{prefix}.norm.weight"), reader.dtype)
        tied = getattr(self.config, "tie_word_embeddings", False)
        self.lm_head.load(self.embed_tokens.weight if tied else reader.linear("lm_head"), reader.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        positions = positions.clone()  # a new object per forward: the backend memoises RoPE tables by identity
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)
