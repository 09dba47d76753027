"""The FP8 prefill GEMM extension (CUTLASS-generated sm_89 kernel, activation quantization, weight expansion, grouped
MoE GEMM) and the exact path's dequantize + cuBLAS bf16 GEMM. Numerics: adaq.formats.fp8_prefill; which path runs a linear
of M rows is chosen above this floor, in adaq.backends.prefill_route.

FP8 operands: activations are quantized per token by `quantize_rows`; each NVFP4 weight is expanded to E4M3 into one
`Fp8Workspace` buffer per device just before its GEMM, so the expanded model never exists at once. The exact path's
bf16 workspace is likewise one buffer per device, reserved at load for the largest layer.
`scaled_mm(..., kind="ada")` forces the Ada kernel on Hopper (tests, microbenchmark).
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adaq.formats import fp8_prefill

KERNELS = Path(__file__).resolve().parent
GENERATED = KERNELS / "generated"
SOURCES = (KERNELS / "csrc" / "fp8_binding.cpp", KERNELS / "csrc" / "fp8_quant.cu", KERNELS / "csrc" / "fp8_mma_peak.cu",
           KERNELS / "csrc" / "fp8_moe.cu", GENERATED / "fp8_gemm_sm89.cu")
HEADERS = (KERNELS / "csrc" / "common.cuh", KERNELS / "csrc" / "fp8_grouped.cuh", GENERATED / "fp8_gemm_sm89.h")
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17")


def tiles() -> list[dict]:
    return json.loads((GENERATED / "fp8_gemm_sm89.json").read_text())["tiles"]


def cutlass_include() -> Path:
    """CUTLASS's C++ headers, shipped inside the nvidia-cutlass wheel (cutlass_library/source/include)."""
    from adaq.errors import AdaqError

    try:
        import cutlass_library
    except ImportError:
        raise AdaqError("the FP8 prefill GEMM needs CUTLASS's headers: pip install nvidia-cutlass==4.2.0.0") from None
    return Path(cutlass_library.__file__).parent / "source" / "include"


def source_hash() -> str:
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(NVCC_FLAGS).encode())
    return digest.hexdigest()[:16]


_EXTENSION = None


def ext(verbose: bool = False):
    """Build (first use, a few minutes: CUTLASS templates) or load the FP8 extension for 8.9+PTX."""
    global _EXTENSION
    if _EXTENSION is None:
        from torch.utils import cpp_extension

        from adaq.kernels.build import cache_root

        digest = source_hash()
        build_dir = cache_root() / f"fp8-{digest}"
        build_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.9+PTX")
        _EXTENSION = cpp_extension.load(
            name=f"adaq_fp8_{digest}", sources=[str(p) for p in SOURCES], extra_cflags=["-O3"],
            extra_cuda_cflags=list(NVCC_FLAGS), extra_include_paths=[str(cutlass_include())],
            build_directory=str(build_dir), verbose=verbose)
    return _EXTENSION


def exact_available() -> bool:
    """The exact path needs the decode layout's dequantization kernel (adaq.kernels.ops.nvfp4_dequantize, in adaq's
    main extension, which the cuda backend has loaded already)."""
    from adaq.kernels import ops

    return hasattr(ops.ext(), "gemm_dequantize")


_EXTENSION_ERROR: list[str] = []  # why the FP8 extension could not be loaded, once tried


def extension_ok() -> bool:
    """Whether the FP8 extension loads (it needs nvidia-cutlass's headers and nvcc the first time)."""
    if _EXTENSION is None and not _EXTENSION_ERROR:
        try:
            ext()
        except Exception as error:  # noqa: BLE001 -- a missing wheel or a failed build: auto falls back to exact
            _EXTENSION_ERROR.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    return _EXTENSION is not None


def gpu_fp8_kind(device: torch.device) -> str | None:
    """The FP8 GEMM this GPU has: 'ada' (generated sm_89 kernel), 'hopper' (cuBLASLt FP8) or None."""
    if torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (9, 0):
        return "hopper"
    if (major, minor) >= (8, 9):
        return "ada"
    return None


def extension_error() -> str | None:
    """Why the FP8 extension did not load, once `extension_ok` has tried."""
    return _EXTENSION_ERROR[0] if _EXTENSION_ERROR else None


def choose_tile(m: int, n: int, sm_count: int) -> int:
    """64x128 (4 stages) at every M: on the H100 (compute_89 PTX, prefill_bench, two runs 2026-11-22) it beat
    128x64 on all six M = 2048 shapes by 1-8 % (226-272 TFLOP/s, 60-73 % of the FP8 mma.sync ceiling), and below
    128 rows it pads less. Both hold two blocks per SM on Ada and on the H100 (register-bound), so the ranking
    carries over. The 6-stage 128x64 was faster still on the H100 (+1-7 %), but its 72 KB leave room for one block
    per SM in Ada's 100 KB, half the occupancy, so Ada does not get it. `sm_count` is kept for a grid-size rule."""
    return 1


# ---- operands and GEMM ---------------------------------------------------------------------------------------------

@dataclass
class Fp8Workspace:
    """One E4M3 weight buffer (and its column scales) per device, grown to the largest layer and reused."""

    values: torch.Tensor
    col_scale: torch.Tensor

    def view(self, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.values[: n * k].view(n, k), self.col_scale[:n]


_WORKSPACES: dict[torch.device, Fp8Workspace] = {}


def workspace(device: torch.device, n: int, k: int) -> Fp8Workspace:
    """Grows only when a larger layer appears (the cuda backend reserves it at load), never inside a captured graph.
    Keyed by the device with its index, so `cuda` (the backend's) and `cuda:0` (a tensor's) share one buffer."""
    device = _key(device)
    current = _WORKSPACES.get(device)
    if current is None or current.values.numel() < n * k or current.col_scale.numel() < n:
        size = max(n * k, 0 if current is None else current.values.numel())
        rows = max(n, 0 if current is None else current.col_scale.numel())
        current = Fp8Workspace(torch.empty(size, dtype=fp8_prefill.E4M3, device=device),
                               torch.empty(rows, dtype=torch.float32, device=device))
        _WORKSPACES[device] = current
    return current


def expand_weight(weight, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4Weight (on `device`) -> (e4m3 [N,K], col_scale [N]) views of the shared workspace."""
    n, k = weight.out_features, weight.in_features
    values, col_scale = workspace(device, n, k).view(n, k)
    global_scale = weight.global_scale.float().reshape(1).contiguous()
    ext().expand_nvfp4(weight.packed.contiguous(), weight.block_scale.contiguous(), global_scale, values, col_scale)
    return values, col_scale


def quantize_rows(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-6,
                  unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [M,K] -> (e4m3 [M,K], fp32 row_scale [M]); with `norm`, RMSNorm(x) is quantized (one pass)."""
    out = torch.empty(x.shape, dtype=fp8_prefill.E4M3, device=x.device)
    row_scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    ext().quantize_rows(x.contiguous(), norm, eps, unit_offset, out, row_scale)
    return out, row_scale


def scaled_mm(x8: torch.Tensor, row_scale: torch.Tensor, w8: torch.Tensor, col_scale: torch.Tensor,
              kind: str, tile: int | None = None) -> torch.Tensor:
    """((x8 @ w8^T) * row_scale[m]) * col_scale[n] -> bf16 [M,N] through the chosen GEMM."""
    m, n = x8.shape[0], w8.shape[0]
    if kind == "hopper":
        return torch._scaled_mm(x8, w8.t(), scale_a=row_scale.view(m, 1), scale_b=col_scale.view(1, n),
                                out_dtype=torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x8.device)
    if tile is None:
        tile = choose_tile(m, n, torch.cuda.get_device_properties(x8.device).multi_processor_count)
    ext().fp8_gemm(x8, w8, row_scale, col_scale, out, tile)
    return out


def fp8_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, kind: str | None = None) -> torch.Tensor:
    """The FP8 prefill linear for bf16 x [M,K] and an NVFP4Weight on the GPU: expand, quantize, GEMM."""
    w8, col_scale = expand_weight(weight, x.device)
    return _fp8_gemm(x, w8, col_scale, bias, kind)


@dataclass(frozen=True)
class Fp8Scales:
    """What the FP8 path needs of a weight besides the decode layout: row_mul = 64 / (each row's largest block
    scale) and col_scale = (that / global_scale) / 64, fp32 [N] each (adaq.formats.fp8_prefill.channel_scales)."""

    row_mul: torch.Tensor
    col_scale: torch.Tensor

    @staticmethod
    def of(weight, device: torch.device) -> "Fp8Scales":
        row_mul, col_scale = fp8_prefill.channel_scales(weight)
        return Fp8Scales(row_mul.to(device).contiguous(), col_scale.to(device).contiguous())


def fp8_linear_packed(x: torch.Tensor, packed, scales: Fp8Scales, bias: torch.Tensor | None = None,
                      kind: str | None = None) -> torch.Tensor:
    """The FP8 prefill linear from the decode kernels' layout (layout.PackedNVFP4): the cuda backend's path, which
    keeps no other copy of the weight. Bit for bit the same operands as `fp8_linear` on the original weight."""
    from adaq.kernels import ops

    n, k = packed.out_features, packed.in_features
    w8 = ops.nvfp4_expand_e4m3(packed, scales.row_mul, workspace(x.device, n, k).values)
    return _fp8_gemm(x, w8, scales.col_scale, bias, kind)


def fp8_linear_e4m3(x: torch.Tensor, values: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None = None,
                    kind: str | None = None) -> torch.Tensor:
    """bf16 x [M,K] times a weight already in E4M3 with per-channel scales (a quantized output layer): x quantized
    per token, the FP8 GEMM, its epilogue (adaq.formats.fp8_prefill.fp8_linear_reference)."""
    return _fp8_gemm(x, values, col_scale, bias, kind)


def _fp8_gemm(x: torch.Tensor, w8: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
              kind: str | None) -> torch.Tensor:
    x8, row_scale = quantize_rows(x)
    y = scaled_mm(x8, row_scale, w8, col_scale, kind or gpu_fp8_kind(x.device))
    return y if bias is None else y + bias


# ---- the exact path: dequantize into one bf16 workspace, cuBLAS bf16, 1/global_scale as alpha --------------------

@dataclass(frozen=True)
class ExactPlan:
    """Column segments of one weight with their fp32 multiplier 1/global_scale (one segment unless fused weights
    with different global scales share the layout); `alpha` is handed to cuBLAS as its fp32 alpha."""

    segments: tuple[tuple[int, int, float], ...]  # (first column, end column, alpha)


def exact_plan(packed) -> ExactPlan:
    """From a PackedNVFP4's colscale (2^7 / global_scale per column, fp32); host sync: call at load time."""
    from adaq.kernels.layout import SCALE_EXPONENT_SHIFT

    alphas = (packed.colscale[:packed.out_features].float().cpu() * 2.0 ** -SCALE_EXPONENT_SHIFT).tolist()
    segments, start = [], 0
    for column in range(1, len(alphas) + 1):
        if column == len(alphas) or alphas[column] != alphas[start]:
            segments.append((start, column, alphas[start]))
            start = column
    return ExactPlan(tuple(segments))


_DENSE_WORKSPACES: dict[torch.device, torch.Tensor] = {}
_ZEROS: dict[torch.device, torch.Tensor] = {}


def _key(device: torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def reserve_dense_workspace(device: torch.device, n: int, k: int) -> torch.Tensor:
    """The device's bf16 workspace, grown to hold [n, k] (call at load time: growing allocates)."""
    device = _key(device)
    current = _DENSE_WORKSPACES.get(device)
    if current is None or current.numel() < n * k:
        _DENSE_WORKSPACES[device] = current = torch.empty(n * k, dtype=torch.bfloat16, device=device)
    if device not in _ZEROS:
        _ZEROS[device] = torch.zeros((), dtype=torch.bfloat16, device=device)
    return current


def dequantize_packed(packed, out: torch.Tensor | None = None) -> torch.Tensor:
    """PackedNVFP4 -> bf16 [N, K] = e2m1 x block_scale (exact; 1/global_scale NOT applied), in `out` or the
    device's workspace, by the layout's own kernel (csrc/nvfp4_gemm.cu nvfp4_dequantize_kernel; graph-safe)."""
    from adaq.kernels import ops

    n, k = packed.out_features, packed.in_features
    if out is None:
        out = reserve_dense_workspace(packed.wq.device, n, k)
    return ops.nvfp4_dequantize(packed, out)


def workspace_bytes(device: torch.device) -> int:
    """Bytes of this device's reused prefill workspaces (the exact path's bf16 one and the FP8 weight one)."""
    device = _key(device)
    dense = _DENSE_WORKSPACES.get(device)
    fp8 = _WORKSPACES.get(device)
    return ((0 if dense is None else dense.numel() * dense.element_size())
            + (0 if fp8 is None else fp8.values.numel() + fp8.col_scale.numel() * 4))


def exact_linear(x: torch.Tensor, packed, plan: ExactPlan, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = (x [M, K] bf16 @ (e2m1 x block_scale)^T) * (1/global_scale) (+ bias): one cuBLAS bf16 GEMM per
    segment, the scale as cuBLAS's fp32 alpha, one bf16 rounding."""
    weight = dequantize_packed(packed)
    outputs = []
    for start, end, alpha in plan.segments:
        w = weight[start:end]
        if bias is None:
            outputs.append(torch.addmm(_ZEROS[_key(x.device)], x, w.t(), beta=0, alpha=alpha))
        else:
            outputs.append(torch.addmm(bias[start:end], x, w.t(), alpha=alpha))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
