"""The registry of quantization methods behind `adaq quantize --method NAME`.

A method is a function `(job: QuantJob) -> MethodResult` that writes a compressed-tensors NVFP4 checkpoint
(safetensors shards + config.json) into `job.out_dir`, a fresh temp folder. The pipeline (adaq.quant.pipeline)
resolves the source, copies tokenizer files, writes the applied recipe and metadata, checks the result and renames
it into place, so a method only produces tensors. Register with:

    @register_method("name", "one-line description", needs_calibration=True)
    def quantize_name(job: QuantJob) -> MethodResult: ...

Methods living in other modules are listed in `_PLUGIN_MODULES` and imported on first lookup, so that
`adaq --help` never imports torch.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adaq.errors import AdaqError


class Progress:
    """What a method reports; the CLI passes a rich-backed subclass, library callers get this silent one."""

    def task(self, description: str, total: int | None) -> int:
        return 0

    def advance(self, task: int, amount: int = 1) -> None:
        pass

    def log(self, message: str) -> None:
        pass


@dataclass
class CalibrationSpec:
    path: Path  # a text/jsonl/json/parquet file, or a folder of them
    num_samples: int = 64
    seq_len: int = 512

    def __post_init__(self):
        if self.num_samples < 1:
            raise AdaqError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 2:
            raise AdaqError(f"--seq-len must be at least 2, got {self.seq_len}")


@dataclass
class QuantJob:
    source: Path  # a dense HF folder (config.json, safetensors, tokenizer)
    out_dir: Path  # the temp folder the method writes into
    scheme: str  # "nvfp4a16" | "nvfp4"
    recipe: "object"  # adaq.quant.recipe.Recipe
    calibration: CalibrationSpec | None = None
    device: str = "cpu"
    progress: Progress = field(default_factory=Progress)


@dataclass
class MethodResult:
    quantized: list[str]  # Linear prefixes written in NVFP4
    kept: list[str]  # Linear modules kept in their source dtype (the config's ignore list)
    notes: dict = field(default_factory=dict)  # method-specific figures for the metadata file


@dataclass
class Method:
    name: str
    description: str
    run: Callable[[QuantJob], MethodResult]
    needs_calibration: bool = False  # for every scheme (W4A4 always needs it)


METHODS: dict[str, Method] = {}
# Modules whose import registers methods (issue 7's quantizers register from their own files).
_PLUGIN_MODULES = ["adaq.quant.rtn", "adaq.quant.llmcompressor_method", "adaq.quant.scale_search",
                   "adaq.quant.activation_aware", "adaq.quant.gptq"]
_loaded = False


def register_method(name: str, description: str, needs_calibration: bool = False):
    def decorate(run: Callable[[QuantJob], MethodResult]):
        METHODS[name] = Method(name, description, run, needs_calibration)
        return run

    return decorate


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as missing:
            if missing.name != module:
                raise


def get_method(name: str) -> Method:
    _load_plugins()
    if name not in METHODS:
        raise AdaqError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_plugins()
    return sorted(METHODS)
