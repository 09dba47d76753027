"""Python entry points to the CUDA kernels: shapes in, tensors out, on torch's current stream.

Every op is graph-safe: outputs and workspaces come from torch's allocator, nothing reads device memory on the host.
The split-K arrival counters are the one persistent buffer (zero between launches; the kernel resets them).
"""

import os

import torch

from adaq.kernels.build import load
from adaq.kernels.layout import MAX_DECODE_ROWS, PackedNVFP4

COUNTERS = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


DEFAULT_GEMM_VARIANT = 0  # per-shape choice (csrc/nvfp4_gemm.cu, measured on the H100: docs/KERNELS.md)
_variant: int | None = None


def ext():
    global _variant
    module = load()
    if _variant is None:  # ADAQ_GEMM_VARIANT picks another GEMM variant (1..4; 0 = per shape), for comparisons
        set_gemm_variant(int(os.environ.get("ADAQ_GEMM_VARIANT", DEFAULT_GEMM_VARIANT)), module)
    return module


def set_gemm_variant(variant: int, module=None) -> None:
    global _variant
    _variant = variant
    (module or load()).gemm_set_variant(variant)


def gemm_variant() -> int:
    ext()
    return _variant


def counters(device: torch.device) -> torch.Tensor:
    """The split-K counters of a device; call once before any CUDA-graph capture (it allocates)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _counters:
        _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


def nvfp4_linear(x: torch.Tensor, w: PackedNVFP4, bias: torch.Tensor | None = None, splits: int = 0) -> torch.Tensor:
    """y [M, N] = x [M, K] (bf16) @ W^T; rows beyond 64 run in chunks of 64 (each chunk reads the weights again)."""
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:
        x = x.contiguous()
    if x.shape[0] <= MAX_DECODE_ROWS:
        return ext().gemm(x, w.wq, w.ws, w.colscale, bias, counters(x.device), w.out_features, w.in_features, splits)
    return torch.cat([nvfp4_linear(x[i:i + MAX_DECODE_ROWS], w, bias, splits)
                      for i in range(0, x.shape[0], MAX_DECODE_ROWS)])


def store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping) -> None:
    ext().store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping.long())


def attention_splits(tokens: int, kv_heads: int, max_context: int) -> int:
    return int(ext().attention_splits(tokens, kv_heads, max(1, max_context)))


def paged_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, *, scale: float,
                    sliding_window: int | None = None, softcap: float | None = None, query_seq=None, query_ctx=None,
                    splits: int = 1) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; query t belongs to sequence query_seq[t] (default t) and sees query_ctx[t] keys
    (default context_lens[seq])."""
    return ext().paged_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, query_seq,
                                 query_ctx, splits, int(sliding_window or 0), float(scale), float(softcap or 0.0))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    return ext().rms_norm(x, weight, float(eps), bool(unit_offset))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return ext().gated_activation(x, 0)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return ext().gated_activation(x, 1)


def rotary(q, k, positions, inv_freq):
    q_out, k_out = ext().rotary(q, k, positions, inv_freq)
    return q_out, k_out


def router_topk(logits: torch.Tensor, top_k: int, renormalize: bool):
    weights, ids = ext().router_topk(logits, top_k, renormalize)
    return weights, ids


def moe_align(ids: torch.Tensor, experts: int):
    """(group_offsets [G+1], group_expert [G], row_ids [rows], num_groups [1]) with G = min(experts, rows)."""
    max_groups = min(experts, ids.numel())
    return ext().moe_align(ids.int().contiguous(), experts, max_groups)


def grouped_linear(x: torch.Tensor, x_row_div: int, experts: "StackedExperts", which: str, align, out_rows: int,
                   max_rows: int, splits: int = 0) -> torch.Tensor:
    wq, ws, colscale, n, k = experts.tensors(which)
    offsets, group_expert, row_ids, num_groups = align
    return ext().gemm_grouped(x, x_row_div, wq, ws, colscale, counters(x.device), offsets, group_expert, row_ids,
                              num_groups, group_expert.numel(), max_rows, out_rows, n, k, splits)


def moe_combine(y: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return ext().moe_combine(y, weights, ids)


class StackedExperts:
    """All experts' gate|up and down weights of one MoE layer in the kernel layout, stacked [E, ...]."""

    def __init__(self, gate_up: list[PackedNVFP4], down: list[PackedNVFP4]):
        self.num_experts = len(down)
        self.gate_up = self._stack(gate_up)
        self.down = self._stack(down)
        self.intermediate = gate_up[0].out_features // 2
        self.hidden = down[0].out_features

    @staticmethod
    def _stack(packed: list[PackedNVFP4]):
        wq = torch.stack([p.wq.reshape(-1) for p in packed])
        ws = torch.stack([p.ws.reshape(-1) for p in packed])
        colscale = torch.stack([p.colscale for p in packed])
        return wq, ws, colscale, packed[0].out_features, packed[0].in_features

    def tensors(self, which: str):
        return self.gate_up if which == "gate_up" else self.down

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.gate_up, self.down) for t in part[:3])


def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, experts: StackedExperts, top_k: int,
                renormalize: bool, activation: str = "silu") -> torch.Tensor:
    """Decode MoE: fused router, rows grouped by expert, two grouped NVFP4 GEMMs, weighted combine (<= 64 tokens
    per call; more run in chunks)."""
    tokens = x.shape[0]
    if tokens > MAX_DECODE_ROWS:
        return torch.cat([moe_forward(x[i:i + MAX_DECODE_ROWS], router_logits[i:i + MAX_DECODE_ROWS], experts,
                                      top_k, renormalize, activation) for i in range(0, tokens, MAX_DECODE_ROWS)])
    weights, ids = router_topk(router_logits, top_k, renormalize)
    align = moe_align(ids, experts.num_experts)
    rows = tokens * top_k
    gate_up = grouped_linear(x.contiguous(), top_k, experts, "gate_up", align, rows, tokens)
    hidden = silu_and_mul(gate_up) if activation == "silu" else gelu_tanh_and_mul(gate_up)
    y = grouped_linear(hidden, 1, experts, "down", align, rows, tokens)
    return moe_combine(y, weights, ids)
