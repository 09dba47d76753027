"""NVIDIA Model Optimizer (ModelOpt) NVFP4 checkpoints, e.g. nvidia/Qwen3-8B-FP4.

`hf_quant_config.json` (or config.json `quantization_config` with `quant_method: modelopt`) holds
`quant_algo: NVFP4 | W4A16_NVFP4`, `group_size: 16` and `exclude_modules`. Per quantized Linear `P`:
`P.weight` (uint8 [N, K/2], compressed-tensors' nibble order), `P.weight_scale` (e4m3 [N, K/16]),
`P.weight_scale_2` (fp32 scalar) and, for W4A4, `P.input_scale` (fp32 scalar). W = e2m1 * weight_scale *
weight_scale_2, so adaq's divisor global scale is 1 / weight_scale_2 (and its input global scale 1 / input_scale).
adaq decodes with the divisor (its one NVFP4 semantics), which can differ from ModelOpt's own product by one fp32
ulp of the step size. 1 / fl(1 / x) is not always x, so reader and writer agree on a rule (the divisor with the
shortest mantissa among those whose reciprocal is the stored multiplier): a compressed-tensors checkpoint copied
to ModelOpt and read back decodes bit-identically.
"""

import json
from pathlib import Path

import torch

from adaq.errors import CheckpointError
from adaq.formats.nvfp4 import GROUP_SIZE, NVFP4Weight

QUANT_CONFIG_FILE = "hf_quant_config.json"
SCHEME_OF_ALGO = {"NVFP4": "nvfp4", "W4A16_NVFP4": "nvfp4a16"}
QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
# FP8 KV-cache scales ModelOpt may add; adaq computes its own dynamic KV scales.
KV_SCALE_SUFFIXES = ("k_scale", "v_scale")


def modelopt_quant_config(path: Path, config: dict) -> dict | None:
    """The `quantization` section of a ModelOpt folder, or None when the folder is not ModelOpt."""
    file = path / QUANT_CONFIG_FILE
    if file.is_file():
        try:
            section = json.loads(file.read_text()).get("quantization")
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{file}: not valid JSON ({error})") from None
        if not isinstance(section, dict):
            raise CheckpointError(f"{file}: no 'quantization' section")
        return section
    inline = config.get("quantization_config") or {}
    return inline if inline.get("quant_method") == "modelopt" else None


def scheme_of(section: dict, where: Path) -> str:
    algo = section.get("quant_algo")
    if algo not in SCHEME_OF_ALGO:
        raise CheckpointError(f"{where}: ModelOpt quant_algo {algo!r} is not NVFP4 "
                              f"(adaq reads {', '.join(SCHEME_OF_ALGO)})")
    group_size = section.get("group_size", GROUP_SIZE)
    if group_size != GROUP_SIZE:
        raise CheckpointError(f"{where}: ModelOpt group_size {group_size}, NVFP4 needs {GROUP_SIZE}")
    return SCHEME_OF_ALGO[algo]


def quantized_prefixes(names: set[str]) -> list[str]:
    """Modules with a packed weight: both `P.weight` and `P.weight_scale_2` present."""
    return sorted(name.removesuffix(".weight_scale_2") for name in names
                  if name.endswith(".weight_scale_2") and name.removesuffix("_scale_2") in names)


def plain_names(names: set[str], prefixes: list[str]) -> list[str]:
    quantized = {f"{prefix}.{suffix}" for prefix in prefixes for suffix in ("weight",) + QUANT_SUFFIXES}
    return sorted(name for name in names
                  if name not in quantized and not name.endswith(tuple(f".{s}" for s in KV_SCALE_SUFFIXES)))


def _ulp_neighbours(x: torch.Tensor, count: int = 2) -> list[torch.Tensor]:
    values, up, down = [x], x, x
    for _ in range(count):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(0.0))
        values += [up, down]
    return values


def _trailing_zero_bits(x: torch.Tensor) -> int:
    bits = int(x.reshape(()).view(torch.int32))
    return (bits & -bits).bit_length() if bits else 32


def divisor_from_multiplier(multiplier: torch.Tensor) -> torch.Tensor:
    """adaq's divisor for ModelOpt's multiplier: of the fp32 values d with fl(1 / d) == multiplier, the one with
    the shortest mantissa (so a divisor written as its reciprocal, e.g. llm-compressor's bf16-rounded global
    scales, comes back exactly)."""
    multiplier = multiplier.float().reshape(())
    matching = [d for d in _ulp_neighbours(1.0 / multiplier) if torch.equal(1.0 / d, multiplier)]
    if not matching:
        return (1.0 / multiplier).reshape(1)
    return max(matching, key=_trailing_zero_bits).reshape(1)


def multiplier_from_divisor(divisor: torch.Tensor) -> torch.Tensor:
    """ModelOpt's multiplier for adaq's divisor, chosen so that divisor_from_multiplier gives the divisor back."""
    divisor = divisor.float().reshape(())
    for candidate in _ulp_neighbours(1.0 / divisor):
        if torch.equal(divisor_from_multiplier(candidate).reshape(()), divisor):
            return candidate
    return 1.0 / divisor


def to_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
             input_scale: torch.Tensor | None) -> NVFP4Weight:
    return NVFP4Weight(packed=weight, block_scale=weight_scale, global_scale=divisor_from_multiplier(weight_scale_2),
                       input_global_scale=None if input_scale is None else divisor_from_multiplier(input_scale))


def from_nvfp4(prefix: str, weight: NVFP4Weight) -> dict[str, torch.Tensor]:
    tensors = {
        f"{prefix}.weight": weight.packed,
        f"{prefix}.weight_scale": weight.block_scale,
        f"{prefix}.weight_scale_2": multiplier_from_divisor(weight.global_scale),
    }
    if weight.input_global_scale is not None:
        tensors[f"{prefix}.input_scale"] = multiplier_from_divisor(weight.input_global_scale)
    return tensors


def save_modelopt(folder: Path, source_config: dict, scheme: str, exclude: list[str],
                  quantized: dict[str, NVFP4Weight], kept: dict[str, torch.Tensor]) -> None:
    """A ModelOpt-layout NVFP4 folder (as `modelopt.torch.export` writes it), for tests and conversions."""
    from safetensors.torch import save_file

    algo = {scheme: algo for algo, scheme in SCHEME_OF_ALGO.items()}[scheme]
    tensors = dict(kept)
    for prefix, weight in quantized.items():
        tensors.update(from_nvfp4(prefix, weight))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / "model.safetensors"))
    section = {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": GROUP_SIZE,
               "exclude_modules": exclude}
    quant_file = {"producer": {"name": "modelopt", "version": "0.37.0"}, "quantization": section}
    (folder / QUANT_CONFIG_FILE).write_text(json.dumps(quant_file, indent=4) + "\n")
    config = {key: value for key, value in source_config.items() if key != "quantization_config"}
    config["quantization_config"] = {"quant_method": "modelopt", **section}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
