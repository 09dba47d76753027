"""Open an HF-style checkpoint folder and expose its NVFP4 linears and plain tensors, whatever the format."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from adaq.errors import CheckpointError
from adaq.formats.nvfp4 import NVFP4Weight

CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


class Checkpoint:
    """A folder of safetensors shards plus config.json. Tensors are read lazily, one at a time."""

    format = "dense"

    def __init__(self, path: Path, config: dict, index: dict[str, Path]):
        self.path = path
        self.config = config
        self._index = index  # tensor name -> shard file

    @property
    def scheme(self) -> str | None:
        return None

    def quantized_prefixes(self) -> list[str]:
        return []

    def nvfp4(self, prefix: str) -> NVFP4Weight:
        raise CheckpointError(f"{self.path}: {prefix} is not quantized")

    def tensor_names(self) -> list[str]:
        return sorted(self._index)

    def tensor(self, name: str) -> torch.Tensor:
        shard = self._index.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        with safe_open(shard, framework="pt") as reader:
            return reader.get_tensor(name)

    def _raw(self, name: str) -> torch.Tensor | None:
        return self.tensor(name) if name in self._index else None


class CompressedTensorsCheckpoint(Checkpoint):
    format = "compressed-tensors"

    @property
    def scheme(self) -> str | None:
        groups = self.config["quantization_config"].get("config_groups", {})
        has_inputs = any(group.get("input_activations") for group in groups.values())
        return "nvfp4" if has_inputs else "nvfp4a16"

    def quantized_prefixes(self) -> list[str]:
        return sorted(name.removesuffix(".weight_packed") for name in self._index if name.endswith(".weight_packed"))

    def nvfp4(self, prefix: str) -> NVFP4Weight:
        return NVFP4Weight(
            packed=self.tensor(f"{prefix}.weight_packed"),
            block_scale=self.tensor(f"{prefix}.weight_scale"),
            global_scale=self.tensor(f"{prefix}.weight_global_scale").float().reshape(1),
            input_global_scale=self._raw(f"{prefix}.input_global_scale"),
        )

    def tensor_names(self) -> list[str]:
        return sorted(name for name in self._index if not name.endswith(CT_SUFFIXES))


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error})") from None


def index_shards(path: Path) -> dict[str, Path]:
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files (adaq reads safetensors only, never pickles)")
    index = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as reader:
            index.update({name: shard for name in reader.keys()})
    return index


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    config = read_config(path)
    index = index_shards(path)
    if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        return CompressedTensorsCheckpoint(path, config, index)
    return Checkpoint(path, config, index)
