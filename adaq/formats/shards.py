"""Parts of a tensor for tensor parallelism: row ranges (output features, dim 0) and one column range (input
features, dim 1), read straight from safetensors (`get_slice`) so a rank never holds more than its share.

NVFP4 weights are cut on their packed layout: `weight_packed` [N, K/2] takes columns K0/2 .. K1/2 and `weight_scale`
[N, K/16] takes K0/16 .. K1/16, so every column cut must fall on a 16-value block boundary (a block and its scale
stay on one rank); the per-tensor global scales are kept whole.
"""

import torch

from adaq.errors import CheckpointError
from adaq.formats.nvfp4 import GROUP_SIZE, NVFP4Weight

Rows = list[tuple[int, int]] | None  # ranges of dim 0, concatenated in order; None: all rows
Cols = tuple[int, int] | None  # one range of dim 1; None: all columns


def rows_of(rows) -> Rows:
    """A single (start, stop) or a list of them, as a list."""
    if rows is None:
        return None
    return [tuple(rows)] if isinstance(rows[0], int) else [tuple(r) for r in rows]


def slice_tensor(tensor: torch.Tensor, rows: Rows = None, cols: Cols = None) -> torch.Tensor:
    """The rows and columns of an in-memory tensor (a source that cannot read parts)."""
    if cols is not None:
        tensor = tensor[:, cols[0]:cols[1]]
    if rows is not None:
        tensor = torch.cat([tensor[start:stop] for start, stop in rows_of(rows)])
    return tensor.contiguous()


def read_slice(sliced, rows: Rows = None, cols: Cols = None) -> torch.Tensor:
    """The rows and columns of a safetensors `get_slice` handle; only those bytes are read."""
    rows = rows_of(rows) or [(0, sliced.get_shape()[0])]
    parts = [sliced[start:stop] if cols is None else sliced[start:stop, cols[0]:cols[1]] for start, stop in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def packed_columns(name: str, cols: Cols) -> tuple[Cols, Cols]:
    """(columns of weight_packed, columns of weight_scale) for input columns `cols`; a cut inside a 16-value block
    is refused, naming the Linear and the column."""
    if cols is None:
        return None, None
    for edge in cols:
        if edge % GROUP_SIZE:
            raise CheckpointError(f"{name}: a tensor-parallel split at input column {edge} is not a multiple of "
                                  f"{GROUP_SIZE} (NVFP4 blocks and their scales must stay on one rank)")
    return (cols[0] // 2, cols[1] // 2), (cols[0] // GROUP_SIZE, cols[1] // GROUP_SIZE)


def slice_nvfp4(weight: NVFP4Weight, rows: Rows, cols: Cols, name: str) -> NVFP4Weight:
    packed_cols, scale_cols = packed_columns(name, cols)
    return NVFP4Weight(slice_tensor(weight.packed, rows, packed_cols),
                       slice_tensor(weight.block_scale, rows, scale_cols), weight.global_scale,
                       weight.input_global_scale)
