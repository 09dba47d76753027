"""Random weights in the shapes of a real model, made directly on the GPU: a weight source with the Checkpoint interface.

NVFP4 weights are drawn as what round-to-nearest NVFP4 makes of Gaussian weights (std = initializer_range): codes
with that distribution, block scales from the distribution of a 16-value block's amax, one global scale per tensor
shared by q/k/v and by gate/up as llm-compressor links them. No bf16 copy of the model ever exists. The dense
source draws bf16 N(0, std) weights for the baseline. Every tensor is seeded by its name, so a tensor is the same
whenever and wherever it is asked for, and no two tensors are alike.
"""

import functools
import zlib

import torch

from adaq.bench.shapes import HYBRID_FAMILIES, TensorSpec, model_family, model_tensors, text_config
from adaq.formats.nvfp4 import FP4_MAX, FP8_MAX, GROUP_SIZE, NVFP4Weight, quantize, unpack_nibbles

# A Gaussian block of 16 has amax ~ exp(N(0.70, 0.23)) standard deviations (measured on 16M values), and a tensor
# of tens of millions Gaussian values tops out near 6 standard deviations: the global scale maps that to 448 * 6.
BLOCK_AMAX_LOG_MEAN, BLOCK_AMAX_LOG_STD = 0.70, 0.23
TENSOR_AMAX_STDS = 6.0
# Random attention averages the prefix, and through an N(0, initializer_range) o_proj that average outweighs the
# embeddings in the residual stream: one long prompt's tokens end up alike and a MoE router sends nearly all of them
# to a few experts (Qwen3-30B-A3B, 2048 tokens: up to 2,024 on one expert, 88 of 128 experts idle), which no trained,
# load-balanced router does -- and routing is the one thing about the weights' values that changes a step's time.
# Attention output projections are drawn at a tenth of the std: the busiest expert then holds ~2x the mean
# (scripts/moe_routing_skew.py; docs/KERNELS.md, session 7).
ATTENTION_OUTPUT_STD_FACTOR = 0.1


class SyntheticCheckpoint:
    """A Checkpoint look-alike (adaq.formats.checkpoint) whose tensors are generated on `device` when read."""

    def __init__(self, config: dict, *, quantized: bool, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0, name: str = "synthetic"):
        self.path = f"synthetic:{name}"
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.quantized = quantized
        self.format = "synthetic-nvfp4" if quantized else "synthetic-dense"
        self.specs = model_tensors(config)
        self._by_name = {spec.name: spec for spec in self.specs}
        self.config = _with_quantization_config(config) if quantized else dict(config)
        self._std = float(text_config(config).get("initializer_range", 0.02))
        # Gemma 3 and the hybrids' (1 + w) norms store w - 1; a GDN layer's gated output norm stores w.
        self._norm_offset = 0.0 if model_family(config) in ("gemma3", *HYBRID_FAMILIES) else 1.0

    @property
    def scheme(self) -> str | None:
        return "nvfp4a16" if self.quantized else None

    def quantized_prefixes(self) -> list[str]:
        return [spec.name for spec in self.specs if spec.quantizable] if self.quantized else []

    def tensor_names(self) -> list[str]:
        return [self._tensor_name(spec) for spec in self.specs if not (self.quantized and spec.quantizable)]

    def nvfp4(self, prefix: str) -> NVFP4Weight:
        spec = self._by_name.get(prefix)
        if not self.quantized or spec is None or not spec.quantizable:
            raise KeyError(f"{self.path}: {prefix} is not a quantized Linear")
        return random_nvfp4(spec.shape, self.std_of(prefix), self._generator(prefix), self.device)

    def tensor(self, name: str) -> torch.Tensor:
        spec = self._by_name.get(name.removesuffix(".weight")) or self._by_name.get(name)
        if spec is None or (self.quantized and spec.quantizable):
            raise KeyError(f"{self.path}: no tensor {name}")
        generator = self._generator(name)
        if spec.role == "norm" or name.endswith("linear_attn.norm.weight"):
            offset = 1.0 if spec.role == "gdn" else self._norm_offset
            noise = torch.randn(spec.shape, generator=generator, device=self.device) * 0.05
            return (noise + offset).to(self.dtype)
        return (torch.randn(spec.shape, generator=generator, device=self.device) * self.std_of(name)).to(self.dtype)

    def std_of(self, name: str) -> float:
        """The std a weight is drawn with: initializer_range, attention output projections a tenth of it."""
        if name.removesuffix(".weight").endswith("self_attn.o_proj"):
            return self._std * ATTENTION_OUTPUT_STD_FACTOR
        return self._std

    def _tensor_name(self, spec: TensorSpec) -> str:
        return f"{spec.name}.weight" if spec.quantizable else spec.name

    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()) + (self.seed << 32))


def random_nvfp4(shape: tuple[int, int], std: float, generator: torch.Generator,
                 device: torch.device) -> NVFP4Weight:
    """An NVFP4 weight [N, K] as round-to-nearest would make it from N(0, std) values, drawn without them: codes
    from the distribution quantized Gaussian blocks have, each block holding its amax at +-6, and E4M3 block scales
    from the distribution of a 16-value block's amax."""
    rows, cols = shape
    lut = _byte_table(device)
    draws = torch.randint(0, lut.numel(), (rows, cols // 2), generator=generator, device=device, dtype=torch.int32)
    packed = _with_block_maxima(lut[draws], generator)
    global_scale = torch.full((1,), _global_scale(std), dtype=torch.float32, device=device)  # a fill: no host sync
    log_amax = torch.randn((rows, cols // GROUP_SIZE), generator=generator, device=device)
    block_amax = (log_amax * BLOCK_AMAX_LOG_STD + BLOCK_AMAX_LOG_MEAN).exp().clamp(max=TENSOR_AMAX_STDS) * std
    block_scale = (global_scale * block_amax / FP4_MAX).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    return NVFP4Weight(packed, block_scale, global_scale)


def _with_block_maxima(packed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Put a +-6 code at a random place in every block of 16: a quantizer maps each block's amax there, which makes
    the block scales consistent with the codes (quantizing the dequantized weights gives them back)."""
    device = packed.device
    blocks = packed.numel() * 2 // GROUP_SIZE
    place = torch.randint(0, GROUP_SIZE, (blocks,), generator=generator, device=device)
    sign = torch.randint(0, 2, (blocks,), generator=generator, device=device, dtype=torch.uint8)
    code = (7 | (sign << 3)).to(torch.uint8)
    byte = torch.arange(blocks, device=device) * (GROUP_SIZE // 2) + place // 2
    shift = ((place % 2) * 4).to(torch.uint8)
    flat = packed.view(-1)
    kept = flat[byte] & (0xF0 >> shift)
    flat[byte] = kept | (code << shift)
    return packed


@functools.cache
def _global_scale(std: float) -> float:
    """The tensor's global scale, rounded through bf16 as stored scales are (the model dtype), once per std."""
    return torch.tensor([FP8_MAX * FP4_MAX / (TENSOR_AMAX_STDS * std)]).to(torch.bfloat16).float().item()


@functools.cache
def _code_probabilities() -> torch.Tensor:
    """How often round-to-nearest NVFP4 of Gaussian weights gives each of the 16 codes (-0 never)."""
    generator = torch.Generator().manual_seed(0)
    sample = quantize(torch.randn(512, 1024, generator=generator))
    counts = torch.bincount(unpack_nibbles(sample.packed).flatten().long(), minlength=16).double()
    return counts / counts.sum()


@functools.cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """A 65536-entry table mapping a uniform 16-bit draw to a packed byte of two independent codes."""
    cumulative = _code_probabilities().cumsum(0)
    uniform = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
    nibble = torch.searchsorted(cumulative, uniform).clamp(max=15).to(torch.uint8)
    low, high = nibble.repeat(256), nibble.repeat_interleave(256)
    return (low | (high << 4)).to(device)


def _with_quantization_config(config: dict) -> dict:
    """The quantization_config llm-compressor writes for NVFP4A16 (weights only; lm_head and MoE routers kept)."""
    ignore = ["lm_head"]
    if model_family(config) == "qwen3_moe":
        ignore.append("re:.*mlp.gate$")
    if model_family(config) in HYBRID_FAMILIES:  # llm-compressor's Qwen3.5 / Qwen3-Next NVFP4 examples
        ignore += ["re:.*mlp.gate$", "re:.*shared_expert_gate$", "re:.*linear_attn.*"]
    weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": GROUP_SIZE,
               "symmetric": True, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None}
    quantization = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                    "quantization_status": "compressed", "config_groups": {"group_0": scheme}, "ignore": ignore}
    return {**config, "quantization_config": quantization}


def synthetic_engine(name: str, config):
    """An LLMEngine over random NVFP4 weights in the shapes of `name` (a bundled config or a config.json path), with
    `config.model` as the folder of its tokenizer and generation_config.json (`adaq serve --synthetic`)."""
    from adaq.backends import get_backend
    from adaq.backends.fallbacks import Fallbacks
    from adaq.bench.shapes import load_model_config
    from adaq.engine.llm_engine import LLMEngine
    from adaq.models import build_model, load_weights

    source = SyntheticCheckpoint(load_model_config(name), quantized=True, device=config.device, name=name)
    device = config.device if config.device_given else None  # None: auto choosing the CPU is a fallback
    backend = get_backend(config.backend, device, fallbacks=Fallbacks(strict=config.strict))
    model = build_model(source.config, backend, config.dtype, config.device, lm_head=config.lm_head)
    load_weights(model, source)
    return LLMEngine(config, model=model, model_config=source.config)
