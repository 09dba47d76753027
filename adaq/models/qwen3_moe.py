"""Qwen3-MoE: Qwen3's attention with sparse expert MLPs (every `decoder_sparse_step`-th layer, except
`mlp_only_layers`), top-k routing with optional renormalisation (`norm_topk_prob`)."""

from torch import nn

from adaq.layers.mlp import GatedMLP
from adaq.layers.moe import SparseMoE
from adaq.models.qwen3 import Qwen3ForCausalLM


def num_experts_of(config) -> int:
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)


def is_sparse_layer(config, layer_idx: int) -> bool:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only_mlp = getattr(config, "mlp_only_layers", None) or []
    return layer_idx not in only_mlp and num_experts_of(config) > 0 and (layer_idx + 1) % step == 0


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, layer_idx: int) -> nn.Module:
        config = self.config
        if not is_sparse_layer(config, layer_idx):
            return GatedMLP(self.backend, config.hidden_size, config.intermediate_size, config.hidden_act)
        return SparseMoE(self.backend, config.hidden_size, config.moe_intermediate_size, num_experts_of(config),
                         config.num_experts_per_tok, bool(config.norm_topk_prob))
