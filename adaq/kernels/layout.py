"""The weight layout adaq's decode GEMM reads, and the alignment rules that follow from it.

`adaq validate` reads the rules from here. The kernel (csrc/nvfp4_gemm.cu, whose header describes the layout in
full) walks a weight [N, K] in super-tiles of TILE_N = 16 output columns by TILE_K = 128 input values: 1024 bytes
of E2M1 codes (2 x 16 bytes per lane of a warp, two coalesced loads) plus 128 bytes of block scales re-encoded as
unsigned E5M3 bytes. A lane holds 32 contiguous k of one column per half; each 32-bit word holds four bf16 pairs
placed so that a rotate and a mask turn them into bf16 bits. Any K that is a multiple of the NVFP4 group (16)
runs: `repack` pads N to a multiple of 16 and K to a multiple of 128 with zero weights, which costs only the
padding's bytes. Shapes that are multiples of the tile need no padding at all (every Qwen3 and Gemma3 projection is).

`repack` is pure PyTorch (runs on CPU or GPU, at load time); `emulate_b_fragments` replays the kernel's bit tricks
on the repacked bytes, so a CPU test can prove the layout without a GPU.
"""

from dataclasses import dataclass

import torch

from adaq.formats import nvfp4
from adaq.formats.nvfp4 import NVFP4Weight

TILE_N = 16  # output columns per super-tile (one mma m16: the weights are the A operand)
TILE_K = 128  # input values per super-tile (eight mma k16 steps = eight NVFP4 blocks)
REQUIRED_K_MULTIPLE = nvfp4.GROUP_SIZE  # the hard rule: K % 16 == 0 (anything else is not NVFP4)
MAX_DECODE_ROWS = 64  # rows per kernel launch (M, or tokens routed to one expert); more rows loop
SCALE_EXPONENT_SHIFT = 20  # the kernel's bf16 weights carry value / 2^20; colscale multiplies it back

# Where each E2M1 code bit of the four pairs in a 32-bit word is stored. Pair p of word i holds the codes of
# slice positions 8i + 2p (low bf16 half) and 8i + 2p + 1 (high half). The kernel extracts pair p as
# rotr(word, d) & mask, so a code bit whose bf16 destination is bit `out` is stored at bit (out + d) % 32.
# Pair D takes exponent bit e1 (destination 8 / 24) from rotation 6 and the rest from rotation 14.
_PAIR_ROTATION = ((0, 0, 0, 0), (4, 4, 4, 4), (10, 10, 10, 10), (14, 14, 6, 14))  # [pair][code bit m, e0, e1, s]
_CODE_BIT_DEST = (6, 7, 8, 15)  # bf16 destination of code bits m, e0, e1, sign (low half; +16 for the high half)
_PAIR_MASK = 0x81C081C0
_PAIR_MASK_Q, _PAIR_MASK_R = 0x01000100, 0x80C080C0
_SCALE_MASK, _SCALE_BIAS = 0x0FF00FF0, 0x70007000
_E5M3_BIAS = 9  # E5M3 exponent field = unbiased exponent + 9 (E4M3's smallest subnormal is 2^-9)
_E5M3_NAN = 0xFF
_SCALE_BF16_EXPONENT = 106  # (byte << 4) | 0x7000 as bf16 is the scale times 2^106


def _word_bit_sources() -> list[tuple[int, int]]:
    """[stored bit 0..31] -> (code position 0..7 in the word, code bit 0..3)."""
    sources: list[tuple[int, int] | None] = [None] * 32
    for pair in range(4):
        for half in range(2):
            for bit in range(4):
                stored = (_CODE_BIT_DEST[bit] + 16 * half + _PAIR_ROTATION[pair][bit]) % 32
                assert sources[stored] is None
                sources[stored] = (2 * pair + half, bit)
    return sources  # type: ignore[return-value]


_WORD_BITS = _word_bit_sources()

@dataclass(frozen=True)
class AlignmentRules:
    required_k_multiple: int = REQUIRED_K_MULTIPLE
    pad_free_n_multiple: int = TILE_N
    pad_free_k_multiple: int = TILE_K
    why: str = ("the sm_89 decode GEMM reads 16-column x 128-k super-tiles; other N/K (K % 16 == 0) are zero-padded "
                "at load, costing the padding's bytes")


RULES = AlignmentRules()


@dataclass
class PackedNVFP4:
    """A weight in the kernel's layout, on one device."""

    wq: torch.Tensor  # uint8 [N16, KST, 2 * 32 * 16]
    ws: torch.Tensor  # uint8 [N16, KST, 32 * 4]
    colscale: torch.Tensor  # fp32 [N16 * 16]: 2^20 / global_scale per output column
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


def column_scales(global_scales: torch.Tensor, rows_each: list[int], n_padded: int) -> torch.Tensor:
    """fp32 [n_padded]: 2^20 / global_scale for each output column (fused weights may carry several scales)."""
    per_row = torch.cat([torch.full((rows,), 1.0, dtype=torch.float32) * float(2 ** SCALE_EXPONENT_SHIFT) /
                         g.float().reshape(()).cpu() for g, rows in zip(global_scales, rows_each)])
    return torch.nn.functional.pad(per_row, (0, n_padded - per_row.numel()))


def _encode_scales(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales [n, kb] -> E5M3 bytes, adjusting codes [n, kb, 16] in place so the product is unchanged:
    negative scales move their sign into the codes, zero scales zero the codes (the byte then says 1.0)."""
    value = scales.float()
    nan = torch.isnan(value)
    zero = value == 0
    codes[zero] = 0
    codes[(value < 0) & ~nan] ^= 0x8
    magnitude = torch.where(zero | nan, torch.ones_like(value), value.abs())
    mantissa, exponent = torch.frexp(magnitude)  # magnitude = mantissa * 2^exponent, mantissa in [0.5, 1)
    field = exponent - 1 + _E5M3_BIAS
    bits = (mantissa * 16 - 8).to(torch.int32)
    assert bool(((field >= 0) & (field < 31)).all()) and bool(((mantissa * 16 - 8) == bits).all())
    byte = (field.to(torch.int32) << 3) | bits
    return torch.where(nan, torch.full_like(byte, _E5M3_NAN), byte).to(torch.uint8)


def _decode_scales(byte: torch.Tensor) -> torch.Tensor:
    """E5M3 bytes -> fp32 block scales (the E4M3 values they came from; NaN for 0xFF)."""
    b = byte.to(torch.int32)
    value = (1 + (b & 7).float() / 8) * torch.pow(2.0, ((b >> 3) - _E5M3_BIAS).float())
    return torch.where(b == _E5M3_NAN, torch.full_like(value, float("nan")), value)


def _pack_words(codes8: torch.Tensor) -> torch.Tensor:
    """[..., 8] codes (positions 0..7 of a word) -> [..., 4] little-endian bytes of the word."""
    word = torch.zeros(codes8.shape[:-1], dtype=torch.int64, device=codes8.device)
    for stored, (position, bit) in enumerate(_WORD_BITS):
        word |= ((codes8[..., position].to(torch.int64) >> bit) & 1) << stored
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)


def _unpack_words(bytes4: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_words: [..., 4] bytes -> [..., 8] codes."""
    b = bytes4.to(torch.int64)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    codes = torch.zeros((*word.shape, 8), dtype=torch.int64, device=word.device)
    for stored, (position, bit) in enumerate(_WORD_BITS):
        codes[..., position] |= ((word >> stored) & 1) << bit
    return codes.to(torch.uint8)


def _scale_words(enc: torch.Tensor) -> torch.Tensor:
    """E5M3 bytes [T, KST, g, c, half, block] -> [T, KST, 32 lanes, 4 bytes] as the kernel's masks expect: half 0's
    blocks 2c / 2c+1 at bits 4..11 / 20..27; half 1's (read after a rotate left by 8) split into nibbles."""
    e = enc.to(torch.int64)
    b00, b01, b10, b11 = e[..., 0, 0], e[..., 0, 1], e[..., 1, 0], e[..., 1, 1]
    word = ((b00 << 4) | (b01 << 20) | ((b10 & 0xF) << 28) | (b10 >> 4) | ((b11 & 0xF) << 12) | ((b11 >> 4) << 16))
    t, kst = enc.shape[:2]
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8).reshape(t, kst, 32, 4)


def repack(weight: NVFP4Weight, device: torch.device | str | None = None,
           column_global_scales: torch.Tensor | None = None) -> PackedNVFP4:
    """NVFP4Weight -> the kernel layout (see the module doc). column_global_scales [N] overrides the per-tensor one."""
    check_weight(weight)
    device = torch.device(device) if device is not None else weight.packed.device
    n, k = weight.out_features, weight.in_features
    n_pad, k_pad = padded_shape(n, k)
    tiles, kst = n_pad // TILE_N, k_pad // TILE_K
    codes = nvfp4.unpack_nibbles(weight.packed.to(device))
    codes = torch.nn.functional.pad(codes, (0, k_pad - k, 0, n_pad - n)).view(n_pad, k_pad // 16, 16)
    scales = weight.block_scale.to(device).float()
    scales = torch.nn.functional.pad(scales, (0, (k_pad - k) // nvfp4.GROUP_SIZE, 0, n_pad - n))
    enc = _encode_scales(scales, codes)
    # codes: n = 16T + 8h + g, k = 128 st + 32c + 8 word + position -> [T, KST, h, g, c, word, position]
    lanes = codes.view(tiles, 2, 8, kst, 4, 4, 8).permute(0, 3, 1, 2, 4, 5, 6)
    wq = _pack_words(lanes).reshape(tiles, kst, 2 * 32 * 16).contiguous()
    # scales: block = 8 st + 2c + b -> [T, KST, g, c, h, b]
    ws = _scale_words(enc.view(tiles, 2, 8, kst, 4, 2).permute(0, 3, 2, 4, 1, 5)).reshape(tiles, kst, 128).contiguous()
    if column_global_scales is None:
        colscale = column_scales([weight.global_scale], [n], n_pad)
    else:
        colscale = torch.nn.functional.pad(float(2 ** SCALE_EXPONENT_SHIFT) / column_global_scales.float().cpu(),
                                           (0, n_pad - n))
    return PackedNVFP4(wq, ws, colscale.to(device), n, k)


def _bf16_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int32) << 16).view(torch.float32)


def _rotr(word: torch.Tensor, d: int) -> torch.Tensor:
    return ((word >> d) | (word << (32 - d))) & 0xFFFFFFFF if d else word


def emulate_b_fragments(packed: PackedNVFP4) -> torch.Tensor:
    """The dense fp32 [N, K] weight exactly as the kernel's registers see it (bf16 value x 2^-20 times colscale).

    Follows the kernel step by step: a lane's bytes as little-endian words, the rotate/mask per pair that makes
    bf16 bits, the scale word's masks that make bf16 scale x 2^106, the bf16 product, then colscale.
    """
    tiles, kst = packed.wq.shape[:2]
    raw = packed.wq.cpu().view(tiles, kst, 2, 8, 4, 4, 4).to(torch.int64)  # [T, KST, h, g, c, word, byte]
    words = raw[..., 0] | (raw[..., 1] << 8) | (raw[..., 2] << 16) | (raw[..., 3] << 24)
    sraw = packed.ws.cpu().view(tiles, kst, 8, 4, 4).to(torch.int64)  # [T, KST, g, c, byte]
    sword = sraw[..., 0] | (sraw[..., 1] << 8) | (sraw[..., 2] << 16) | (sraw[..., 3] << 24)
    scale_bits = torch.stack([(sword & _SCALE_MASK) | _SCALE_BIAS,
                              ((((sword << 8) | (sword >> 24)) & 0xFFFFFFFF) & _SCALE_MASK) | _SCALE_BIAS], dim=-1)
    pairs = torch.stack([
        words & _PAIR_MASK, _rotr(words, 4) & _PAIR_MASK, _rotr(words, 10) & _PAIR_MASK,
        (_rotr(words, 6) & _PAIR_MASK_Q) | (_rotr(words, 14) & _PAIR_MASK_R)], dim=-1)  # [T, KST, h, g, c, word, pair]
    values = torch.stack([_bf16_bits_to_float(pairs & 0xFFFF), _bf16_bits_to_float(pairs >> 16)], dim=-1)
    # scale of (h, g, c, word): half h of the lane's scale register pair, low bf16 for words 0-1 (block 2c)
    sc = scale_bits.permute(0, 1, 4, 2, 3)  # [T, KST, h, g, c]
    scale = torch.stack([_bf16_bits_to_float(sc & 0xFFFF), _bf16_bits_to_float(sc >> 16)], dim=-1)  # [.., block]
    scale = scale[..., [0, 0, 1, 1]].unsqueeze(-1).unsqueeze(-1)  # [T, KST, h, g, c, word, 1, 1]
    products = (values.double() * scale.double()).to(torch.bfloat16).float()  # exact, as fma.rn.bf16x2 gives
    # [T, KST, h, g, c, word, pair, half] -> k = 128 st + 32 c + 8 word + 2 pair + half, n = 16 T + 8 h + g
    dense = products.reshape(tiles, kst, 2, 8, 4, 32).permute(0, 2, 3, 1, 4, 5).reshape(tiles * 16, kst * 128)
    dense = dense * packed.colscale.cpu()[:, None]
    return dense[:packed.out_features, :packed.in_features]


def unpack_codes(packed: PackedNVFP4) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `repack` up to value-preserving changes: (E2M1 codes uint8 [N, K], E4M3 block scales [N, K/16])
    on the packed tensors' device. Blocks whose scale was zero come back as zero codes with scale 1, blocks with a
    negative scale with flipped code signs and the scale's magnitude: every product code x scale is unchanged."""
    tiles, kst = packed.wq.shape[:2]
    raw = packed.wq.view(tiles, kst, 2, 8, 4, 4, 4)  # [T, KST, h, g, c, word, byte]
    codes = _unpack_words(raw).permute(0, 2, 3, 1, 4, 5, 6).reshape(tiles * 16, kst * 128)
    sraw = packed.ws.view(tiles, kst, 8, 4, 4).to(torch.int64)  # [T, KST, g, c, byte]
    word = sraw[..., 0] | (sraw[..., 1] << 8) | (sraw[..., 2] << 16) | (sraw[..., 3] << 24)
    b00, b01 = (word >> 4) & 0xFF, (word >> 20) & 0xFF
    b10 = ((word >> 28) & 0xF) | ((word & 0xF) << 4)
    b11 = ((word >> 12) & 0xF) | (((word >> 16) & 0xF) << 4)
    enc = torch.stack([torch.stack([b00, b01], -1), torch.stack([b10, b11], -1)], -2)  # [T, KST, g, c, h, b]
    enc = enc.permute(0, 4, 2, 1, 3, 5).reshape(tiles * 16, kst * 8)
    scales = _decode_scales(enc).to(torch.float8_e4m3fn)
    n, k = packed.out_features, packed.in_features
    return codes[:n, :k].contiguous(), scales[:n, :k // nvfp4.GROUP_SIZE].contiguous()


def dequantize(packed: PackedNVFP4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [N, K] weight from the kernel layout (fallback paths: non-bf16 activations, very large M)."""
    codes, scales = unpack_codes(packed)
    multiplier = packed.colscale[:packed.out_features, None] / float(2 ** SCALE_EXPONENT_SHIFT)
    step = (scales.float() * multiplier).unsqueeze(-1)
    values = nvfp4.e2m1_decode(codes).unflatten(-1, (-1, nvfp4.GROUP_SIZE))
    return (values * step).flatten(-2).to(dtype)
