"""Gemma3 text: local sliding-window and global layers (`layer_types`), a RoPE base per layer type, (1 + w)
RMSNorm everywhere (q/k norms too), norms before and after attention and MLP, gelu-tanh MLP, embedding scaled by
sqrt(hidden) in the model dtype, tied output layer, attention scale query_pre_attn_scalar^-0.5, final logit softcap when set.
`attn_logit_softcapping` is ignored, as transformers' Gemma3 ignores it (every released Gemma3 sets it null)."""

import torch
from torch import nn

from adaq.layers.attention import SelfAttention
from adaq.layers.embedding import Embedding, LMHead
from adaq.layers.mlp import GatedMLP
from adaq.layers.norm import RMSNorm
from adaq.layers.rotary import RopeTables
from adaq.models.base import CausalLM, WeightReader
from adaq.models.qwen3 import head_dim_of, sliding_window_of

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, backend, layer_idx: int, rope: RopeTables):
        super().__init__()
        head_dim = head_dim_of(config)
        eps = config.rms_norm_eps
        inv_freq, attention_factor = rope(head_dim, config.layer_types[layer_idx])
        for name in NORMS:
            setattr(self, name, RMSNorm(backend, config.hidden_size, eps, unit_offset=True))
        self.self_attn = SelfAttention(
            backend, config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
            inv_freq, eps, config.query_pre_attn_scalar ** -0.5 * attention_factor ** 2,
            unit_offset_norm=True, sliding_window=sliding_window_of(config, layer_idx))
        self.mlp = GatedMLP(backend, config.hidden_size, config.intermediate_size, config.hidden_activation)

    def load(self, reader: WeightReader, prefix: str) -> None:
        for name in NORMS:
            getattr(self, name).load(reader.tensor(f"{prefix}.{name}.weight"), reader.dtype)
        self.self_attn.load(reader, f"{prefix}.self_attn")
        self.mlp.load(reader, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, this layer's normed MLP output): the caller's next norm adds the two (fused add + norm)."""
        hidden, normed = self.input_layernorm.add(hidden, delta)
        attn = self.self_attn(positions, normed)
        hidden, normed = self.pre_feedforward_layernorm.add(hidden, self.post_attention_layernorm(attn))
        return hidden, self.post_feedforward_layernorm(self.mlp(normed))


class Gemma3ForCausalLM(CausalLM):
    tie_word_embeddings_default = True

    def __init__(self, config, backend, dtype: torch.dtype):
        super().__init__(config, backend, dtype)
        self.embed_tokens = Embedding(backend, config.vocab_size, config.hidden_size,
                                      scale=config.hidden_size ** 0.5)
        rope = RopeTables(config, backend.device)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, backend, i, rope) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.lm_head = LMHead(backend, config.hidden_size, config.vocab_size, config.final_logit_softcapping)
