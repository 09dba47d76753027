"""What a checkpoint must satisfy to run on adaq's sm_89 kernels: the one place validate takes these numbers from.

The decode GEMM's own rules live with it in adaq.kernels.layout: it walks a weight [N, K] in super-tiles of
TILE_N output columns by TILE_K input values and zero-pads other shapes at load (K must still be a multiple of 16).
So a shape off the tile is a warning (the padding costs memory and bandwidth), not an error. That module is plain
Python (no GPU, no build), so validate always reads the kernels' current rules.
"""

from dataclasses import dataclass
from functools import cache

from adaq.formats.nvfp4 import GROUP_SIZE


@dataclass(frozen=True)
class TileRules:
    n_multiple: int  # output features (rows of the weight) per tile
    k_multiple: int  # input features per tile
    padded: bool  # True: the kernel pads other shapes at load (warning); False: it cannot run them (error)
    why: str
    column_scale_bytes: int = 4  # the kernel layout keeps one fp32 multiplier per output column

    def padded_shape(self, n: int, k: int) -> tuple[int, int]:
        return -(-n // self.n_multiple) * self.n_multiple, -(-k // self.k_multiple) * self.k_multiple


ADA_ARCHS = ("sm_89", "sm_90")  # sm_90 runs the same Ada code through its compute_89 PTX: the same tiles


@cache
def kernel_tiles() -> TileRules:
    from adaq.kernels.layout import RULES

    return TileRules(n_multiple=RULES.pad_free_n_multiple, k_multiple=RULES.pad_free_k_multiple, padded=True,
                     why=f"the sm_89 decode GEMM's {RULES.pad_free_n_multiple}×{RULES.pad_free_k_multiple} tile")


def tile_rules(arch: str) -> TileRules:
    from adaq.errors import AdaqError

    if arch not in ADA_ARCHS:
        raise AdaqError(f"unknown --arch {arch}; adaq's kernels target {', '.join(ADA_ARCHS)}")
    return kernel_tiles()


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

# rule id -> what it demands (short: the rules table prints it); every finding names one of these.
RULES = {
    "safetensors": "well-formed safetensors shards",
    "config": "config.json describes the model",
    "architecture": "an architecture adaq runs",
    "tokenizer": "a loadable tokenizer",
    "layers": "decoder layers 0..num_hidden_layers-1, no more",
    "finite": "kept tensors (norms, embeddings, lm_head) finite",
    "tensors-present": "packed weight, block and global scales",
    "dtype": f"{PACKED_DTYPE} packed, {BLOCK_SCALE_DTYPE} block, {GLOBAL_SCALE_DTYPE} global",
    "shape": "[N, K/2], [N, K/16], one global value",
    "shape-vs-config": "N and K as config.json gives them",
    "k-multiple-of-16": f"K a multiple of {GROUP_SIZE} (the NVFP4 group)",
    "tile-n": "N on the decode kernel's tile",
    "tile-k": "K on the decode kernel's tile",
    "global-scale": "global scales finite and > 0",
    "block-scale": "block scales finite and ≥ 0",
    "input-scale": "W4A4 input scales present, finite, > 0",
    "fused-group": "q/k/v and gate/up share global scales",
    "context": "context ≤ max_position_embeddings",
    "fits": "fits in the GPU's memory",
    "tp-split": "heads, KV heads and intermediate sizes split over --tp ranks",
    "tp-split-16": "row-parallel NVFP4 Linears cut on 16-column blocks",
    "compile": "kernels compile with the intended instructions",
}
