"""What a checkpoint must satisfy to run on adaq's sm_89 kernels: the one place these numbers are defined.

The decode GEMM reads a weight [N, K] in tiles of TILE_N output rows by TILE_K input values (four NVFP4 blocks
of 16, i.e. two FP8 `mma.sync.m16n8k32` K-steps, one 32-byte packed load per row); a shape that is not a
multiple of the tile would need a masked tail the kernel does not have.
"""

from dataclasses import dataclass

from adaq.formats.nvfp4 import GROUP_SIZE


@dataclass(frozen=True)
class TileRules:
    n_multiple: int  # output features (rows of the weight) per tile
    k_multiple: int  # input features per tile
    why: str


# sm_90 runs the same Ada code through its compute_89 PTX, so it obeys the same tiles.
ADA_TILES = TileRules(n_multiple=8, k_multiple=64, why="the sm_89 decode GEMM tile")
ARCH_TILES = {"sm_89": ADA_TILES, "sm_90": ADA_TILES}


def tile_rules(arch: str) -> TileRules:
    from adaq.errors import AdaqError

    if arch not in ARCH_TILES:
        raise AdaqError(f"unknown --arch {arch}; adaq's kernels target {', '.join(ARCH_TILES)}")
    return ARCH_TILES[arch]


@dataclass(frozen=True)
class TensorRoles:
    """The tensor-name suffixes of one quantized Linear in a checkpoint format."""

    packed: str
    block_scale: str
    global_scale: str
    input_scale: str
    global_is_divisor: bool  # compressed-tensors stores 1/multiplier, ModelOpt the multiplier itself


FORMAT_ROLES = {
    "compressed-tensors": TensorRoles("weight_packed", "weight_scale", "weight_global_scale",
                                      "input_global_scale", global_is_divisor=True),
    "modelopt": TensorRoles("weight", "weight_scale", "weight_scale_2", "input_scale", global_is_divisor=False),
}

PACKED_DTYPE = "U8"
BLOCK_SCALE_DTYPE = "F8_E4M3"
GLOBAL_SCALE_DTYPE = "F32"

# Projections the engine fuses into one GEMM when they share their global scale(s).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# rule id -> what it demands; every finding names one of these.
RULES = {
    "safetensors": "every shard is a well-formed safetensors file",
    "config": "config.json is present and describes the model",
    "architecture": "the architecture is one adaq runs",
    "tensors-present": "each quantized Linear has its packed weight, block scales and global scale",
    "dtype": f"packed weight {PACKED_DTYPE}, block scales {BLOCK_SCALE_DTYPE}, global scales {GLOBAL_SCALE_DTYPE}",
    "shape": "packed [N, K/2], block scales [N, K/16], global scales one value",
    "shape-vs-config": "N and K match the shape the model config gives this projection",
    "k-multiple-of-16": f"K is a multiple of the NVFP4 group size ({GROUP_SIZE})",
    "tile-n": "N is a multiple of the decode kernel's row tile",
    "tile-k": "K is a multiple of the decode kernel's K tile",
    "global-scale": "global scales are finite and positive",
    "block-scale": "block scales are finite and non-negative",
    "input-scale": "W4A4 input global scales are present, finite and positive",
    "fused-group": "q/k/v share one global scale, and so do gate/up (else the engine will not fuse them)",
    "context": "the context fits the model's max_position_embeddings",
    "fits": "weights, KV cache, activations and CUDA context fit the GPU's memory",
    "compile": "the CUDA sources compile for the target arch and hold the FP8 MMA instructions",
}
