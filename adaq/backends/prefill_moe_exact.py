"""MoE prefill on the exact path: tokens grouped by expert, each expert's NVFP4 weights dequantized exactly into a
reused bf16 workspace, one cuBLAS bf16 GEMM per active expert and projection, 1/global_scale as cuBLAS's alpha.

Numerics (`moe_exact_reference`, plain PyTorch, any device): adaq.backends.numerics.moe.moe_reference with every
expert linear replaced by the exact path's linear (adaq.formats.fp8_prefill.exact_linear_reference:
`(x @ (e2m1 x block_scale)^T) * (1 / global_scale)` accumulated in fp32, one rounding to bf16); the gated activation
in bf16; the weighted outputs summed in ascending expert order in bf16. The same as the reference backend's MoE
(`x @ dequantize(w, bf16)^T`) up to the bf16 rounding of the GEMM: the workspace holds `e2m1 x block_scale`
exactly (<= 6 significant bits), and the global scale multiplies the fp32 sum once.

GPU (`exact_moe_forward`):
1. the fused router (moe.cu `router_topk`; Gemma 4's expert_scale applied as the decode path applies it), rows
   (token, slot) grouped by expert with a stable sort (ops.align_rows_sorted: ascending rows within an
   expert, every expert a group); ONE host sync per layer: the E + 1 group offsets, which the loop of GEMMs needs;
2. the token rows gathered into expert order (bf16);
3. per chunk of experts (as many as the workspace holds): their gate|up weights dequantized in one launch
   (csrc/nvfp4_gemm.cu `nvfp4_dequantize` over the stacked decode layout: the experts' layouts back to back are
   the layout of one [chunk * N, K] weight when N % 16 == 0 and K % 128 == 0, else one launch per expert), then
   one cuBLAS batched GEMM over the chunk (`bmm` with an fp32 result: each expert's rows gathered into a slab as
   wide as the chunk's busiest expert, padding rows discarded), times each column's 1/global_scale in fp32 and
   rounded once (gate and up may carry different global scales); an expert with many more rows than the others of
   its chunk (skewed routing) runs alone as one `addmm` rather than widening every expert's slab to its rows
   (`slab_width`); without torch's bmm(out_dtype) one `addmm` per active expert with the scale as its alpha (more
   launches, the same numbers). A chunk nobody chose is skipped;
4. the gated activation (moe.cu / elementwise kernels), the down projection the same way;
5. rows scattered back to (token, slot) order, moe.cu's `moe_combine` (ascending expert order, bf16).
The decode kernels re-read every active expert once per 64 tokens; this path reads each expert's NVFP4 bytes once
and writes / reads its bf16 copy once, so it wins from a few hundred tokens (prefill_route.moe_exact_min_tokens).
Launches per layer (Qwen3-30B-A3B, 2048 tokens): ~6 chunks x (dequantize, gather, bmm, scale, copy) per projection,
about 70, against ~270 for one GEMM per expert.
"""

from dataclasses import dataclass

import torch

from adaq.backends.handles import ExpertsHandle
from adaq.backends.numerics import activation, moe
from adaq.backends.prefill_moe import routed_weights
from adaq.formats import fp8_prefill
from adaq.formats.nvfp4 import NVFP4Weight
from adaq.kernels.ops import align_rows_sorted

# Elements of the bf16 workspace one chunk of experts may fill (128 MiB); a single expert larger than it gets its
# own chunk. Qwen3-30B-A3B: 21 experts' gate|up (1536 x 2048) or 42 experts' down per launch.
WORKSPACE_ELEMENTS = 64 * 2**20


# ---- the reference ------------------------------------------------------------------------------------------------

class _ExactExpertLinears:
    """What moe_reference asks of a backend, with every expert linear on the exact path's numerics."""

    @staticmethod
    def linear(x: torch.Tensor, handle: NVFP4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_prefill.exact_linear_reference(x, handle, bias)

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(x)

    @staticmethod
    def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
        return activation.gelu_tanh_and_mul(x)


def moe_exact_reference(x: torch.Tensor, router_logits: torch.Tensor, gate_up: list[list[NVFP4Weight]],
                        down: list[NVFP4Weight], top_k: int, renormalize: bool, activation_name: str = "silu",
                        expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> [T, H]: the exact path's MoE (module doc). gate_up[e] = [gate, up] (or one fused weight)."""
    experts = ExpertsHandle([list(pair) for pair in gate_up], list(down), down[0].in_features)
    return moe.moe_reference(_ExactExpertLinears(), x, router_logits, experts, top_k, renormalize,
                             activation=activation_name, expert_scale=expert_scale)


# ---- the experts as the exact path holds them ---------------------------------------------------------------------

@dataclass
class ExactProjection:
    """One projection of every expert in the decode kernels' stacked layout (ops.StackedExperts.tensors), with each
    expert's alpha segments: (first column, end column, 1/global_scale), read once at load (a host sync there)."""

    wq: torch.Tensor  # uint8 [E, layout bytes of one expert]
    ws: torch.Tensor  # uint8 [E, scale bytes of one expert]
    rows: int  # N of one expert
    cols: int  # K
    segments: tuple[tuple[tuple[int, int, float], ...], ...]  # per expert
    chunk: int  # experts per dequantize launch
    alphas: torch.Tensor  # fp32 [E, N] on the device: 1/global_scale per column (the batched GEMM's epilogue)

    @property
    def experts(self) -> int:
        return self.wq.shape[0]

    @classmethod
    def of(cls, stacked_part) -> "ExactProjection":
        from adaq.kernels import layout

        wq, ws, colscale, n, k = stacked_part
        alphas = (colscale[:, :n].float() * 2.0 ** -layout.SCALE_EXPONENT_SHIFT).contiguous()  # exact: a power of 2
        segments = tuple(_segments(row) for row in alphas.cpu().tolist())
        back_to_back = n % layout.TILE_N == 0 and k % layout.TILE_K == 0
        chunk = max(1, WORKSPACE_ELEMENTS // (n * k)) if back_to_back else 1
        return cls(wq, ws, n, k, segments, min(chunk, wq.shape[0]), alphas)


def _segments(alphas: list[float]) -> tuple[tuple[int, int, float], ...]:
    segments, start = [], 0
    for column in range(1, len(alphas) + 1):
        if column == len(alphas) or alphas[column] != alphas[start]:
            segments.append((start, column, alphas[start]))
            start = column
    return tuple(segments)


@dataclass
class ExactExperts:
    gate_up: ExactProjection  # [E, 2I, H]
    down: ExactProjection  # [E, H, I]
    batched: bool = True  # one padded bmm per chunk of experts (else one addmm per expert: more launches)

    @classmethod
    def of(cls, stacked, batched: bool = True) -> "ExactExperts":
        """From ops.StackedExperts (the decode kernels' copy: nothing else is kept)."""
        return cls(ExactProjection.of(stacked.tensors("gate_up")), ExactProjection.of(stacked.tensors("down")),
                   batched)

    def workspace_elements(self) -> int:
        return max(p.chunk * p.rows * p.cols for p in (self.gate_up, self.down))


def dequantize_experts(projection: ExactProjection, first: int, last: int, out: torch.Tensor) -> torch.Tensor:
    """bf16 [last - first, N, K] = e2m1 x block_scale of experts first..last-1 (exact; alpha not applied), into out,
    in one launch: back to back the experts' layouts are one [count * N, K] layout (a chunk of one otherwise)."""
    from adaq.kernels import ops
    from adaq.kernels.layout import PackedNVFP4

    n, k, count = projection.rows, projection.cols, last - first
    weight = PackedNVFP4(projection.wq[first:last].reshape(-1), projection.ws[first:last].reshape(-1), None,
                         count * n, k)
    return ops.nvfp4_dequantize(weight, out).view(count, n, k)


_BATCHED: dict[torch.device, bool] = {}


def batched_available(device: torch.device) -> bool:
    """Whether torch's bmm gives an fp32 result for bf16 inputs on this device (torch >= 2.8 on CUDA), tried once
    on a tiny product (at load: never inside a CUDA-graph capture)."""
    device = torch.device(device)
    if device not in _BATCHED:
        try:
            ones = torch.ones(1, 2, 16, dtype=torch.bfloat16, device=device)
            _BATCHED[device] = bmm_fp32(ones, ones.transpose(1, 2)).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _BATCHED[device] = False
    return _BATCHED[device]


def grouped_exact_gemm(rows: torch.Tensor, projection: ExactProjection, bounds: list[int], offsets: torch.Tensor,
                       workspace: torch.Tensor, batched: bool = True) -> torch.Tensor:
    """out [R, N] bf16: rows bounds[e]..bounds[e+1] of `rows` [R, K] times expert e's weight, times its alphas.
    `offsets`: the same bounds on the device. batched: one padded bmm per chunk of experts; else one addmm each."""
    out = torch.empty(rows.shape[0] + 1, projection.rows, dtype=torch.bfloat16, device=rows.device)
    for first in range(0, projection.experts, projection.chunk):
        last = min(first + projection.chunk, projection.experts)
        if bounds[last] == bounds[first]:
            continue  # no token chose these experts
        weights = dequantize_experts(projection, first, last, workspace)
        width = slab_width([bounds[e + 1] - bounds[e] for e in range(first, last)]) if batched else 0
        if width:
            _chunk_bmm(rows, weights, projection.alphas[first:last], offsets[first:last + 1], width, out)
        for expert in range(first, last):  # the experts the slab leaves out: one addmm each
            start, end = bounds[expert], bounds[expert + 1]
            if end - start > width:
                _expert_gemm(rows[start:end], weights[expert - first], projection.segments[expert], out[start:end])
    return out[:-1]


# What one more cuBLAS launch costs, in rows of a chunk's padded slab: a launch's fixed cost and a lone GEMM's
# poorer tiling (~5 us) against ~0.02 us per row of one expert's gate|up in the bmm (Qwen3-30B-A3B, 2 x 2048 x 1536
# flop at ~300 TFLOP/s on the H100; ~0.04 us on an RTX 4090).
LAUNCH_ROWS = 256


def slab_width(counts: list[int], launch_rows: int = LAUNCH_ROWS) -> int:
    """Rows per expert of a chunk's batched GEMM, given each expert's rows: every expert with more runs alone (one
    addmm). The width that minimises the rows multiplied, len(counts) x width for the slab (empty and short experts
    padded) plus each lone expert's rows and launch_rows for its launch. 0: every expert alone (no slab)."""
    def cost(width: int) -> int:
        return len(counts) * width + sum(count + launch_rows for count in counts if count > width)

    return min(sorted({0, *counts}), key=cost)


def bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 [c, M, K] @ bf16 [c, K, N] with fp32 accumulation and an fp32 result (cuBLAS; no rounding to bf16)."""
    return torch.bmm(a, b, out_dtype=torch.float32)


def _chunk_bmm(rows: torch.Tensor, weights: torch.Tensor, alphas: torch.Tensor, offsets: torch.Tensor, width: int,
               out: torch.Tensor) -> None:
    """Experts first..last as one batched GEMM: each expert's rows gathered into a [width, K] slab (short experts
    padded with row 0, whose results go to out's spare last row; an expert of more than `width` rows is all padding
    here, another launch's), the fp32 products times each column's alpha,
    rounded once to bf16, and copied into out's rows of each expert. No host sync: the bounds are on the device."""
    starts, counts = offsets[:-1].long(), (offsets[1:] - offsets[:-1]).long()
    counts = counts.masked_fill(counts > width, 0)  # experts wider than the slab run alone (grouped_exact_gemm)
    lane = torch.arange(width, device=rows.device)
    valid = lane[None, :] < counts[:, None]
    source = torch.where(valid, starts[:, None] + lane[None, :], 0).reshape(-1)
    slab = rows.index_select(0, source).view(weights.shape[0], width, rows.shape[1])
    product = bmm_fp32(slab, weights.transpose(1, 2)).mul_(alphas[:, None, :]).to(torch.bfloat16)
    spare = out.shape[0] - 1
    target = torch.where(valid, starts[:, None] + lane[None, :], spare).reshape(-1)
    out.index_copy_(0, target, product.view(-1, product.shape[-1]))


_ZERO: dict[torch.device, torch.Tensor] = {}


def _expert_gemm(x: torch.Tensor, weight: torch.Tensor, segments, out: torch.Tensor) -> None:
    """out = (x @ weight^T) * alpha per column segment: cuBLAS bf16, fp32 alpha, one rounding (beta 0 ignores the
    zero input, so nothing is read from `out`)."""
    zero = _ZERO.setdefault(x.device, torch.zeros((), dtype=torch.bfloat16, device=x.device))
    if len(segments) == 1:
        torch.addmm(zero, x, weight.t(), beta=0, alpha=segments[0][2], out=out)
        return
    for start, end, alpha in segments:
        out[:, start:end] = torch.addmm(zero, x, weight[start:end].t(), beta=0, alpha=alpha)


def exact_moe_forward(x: torch.Tensor, router_logits: torch.Tensor, experts: ExactExperts, top_k: int,
                      renormalize: bool, activation_name: str = "silu",
                      expert_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The exact prefill MoE: x [T, H] bf16, router_logits [T, E] -> [T, H] bf16 (module doc, 1-5)."""
    from adaq.kernels import fp8_gemm, ops

    weights, ids = routed_weights(router_logits, top_k, renormalize, expert_scale)
    offsets, _, row_ids, _ = align_rows_sorted(ids, experts.down.experts)
    bounds = offsets.tolist()  # the one host sync: which experts have rows, and each chunk's widest expert
    row_ids = row_ids.long()
    workspace = fp8_gemm.reserve_dense_workspace(x.device, experts.workspace_elements(), 1)
    rows = x.contiguous().index_select(0, torch.div(row_ids, top_k, rounding_mode="floor"))
    gate_up = grouped_exact_gemm(rows, experts.gate_up, bounds, offsets, workspace, experts.batched)
    hidden = ops.gated(gate_up, activation_name)
    y_sorted = grouped_exact_gemm(hidden, experts.down, bounds, offsets, workspace, experts.batched)
    y = torch.empty_like(y_sorted)
    y.index_copy_(0, row_ids, y_sorted)
    return ops.moe_combine(y, weights, ids)
