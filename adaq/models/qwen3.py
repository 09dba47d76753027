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

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, this layer's MLP output): the caller's next norm adds the two (fused add + norm)."""
        hidden, normed = self.input_layernorm.add(hidden, delta)
        hidden, normed = self.post_attention_layernorm.add(hidden, self.self_attn(positions, normed))
        return hidden, self.mlp(normed)


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
