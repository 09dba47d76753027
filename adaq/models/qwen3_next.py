"""Qwen3-Next: Qwen3.5-MoE's hybrid decoder (adaq.models.qwen3_5) with the Gated DeltaNet input projections fused
per key-head group: `in_proj_qkvz` rows are, for each of the Hk groups, [q (Dk), k (Dk), v (r Dv), z (r Dv)] and
`in_proj_ba` rows [b (r), a (r)], r = Hv / Hk (transformers' `fix_query_key_value_ordering`). They are
de-interleaved once at load into Qwen3.5's q|k|v, z, b, a order (a row permutation: exact for NVFP4 too). Sparse
layers every `decoder_sparse_step` except `mlp_only_layers`, top-k renormalised when `norm_topk_prob`."""

import torch
from torch import nn

from adaq.backends.handles import select_rows
from adaq.layers.gated_delta import GatedDeltaNet
from adaq.layers.mlp import GatedMLP
from adaq.models.qwen3_5 import LINEAR_ATTENTION, Qwen3_5ForCausalLM, gated_delta_net, shared_expert_moe
from adaq.models.qwen3_moe import is_sparse_layer


def grouped_rows(num_groups: int, widths: list[int]) -> list[torch.Tensor]:
    """For rows laid out per group as consecutive parts of `widths`, the row indices of each part, all groups."""
    group = sum(widths)
    bases = torch.arange(num_groups)[:, None] * group
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [(bases + start + torch.arange(width)).flatten() for start, width in zip(starts, widths)]


class FusedGatedDeltaNet(GatedDeltaNet):
    def group_rows(self, rows_per_group: int) -> tuple[int, int] | None:
        """Tensor parallelism: this rank's key-head groups are consecutive rows of the interleaved projections."""
        return None if not self.sharded else (self.k_share[0] * rows_per_group, self.k_share[1] * rows_per_group)

    def load(self, reader, prefix: str) -> None:
        ratio = self.num_v_heads // self.num_k_heads
        q, k, v, z = grouped_rows(self.num_k_heads, [self.head_k_dim, self.head_k_dim, ratio * self.head_v_dim,
                                                     ratio * self.head_v_dim])
        b, a = grouped_rows(self.num_k_heads, [ratio, ratio])
        group = 2 * self.head_k_dim + 2 * ratio * self.head_v_dim  # rows per key-head group
        qkvz = reader.linear(f"{prefix}.in_proj_qkvz", self.group_rows(group))
        ba = reader.linear(f"{prefix}.in_proj_ba", self.group_rows(2 * ratio))
        weights = [select_rows(qkvz, torch.cat([q, k, v])), select_rows(qkvz, z), select_rows(ba, b),
                   select_rows(ba, a)]
        self.load_projections(weights, reader, prefix)


class Qwen3NextForCausalLM(Qwen3_5ForCausalLM):
    def make_mixer(self, layer_idx: int, rope) -> nn.Module:
        if self.config.layer_types[layer_idx] == LINEAR_ATTENTION:
            return gated_delta_net(self.config, self.backend, FusedGatedDeltaNet)
        return super().make_mixer(layer_idx, rope)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        config = self.config
        if not is_sparse_layer(config, layer_idx):
            return GatedMLP(self.backend, config.hidden_size, config.intermediate_size, config.hidden_act)
        return shared_expert_moe(config, self.backend, renormalize=bool(config.norm_topk_prob))
