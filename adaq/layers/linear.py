"""Linear layers: NVFP4 or dense weights behind a backend handle, and the NVFP4 activation emulation (W4A4)."""

from dataclasses import dataclass

import torch
from torch import nn

from adaq.formats import nvfp4
from adaq.formats.nvfp4 import NVFP4Weight

Weight = NVFP4Weight | torch.Tensor


@dataclass
class LinearHandle:
    """What the reference backend keeps for one linear: the packed weight and/or a dense [N, K] copy."""

    out_features: int
    in_features: int
    dtype: torch.dtype
    packed: NVFP4Weight | None = None  # NVFP4 weights, on the model's device
    dense: torch.Tensor | None = None  # [N, K] in `dtype`: a bf16 weight or the cached dequantized NVFP4 weight
    input_global_scale: torch.Tensor | None = None  # set only when W4A4 activations are emulated

    def weight(self) -> torch.Tensor:
        """The dense [N, K] weight in the compute dtype, dequantizing now if it is not cached."""
        if self.dense is not None:
            return self.dense
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


def quantize_activation_nvfp4(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of activations [.., K] as compressed-tensors does for W4A4 checkpoints.

    Per 16 values along K: scale = e4m3(input_global_scale * amax / 6) (zero -> 0.125), values rounded to E2M1 of
    x / (scale / input_global_scale), saturating at 6. Computed in fp32, returned in x's dtype.
    """
    global_scale = input_global_scale.float().reshape(1).to(x.device)
    blocks = x.float().unflatten(-1, (-1, nvfp4.GROUP_SIZE))
    scale = nvfp4.block_scales(blocks.flatten(-2), global_scale)
    step = nvfp4.effective_scales(scale, global_scale).unsqueeze(-1)
    codes = nvfp4.e2m1_encode(blocks / step)
    return (nvfp4.e2m1_decode(codes) * step).flatten(-2).to(x.dtype)


class Linear(nn.Module):
    """y = x W^T (+ b) through the backend, for one weight or several stacked along N (q/k/v, gate/up).

    Stacked weights become one handle (one GEMM) when `can_fuse` allows, else one handle each and the outputs
    are concatenated. Weights arrive at load time; the module holds no parameters before.
    """

    def __init__(self, backend, in_features: int, out_sizes: int | list[int], role: str | None = None):
        super().__init__()
        self.backend = backend
        self.role = role  # the projection's name (qkv_proj, down_proj, ...): backends may treat roles differently
        self.in_features = in_features
        self.out_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        self.out_features = sum(self.out_sizes)
        self.handles: list = []
        self.biases: list[torch.Tensor | None] = []

    @property
    def fused(self) -> bool:
        return len(self.handles) == 1

    def load(self, weights: Weight | list[Weight], dtype: torch.dtype,
             biases: list[torch.Tensor | None] | None = None) -> None:
        weights = weights if isinstance(weights, list) else [weights]
        biases = biases or [None] * len(weights)
        check_shapes(weights, self.in_features, self.out_sizes)
        if can_fuse(weights):
            weights = [fuse(weights)]
            biases = [None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(n) if b is None else b.float() for b, n in zip(biases, self.out_sizes)])]
        self.handles = [self.backend.prepare_linear(w, dtype=dtype, role=self.role) for w in weights]
        self.biases = [None if b is None else b.to(device=self.backend.device, dtype=dtype) for b in biases]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.backend.linear(x, h, b) for h, b in zip(self.handles, self.biases)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def weight_shape(weight: Weight) -> tuple[int, int]:
    if isinstance(weight, NVFP4Weight):
        return weight.out_features, weight.in_features
    return tuple(weight.shape)


def check_shapes(weights: list[Weight], in_features: int, out_sizes: list[int]) -> None:
    from adaq.errors import CheckpointError

    if len(weights) != len(out_sizes):
        raise CheckpointError(f"{len(weights)} weights where {len(out_sizes)} were expected")
    for weight, rows in zip(weights, out_sizes):
        if weight_shape(weight) != (rows, in_features):
            raise CheckpointError(f"weight of shape {weight_shape(weight)} where {(rows, in_features)} was expected")
