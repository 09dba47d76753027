"""MoE prefill on the FP8 path (issue 8, item 5): tokens grouped by expert, one grouped FP8 GEMM per projection.

Numerics (`moe_fp8_reference`, plain PyTorch, any device): adaq.backends.numerics.moe.moe_reference with every expert linear
replaced by the FP8 path's linear (adaq.formats.fp8_prefill): each expert's NVFP4 weight expanded to E4M3 with one
scale per output channel, activations E4M3 per token (per row: gate|up rows are the token's own, down rows are
(token, expert) rows), fp32 accumulation, `((acc * row_scale) * col_scale)` rounded once to bf16; SiLU-and-mul in
bf16; the weighted outputs summed in ascending expert order in bf16.

GPU (`fp8_moe_forward`), with no host sync between the router and the combine:
1. fused router (moe.cu `router_topk`), rows (token, slot) grouped by expert in moe_align's layout (moe.cu's
   `moe_align` up to `MOE_ALIGN_MAX_ROWS` rows; above, its stable placement is quadratic, so a stable sort and a
   searchsorted give the same layout with every expert as a group, empty ones included);
2. the tokens quantized to E4M3 once (`quantize_rows`), their rows gathered into expert order;
3. all experts' gate|up weights expanded to E4M3 in one launch into the shared FP8 workspace (the per-row global
   scale divided afterwards: exact, powers of two aside the division is the reference's), then one grouped FP8 GEMM
   (generated sm_89 kernel, csrc/fp8_grouped.cuh) over all groups;
4. SiLU-and-mul, E4M3 per row, the down weights expanded into the same workspace, the second grouped GEMM;
5. rows scattered back to (token, slot) order and moe.cu's `moe_combine`.
"""

from dataclasses import dataclass

import torch

from adaq.backends.handles import ExpertsHandle
from adaq.backends.numerics import activation, moe
from adaq.formats import fp8_prefill
from adaq.formats.nvfp4 import NVFP4Weight
from adaq.kernels import fp8_gemm
from adaq.kernels.ops import align_rows_sorted

MOE_ALIGN_MAX_ROWS = 2048  # moe_align's stable placement costs O(rows^2 / threads): sort-based grouping above
MOE_TILE_ENV = "ADAQ_PREFILL_MOE_TILE"


# ---- the reference ------------------------------------------------------------------------------------------------

class _Fp8ExpertLinears:
    """What moe_reference asks of a backend, with every expert linear on the FP8 path's numerics."""

    @staticmethod
    def linear(x: torch.Tensor, handle: fp8_prefill.FP8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_prefill.fp8_linear_reference(x, handle, bias)

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(x)


def moe_fp8_reference(x: torch.Tensor, router_logits: torch.Tensor, gate_up: list[list[NVFP4Weight]],
                      down: list[NVFP4Weight], top_k: int, renormalize: bool) -> torch.Tensor:
    """x [T, H] -> [T, H]: the FP8 path's MoE (module doc). gate_up[e] = [gate, up] (or one fused weight)."""
    experts = ExpertsHandle([[fp8_prefill.expand_weight(w) for w in pair] for pair in gate_up],
                                [fp8_prefill.expand_weight(w) for w in down], down[0].in_features)
    return moe.moe_reference(_Fp8ExpertLinears(), x, router_logits, experts, top_k, renormalize)


# ---- stacked expert weights --------------------------------------------------------------------------------------

@dataclass
class StackedNVFP4:
    """One projection of every expert, rows stacked: expert e owns rows [e * rows_per_expert, (e + 1) * ...)."""

    packed: torch.Tensor  # uint8 [E * N, K / 2]
    block_scale: torch.Tensor  # float8_e4m3fn [E * N, K / 16]
    row_global_scale: torch.Tensor  # float32 [E * N]: each row's NVFP4 global scale (gate and up may differ)
    experts: int

    @property
    def rows_per_expert(self) -> int:
        return self.packed.shape[0] // self.experts

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    @classmethod
    def stack(cls, weights: list[list[NVFP4Weight]], device: torch.device | str) -> "StackedNVFP4":
        """weights[e] = the NVFP4 weights whose rows (concatenated) form expert e's projection."""
        flat = [w for parts in weights for w in parts]
        return cls(torch.cat([w.packed for w in flat]).to(device),
                   torch.cat([w.block_scale for w in flat]).to(device),
                   torch.cat([w.global_scale.float().reshape(1).expand(w.out_features) for w in flat]).to(device),
                   len(weights))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.block_scale.numel() + self.row_global_scale.numel() * 4


def expand_stacked_reference(w: StackedNVFP4) -> fp8_prefill.FP8Weight:
    """What `expand_stacked` computes, in plain PyTorch: the expansion with a global scale of 1, then each row's
    column scale divided by its own global scale (equal, bit for bit, to expanding each expert alone)."""
    unit = NVFP4Weight(w.packed, w.block_scale, torch.ones(1, device=w.packed.device))
    expanded = fp8_prefill.expand_weight(unit)
    return fp8_prefill.FP8Weight(expanded.values, expanded.col_scale / w.row_global_scale)


@dataclass
class LayoutProjection:
    """One projection of every expert as the decode kernels hold it (ops.StackedExperts): when each expert's N is a
    multiple of 16 and K of 128 the experts' layouts, back to back, are the layout of one [E * N, K] weight, so
    `ops.nvfp4_expand_e4m3` expands them all in one launch with no second copy of the NVFP4 bytes. row_mul and
    col_scale (fp32 [E * N]) are the spec's (fp8_prefill.channel_scales with each row's own global scale)."""

    wq: torch.Tensor
    ws: torch.Tensor
    row_mul: torch.Tensor
    col_scale: torch.Tensor
    experts: int
    rows_per_expert: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.experts * self.rows_per_expert

    @staticmethod
    def fits(n: int, k: int) -> bool:
        from adaq.kernels import layout

        return n % layout.TILE_N == 0 and k % layout.TILE_K == 0

    @classmethod
    def of(cls, stacked_part, weights: list[list[NVFP4Weight]], device: torch.device) -> "LayoutProjection":
        """stacked_part: ops.StackedExperts.tensors(...) (wq, ws, colscale, N, K); weights[e]: expert e's NVFP4
        weights (row order), read for their block and global scales only."""
        wq, ws, _, n, k = stacked_part
        row_mul, col_scale = [], []
        for w in (w for parts in weights for w in parts):  # as expand_stacked_reference: unit global scale, then
            mul, col = fp8_prefill.channel_scales(w, torch.ones(1, device=w.block_scale.device))  # the row's own
            row_mul.append(mul)
            col_scale.append(col / w.global_scale.float().reshape(1))
        return cls(wq.reshape(-1), ws.reshape(-1), torch.cat(row_mul).to(device).contiguous(),
                   torch.cat(col_scale).to(device).contiguous(), len(weights), n, k)


@dataclass
class Fp8Experts:
    """A MoE layer's experts for the FP8 prefill path, expanded to E4M3 per use (never kept in E4M3): from the
    decode kernels' layout where the shapes allow (`LayoutProjection`), else from a stacked copy of their NVFP4
    bytes (`StackedNVFP4`)."""

    gate_up: "StackedNVFP4 | LayoutProjection"  # [E * 2I, H]
    down: "StackedNVFP4 | LayoutProjection"  # [E * H, I]

    @classmethod
    def from_weights(cls, gate_up: list[list[NVFP4Weight]], down: list[NVFP4Weight],
                     device: torch.device | str) -> "Fp8Experts":
        return cls(StackedNVFP4.stack(gate_up, device), StackedNVFP4.stack([[w] for w in down], device))

    @classmethod
    def from_layout(cls, stacked, gate_up: list[list[NVFP4Weight]], down: list[NVFP4Weight],
                    device: torch.device) -> "Fp8Experts | None":
        """From ops.StackedExperts (the decode kernels' copy); None where a projection's shape does not allow it."""
        parts = ((stacked.tensors("gate_up"), gate_up), (stacked.tensors("down"), [[w] for w in down]))
        if not all(LayoutProjection.fits(part[3], part[4]) for part, _ in parts):
            return None
        return cls(*(LayoutProjection.of(part, weights, device) for part, weights in parts))

    @property
    def num_experts(self) -> int:
        return self.down.experts

    @property
    def nbytes(self) -> int:
        """Bytes this object adds to the decode kernels' copy (the scales only, from the layout)."""
        return sum(p.nbytes if isinstance(p, StackedNVFP4) else 8 * p.out_features for p in (self.gate_up, self.down))


_ONES: dict[torch.device, torch.Tensor] = {}


def expand_projection(w: "StackedNVFP4 | LayoutProjection", device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of one projection -> (e4m3 [E, N, K], col_scale [E, N]); the values in the shared FP8 workspace."""
    if isinstance(w, StackedNVFP4):
        return expand_stacked(w, device)
    from adaq.kernels import ops

    n, k = w.rows_per_expert, w.in_features
    values = ops.nvfp4_expand_e4m3(w, w.row_mul, fp8_gemm.workspace(device, w.out_features, k).values)
    return values.view(w.experts, n, k), w.col_scale.view(w.experts, n)


def expand_stacked(w: StackedNVFP4, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of one projection -> (e4m3 [E, N, K], col_scale [E, N]) views of the shared FP8 workspace."""

    rows, k = w.packed.shape[0], w.in_features
    values, col_scale = fp8_gemm.workspace(device, rows, k).view(rows, k)
    ones = _ONES.setdefault(device, torch.ones(1, dtype=torch.float32, device=device))
    fp8_gemm.ext().expand_nvfp4(w.packed, w.block_scale, ones, values, col_scale)
    col_scale.div_(w.row_global_scale)
    return values.view(w.experts, w.rows_per_expert, k), col_scale.view(w.experts, w.rows_per_expert)


# ---- grouping and the grouped GEMM -------------------------------------------------------------------------------

def align_rows(ids: torch.Tensor, experts: int):
    """(group_offsets [G+1], group_expert [G], row_ids [R], num_groups [1]), int32, in moe_align's layout: rows
    t * top_k + j sorted by expert, ascending row order within an expert."""
    if ids.numel() <= MOE_ALIGN_MAX_ROWS and ids.is_cuda:
        from adaq.kernels import ops

        return ops.moe_align(ids, experts)
    return align_rows_sorted(ids, experts)


def routed_weights(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   expert_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused router (moe.cu `router_topk`): (weights, ids) [T, top_k], each weight times its expert's
    `expert_scale` (Gemma 4) where given."""
    from adaq.kernels import ops

    weights, ids = ops.router_topk(router_logits.to(torch.bfloat16).contiguous(), top_k, renormalize)
    if expert_scale is not None:
        weights = weights * expert_scale[ids.long()].to(weights.dtype)
    return weights, ids


def choose_grouped_tile(rows: int, experts: int) -> int:
    """64x128: fewest padded rows per group, and the fastest tile at 512, 2048 and 8192 tokens of Qwen3-30B-A3B on
    the H100 (prefill_moe_bench, bench/results/prefill/moe_bench.json); $ADAQ_PREFILL_MOE_TILE overrides."""
    import os

    if os.environ.get(MOE_TILE_ENV):
        return int(os.environ[MOE_TILE_ENV])
    return 1


def grouped_gemm(a: torch.Tensor, row_scale: torch.Tensor, w8: torch.Tensor, col_scale: torch.Tensor, align,
                 tile: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """out [R, N] bf16: group g's rows of a [R,K] e4m3 times expert group_expert[g] of w8 [E,N,K] (fp8 epilogue)."""

    offsets, group_expert, _, num_groups = align
    if out is None:
        out = torch.empty(a.shape[0], w8.shape[1], dtype=torch.bfloat16, device=a.device)
    fp8_gemm.ext().fp8_grouped_gemm(a, w8, row_scale, col_scale, offsets, group_expert, num_groups, out, tile)
    return out


def _gather_rows(x8: torch.Tensor, row_scale: torch.Tensor, token_of_row: torch.Tensor):
    rows = x8.view(torch.uint8).index_select(0, token_of_row).view(fp8_prefill.E4M3)
    return rows, row_scale.index_select(0, token_of_row)


def fp8_moe_routed(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Fp8Experts,
                   activation_name: str = "silu", tile: int | None = None) -> torch.Tensor:
    """x [T, H] bf16 with its routing (weights [T, k] bf16, ids [T, k] int32) -> [T, H] bf16 (module doc, 2-5)."""
    from adaq.kernels import ops

    top_k, rows = ids.shape[1], ids.numel()
    align = align_rows(ids, experts.num_experts)
    row_ids = align[2].long()
    tile = choose_grouped_tile(rows, experts.num_experts) if tile is None else tile
    x8, row_scale = fp8_gemm.quantize_rows(x.contiguous())
    a, a_scale = _gather_rows(x8, row_scale, torch.div(row_ids, top_k, rounding_mode="floor"))
    w8, col_scale = expand_projection(experts.gate_up, x.device)
    gate_up = grouped_gemm(a, a_scale, w8, col_scale, align, tile)
    hidden = ops.gated(gate_up, activation_name)
    h8, h_scale = fp8_gemm.quantize_rows(hidden)
    w8, col_scale = expand_projection(experts.down, x.device)
    y_sorted = grouped_gemm(h8, h_scale, w8, col_scale, align, tile)
    y = torch.empty_like(y_sorted)
    y.index_copy_(0, row_ids, y_sorted)
    return ops.moe_combine(y, weights, ids)


def fp8_moe_forward(x: torch.Tensor, router_logits: torch.Tensor, experts: Fp8Experts, top_k: int,
                    renormalize: bool, activation_name: str = "silu", tile: int | None = None) -> torch.Tensor:
    """The FP8 prefill MoE: x [T, H] bf16, router_logits [T, E] bf16 -> [T, H] bf16."""
    weights, ids = routed_weights(router_logits, top_k, renormalize)
    return fp8_moe_routed(x, weights, ids, experts, activation_name, tile)
