"""Open an HF-style checkpoint folder and expose its NVFP4 linears and plain tensors, whatever the format.

Formats: `compressed-tensors` (nvfp4-pack-quantized, as llm-compressor writes it), `modelopt` (NVIDIA ModelOpt
NVFP4) and `dense` (anything else in safetensors). Every shard's header is checked strictly before anything is
read (adaq.formats.safetensors_check), and the tensors against config.json (adaq.formats.consistency); tensors are
then read lazily, one at a time, each refused if it holds NaN or inf. Never unpickles.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from adaq.errors import CheckpointError
from adaq.formats import modelopt
from adaq.formats.consistency import bad_block_scales, check_finite, raise_problems, structure_problems
from adaq.formats.fused_experts import per_expert_view
from adaq.formats.nvfp4 import GROUP_SIZE, NVFP4Weight
from adaq.formats.shards import Cols, Rows, packed_columns, read_slice

CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
CT_FORMAT = "nvfp4-pack-quantized"
TORCH_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class Checkpoint:
    """A folder of safetensors shards plus config.json. Tensors are read lazily, one at a time."""

    format = "dense"
    reads_slices = True  # tensor() and nvfp4() take rows / cols (adaq.formats.shards): tensor parallelism

    def __init__(self, path: Path, config: dict, index: dict[str, Path], headers: dict[Path, dict] | None = None):
        self.path = path
        self.config = config
        self._index = index  # tensor name -> shard file
        self._headers = headers or {}

    @property
    def scheme(self) -> str | None:
        return None

    def quantized_prefixes(self) -> list[str]:
        return []

    def nvfp4(self, prefix: str, rows: Rows = None, cols: Cols = None) -> NVFP4Weight:
        raise CheckpointError(f"{self.path}: {prefix} is not quantized")

    def tensor_names(self) -> list[str]:
        return sorted(self._index)

    def all_names(self) -> list[str]:
        """Every tensor in the shards, quantization tensors included."""
        return sorted(self._index)

    def shards(self) -> list[Path]:
        return sorted(set(self._index.values()))

    def shard_of(self, name: str) -> Path | None:
        return self._index.get(name)

    def names_in(self, shard: Path) -> list[str]:
        return sorted(name for name, file in self._index.items() if file == shard)

    def tensor(self, name: str, rows: Rows = None, cols: Cols = None) -> torch.Tensor:
        """The tensor as stored (or its `rows` and `cols` only, read alone); NaN or inf in a floating tensor is a
        CheckpointError."""
        shard = self._index.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        with safe_open(shard, framework="pt") as reader:
            if rows is None and cols is None:
                return check_finite(self.path, name, reader.get_tensor(name))
            return check_finite(self.path, name, read_slice(reader.get_slice(name), rows, cols))

    def specs(self) -> dict[str, tuple[str, list[int]]]:
        """(safetensors dtype, shape) of every tensor, from the shard headers."""
        specs = {}
        for shard in self.shards():
            header = self._headers.get(shard)
            if header is None:
                with safe_open(shard, framework="pt") as reader:
                    header = {name: {"dtype": reader.get_slice(name).get_dtype(),
                                     "shape": reader.get_slice(name).get_shape()} for name in reader.keys()}
            specs.update({name: (entry["dtype"], list(entry["shape"])) for name, entry in header.items()
                          if name != "__metadata__"})
        return specs

    def tensor_spec(self, name: str) -> tuple[torch.dtype | None, tuple[int, ...]]:
        """(dtype, shape) from the shard header, without reading the tensor; dtype None if torch has none."""
        shard = self._index.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        entry = self._headers.get(shard, {}).get(name)
        if entry is None:
            with safe_open(shard, framework="pt") as reader:
                sliced = reader.get_slice(name)
                return TORCH_DTYPES.get(sliced.get_dtype()), tuple(sliced.get_shape())
        return TORCH_DTYPES.get(entry["dtype"]), tuple(entry["shape"])

    def _raw(self, name: str) -> torch.Tensor | None:
        return self.tensor(name) if name in self._index else None


class CompressedTensorsCheckpoint(Checkpoint):
    format = "compressed-tensors"

    def __init__(self, path: Path, config: dict, index: dict[str, Path], headers: dict[Path, dict] | None = None):
        super().__init__(path, config, index, headers)
        check_ct_config(path, config["quantization_config"])

    @property
    def scheme(self) -> str | None:
        groups = self.config["quantization_config"].get("config_groups", {})
        has_inputs = any(group.get("input_activations") for group in groups.values())
        return "nvfp4" if has_inputs else "nvfp4a16"

    @property
    def ignore(self) -> list[str]:
        return list(self.config["quantization_config"].get("ignore") or [])

    def quantized_prefixes(self) -> list[str]:
        return sorted(name.removesuffix(".weight_packed") for name in self._index if name.endswith(".weight_packed"))

    def nvfp4(self, prefix: str, rows: Rows = None, cols: Cols = None) -> NVFP4Weight:
        packed_cols, scale_cols = packed_columns(prefix, cols)
        weight = NVFP4Weight(
            packed=self.tensor(f"{prefix}.weight_packed", rows, packed_cols),
            block_scale=self.tensor(f"{prefix}.weight_scale", rows, scale_cols),
            global_scale=self.tensor(f"{prefix}.weight_global_scale").float().reshape(1),
            input_global_scale=_scalar(self._raw(f"{prefix}.input_global_scale")),
        )
        check_nvfp4(self.path, prefix, weight, ("weight_packed", "weight_scale", "weight_global_scale"))
        return weight

    def tensor_names(self) -> list[str]:
        return sorted(name for name in self._index if not name.endswith(CT_SUFFIXES))


class ModelOptCheckpoint(Checkpoint):
    format = "modelopt"

    def __init__(self, path: Path, config: dict, index: dict[str, Path], headers: dict[Path, dict] | None,
                 section: dict):
        super().__init__(path, config, index, headers)
        self.quant_section = section
        self._scheme = modelopt.scheme_of(section, path)
        self._prefixes = modelopt.quantized_prefixes(set(index))

    @property
    def scheme(self) -> str | None:
        return self._scheme

    @property
    def ignore(self) -> list[str]:
        return list(self.quant_section.get("exclude_modules") or [])

    def quantized_prefixes(self) -> list[str]:
        return list(self._prefixes)

    def nvfp4(self, prefix: str, rows: Rows = None, cols: Cols = None) -> NVFP4Weight:
        packed_cols, scale_cols = packed_columns(prefix, cols)
        weight = modelopt.to_nvfp4(self.tensor(f"{prefix}.weight", rows, packed_cols),
                                   self.tensor(f"{prefix}.weight_scale", rows, scale_cols),
                                   self.tensor(f"{prefix}.weight_scale_2"), self._raw(f"{prefix}.input_scale"))
        check_nvfp4(self.path, prefix, weight, ("weight", "weight_scale", "weight_scale_2"))
        return weight

    def tensor_names(self) -> list[str]:
        return modelopt.plain_names(set(self._index), self._prefixes)


def _scalar(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float().reshape(1)


def check_ct_config(path: Path, qconfig: dict) -> None:
    """Refuse compressed-tensors checkpoints that are not NVFP4 (FP8, INT4, ...), naming what they are."""
    formats = {qconfig.get("format")} | {group.get("format") for group in qconfig.get("config_groups", {}).values()}
    formats.discard(None)
    if formats != {CT_FORMAT}:
        raise CheckpointError(f"{path}: compressed-tensors format {', '.join(sorted(map(str, formats))) or 'none'} "
                              f"is not NVFP4 (adaq reads {CT_FORMAT})")
    for name, group in qconfig.get("config_groups", {}).items():
        weights = group.get("weights") or {}
        if (weights.get("num_bits"), weights.get("type"), weights.get("group_size")) != (4, "float", GROUP_SIZE):
            raise CheckpointError(f"{path}: config_groups.{name}.weights is not 4-bit float with groups of "
                                  f"{GROUP_SIZE}: {weights}")


def check_nvfp4(path: Path, prefix: str, weight: NVFP4Weight, names: tuple[str, str, str]) -> None:
    """dtypes and shapes of one NVFP4 linear; the error names the tensor and the rule it breaks."""
    packed_name, scale_name, global_name = (f"{prefix}.{name}" for name in names)
    rules = [
        (weight.packed.dtype == torch.uint8 and weight.packed.ndim == 2,
         f"{packed_name} must be a 2-D uint8 tensor, got {weight.packed.dtype} {tuple(weight.packed.shape)}"),
        (weight.block_scale.dtype == torch.float8_e4m3fn,
         f"{scale_name} must be float8_e4m3fn, got {weight.block_scale.dtype}"),
        (weight.global_scale.numel() == 1, f"{global_name} must hold one value, got {weight.global_scale.numel()}"),
    ]
    for ok, message in rules:
        if not ok:
            raise CheckpointError(f"{path}: {message}")
    rows, half_k = weight.packed.shape
    expected = (rows, half_k * 2 // GROUP_SIZE)
    if (half_k * 2) % GROUP_SIZE or tuple(weight.block_scale.shape) != expected:
        raise CheckpointError(f"{path}: {scale_name} has shape {tuple(weight.block_scale.shape)}, expected "
                              f"{expected} for {packed_name} of shape {(rows, half_k)} (K = {half_k * 2} must be "
                              f"a multiple of {GROUP_SIZE})")
    check_scale_values(path, prefix, weight, scale_name, global_name)


def check_scale_values(path: Path, prefix: str, weight: NVFP4Weight, scale_name: str, global_name: str) -> None:
    """The rules `adaq validate` reports as global-scale, input-scale and block-scale, enforced at load."""
    scalars = [(global_name, weight.global_scale), (f"{prefix} input scale", weight.input_global_scale)]
    for name, value in scalars:
        if value is not None and not (bool(torch.isfinite(value).all()) and bool((value > 0).all())):
            raise CheckpointError(f"{path}: {name} is {value.item():g}: a scale must be finite and positive")
    problem = bad_block_scales(weight.block_scale)
    if problem is not None:
        raise CheckpointError(f"{path}: {scale_name} holds {problem}: block scales must be finite and >= 0")


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return config


def read_headers(path: Path) -> dict[Path, dict]:
    """Every shard's checked header (truncation, lying offsets, unknown dtypes and pickles are refused here)."""
    try:
        from adaq.formats.safetensors_check import check_safetensors_folder
    except ImportError:
        return {}
    return check_safetensors_folder(path)


def index_shards(path: Path, headers: dict[Path, dict] | None = None) -> dict[str, Path]:
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(pickles[:3])}: adaq never unpickles; convert to safetensors)" if pickles else ""
        raise CheckpointError(f"{path}: no *.safetensors files{hint}")
    index = {}
    for shard in shards:
        header = (headers or {}).get(shard)
        if header is not None:
            names = [name for name in header if name != "__metadata__"]
        else:
            with safe_open(shard, framework="pt") as reader:
                names = list(reader.keys())
        index.update({name: shard for name in names})
    return index


def open_checkpoint(path: str | Path, check: bool = True) -> Checkpoint:
    """The checkpoint in folder `path`; with `check`, a CheckpointError when its tensors disagree with config.json
    (layers, Linear shapes: adaq.formats.consistency). `adaq validate` opens with check=False and reports them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    config = read_config(path)
    headers = read_headers(path)
    index = index_shards(path, headers)
    section = modelopt.modelopt_quant_config(path, config)
    if section is not None:
        checkpoint = ModelOptCheckpoint(path, config, index, headers, section)
    elif (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        checkpoint = CompressedTensorsCheckpoint(path, config, index, headers)
    else:
        checkpoint = per_expert_view(Checkpoint(path, config, index, headers))
    if check:
        raise_problems(path, structure_problems(config, checkpoint.specs(), set(checkpoint.quantized_prefixes())))
    return checkpoint
