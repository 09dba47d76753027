"""Engine settings, validated on creation; every error names the setting (and its command-line flag)."""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaq.errors import AdaqError

# The cache tensor's storage dtype per --kv-cache-dtype; nvfp4 is packed bytes (adaq.backends.numerics.attention).
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "nvfp4": torch.uint8}
MODEL_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}
BACKENDS = ("auto", "reference", "cuda")
LM_HEADS = ("bf16", "fp8", "nvfp4")  # adaq.layers.embedding.LM_HEAD_FORMATS (a test keeps them equal)
# vLLM V1's default max_num_batched_tokens (EngineArgs, its OpenAI server): 2048 on a GPU under 70 GiB, 8192 on a
# larger one. A smaller chunk keeps less in the sliding-window layers' KV and in the largest step's activations.
LARGE_GPU_BYTES = 70 * 2**30
SMALL_BATCHED_TOKENS, LARGE_BATCHED_TOKENS = 2048, 8192
BATCHED_TOKENS_RULE = "2048 on GPUs under 70 GiB and on the CPU, 8192 on larger GPUs"
_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class EngineConfig:
    model: str | Path
    backend: str = "auto"
    kv_cache_dtype: str = "fp8"
    # The output layer: bf16 (as stored; llm-compressor keeps lm_head), or quantized at load to fp8 (E4M3 per output
    # channel, activations per token) or nvfp4 (RTN): fewer bytes per decode step, some accuracy (docs/KERNELS.md).
    lm_head: str = "bf16"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int | None = None  # None: 256 on GPU, 32 on CPU
    max_num_batched_tokens: int | None = None  # None: default_batched_tokens of the device's memory
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | str | None = None  # bytes, or "4GiB"; CPU default: see ModelRunner
    num_kv_blocks: int | None = None  # exact block count (tests, benchmarks); overrides the memory rules
    block_size: int = 16
    # Share the KV blocks of common prompt prefixes (vLLM's automatic prefix caching). Off here so that timing
    # loops that repeat a prompt (bench) measure real prefills; adaq.LLM turns it on.
    enable_prefix_caching: bool = False
    # Sliding-window layers keep only their window (+ one step's chunk) in a pool of their own (block_manager.py);
    # False allocates them the whole context like the global layers.
    window_kv: bool = True
    dtype: str | torch.dtype | None = None  # None: bf16 on GPU, fp32 on CPU
    device: str | torch.device | None = None  # None: cuda when available
    skip_tokenizer: bool = False
    enforce_eager: bool = False  # decode without CUDA graphs, on purpose (not a fallback)
    strict: bool = False  # any fallback (adaq.backends.fallbacks) is an AdaqError instead of a warning
    # Ranks of tensor parallelism (adaq.engine.tensor_parallel): this process and size - 1 spawned workers, on
    # cuda:base .. cuda:base+size-1 (gloo processes on the CPU).
    tensor_parallel_size: int = 1
    # Whether `device` was chosen by the caller: auto picking the CPU because no GPU is visible is a fallback,
    # `--device cpu` is not.
    device_given: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.model = Path(self.model)
        self.device_given = self.device is not None
        self.device = resolve_device(self.device)
        self.dtype = self._resolve_dtype()
        self.kv_cache_memory = None if self.kv_cache_memory is None else parse_size(self.kv_cache_memory)
        on_gpu = self.device.type == "cuda"
        self.max_num_seqs = self.max_num_seqs or (256 if on_gpu else 32)
        self.max_num_batched_tokens = self.max_num_batched_tokens or default_batched_tokens(device_memory(self.device))
        self._check()

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        _require(self.dtype in MODEL_DTYPES, "dtype", self.dtype, f"one of {', '.join(MODEL_DTYPES)}")
        return MODEL_DTYPES[self.dtype]

    def _check(self) -> None:
        _require(self.backend in BACKENDS, "backend", self.backend, f"one of {', '.join(BACKENDS)}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv-cache-dtype", self.kv_cache_dtype,
                 f"one of {', '.join(KV_CACHE_DTYPES)}")
        _require(self.lm_head in LM_HEADS, "lm-head", self.lm_head, f"one of {', '.join(LM_HEADS)}")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max-model-len", self.max_model_len, ">= 1")
        _require(self.max_num_seqs >= 1, "max-num-seqs", self.max_num_seqs, ">= 1")
        _require(self.max_num_batched_tokens >= 1, "max-num-batched-tokens", self.max_num_batched_tokens, ">= 1")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu-memory-utilization", self.gpu_memory_utilization,
                 "in (0, 1]")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num-kv-blocks", self.num_kv_blocks, ">= 1")
        _require(self.block_size >= 1, "block-size", self.block_size, ">= 1")
        _require(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
                 "tensor-parallel-size", self.tensor_parallel_size, "an integer >= 1")

    @property
    def kv_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES[self.kv_cache_dtype]


def default_batched_tokens(device_memory_bytes: int | None) -> int:
    """max_num_batched_tokens when none is given, for a GPU of this many bytes (None: the CPU): BATCHED_TOKENS_RULE."""
    if device_memory_bytes is not None and device_memory_bytes >= LARGE_GPU_BYTES:
        return LARGE_BATCHED_TOKENS
    return SMALL_BATCHED_TOKENS


def device_memory(device: torch.device) -> int | None:
    """A GPU's total memory in bytes; None for the CPU. Tensor-parallel ranks use GPUs of the same kind."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """cpu, cuda or cuda:N (None: cuda when available), refused when torch sees no such GPU."""
    try:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise AdaqError(f"invalid setting --device {device}: must be cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        build = " (a CPU-only build)" if torch.version.cuda is None else ""
        raise AdaqError(f"invalid setting --device {device}: torch {torch.__version__}{build} sees no CUDA GPU; "
                        "use --device cpu")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise AdaqError(f"invalid setting --device {device}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return chosen


def parse_size(value: int | str) -> int:
    """Bytes from 1073741824, "1GiB", "512MB" or "1.5g"."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit not in _SIZE_UNITS:
            raise AdaqError(f"invalid size {value!r} for --kv-cache-memory: write bytes or e.g. 512MiB, 4GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise AdaqError(f"invalid size {value!r} for --kv-cache-memory: must be > 0")
    return size


def text_config(config: dict) -> dict:
    """The language model's part of an HF config (multimodal configs nest it under text_config)."""
    return config.get("text_config") or config


def _require(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise AdaqError(f"invalid setting --{name} {value}: must be {expected}")
