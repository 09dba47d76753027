"""Write compressed-tensors `nvfp4-pack-quantized` checkpoints, exactly as llm-compressor writes them.

Shards are streamed: each tensor's bytes go to disk as soon as it is produced, so a shard never sits in memory
whole. Per quantized Linear `P`: `P.weight_packed` (uint8 [N, K/2]), `P.weight_scale` (float8_e4m3fn [N, K/16]),
`P.weight_global_scale` (fp32 [1]) and, for W4A4, `P.input_global_scale` (fp32 [1]).
"""

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaq.formats.nvfp4 import GROUP_SIZE, NVFP4Weight

FORMAT = "nvfp4-pack-quantized"
COMPRESSED_TENSORS_VERSION = "0.19.0"  # the version llm-compressor 0.14 writes; vLLM keys nothing on it
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
SCHEMES = ("nvfp4a16", "nvfp4")


def _fp4_args(observer: str | None, dynamic) -> dict:
    return {
        "actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": GROUP_SIZE, "num_bits": 4,
        "observer": observer, "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn",
        "strategy": "tensor_group", "symmetric": True, "type": "float", "zp_dtype": None,
    }


def quantization_config(scheme: str, ignore: Iterable[str], targets: Iterable[str] = ("Linear",)) -> dict:
    """config.json's `quantization_config`, key for key what llm-compressor 0.14 writes for NVFP4A16 / NVFP4."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    inputs = _fp4_args("static_minmax", "local") if scheme == "nvfp4" else None
    group = {"format": FORMAT, "input_activations": inputs, "output_activations": None,
             "targets": list(targets), "weights": _fp4_args("memoryless_minmax", False)}
    return {
        "config_groups": {"group_0": group}, "format": FORMAT, "global_compression_ratio": None,
        "ignore": list(ignore), "kv_cache_scheme": None, "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def nvfp4_tensors(prefix: str, weight: NVFP4Weight) -> dict[str, torch.Tensor]:
    """The compressed-tensors names and tensors of one quantized Linear."""
    tensors = {
        f"{prefix}.weight_packed": weight.packed,
        f"{prefix}.weight_scale": weight.block_scale,
        f"{prefix}.weight_global_scale": weight.global_scale.float().reshape(1),
    }
    if weight.input_global_scale is not None:
        tensors[f"{prefix}.input_global_scale"] = weight.input_global_scale.float().reshape(1)
    return tensors


@dataclass
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class StreamingShard:
    """A safetensors file whose header is written first, from the planned specs, and its tensors one at a time.

    Tensors must be written in the planned order with the planned dtype and shape; `close` checks all came.
    """

    path: Path
    specs: list[TensorSpec]
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})

    def __post_init__(self):
        self._next = 0
        self._handle = open(self.path, "wb")
        self._handle.write(self._header())

    def _header(self) -> bytes:
        header, offset = {"__metadata__": self.metadata}, 0
        for spec in self.specs:
            header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned, as the safetensors library writes
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{self.path.name}: expected {spec}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self.specs):
            missing = [spec.name for spec in self.specs[self._next:]]
            raise ValueError(f"{self.path.name}: {len(missing)} planned tensors never written, e.g. {missing[0]}")


def nvfp4_specs(prefix: str, out_features: int, in_features: int, with_input_scale: bool) -> list[TensorSpec]:
    """The specs `nvfp4_tensors` produces for an [out, in] Linear, known before it is quantized."""
    specs = [
        TensorSpec(f"{prefix}.weight_packed", torch.uint8, (out_features, in_features // 2)),
        TensorSpec(f"{prefix}.weight_scale", torch.float8_e4m3fn, (out_features, in_features // GROUP_SIZE)),
        TensorSpec(f"{prefix}.weight_global_scale", torch.float32, (1,)),
    ]
    if with_input_scale:
        specs.append(TensorSpec(f"{prefix}.input_global_scale", torch.float32, (1,)))
    return specs


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def write_index(folder: Path, shards: dict[str, list[TensorSpec]]) -> None:
    """model.safetensors.index.json for a multi-shard checkpoint (none for a single file)."""
    if len(shards) < 2:
        return
    weight_map = {spec.name: shard for shard, specs in shards.items() for spec in specs}
    total = sum(spec.nbytes for specs in shards.values() for spec in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(folder: Path, source_config: dict, scheme: str, ignore: Iterable[str]) -> dict:
    """config.json: the source's, with llm-compressor's `quantization_config` added."""
    config = {key: value for key, value in source_config.items() if key != "quantization_config"}
    config["quantization_config"] = quantization_config(scheme, ignore)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def save_compressed_tensors(folder: Path, source_config: dict, scheme: str, ignore: Iterable[str],
                            quantized: dict[str, NVFP4Weight], kept: dict[str, torch.Tensor]) -> None:
    """Write a whole (small) checkpoint from memory in one shard: for tests and synthetic checkpoints."""
    tensors = dict(kept)
    for prefix, weight in quantized.items():
        tensors.update(nvfp4_tensors(prefix, weight))
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in sorted(tensors.items())]
    folder.mkdir(parents=True, exist_ok=True)
    shard = StreamingShard(folder / "model.safetensors", specs)
    for spec in specs:
        shard.write(spec.name, tensors[spec.name])
    shard.close()
    write_config(folder, source_config, scheme, ignore)
