"""Gemma 4 text, dense (31B style) and MoE (26B-A4B style), as transformers 5.17's Gemma4TextModel computes it.

- Sliding and global layers (`layer_types`); each layer's head_dim and KV-head count from `per_layer_config` (global
  layers: `global_head_dim`, `num_global_key_value_heads`); RoPE per layer type (global: "proportional", partial).
- Attention: q_norm, k_norm, a scale-free v_norm, scaling 1.0; `attention_k_eq_v` global layers have no v_proj
  (the key projection is the value, before k_norm and RoPE).
- RMSNorms multiply by w (not Gemma 3's 1 + w). transformers multiplies in fp32 and rounds once; adaq's plain
  RMSNorm rounds the normed value first, as for Qwen3 (at most one bf16 ulp apart; identical in fp32).
- Each layer ends by scaling the whole residual stream by its `layer_scalar`.
- MoE layers run the dense MLP and the experts side by side: the router reads the residual stream (scale-free norm,
  times `scale` and hidden^-0.5), softmax, top-k, renormalised, times `per_expert_scale`; experts read
  pre_feedforward_layernorm_2 of the residual stream; each branch has its own post-norm and the sum goes through
  post_feedforward_layernorm.
- Embedding scaled by sqrt(hidden) in the model dtype, tied output layer, final logit soft-capping.
Refused: per-layer inputs (E2B/E4B: `hidden_size_per_layer_input` > 0), KV shared across layers, bidirectional
attention over all tokens.
"""

import torch
from torch import nn

from adaq.errors import UnsupportedArchitecture
from adaq.layers.attention import SelfAttention
from adaq.layers.embedding import Embedding, LMHead
from adaq.layers.linear import Linear
from adaq.layers.mlp import GatedMLP
from adaq.layers.moe import SparseMoE
from adaq.layers.norm import RMSNorm
from adaq.layers.rotary import RopeTables
from adaq.models.base import CausalLM, WeightReader
from adaq.models.qwen3 import sliding_window_of

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
MOE_NORMS = ("post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")


def check_supported(config) -> None:
    if getattr(config, "hidden_size_per_layer_input", 0):
        raise UnsupportedArchitecture("Gemma 4 with per-layer inputs (E2B/E4B: hidden_size_per_layer_input > 0) "
                                      "is not supported")
    if getattr(config, "num_kv_shared_layers", 0):
        raise UnsupportedArchitecture("Gemma 4 with KV shared across layers (num_kv_shared_layers > 0) is not "
                                      "supported")
    if getattr(config, "use_bidirectional_attention", None) == "all":
        raise UnsupportedArchitecture("Gemma 4 with use_bidirectional_attention='all' is not supported")


class Gemma4Router(nn.Module):
    """Router logits [T, E] from the residual stream: scale-free RMSNorm, times `scale` and hidden^-0.5, then proj
    (rounded to the model dtype after each multiply, as transformers)."""

    def __init__(self, config, backend):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.norm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps)
        self.proj = Linear(backend, config.hidden_size, config.num_experts)
        self.scale: torch.Tensor | None = None
        self.per_expert_scale: torch.Tensor | None = None

    def load(self, reader: WeightReader, prefix: str) -> None:
        device = self.norm.backend.device
        self.norm.load(torch.ones(self.hidden_size), reader.dtype)
        self.proj.load(reader.linear(f"{prefix}.proj"), reader.dtype)
        self.scale = reader.tensor(f"{prefix}.scale").to(device=device, dtype=reader.dtype)
        self.per_expert_scale = reader.tensor(f"{prefix}.per_expert_scale").to(device=device, dtype=reader.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden) * self.scale * self.hidden_size ** -0.5)


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, config, backend, layer_idx: int, rope: RopeTables):
        super().__init__()
        layer = config.per_layer_config[layer_idx]
        layer_type = config.layer_types[layer_idx]
        eps = config.rms_norm_eps
        inv_freq, attention_factor = rope(layer.head_dim, layer_type)
        for name in NORMS:
            setattr(self, name, RMSNorm(backend, config.hidden_size, eps))
        self.self_attn = SelfAttention(
            backend, config.hidden_size, config.num_attention_heads, layer.num_key_value_heads, layer.head_dim,
            inv_freq, eps, attention_factor ** 2, sliding_window=sliding_window_of(config, layer_idx),
            value_from_key=bool(config.attention_k_eq_v) and layer_type != "sliding_attention", value_norm=True)
        self.mlp = GatedMLP(backend, config.hidden_size, config.intermediate_size, config.hidden_activation)
        self.moe = bool(config.enable_moe_block)
        if self.moe:
            self.router = Gemma4Router(config, backend)
            self.experts = SparseMoE(backend, config.hidden_size, config.moe_intermediate_size, config.num_experts,
                                     config.top_k_experts, renormalize=True, activation=config.hidden_activation,
                                     router=False)
            for name in MOE_NORMS:
                setattr(self, name, RMSNorm(backend, config.hidden_size, eps))
        self.layer_scalar: torch.Tensor | None = None

    def norm_names(self) -> tuple[str, ...]:
        return NORMS + (MOE_NORMS if self.moe else ())

    def load(self, reader: WeightReader, prefix: str) -> None:
        for name in self.norm_names():
            getattr(self, name).load(reader.tensor(f"{prefix}.{name}.weight"), reader.dtype)
        self.self_attn.load(reader, f"{prefix}.self_attn")
        self.mlp.load(reader, f"{prefix}.mlp")
        if self.moe:
            self.router.load(reader, f"{prefix}.router")
            self.experts.load_experts(reader, f"{prefix}.experts")
        scalar = reader.tensor(f"{prefix}.layer_scalar")
        self.layer_scalar = scalar.to(device=self.mlp.backend.device, dtype=reader.dtype)

    def feed_forward(self, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        out = self.mlp(normed)
        if not self.moe:
            return out
        logits = self.router(residual)
        routed = self.experts(self.pre_feedforward_layernorm_2(residual), logits, self.router.per_expert_scale)
        return self.post_feedforward_layernorm_1(out) + self.post_feedforward_layernorm_2(routed)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                delta: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """(the scaled residual stream, None): layer_scalar scales the whole sum, so no delta is left over."""
        hidden, normed = self.input_layernorm.add(hidden, delta)
        attn = self.self_attn(positions, normed)
        hidden, normed = self.pre_feedforward_layernorm.add(hidden, self.post_attention_layernorm(attn))
        hidden = hidden + self.post_feedforward_layernorm(self.feed_forward(hidden, normed))
        return hidden * self.layer_scalar, None


class Gemma4ForCausalLM(CausalLM):
    tie_word_embeddings_default = True

    def __init__(self, config, backend, dtype: torch.dtype):
        check_supported(config)
        super().__init__(config, backend, dtype)
        self.embed_tokens = Embedding(backend, config.vocab_size, config.hidden_size,
                                      scale=config.hidden_size ** 0.5)
        rope = RopeTables(config, backend.device)
        self.layers = nn.ModuleList(
            Gemma4DecoderLayer(config, backend, i, rope) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps)
        self.lm_head = LMHead(backend, config.hidden_size, config.vocab_size, config.final_logit_softcapping)


class Gemma4ForConditionalGeneration(Gemma4ForCausalLM):
    """The multimodal packaging (weights under model.language_model.*): its text model only (build_model's notice
    says the towers are ignored)."""
