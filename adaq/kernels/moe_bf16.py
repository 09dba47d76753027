"""The bf16 engine's mixture of experts on the GPU: a grouped GEMM over expert-sorted slots (Triton), the layout of
vLLM's fused_moe. A slot is one (token, k) pair of the router's top-k; slots are sorted by expert and each
expert's run padded to a multiple of `block_m`, so every `block_m` rows of the sorted order belong to one expert and
one program multiplies them by that expert's weights, read once per block. Everything is on the device with static
shapes (no host sync), so decode steps capture into CUDA graphs.

torch's `_grouped_mm` would serve on Hopper, but on Ada (sm_89) it falls back to a loop that copies the group
offsets to the host: no graphs, a sync per layer. Triton's `tl.dot` on bf16 lowers to Ada's `mma.sync`.

`grouped_gemm_reference` defines the semantics (plain PyTorch, any device); `grouped_gemm` is the kernel.
"""

import torch

try:  # the CPU wheels of torch come without Triton: the reference still runs, the kernel does not
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SENTINEL_EXPERT = -1  # a block past the last expert's padded run: its program returns at once


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def block_rows(slots: int, num_experts: int) -> int:
    """Rows per program: 16 (tl.dot's least) while a decode's few slots spread over many experts, else 64."""
    return 16 if slots <= 4 * num_experts else 64


def padded_slots(slots: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the sorted layout's rows: each non-empty expert pads at most one partial block."""
    return (min(num_experts, slots) + -(-slots // block_m)) * block_m


def align_slots(chosen: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [T, k] expert ids -> (sorted_slots [P] int32: slot ids by expert, each expert's run padded to a
    multiple of block_m with the sentinel T*k; block_experts [P / block_m] int32: each block's expert, or -1)."""
    flat = chosen.reshape(-1).long()
    slots = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat,
                                                                                        torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(slots, device=flat.device) - (torch.cumsum(counts, 0) - counts)[by_expert]
    total = padded_slots(slots, num_experts, block_m)
    sorted_slots = torch.full((total,), slots, dtype=torch.int32, device=flat.device)
    sorted_slots[(ends - padded)[by_expert] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, total, block_m, device=flat.device)
    block_experts = torch.searchsorted(ends, block_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, SENTINEL_EXPERT)
    return sorted_slots, block_experts.to(torch.int32)


def grouped_gemm_reference(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, rows_per_input: int,
                           slot_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = bf16(fp32(x[s // rows_per_input] @ weights[chosen[s]].T) * slot_scale[s]) for every slot s.

    x [R, K] bf16; weights [E, N, K] bf16; chosen: the slots' experts (T*k of them); slot_scale [T*k] fp32 or None."""
    flat = chosen.reshape(-1).long()
    out = torch.empty(flat.numel(), weights.shape[1], dtype=torch.float32, device=x.device)
    for expert in torch.unique(flat).tolist():
        slots = torch.nonzero(flat == expert).flatten()
        out[slots] = x[slots // rows_per_input].float() @ weights[expert].float().T
    if slot_scale is not None:
        out = out * slot_scale.reshape(-1, 1).float()
    return out.to(torch.bfloat16)


def grouped_gemm_sorted(x: torch.Tensor, weights: torch.Tensor, sorted_slots: torch.Tensor,
                        block_experts: torch.Tensor, block_m: int, slots: int, rows_per_input: int,
                        slot_scale: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel does over the layout of `align_slots`, block by block in plain PyTorch (the CPU tests check
    the layout with it): each block's real slots times its expert's weights."""
    out = torch.full((slots, weights.shape[1]), float("nan"), dtype=torch.bfloat16, device=x.device)
    for block, expert in enumerate(block_experts.tolist()):
        ids = sorted_slots[block * block_m:(block + 1) * block_m].long()
        ids = ids[ids < slots]
        if expert == SENTINEL_EXPERT or ids.numel() == 0:
            continue
        y = x[ids // rows_per_input].float() @ weights[expert].float().T
        out[ids] = (y if slot_scale is None else y * slot_scale.reshape(-1)[ids, None].float()).to(torch.bfloat16)
    return out


def grouped_gemm(x: torch.Tensor, weights: torch.Tensor, sorted_slots: torch.Tensor, block_experts: torch.Tensor,
                 block_m: int, slots: int, rows_per_input: int,
                 slot_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel of `grouped_gemm_reference` over the layout of `align_slots`: out [slots, N] bf16 (every row
    written; `out` given: written in place)."""
    experts, n, k = weights.shape
    if x.dtype != torch.bfloat16 or weights.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"grouped bf16 GEMM: x {tuple(x.shape)} {x.dtype}, weights {tuple(weights.shape)} "
                         f"{weights.dtype} (bf16, x [R, K] against weights [E, N, K])")
    x, weights = x.contiguous(), weights.contiguous()
    out = torch.empty(slots, n, dtype=torch.bfloat16, device=x.device) if out is None else out
    block_n, block_k = (64, 128) if block_m == 16 else (128, 64)
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    scale = slot_scale.reshape(-1).float().contiguous() if slot_scale is not None else out  # unread when None
    _grouped_kernel[grid](x, weights, out, sorted_slots, block_experts, scale, slots, rows_per_input, n, k,
                          HAS_SCALE=slot_scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                          num_warps=4, num_stages=3)
    return out


if triton is not None:
    @triton.jit
    def _grouped_kernel(x_ptr, w_ptr, out_ptr, sorted_slots_ptr, block_experts_ptr, scale_ptr, slots, rows_per_input,
                        n: tl.constexpr, k: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # n, k compile-time: a model has two (N, K) pairs per MoE, and constant strides fold into the addressing.
        # One program: BLOCK_M sorted slots of one expert x BLOCK_N output columns. Padding slots (id == slots)
        # load zero rows and store nothing; a block past the last run (expert -1) returns before any load.
        expert = tl.load(block_experts_ptr + tl.program_id(0))
        if expert < 0:
            return
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slots_ptr + offs_m)
        valid = slot < slots
        row = (slot // rows_per_input).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + row[:, None] * k + offs_k[None, :]
        # weights [E, N, K] read as a [BLOCK_K, BLOCK_N] tile: K contiguous, so each column's 16-byte runs coalesce
        b_ptrs = w_ptr + expert.to(tl.int64) * n * k + offs_n[None, :].to(tl.int64) * k + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, tl.cdiv(k, BLOCK_K)):
            in_k = offs_k < k - step * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & in_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=in_k[:, None] & (offs_n[None, :] < n), other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + slot, mask=valid, other=0.0)[:, None]
        out_ptrs = out_ptr + slot.to(tl.int64)[:, None] * n + offs_n[None, :]
        tl.store(out_ptrs, acc.to(tl.bfloat16), mask=valid[:, None] & (offs_n[None, :] < n))
