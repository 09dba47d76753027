"""What a backend hands back for a layer's weights, and the weight checks every backend shares.

A layer passes `Weight`s (an NVFP4Weight or a dense [N, K] tensor) to `prepare_linear` / `prepare_experts` once, at
load, and gets a handle it passes back on every call; what is inside a handle is the backend's business.
"""

from dataclasses import dataclass

import torch

from adaq.formats import fp8_prefill, nvfp4
from adaq.formats.fp8_prefill import FP8Weight
from adaq.formats.nvfp4 import NVFP4Weight

# FP8Weight: E4M3 with one scale per output channel, run W8A8 at every M (the quantized output layer, --lm-head fp8)
Weight = NVFP4Weight | FP8Weight | torch.Tensor


@dataclass
class LinearHandle:
    """What the reference backend keeps for one linear: the packed weight and/or a dense [N, K] copy."""

    out_features: int
    in_features: int
    dtype: torch.dtype
    packed: NVFP4Weight | None = None  # NVFP4 weights, on the model's device
    dense: torch.Tensor | None = None  # [N, K] in `dtype`: a bf16 weight or the cached dequantized NVFP4 weight
    input_global_scale: torch.Tensor | None = None  # set only when W4A4 activations are emulated
    channel_fp8: FP8Weight | None = None  # E4M3 per output channel: x is quantized per token (fp8_prefill)

    def weight(self) -> torch.Tensor:
        """The dense [N, K] weight in the compute dtype, dequantizing now if it is not cached."""
        if self.dense is not None:
            return self.dense
        if self.channel_fp8 is not None:
            return fp8_prefill.dequantize_expanded(self.channel_fp8, self.dtype)
        return nvfp4.dequantize(self.packed, self.dtype)


def can_fuse(weights: list[Weight]) -> bool:
    """Weights fuse into one GEMM when they are all dense, or all NVFP4 with the same global scales."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return True
    if not all(isinstance(w, NVFP4Weight) for w in weights):
        return False
    first = weights[0]
    return all(same_scale(w.global_scale, first.global_scale) and
               same_scale(w.input_global_scale, first.input_global_scale) for w in weights[1:])


def same_scale(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.float().reshape(-1), b.float().reshape(-1))


def fuse(weights: list[Weight]) -> Weight:
    """Concatenate weights along N (out_features); NVFP4 weights must share their global scales."""
    if len(weights) == 1:
        return weights[0]
    if isinstance(weights[0], torch.Tensor):
        return torch.cat(weights, dim=0)
    return NVFP4Weight(
        packed=torch.cat([w.packed for w in weights], dim=0),
        block_scale=torch.cat([w.block_scale for w in weights], dim=0),
        global_scale=weights[0].global_scale,
        input_global_scale=weights[0].input_global_scale,
    )


def weight_shape(weight: Weight) -> tuple[int, int]:
    if isinstance(weight, NVFP4Weight | FP8Weight):
        return weight.out_features, weight.in_features
    return tuple(weight.shape)


def check_shapes(weights: list[Weight], in_features: int, out_sizes: list[int]) -> None:
    from adaq.errors import CheckpointError

    if len(weights) != len(out_sizes):
        raise CheckpointError(f"{len(weights)} weights where {len(out_sizes)} were expected")
    for weight, rows in zip(weights, out_sizes):
        if weight_shape(weight) != (rows, in_features):
            raise CheckpointError(f"weight of shape {weight_shape(weight)} where {(rows, in_features)} was expected")


@dataclass
class ExpertsHandle:
    """Reference layout: per expert, the gate|up handles (one when fused) and the down handle."""

    gate_up: list[list]
    down: list
    intermediate_size: int


def weight_rows(weight: Weight) -> int:
    return weight_shape(weight)[0]


def weight_cols(weight: Weight) -> int:
    return weight_shape(weight)[1]


def select_rows(weight: Weight, rows: torch.Tensor) -> Weight:
    """Rows `rows` (output features) of a weight, in that order; exact for NVFP4 (rows are independent, the global
    scales are per tensor)."""
    if isinstance(weight, torch.Tensor):
        return weight[rows]
    return NVFP4Weight(weight.packed[rows], weight.block_scale[rows], weight.global_scale, weight.input_global_scale)
