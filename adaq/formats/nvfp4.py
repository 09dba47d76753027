"""The NVFP4 reference codec: the exact numerics every other part of adaq reproduces.

Layout (the one compressed-tensors writes and vLLM reads):
- values: E2M1, codes 0..15; the low 3 bits index E2M1_GRID, bit 3 is the sign;
- packing along K: element 2j in the low nibble, 2j+1 in the high nibble -> uint8 [N, K/2];
- block scales: one float8_e4m3fn per 16 consecutive values of a row -> [N, K/16];
- global scale: one float32 *divisor* per tensor, W = e2m1 * float(block_scale) / global_scale.
"""

from dataclasses import dataclass

import torch

GROUP_SIZE = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring grid values; ties go to the even code (0.25->0, 0.75->1, 1.25->1, ...)
_TIE_TO_LOWER = (True, False, True, False, True, False, True)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass
class NVFP4Weight:
    """One quantized Linear weight [N, K] in NVFP4."""

    packed: torch.Tensor  # uint8 [N, K/2]
    block_scale: torch.Tensor  # float8_e4m3fn [N, K/16]
    global_scale: torch.Tensor  # float32 [1], the divisor
    input_global_scale: torch.Tensor | None = None  # float32 [1], W4A4 only

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    @property
    def global_multiplier(self) -> torch.Tensor:
        """1 / global_scale in fp32: what kernels multiply by (ModelOpt's weight_scale_2)."""
        return 1.0 / self.global_scale.float()

    def to(self, device: torch.device | str) -> "NVFP4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NVFP4Weight(move(self.packed), move(self.block_scale), move(self.global_scale),
                           move(self.input_global_scale))

    def nbytes(self) -> int:
        return self.packed.numel() + self.block_scale.numel() + 4


def e2m1_grid(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 E2M1 values indexed by code (codes 8..15 negative)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=device)
    return torch.cat([grid, -grid])


def _strict_boundaries(device: torch.device | str) -> torch.Tensor:
    """Midpoints as fp32 bounds b with code = #(|x| > b): a tie that goes up uses the fp32 just below its midpoint."""
    bounds = torch.tensor(_MIDPOINTS, dtype=torch.float32)
    below = torch.nextafter(bounds, torch.zeros_like(bounds))
    return torch.where(torch.tensor(_TIE_TO_LOWER), bounds, below).to(device)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to even, values past 6 saturate) and return uint8 codes.

    The sign bit is set for every x < 0, also where the magnitude rounds to 0 (code 8, "-0"): llm-compressor
    writes it so, and byte equality with its checkpoints needs the same. -0.0 itself encodes as code 0.
    """
    code = torch.bucketize(x.abs().float(), _strict_boundaries(x.device), right=False).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return e2m1_grid(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, element 2j in the low nibble."""
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """448 * 6 / amax, computed in amax's dtype (bf16 for a bf16 model, as llm-compressor does), returned as fp32 [1].

    Maps the tensor's largest block to the top of the E4M3 range; a zero or non-finite amax gives 1.
    """
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    scale = torch.nan_to_num(FP8_MAX * FP4_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)
    return scale.float().reshape(1)


def block_scales(weight: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 scale per 16 values: e4m3(global_scale * (amax(block) / 6)), a zero scale replaced by E4M3's 0.125.

    amax / 6 is rounded to the weight's dtype first and the product taken in fp32: llm-compressor's order of
    operations, which the bytes of its checkpoints depend on.
    """
    blocks = weight.unflatten(-1, (-1, GROUP_SIZE))
    local = blocks.abs().amax(dim=-1) / torch.tensor(FP4_MAX, dtype=weight.dtype, device=weight.device)
    scale = (global_scale.float() * local).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    scale = torch.where(scale == 0, torch.full_like(scale, 0.125), scale)
    return scale.to(torch.float8_e4m3fn)


def effective_scales(block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float(block_scale) / global_scale in fp32, the per-block step size (compressed-tensors order)."""
    return block_scale.float() / global_scale.float()


def tensor_amax(weight: torch.Tensor) -> torch.Tensor:
    """amax(|W|) in W's dtype (exact: a max rounds nothing)."""
    return weight.abs().amax()


def quantize(weight: torch.Tensor, global_scale: torch.Tensor | None = None) -> NVFP4Weight:
    """Round-to-nearest NVFP4 of a [N, K] weight; K must be a multiple of 16.

    Byte-identical to llm-compressor's NVFP4A16 for the same weight (in its stored dtype) and global scale:
    block scales as in `block_scales`, codes = e2m1(W / (float(scale) / global_scale)) in fp32. Without a
    global scale, the tensor's own one (`global_scale_from_amax`); fused siblings (q/k/v, gate/up) pass the
    shared one computed from the largest of their amaxes.
    """
    check_quantizable(weight)
    if global_scale is None:
        global_scale = global_scale_from_amax(tensor_amax(weight))
    global_scale = global_scale.float().reshape(1).to(weight.device)
    scale = block_scales(weight, global_scale)
    step = effective_scales(scale, global_scale).unsqueeze(-1)
    codes = e2m1_encode(weight.unflatten(-1, (-1, GROUP_SIZE)).float() / step).flatten(-2)
    return NVFP4Weight(pack_nibbles(codes), scale, global_scale)


def dequantize(w: NVFP4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact NVFP4 -> dtype: e2m1 * (float(scale) / global_scale) in fp32, then one rounding to dtype."""
    values = e2m1_decode(unpack_nibbles(w.packed)).unflatten(-1, (-1, GROUP_SIZE))
    step = effective_scales(w.block_scale, w.global_scale).unsqueeze(-1)
    return (values * step).flatten(-2).to(dtype)


def check_quantizable(weight: torch.Tensor) -> None:
    from adaq.errors import AdaqError

    if weight.ndim != 2:
        raise AdaqError(f"NVFP4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if weight.shape[1] % GROUP_SIZE:
        raise AdaqError(f"NVFP4 needs K (in_features) to be a multiple of {GROUP_SIZE}, got {weight.shape[1]}")
    if not torch.isfinite(weight).all():
        raise AdaqError("weight holds NaN or inf values")


def quantize_activation_nvfp4(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of activations [.., K] as compressed-tensors does for W4A4 checkpoints.

    Per 16 values along K: scale = e4m3(input_global_scale * amax / 6) (zero -> 0.125), values rounded to E2M1 of
    x / (scale / input_global_scale), saturating at 6. Computed in fp32, returned in x's dtype.
    """
    global_scale = input_global_scale.float().reshape(1).to(x.device)
    blocks = x.float().unflatten(-1, (-1, GROUP_SIZE))
    scale = block_scales(blocks.flatten(-2), global_scale)
    step = effective_scales(scale, global_scale).unsqueeze(-1)
    codes = e2m1_encode(blocks / step)
    return (e2m1_decode(codes) * step).flatten(-2).to(x.dtype)
