"""The weight layout adaq's decode GEMM reads, and the alignment rules that follow from it.

`adaq validate` reads the rules from here. The kernel (csrc/nvfp4_gemm.cu) walks a weight [N, K] in super-tiles of
TILE_N = 8 output columns by TILE_K = 128 input values: 512 bytes of E2M1 nibbles (16 bytes per lane of a warp,
one coalesced load) plus 64 bytes of E4M3 block scales. Any K that is a multiple of the NVFP4 group (16) runs:
`repack` pads N to a multiple of 8 and K to a multiple of 128 with zero weights, which costs only the padding's
bytes. Shapes that are multiples of the tile need no padding at all (every Qwen3 and Gemma3 projection is).

`repack` is pure PyTorch (runs on CPU or GPU, at load time); `emulate_b_fragments` is its inverse as the kernel's
bit tricks see it, so a CPU test can prove the layout without a GPU.
"""

from dataclasses import dataclass

import torch

from adaq.formats import nvfp4
from adaq.formats.nvfp4 import NVFP4Weight

TILE_N = 8  # output columns per super-tile (one mma n8)
TILE_K = 128  # input values per super-tile (eight mma k16 steps = eight NVFP4 blocks)
REQUIRED_K_MULTIPLE = nvfp4.GROUP_SIZE  # the hard rule: K % 16 == 0 (anything else is not NVFP4)
MAX_DECODE_ROWS = 64  # rows per kernel launch (M, or tokens routed to one expert); more rows loop
SCALE_EXPONENT_SHIFT = 7  # the kernel's bf16 weights carry value / 2^7; colscale multiplies it back

# Nibble position (0..7) in a lane's 32-bit word for (k16 step parity, value offset within the lane's 4 values);
# offsets 0..3 are k = 2c, 2c+1, 2c+8, 2c+9. See csrc/nvfp4_gemm.cu.
_NIBBLE = {(0, 0): 3, (0, 1): 7, (0, 2): 2, (0, 3): 6, (1, 0): 1, (1, 1): 5, (1, 2): 0, (1, 3): 4}


@dataclass(frozen=True)
class AlignmentRules:
    required_k_multiple: int = REQUIRED_K_MULTIPLE
    pad_free_n_multiple: int = TILE_N
    pad_free_k_multiple: int = TILE_K
    why: str = ("the sm_89 decode GEMM reads 8-column x 128-k super-tiles; other N/K (K % 16 == 0) are zero-padded "
                "at load, costing the padding's bytes")


RULES = AlignmentRules()


@dataclass
class PackedNVFP4:
    """A weight in the kernel's layout, on one device."""

    wq: torch.Tensor  # uint8 [N8, KST, 32 * 16]
    ws: torch.Tensor  # uint8 [N8, KST, 64]
    colscale: torch.Tensor  # fp32 [N8 * 8]: 2^7 / global_scale per output column
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.wq.numel() + self.ws.numel() + self.colscale.numel() * 4


def padded_shape(n: int, k: int) -> tuple[int, int]:
    return -(-n // TILE_N) * TILE_N, -(-k // TILE_K) * TILE_K


def check_weight(weight: NVFP4Weight) -> None:
    from adaq.errors import CheckpointError

    n, k = weight.out_features, weight.in_features
    if k % REQUIRED_K_MULTIPLE:
        raise CheckpointError(f"NVFP4 weight [{n}, {k}]: K must be a multiple of {REQUIRED_K_MULTIPLE}")
    if tuple(weight.block_scale.shape) != (n, k // nvfp4.GROUP_SIZE):
        raise CheckpointError(f"NVFP4 weight [{n}, {k}]: block scales of shape {tuple(weight.block_scale.shape)}, "
                              f"expected {(n, k // nvfp4.GROUP_SIZE)}")


def _gather_index(device) -> torch.Tensor:
    """[4 lanes c][4 words][8 nibbles] -> k offset within a super-tile."""
    index = torch.empty(4, 4, 8, dtype=torch.long)
    for c in range(4):
        for word in range(4):
            for (parity, slot), nibble in _NIBBLE.items():
                step = 2 * word + parity
                offset = (2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9)[slot]
                index[c, word, nibble] = 16 * step + offset
    return index.to(device)


def column_scales(global_scales: torch.Tensor, rows_each: list[int], n_padded: int) -> torch.Tensor:
    """fp32 [n_padded]: 2^7 / global_scale for each output column (fused weights may carry several scales)."""
    per_row = torch.cat([torch.full((rows,), 1.0, dtype=torch.float32) * float(2 ** SCALE_EXPONENT_SHIFT) /
                         g.float().reshape(()).cpu() for g, rows in zip(global_scales, rows_each)])
    return torch.nn.functional.pad(per_row, (0, n_padded - per_row.numel()))


def repack(weight: NVFP4Weight, device: torch.device | str | None = None,
           column_global_scales: torch.Tensor | None = None) -> PackedNVFP4:
    """NVFP4Weight -> the kernel layout (see the module doc). column_global_scales [N] overrides the per-tensor one."""
    check_weight(weight)
    device = torch.device(device) if device is not None else weight.packed.device
    n, k = weight.out_features, weight.in_features
    n_pad, k_pad = padded_shape(n, k)
    codes = nvfp4.unpack_nibbles(weight.packed.to(device))
    codes = torch.nn.functional.pad(codes, (0, k_pad - k, 0, n_pad - n))
    n8, kst = n_pad // TILE_N, k_pad // TILE_K
    # [n8, g, kst, 128] -> [n8, kst, g, 128] -> gather -> [n8, kst, g, c, word, nibble]
    tiles = codes.view(n8, TILE_N, kst, TILE_K).permute(0, 2, 1, 3)
    nibbles = tiles[..., _gather_index(device)]
    bytes_ = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    wq = bytes_.reshape(n8, kst, 32 * 16).contiguous()
    scales = weight.block_scale.to(device).view(torch.uint8)
    scales = torch.nn.functional.pad(scales, (0, (k_pad - k) // nvfp4.GROUP_SIZE, 0, n_pad - n))
    ws = scales.view(n8, TILE_N, kst, 8).permute(0, 2, 1, 3).reshape(n8, kst, 64).contiguous()
    if column_global_scales is None:
        colscale = column_scales([weight.global_scale], [n], n_pad)
    else:
        colscale = torch.nn.functional.pad(float(2 ** SCALE_EXPONENT_SHIFT) / column_global_scales.float().cpu(),
                                           (0, n_pad - n))
    return PackedNVFP4(wq, ws, colscale.to(device), n, k)


def _bf16_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int32) << 16).view(torch.float32)


def emulate_b_fragments(packed: PackedNVFP4) -> torch.Tensor:
    """The dense fp32 [N, K] weight exactly as the kernel's registers see it (bf16 value/128 times colscale).

    Follows the kernel step by step: a lane's 16 bytes as four little-endian words, the shift/mask that moves a
    nibble into bf16 bits, the E4M3 scale times 2^119 rounded to bf16, the bf16 product, then colscale.
    """
    wq = packed.wq.cpu().view(-1, 32, 4, 4).to(torch.int64)  # [tiles, lane, word, byte]
    words = (wq[..., 0] | (wq[..., 1] << 8) | (wq[..., 2] << 16) | (wq[..., 3] << 24))  # [tiles, lane, 4]
    n8, kst = packed.wq.shape[:2]
    scales = packed.ws.cpu().view(-1, 8, 8).view(torch.float8_e4m3fn).float()  # [tiles, g, step]
    scale_bf16 = (scales * 2.0 ** 119).to(torch.bfloat16).float()
    out = torch.empty(n8, kst, 8, 4, 8, 4)  # [n8, kst, g, c, step, slot]
    for step in range(8):
        word = words[..., step // 2]
        for slot in range(4):
            j = (step & 1) * 2 + slot // 2
            half = slot % 2  # 0: low 16 bits (first bf16), 1: high
            sign = (word << (4 * j)) & 0x80008000
            mag = ((word >> (6 - 4 * j)) if j < 2 else (word << (4 * j - 6))) & 0x01C001C0
            bits = ((sign | mag) >> (16 * half)) & 0xFFFF
            value = _bf16_bits_to_float(bits.view(n8, kst, 8, 4))
            scale = scale_bf16.view(n8, kst, 8, 1, 8)[..., step]
            out[..., step, slot] = (value * scale).to(torch.bfloat16).float()
    # value index k = 16 step + (2c, 2c+1, 2c+8, 2c+9)[slot]
    dense = torch.empty(n8, 8, kst, 8, 16)
    for c in range(4):
        for slot, offset in enumerate((2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9)):
            dense[:, :, :, :, offset] = out[:, :, :, c, :, slot].permute(0, 2, 1, 3)
    dense = dense.reshape(n8 * 8, kst * 128) * packed.colscale.cpu()[:, None]
    return dense[:packed.out_features, :packed.in_features]


def unpack_codes(packed: PackedNVFP4) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `repack`: (E2M1 codes uint8 [N, K], E4M3 block scales [N, K/16]) on the packed tensors' device."""
    n8, kst = packed.wq.shape[:2]
    raw = packed.wq.view(n8, kst, 8, 4, 4, 4)  # [n8, kst, g, c, word, byte]
    nibbles = torch.stack([raw & 0xF, raw >> 4], dim=-1).reshape(n8, kst, 8, 128)
    tiles = torch.empty_like(nibbles)
    tiles[..., _gather_index(raw.device).reshape(-1)] = nibbles
    codes = tiles.permute(0, 2, 1, 3).reshape(n8 * TILE_N, kst * TILE_K)
    scales = packed.ws.view(n8, kst, 8, 8).permute(0, 2, 1, 3).reshape(n8 * TILE_N, kst * 8)
    n, k = packed.out_features, packed.in_features
    return codes[:n, :k], scales[:n, :k // nvfp4.GROUP_SIZE].contiguous().view(torch.float8_e4m3fn)


def dequantize(packed: PackedNVFP4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [N, K] weight from the kernel layout (fallback paths: non-bf16 activations, very large M)."""
    codes, scales = unpack_codes(packed)
    multiplier = packed.colscale[:packed.out_features, None] / float(2 ** SCALE_EXPONENT_SHIFT)
    step = (scales.float() * multiplier).unsqueeze(-1)
    values = nvfp4.e2m1_decode(codes).unflatten(-1, (-1, nvfp4.GROUP_SIZE))
    return (values * step).flatten(-2).to(dtype)
