"""The FP8 prefill path's numerics (the spec its GPU kernels reproduce): E4M3 x E4M3 GEMM with fp32 accumulation.

Weights (NVFP4 -> E4M3, once per layer use): Ada's FP8 `mma.sync` spans 32 values of K, two NVFP4 blocks, so a
per-16 block scale cannot be applied inside it. Each output channel n instead gets one scale: with
`c[n] = max_k block_scale[n, k]` (as fp32) and `row_mul[n] = 64 / c[n]` (one fp32 division, made at load),

    w8[n, k]     = e4m3((e2m1[n, k] * block_scale[n, k]) * row_mul[n])   exact product, one fp32 product, one RNE
    col_scale[n] = (c[n] / global_scale) * 2**-6

The first product is exact (<= 6 significant bits: the value the exact path dequantizes), so the GPU can expand
from the decode kernels' own weight layout (no second copy of the NVFP4 bytes). |e2m1 * block_scale| <= 6 c[n], so
times 64 / c[n] it stays <= 384 < 448; the power-of-two headroom keeps small products out of E4M3's subnormals. The
error against the exact dequantized weight is the E4M3 rounding (and a 2^-24 fp32 one before it).

The exact large-M path (`exact`, and `auto` on GPUs without an FP8 GEMM; adaq.kernels.fp8_gemm runs it with
cuBLAS) is no approximation: the bf16
workspace holds `e2m1 x block_scale` exactly (<= 6 significant bits, within bf16's range) and 1/global_scale
multiplies the fp32 accumulator once, before the single rounding: `exact_linear_reference`.

Activations: per token (row) `row_scale[m] = max(amax(|x[m]|) / 448, 1e-12)`, `x8 = e4m3(x / row_scale)` in fp32
(IEEE division, clamped to +-448 like the FP8 KV cache). Output: `y = ((x8 @ w8^T) * row_scale[m]) * col_scale[n]`
in fp32, one rounding to the compute dtype, then the bias.

Which layers: every NVFP4 linear of at least MIN_TOKENS rows (adaq.backends.prefill_route) except the roles in `$ADAQ_PREFILL_FP8_EXCLUDE`
(comma-separated; default `down_proj`: its inputs, SiLU(gate) * up, have the heaviest tails, and on the real
Gemma3-270M it alone costs +1.56 % perplexity where q/k/v, o and gate/up together cost +0.35 % (16 windows; +0.47 %
on 64); docs/KERNELS.md).
MoE experts are not covered by this setting: the grouped FP8 path runs both of their projections (its accuracy is
not measured on a real MoE checkpoint).
"""

from dataclasses import dataclass

import torch

from adaq.formats import nvfp4
from adaq.formats.nvfp4 import NVFP4Weight

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_ROW_SCALE = 1e-12
WEIGHT_HEADROOM = 64.0  # 2**6: 6 * 64 = 384 <= 448


@dataclass
class FP8Weight:
    """An NVFP4 weight expanded to E4M3 with one fp32 scale per output channel."""

    values: torch.Tensor  # float8_e4m3fn [N, K]
    col_scale: torch.Tensor  # float32 [N]

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def in_features(self) -> int:
        return self.values.shape[1]

    def to(self, device: torch.device | str) -> "FP8Weight":
        return FP8Weight(self.values.to(device), self.col_scale.to(device))

    def nbytes(self) -> int:
        return self.values.numel() + self.col_scale.numel() * 4


def channel_scales(w: NVFP4Weight, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_mul fp32 [N] = 64 / c[n], col_scale fp32 [N]); `global_scale` overrides the weight's (a [N] tensor: one
    per row, for stacked experts)."""
    channel_max = w.block_scale.float().amax(dim=1)
    safe = torch.where(channel_max > 0, channel_max, torch.ones_like(channel_max))
    global_scale = w.global_scale.float().reshape(1) if global_scale is None else global_scale.float()
    col_scale = (channel_max / global_scale) * (1.0 / WEIGHT_HEADROOM)
    return WEIGHT_HEADROOM / safe, col_scale


def expand_weight(w: NVFP4Weight) -> FP8Weight:
    """NVFP4 -> E4M3 values and per-channel scales, exactly as the expansion kernels compute them."""
    row_mul, col_scale = channel_scales(w)
    values = nvfp4.e2m1_decode(nvfp4.unpack_nibbles(w.packed)).unflatten(-1, (-1, nvfp4.GROUP_SIZE))
    exact = values * w.block_scale.float().unsqueeze(-1)  # e2m1 x block scale: exact in fp32
    return FP8Weight((exact.flatten(-2) * row_mul.unsqueeze(1)).to(E4M3), col_scale)


def dequantize_expanded(w: FP8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the FP8 path effectively multiplies by: w8 * col_scale, in fp32, then dtype."""
    return (w.values.float() * w.col_scale.unsqueeze(1)).to(dtype)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 row_scale [M]); row_scale = max(amax / 448, 1e-12) per token."""
    xf = x.float()
    row_scale = (xf.abs().amax(dim=-1) / E4M3_MAX).clamp(min=MIN_ROW_SCALE)
    stored = (xf / row_scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return stored, row_scale


def scaled_mm_reference(x8: torch.Tensor, row_scale: torch.Tensor, w8: torch.Tensor, col_scale: torch.Tensor,
                        dtype: torch.dtype, weight_f32: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 GEMM with its epilogue: ((x8 @ w8^T) * row_scale[m]) * col_scale[n], fp32, one rounding to dtype.
    `weight_f32` may hold w8 already widened to fp32 (a cache: E4M3 values are exact in fp32)."""
    acc = x8.float() @ (w8.float() if weight_f32 is None else weight_f32).T
    return ((acc * row_scale.unsqueeze(1)) * col_scale.unsqueeze(0)).to(dtype)


def fp8_linear_reference(x: torch.Tensor, w: FP8Weight, bias: torch.Tensor | None = None,
                         weight_f32: torch.Tensor | None = None) -> torch.Tensor:
    """y [.., N] = the FP8 path's linear for x [.., K] in x's dtype."""
    lead = x.shape[:-1]
    x8, row_scale = quantize_activation(x.reshape(-1, x.shape[-1]))
    y = scaled_mm_reference(x8, row_scale, w.values, w.col_scale, x.dtype, weight_f32)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


def unscaled_weight(w: NVFP4Weight) -> torch.Tensor:
    """fp32 [N, K] e2m1 x block_scale: what the exact path's bf16 workspace holds (exact in bf16)."""
    values = nvfp4.e2m1_decode(nvfp4.unpack_nibbles(w.packed)).unflatten(-1, (-1, nvfp4.GROUP_SIZE))
    return (values * w.block_scale.float().unsqueeze(-1)).flatten(-2)


def exact_linear_reference(x: torch.Tensor, w: NVFP4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exact path: (x @ (e2m1 x block_scale)^T) * (1 / global_scale) in fp32, one rounding to x's dtype, + bias."""
    alpha = (1.0 / w.global_scale.float().reshape(1)).to(x.device)
    y = ((x.float() @ unscaled_weight(w).to(x.device).T) * alpha).to(x.dtype)
    return y if bias is None else y + bias


def quantize_per_channel(weight: torch.Tensor) -> FP8Weight:
    """A dense [N, K] weight -> E4M3 values with one fp32 scale per output channel (a quantized output layer):
    `col_scale[n] = max(amax(|W[n]|) / 448, 1e-12)` in fp32, `values = e4m3(W / col_scale[n])` (IEEE division,
    RNE). Multiplied by `fp8_linear_reference` / the FP8 GEMM like any expanded weight."""
    wf = weight.float()
    col_scale = (wf.abs().amax(dim=1) / E4M3_MAX).clamp(min=MIN_ROW_SCALE)
    values = (wf / col_scale.unsqueeze(1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return FP8Weight(values, col_scale)
