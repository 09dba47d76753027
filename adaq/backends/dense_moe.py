"""bf16 experts on the GPU (the bf16 engine's MoE, the baseline NVFP4 is measured against): the router of
adaq.backends.numerics.moe, then two grouped GEMMs over expert-sorted slots (adaq.kernels.moe_bf16) with the
gated activation between them, and the top-k outputs summed per token. Same semantics as
`moe_numerics.moe_reference` / `moe_shared_reference` up to the order of the bf16 sums."""

from dataclasses import dataclass

import torch

from adaq.backends.numerics import moe as moe_numerics
from adaq.kernels import moe_bf16


@dataclass
class DenseExperts:
    """gate|up [E, 2I, H] and down [E, H, I], every expert's weights in one tensor each (the last expert is the
    shared one when the layer has it)."""

    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, gate_up: list[list[torch.Tensor]], down: list[torch.Tensor], device: torch.device) -> "DenseExperts":
        gate_up_rows, hidden = sum(w.shape[0] for w in gate_up[0]), gate_up[0][0].shape[1]  # gate|up, or fused
        intermediate = gate_up_rows // 2
        stacked_gate_up = torch.empty(len(down), gate_up_rows, hidden, dtype=torch.bfloat16, device=device)
        stacked_down = torch.empty(len(down), hidden, intermediate, dtype=torch.bfloat16, device=device)
        for expert, (pair, down_weight) in enumerate(zip(gate_up, down)):
            stacked_gate_up[expert].copy_(torch.cat(pair))
            stacked_down[expert].copy_(down_weight)
        return cls(stacked_gate_up, stacked_down)

    @property
    def num_experts(self) -> int:
        return self.down.shape[0]

    def first(self, count: int) -> "DenseExperts":
        return DenseExperts(self.gate_up[:count], self.down[:count])


def dense_moe_forward(backend, x: torch.Tensor, router_logits: torch.Tensor, experts: DenseExperts, top_k: int,
                      renormalize: bool, activation: str, expert_scale=None, shared_expert: bool = False,
                      gemm=moe_bf16.grouped_gemm) -> torch.Tensor:
    """x [T, H] bf16 -> [T, H]; `gemm`: the grouped kernel, or `moe_bf16.grouped_gemm_sorted` (CPU tests)."""
    if shared_expert:
        shared = experts.num_experts - 1
        routed = dense_moe_forward(backend, x, router_logits[:, :shared], experts.first(shared), top_k, renormalize,
                                   activation, gemm=gemm)
        alone = _expert_mlp(backend, x, experts, shared, activation)
        return moe_numerics.add_shared_expert(routed, alone, router_logits[:, shared:])
    weights, chosen = moe_numerics.route(router_logits, top_k, renormalize, expert_scale)
    slots = chosen.numel()
    block_m = moe_bf16.block_rows(slots, experts.num_experts)
    layout = (*moe_bf16.align_slots(chosen, experts.num_experts, block_m), block_m, slots)
    gate_up = gemm(x, experts.gate_up, *layout, rows_per_input=top_k)
    hidden = moe_numerics.gated_activation(backend, activation)(gate_up)
    out = gemm(hidden, experts.down, *layout, rows_per_input=1, slot_scale=weights)
    return out.reshape(x.shape[0], top_k, -1).float().sum(dim=1).to(x.dtype)


def _expert_mlp(backend, x: torch.Tensor, experts: DenseExperts, expert: int, activation: str) -> torch.Tensor:
    gate_up = torch.nn.functional.linear(x, experts.gate_up[expert])
    return torch.nn.functional.linear(moe_numerics.gated_activation(backend, activation)(gate_up), experts.down[expert])
