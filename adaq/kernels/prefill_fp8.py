"""The FP8 prefill path on the GPU, chosen by compute capability (numerics: adaq.layers.fp8_prefill).

- sm_89 (Ada): the CUTLASS-generated FP8 GEMM (adaq/kernels/generated/) for M >= min_tokens; fewer rows keep the
  NVFP4 decode kernels (bytes-bound, bf16 mma.sync).
- sm_90+ (Hopper): the same E4M3 operands and scales through cuBLASLt's FP8 GEMM (`torch._scaled_mm`, row-wise
  scales), because Ada's FP8 mma.sync runs at a quarter of the bf16 rate there (NOTES.md).
- `ADAQ_PREFILL_PATH` = fp8 (the cuda backend runs linears of >= `ADAQ_PREFILL_FP8_MIN_TOKENS` rows, default 64,
  through the GEMM above) | auto (default) | nvfp4 (exact path only). `auto` keeps the exact NVFP4 kernels in the
  engine for now: the FP8 path costs +1.6 % perplexity on Gemma3-270M, over the 0.5 % goal (docs/KERNELS.md).
  `scaled_mm(..., kind="ada")` forces the Ada kernel on Hopper (tests, microbenchmark).

Operands: activations are quantized per token by `quantize_rows`; each NVFP4 weight is expanded to E4M3 into one
`Fp8Workspace` buffer per device just before its GEMM, so the expanded model never exists at once.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adaq.layers import fp8_prefill

PATH_ENV = "ADAQ_PREFILL_PATH"
MIN_TOKENS_ENV = "ADAQ_PREFILL_FP8_MIN_TOKENS"
PATHS = ("auto", "fp8", "nvfp4")
KERNELS = Path(__file__).resolve().parent
GENERATED = KERNELS / "generated"
SOURCES = (KERNELS / "csrc" / "fp8_binding.cpp", KERNELS / "csrc" / "fp8_quant.cu", KERNELS / "csrc" / "fp8_mma_peak.cu",
           GENERATED / "fp8_gemm_sm89.cu")
HEADERS = (KERNELS / "csrc" / "common.cuh", GENERATED / "fp8_gemm_sm89.h")
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


# ---- path selection -----------------------------------------------------------------------------------------------

def configured_path() -> str:
    from adaq.errors import AdaqError

    path = os.environ.get(PATH_ENV, "auto")
    if path not in PATHS:
        raise AdaqError(f"invalid {PATH_ENV}={path!r}: choose one of {', '.join(PATHS)}")
    return path


def min_tokens() -> int:
    return int(os.environ.get(MIN_TOKENS_ENV, fp8_prefill.MIN_TOKENS))


def gemm_kind(device: torch.device) -> str | None:
    """'ada' (generated sm_89 kernel), 'hopper' (cuBLASLt FP8) or None (no FP8 path: exact NVFP4 kernels)."""
    if configured_path() == "nvfp4":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (9, 0):
        return "hopper"
    if (major, minor) >= (8, 9):
        return "ada"
    return None


def use_fp8(rows: int, device: torch.device) -> bool:
    return gemm_kind(device) is not None and rows >= min_tokens()


def choose_tile(m: int, n: int, sm_count: int) -> int:
    """128x64 (4 stages) from 128 rows; below, 64x128 wastes fewer padded rows. Both keep two blocks per Ada SM;
    `sm_count` is kept for a grid-size rule once the microbenchmark (scripts/gpu_prefill.sh) says one pays."""
    return 0 if m >= 128 else 1


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
    """Grows only when a larger layer appears (at warm-up), never inside a captured graph."""
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
    kind = kind or gemm_kind(x.device)
    w8, col_scale = expand_weight(weight, x.device)
    x8, row_scale = quantize_rows(x)
    y = scaled_mm(x8, row_scale, w8, col_scale, kind)
    return y if bias is None else y + bias
