"""CPU stand-ins for MoE kernels, for tests that run the GPU paths' orchestration on the CPU."""

import torch


def combine_emulated(y: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ops.moe_combine's arithmetic: each token's expert rows in ascending expert order, weighted, summed in bf16."""
    out = torch.zeros(ids.shape[0], y.shape[1], dtype=torch.bfloat16)
    for t in range(ids.shape[0]):
        for slot in sorted(range(ids.shape[1]), key=lambda j: int(ids[t, j])):
            out[t] += y[t * ids.shape[1] + slot] * weights[t, slot]
    return out
