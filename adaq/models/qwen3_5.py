"""Qwen3.5 (dense) and Qwen3.5-MoE: hybrid decoders whose `layer_types` mix Gated DeltaNet linear attention
(`linear_attention`, a per-sequence state instead of a KV cache) and gated full attention (`full_attention`:
output gate, partial RoPE, (1 + w) q/k norms); (1 + w) RMSNorm everywhere else. MoE layers add a shared expert
gated by sigmoid(shared_expert_gate(x)). Vision-language checkpoints run their text model; `mtp.*` weights
(multi-token prediction) are never read."""

import torch
from torch import nn

from adaq.layers.attention import GatedSelfAttention
from adaq.layers.embedding import Embedding, LMHead
from adaq.layers.gated_delta import GatedDeltaNet
from adaq.layers.mlp import GatedMLP
from adaq.layers.moe import SharedExpertMoE
from adaq.layers.norm import RMSNorm
from adaq.layers.rotary import RopeTables
from adaq.models.base import CausalLM, WeightReader
from adaq.models.qwen3 import head_dim_of

LINEAR_ATTENTION = "linear_attention"  # the other layer type is "full_attention"


def rotary_dim_of(config, head_dim: int) -> int:
    factor = config.rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * (factor or 1.0))


def gated_delta_net(config, backend, layer_class: type = GatedDeltaNet) -> GatedDeltaNet:
    return layer_class(backend, config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads,
                       config.linear_key_head_dim, config.linear_value_head_dim, config.linear_conv_kernel_dim,
                       config.rms_norm_eps)


def gated_attention(config, backend, rope: RopeTables) -> GatedSelfAttention:
    head_dim = head_dim_of(config)
    inv_freq, attention_factor = rope(rotary_dim_of(config, head_dim))
    return GatedSelfAttention(backend, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                              head_dim, inv_freq, config.rms_norm_eps, head_dim ** -0.5 * attention_factor ** 2)


class HybridDecoderLayer(nn.Module):
    """One token mixer (Gated DeltaNet or gated attention), then the MLP, with (1 + w) pre-norms."""

    def __init__(self, config, backend, layer_idx: int, mixer: nn.Module, mlp: nn.Module):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps, unit_offset=True)
        setattr(self, self.mixer_name, mixer)
        self.post_attention_layernorm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.mlp = mlp

    @property
    def mixer_name(self) -> str:
        return "linear_attn" if self.layer_type == LINEAR_ATTENTION else "self_attn"

    def load(self, reader: WeightReader, prefix: str) -> None:
        self.input_layernorm.load(reader.tensor(f"{prefix}.input_layernorm.weight"), reader.dtype)
        getattr(self, self.mixer_name).load(reader, f"{prefix}.{self.mixer_name}")
        self.post_attention_layernorm.load(reader.tensor(f"{prefix}.post_attention_layernorm.weight"), reader.dtype)
        self.mlp.load(reader, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, this layer's MLP output): the caller's next norm adds the two (fused add + norm)."""
        hidden, normed = self.input_layernorm.add(hidden, delta)
        mixed = getattr(self, self.mixer_name)(positions, normed)
        hidden, normed = self.post_attention_layernorm.add(hidden, mixed)
        return hidden, self.mlp(normed)


class Qwen3_5ForCausalLM(CausalLM):
    def __init__(self, config, backend, dtype: torch.dtype):
        super().__init__(config, backend, dtype)
        self.embed_tokens = Embedding(backend, config.vocab_size, config.hidden_size)
        rope = RopeTables(config, backend.device)
        self.layers = nn.ModuleList(
            HybridDecoderLayer(config, backend, i, self.make_mixer(i, rope), self.make_mlp(i))
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(backend, config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.lm_head = LMHead(backend, config.hidden_size, config.vocab_size)

    def make_mixer(self, layer_idx: int, rope: RopeTables) -> nn.Module:
        if self.config.layer_types[layer_idx] == LINEAR_ATTENTION:
            return gated_delta_net(self.config, self.backend)
        return gated_attention(self.config, self.backend, rope)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return GatedMLP(self.backend, self.config.hidden_size, self.config.intermediate_size, self.config.hidden_act)

    def state_layers(self) -> list[GatedDeltaNet]:
        """The layers that keep a per-sequence state (the engine's state cache attaches to them), in order."""
        return [module for module in self.modules() if isinstance(module, GatedDeltaNet)]


def shared_expert_moe(config, backend, renormalize: bool) -> SharedExpertMoE:
    return SharedExpertMoE(backend, config.hidden_size, config.moe_intermediate_size, config.num_experts,
                           config.num_experts_per_tok, renormalize, config.shared_expert_intermediate_size,
                           config.hidden_act)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """Every layer's MLP is sparse; routing always renormalises its top-k weights (transformers' router)."""

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return shared_expert_moe(self.config, self.backend, renormalize=True)
