"""The prefill paths on the GPU: which kernel runs an NVFP4 linear of M rows (numerics: adaq.formats.fp8_prefill).

`ADAQ_PREFILL_PATH` (`--prefill-path` of run / serve / bench):
- auto (default): the FP8 path where the GPU has an FP8 GEMM and the FP8 extension builds (sm_89 Ada, sm_90
  Hopper), the exact path elsewhere (other GPUs, or nvidia-cutlass missing).
- fp8: the FP8 path; an error where it cannot run. M >= `ADAQ_PREFILL_FP8_MIN_TOKENS` (default: the sweep's `fp8_min_tokens`, its
  crossover with the decode and mid-size kernels) through FP8 -- sm_89: the CUTLASS-generated FP8 GEMM
  (adaq/kernels/generated/); sm_90: the same E4M3 operands and scales through cuBLASLt's FP8 GEMM
  (`torch._scaled_mm`, row-wise scales), because Ada's FP8 mma.sync is slow there. Roles in
  `ADAQ_PREFILL_FP8_EXCLUDE` (default down_proj, whose heavy-tailed input costs most of the accuracy) take the exact
  path. Cost on the real Gemma3-270M: +0.47 % perplexity (docs/KERNELS.md). Fewer rows: decode kernels.
- exact: M >= `exact_min_tokens()` rows (the sweep's crossover with the decode and mid-size kernels): the layer's NVFP4
  weight dequantized into one reused bf16 workspace per device (ops.nvfp4_dequantize: e2m1 x block_scale, exact in
  bf16), cuBLAS bf16 GEMM, 1/global_scale applied as the GEMM's fp32 alpha before its single bf16 rounding; fewer
  rows: the NVFP4 decode kernels (bytes-bound).
- nvfp4: the NVFP4 kernels only, at every M: the decode kernel, and from `mid_min_tokens()` rows the mid-size one.
Below the exact and FP8 thresholds every path runs the NVFP4 kernels: the decode kernel, or from
`mid_min_tokens()` rows (`ADAQ_PREFILL_MID_MIN_TOKENS`) the mid-size kernel (csrc/nvfp4_gemm.cu
`nvfp4_gemm_mid_kernel`: x staged in shared memory, the weights read once per 64 rows, no dense copy); the mid-size
thresholds are optional keys of the file, and a file without them never picks that kernel.
"""


import json
import os
from pathlib import Path

import torch

from adaq.kernels import fp8_gemm

PATH_ENV = "ADAQ_PREFILL_PATH"
MIN_TOKENS_ENV = "ADAQ_PREFILL_FP8_MIN_TOKENS"
EXACT_MIN_TOKENS_ENV = "ADAQ_PREFILL_EXACT_MIN_TOKENS"
EXCLUDE_ENV = "ADAQ_PREFILL_FP8_EXCLUDE"
MOE_EXACT_MIN_TOKENS_ENV = "ADAQ_PREFILL_MOE_EXACT_MIN_TOKENS"
MID_MIN_TOKENS_ENV = "ADAQ_PREFILL_MID_MIN_TOKENS"
MOE_MID_MIN_TOKENS_ENV = "ADAQ_PREFILL_MOE_MID_MIN_TOKENS"
PATHS = ("auto", "fp8", "exact", "nvfp4")
# The rows (tokens) from which each path replaces the decode kernels, read from the JSON file that
# `python -m adaq.bench.prefill_sweep --write-thresholds` writes from a sweep over M on the GPU (its "note" says
# where the figures come from); the environment variables above override them (debugging, tests).
THRESHOLDS_FILE = Path(__file__).with_name("prefill_thresholds.json")
THRESHOLD_KEYS = ("fp8_min_tokens", "exact_min_tokens", "moe_exact_min_tokens")
OPTIONAL_THRESHOLD_KEYS = ("mid_min_tokens", "moe_mid_min_tokens")  # absent or null: that kernel is never picked


def load_thresholds(path: Path = THRESHOLDS_FILE) -> dict[str, int | None]:
    from adaq.errors import AdaqError

    try:
        data = json.loads(Path(path).read_text())
        values = {key: int(data[key]) for key in THRESHOLD_KEYS}
        values.update({key: None if data.get(key) is None else int(data[key]) for key in OPTIONAL_THRESHOLD_KEYS})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise AdaqError(f"{path}: not a prefill thresholds file ({type(error).__name__}: {error})") from None
    if any(value is not None and value < 1 for value in values.values()):
        raise AdaqError(f"{path}: thresholds must be >= 1, got {values}")
    return values


_THRESHOLDS = load_thresholds()
MIN_TOKENS = _THRESHOLDS["fp8_min_tokens"]  # FP8 GEMM from this many rows; fewer rows: exact or decode kernels
EXACT_MIN_TOKENS = _THRESHOLDS["exact_min_tokens"]  # dequantize + cuBLAS bf16 instead of the decode kernels
MOE_EXACT_MIN_TOKENS = _THRESHOLDS["moe_exact_min_tokens"]  # a MoE layer's exact grouped path
MID_MIN_TOKENS = _THRESHOLDS["mid_min_tokens"]  # the mid-size NVFP4 kernel instead of the decode kernel (None: never)
MOE_MID_MIN_TOKENS = _THRESHOLDS["moe_mid_min_tokens"]  # a MoE layer's grouped mid-size path (None: never)
# down_proj's inputs, SiLU(gate) * up, have the heaviest tails: on the real Gemma3-270M it alone costs +1.56 %
# perplexity where q/k/v, o and gate/up together cost +0.35 % (16 windows; +0.47 % on 64); docs/KERNELS.md.
DEFAULT_EXCLUDED = "down_proj"
# The output layer (an NVFP4 lm_head, --lm-head nvfp4) runs the NVFP4 kernels at every M (decode, or the mid-size one
# from its threshold): the format the user chose, exactly, and no prefill workspace the size of the vocabulary.
OUTPUT_ROLE = "lm_head"


def excluded_roles() -> set[str]:
    return {name.strip() for name in os.environ.get(EXCLUDE_ENV, DEFAULT_EXCLUDED).split(",") if name.strip()}


def covers(role: str | None) -> bool:
    """Whether a linear of this role (qkv_proj, o_proj, gate_up_proj, down_proj; None: unnamed) takes the FP8 path."""
    return role != OUTPUT_ROLE and role not in excluded_roles()


def select_path(path: str | None) -> None:
    """The `--prefill-path` of `adaq run` / `adaq serve`: None keeps $ADAQ_PREFILL_PATH (default auto)."""
    from adaq.errors import AdaqError

    if path is None:
        return
    if path not in PATHS:
        raise AdaqError(f"invalid --prefill-path {path!r}: choose one of {', '.join(PATHS)}")
    os.environ[PATH_ENV] = path


def configured_path() -> str:
    from adaq.errors import AdaqError

    path = os.environ.get(PATH_ENV, "auto")
    if path not in PATHS:
        raise AdaqError(f"invalid {PATH_ENV}={path!r}: choose one of {', '.join(PATHS)}")
    return path


def min_tokens() -> int:
    return int(os.environ.get(MIN_TOKENS_ENV, MIN_TOKENS))


def gemm_kind(device: torch.device) -> str | None:
    """'ada' (generated sm_89 kernel), 'hopper' (cuBLASLt FP8) or None (no FP8 path: exact NVFP4 kernels)."""
    if configured_path() in ("nvfp4", "exact"):
        return None
    return fp8_gemm.gpu_fp8_kind(device)


_FP8_ENABLED: dict[tuple[str, torch.device | str], bool] = {}


def fp8_enabled(device: torch.device) -> bool:
    """The FP8 path serves this device's large prefills: `auto` where it can, `fp8` or a clear error. Memoised per
    (path, device): it sits on every linear's call, and the GPU and the extension do not change under a process."""
    key = (configured_path(), device)
    if key not in _FP8_ENABLED:
        _FP8_ENABLED[key] = _fp8_enabled(device)
    return _FP8_ENABLED[key]


def _fp8_enabled(device: torch.device) -> bool:
    from adaq.errors import AdaqError

    path = configured_path()
    if path not in ("auto", "fp8") or torch.device(device).type != "cuda":
        return False
    if gemm_kind(device) is None:
        if path == "fp8":
            raise AdaqError(f"--prefill-path fp8 needs an FP8 GPU (sm_89 or newer); this one is sm_"
                            f"{''.join(map(str, torch.cuda.get_device_capability(device)))}: use auto or exact")
        return False
    if not fp8_gemm.extension_ok():
        if path == "fp8":
            raise AdaqError(f"--prefill-path fp8: the FP8 extension did not load ({fp8_gemm.extension_error()}); "
                            "pip install nvidia-cutlass==4.2.0.0, or use --prefill-path exact")
        return False
    return True


def fp8_unavailable(device: torch.device) -> str | None:
    """Why `auto` cannot give this device the FP8 path (so prefill runs exact), or None when it can."""
    if torch.device(device).type != "cuda":
        return "not a CUDA device"
    if fp8_gemm.gpu_fp8_kind(device) is None:
        capability = "".join(map(str, torch.cuda.get_device_capability(device)))
        return f"sm_{capability} has no FP8 GEMM (the FP8 path needs sm_89 or sm_90)"
    if not fp8_gemm.extension_ok():
        return f"the FP8 extension did not load ({fp8_gemm.extension_error()})"
    return None


def use_fp8(rows: int, device: torch.device) -> bool:
    return rows >= min_tokens() and fp8_enabled(device)


def exact_min_tokens() -> int:
    return int(os.environ.get(EXACT_MIN_TOKENS_ENV, EXACT_MIN_TOKENS))


def _optional_threshold(env: str, default: int | None) -> int | None:
    value = os.environ.get(env)
    return default if value is None else int(value)


def mid_min_tokens() -> int | None:
    return _optional_threshold(MID_MIN_TOKENS_ENV, MID_MIN_TOKENS)


def moe_mid_min_tokens() -> int | None:
    return _optional_threshold(MOE_MID_MIN_TOKENS_ENV, MOE_MID_MIN_TOKENS)


def _nvfp4_kernel(rows: int, mid_from: int | None) -> str:
    return "mid" if mid_from is not None and rows >= mid_from else "decode"


def route(rows: int, device: torch.device, path: str | None = None) -> str:
    """Which kernel runs an NVFP4 linear of `rows` rows: 'fp8', 'exact' (dequantize + cuBLAS bf16), 'mid' (the
    mid-size NVFP4 kernel) or 'decode'. 'fp8' only where the FP8 path is enabled; a layer without FP8 operands (an
    excluded role) asks again with path='exact'."""
    path = path or configured_path()
    if path == "nvfp4":
        return _nvfp4_kernel(rows, mid_min_tokens())
    if path in ("auto", "fp8") and rows >= min_tokens() and fp8_enabled(device):
        return "fp8"
    return "exact" if rows >= exact_min_tokens() else _nvfp4_kernel(rows, mid_min_tokens())


def moe_exact_min_tokens() -> int:
    return int(os.environ.get(MOE_EXACT_MIN_TOKENS_ENV, MOE_EXACT_MIN_TOKENS))


def moe_route(tokens: int, device: torch.device, path: str | None = None) -> str:
    """Which path runs a MoE layer of `tokens` tokens: 'fp8' (grouped FP8 GEMMs: only under --prefill-path fp8),
    'exact' (grouped dequantize + cuBLAS bf16, adaq.backends.prefill_moe_exact: `auto`'s and `exact`'s large
    prefills), 'mid' (the grouped mid-size NVFP4 kernel, adaq.backends.prefill_moe_mid) or 'decode' (the NVFP4
    grouped decode kernels). A layer without what the chosen path needs (FP8
    operands, an activation the grouped FP8 path lacks) asks again with path='exact'."""
    path = path or configured_path()
    if path == "nvfp4":
        return _nvfp4_kernel(tokens, moe_mid_min_tokens())
    if path == "fp8" and tokens >= min_tokens() and fp8_enabled(device):
        return "fp8"
    return "exact" if tokens >= moe_exact_min_tokens() else _nvfp4_kernel(tokens, moe_mid_min_tokens())


def describe(path: str | None = None, device: torch.device | None = None) -> str:
    """One line for labels: what runs prefill (large M) under `path` on `device` (default: the current GPU)."""
    path = path or configured_path()
    mid = mid_min_tokens()
    mid_note = "" if mid is None else f"; NVFP4 mid-size kernel from M >= {mid}"
    if path == "nvfp4":
        return ("prefill: NVFP4 decode kernels at every M" if mid is None else
                f"prefill: NVFP4 kernels at every M (the mid-size kernel from M >= {mid})")
    exact = f"dequantize + cuBLAS bf16 (exact) from M >= {exact_min_tokens()}{mid_note}"
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if path == "exact" or device is None or not fp8_enabled(device):
        error = fp8_gemm.extension_error()
        why = f" (FP8 path unavailable: {error})" if error and path == "auto" else ""
        return f"prefill: {exact}{why}"
    excluded = ", ".join(sorted(excluded_roles())) or "none"
    gemm = "cuBLASLt FP8" if gemm_kind(device) == "hopper" else "CUTLASS sm_89 FP8 GEMM"
    return (f"prefill: FP8 PATH ({gemm}; E4M3 weights per channel, E4M3 activations per token) from M >= "
            f"{min_tokens()}; exact for {excluded}{mid_note}")
