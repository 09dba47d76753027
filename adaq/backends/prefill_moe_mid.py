"""MoE prefill on the mid-size NVFP4 kernel (csrc/nvfp4_gemm.cu `nvfp4_gemm_mid_kernel`, grouped form): no copy of
any expert's weights, each active expert's NVFP4 bytes read once per 64 of its rows, every group of every expert in
one launch per projection, and no host sync.

Numerics: the decode path's (`ops.moe_forward` above 16 tokens): each expert linear accumulates x times the exact
products e2m1 x block_scale in fp32 and is rounded to bf16 once after its column scale; the gated activation in
bf16; the weighted outputs summed in ascending expert order in bf16 (moe.cu `moe_combine`).

1. the router (moe.cu `router_topk`; Gemma 4's expert_scale applied as the exact path applies it), rows
   (token, slot) sorted by expert (a stable sort), every expert's rows cut into groups of <= 16, 32 or 64 rows
   (`group_rows`), the whole table in one launch (ops.expert_pieces; its plain-torch form
   ops.expert_pieces_reference);
2. gate|up: group g reads x rows row / top_k and writes its rows in (token, slot) order, so nothing is gathered
   or scattered; the gated activation; down the same way;
3. moe.cu `moe_combine`.
"""

import torch

from adaq.backends.prefill_moe import routed_weights


def group_rows(rows: int, experts: int) -> int:
    """Rows per group: the kernel's row block (16, 32 or 64) that holds an expert's mean share of the rows. The
    launch's blocks all have the largest group's rows, so a short prompt (1-16 rows per expert) cut at 64 would
    multiply up to 64 rows of padding per group; a hot expert cut at 16 re-reads its weights per 16 rows, from L2."""
    mean = rows / experts
    return 16 if mean <= 16 else 32 if mean <= 32 else 64


def mid_moe_forward(x: torch.Tensor, router_logits: torch.Tensor, stacked, top_k: int, renormalize: bool,
                    activation_name: str = "silu", expert_scale: torch.Tensor | None = None,
                    max_group_rows: int | None = None) -> torch.Tensor:
    """x [T, H] bf16, router_logits [T, E] -> [T, H] bf16 through `stacked` (ops.StackedExperts) experts 0..E-1.
    `max_group_rows` (16, 32 or 64) replaces `group_rows`'s choice (the prefill sweep's variants)."""
    from adaq.kernels import ops

    experts = router_logits.shape[1]
    weights, ids = routed_weights(router_logits, top_k, renormalize, expert_scale)
    rows = ids.numel()
    per_group = min(rows, max_group_rows or group_rows(rows, experts))
    table = ops.expert_pieces(ids, experts, per_group)
    gate_up = ops.grouped_linear_mid(x.contiguous(), top_k, stacked, "gate_up", table, rows, per_group)
    hidden = ops.gated(gate_up, activation_name)
    y = ops.grouped_linear_mid(hidden, 1, stacked, "down", table, rows, per_group)
    return ops.moe_combine(y, weights, ids)
