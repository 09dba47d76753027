"""`adaq validate` as a library call: is this checkpoint runnable by adaq's sm_89 kernels, and does it fit?"""

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from adaq.errors import AdaqError, CheckpointError, UnsupportedArchitecture
from adaq.formats.architectures import architecture_of
from adaq.formats.consistency import (embedding_problems, layer_problems, linear_shapes, missing_linear_problems,
                                     nonfinite, shape_problem, size_problems)
from adaq.formats.safetensors_check import check_safetensors_folder, refuse_pickle, tensor_nbytes
from adaq.formats.shapes import ModelShape
from adaq.validate.budget import (
    DEFAULT_UTILIZATION,
    Budget,
    Gpu,
    WeightBytes,
    check_plan_options,
    estimate_weight_bytes,
    nvfp4_linear_bytes,
    plan,
)
from adaq.validate.rules import FORMAT_ROLES, TensorRoles, tile_rules
from adaq.validate.tensor_parallel import (block_split_problems, budget_note, divisibility_problems, rank_shape,
                                           rank_weights)
from adaq.validate.tensors import Checks, Finding, TensorIndex, check_linears

DEFAULT_CONTEXT = 4096
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
LEVELS = ("layout", "full")  # layout: headers and config only; full: also every scale and every kept tensor's values
TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class ValidationReport:
    path: Path
    format: str
    scheme: str | None
    architecture: str
    arch: str
    quantized_linears: int
    tensors: int
    findings: list[Finding] = field(default_factory=list)
    rules_applied: Counter = field(default_factory=Counter)
    budget: Budget | None = None
    compile: dict | None = None
    shape: ModelShape | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {
            "path": str(self.path), "valid": self.valid, "format": self.format, "scheme": self.scheme,
            "architecture": self.architecture, "arch": self.arch,
            "quantized_linears": self.quantized_linears, "tensors": self.tensors,
            "layer_types": self.shape.layer_types() if self.shape else None,
            "moe_layers": self.shape.moe_layers if self.shape else None,
            "errors": len(self.errors), "warnings": len(self.warnings),
            "findings": [vars(f) for f in self.findings],
            "rules": {rule: {"checked": self.rules_applied[rule], "failed": self.failed(rule)}
                      for rule in sorted(self.rules_applied)},
            "budget": self.budget.as_dict() if self.budget else None,
            "compile": self.compile,
        }

    def failed(self, rule: str) -> int:
        return sum(1 for f in self.findings if f.rule == rule)


def validate_checkpoint(path: str | Path, arch: str = "sm_89", gpu: str | None = "rtx4090", batch: int = 1,
                        context: int | None = None, kv_cache_dtype: str = "fp8", compile: bool = False,
                        utilization: float = DEFAULT_UTILIZATION, window_kv: bool = True,
                        max_num_batched_tokens: int | None = None, level: str = "full",
                        compile_progress=None, tp: int = 1) -> ValidationReport:
    """Check a checkpoint folder's layout and values for `arch` and plan its VRAM on `gpu` (None: no plan; a
    config.json path instead of a folder: the config checks and the plan only, weights estimated;
    `window_kv`, `max_num_batched_tokens`: the engine's settings that size the sliding-window layers' KV (None: the
    engine's default on `gpu`); `tp`: tensor-parallel ranks, whose split rules are checked and whose per-GPU share
    the plan is).

    Raises CheckpointError for a folder that cannot be read at all (corrupt safetensors, no config.json);
    everything else becomes a Finding in the report. `level` "layout" reads headers and config only."""
    from adaq.formats.checkpoint import open_checkpoint

    path = Path(path)
    if level not in LEVELS:
        raise AdaqError(f"unknown validation level {level!r}: one of {', '.join(LEVELS)}")
    tiles, target = tile_rules(arch), None if gpu is None else Gpu.parse(gpu)
    check_plan_options(batch, context, kv_cache_dtype, utilization)
    if tp < 1:
        raise AdaqError(f"invalid setting --tp {tp}: must be >= 1")
    plan_options = PlanOptions(target, batch, context, kv_cache_dtype, utilization, window_kv,
                               max_num_batched_tokens, tp)
    if path.is_file() and path.suffix == ".json":
        return validate_config(path, arch, plan_options, compile, compile_progress)
    require_folder(path)
    headers = check_safetensors_folder(path)
    checkpoint = open_checkpoint(path, check=False)
    index = TensorIndex.from_headers(headers)
    prefixes = checkpoint.quantized_prefixes()
    checks = Checks()
    architecture = check_architecture(checks, checkpoint.config)
    shape = model_shape(checks, checkpoint.config)
    check_quantization_config(checks, checkpoint, index)
    check_tokenizer(checks, path)
    roles = FORMAT_ROLES.get(checkpoint.format)
    if roles is not None:
        checks.merge(check_linears(prefixes, index, roles, tiles, needs_input_scale=checkpoint.scheme == "nvfp4",
                                   read_values=level == "full"))
    if shape is not None:
        check_structure(checks, shape, checkpoint, set(prefixes))
        if tp > 1:
            check_tensor_parallel(checks, shape, index, prefixes, roles, tp)
    if level == "full":
        check_kept_values(checks, index, kept_names(index, prefixes, roles))
    budget = None
    if shape is not None and target is not None:
        weights = weights_from_index(index, prefixes, FORMAT_ROLES.get(checkpoint.format))
        budget = plan_budget(checks, shape, weights, plan_options)
    compiled = compile_check(checks, arch, compile_progress) if compile else None
    return ValidationReport(path, checkpoint.format, checkpoint.scheme, architecture, arch, len(prefixes),
                            len(index.entries), checks.findings, checks.applied, budget, compiled, shape)


@dataclass(frozen=True)
class PlanOptions:
    gpu: Gpu | None
    batch: int
    context: int | None
    kv_cache_dtype: str
    utilization: float
    window_kv: bool
    max_num_batched_tokens: int | None  # None: the engine's default on gpu
    tp: int


def plan_budget(checks: Checks, shape: ModelShape, weights: WeightBytes, options: PlanOptions) -> Budget:
    """The VRAM plan on options.gpu (one GPU's share with --tp), and the findings it gives."""
    o = options
    context = o.context or min(DEFAULT_CONTEXT, shape.max_position or DEFAULT_CONTEXT)
    budget = plan(rank_shape(shape, o.tp), rank_weights(weights, o.tp), o.gpu, o.batch, context, o.kv_cache_dtype,
                  o.utilization, o.window_kv, o.max_num_batched_tokens)
    if o.tp > 1:
        budget.notes.append(budget_note(shape, o.tp))
    check_budget(checks, budget, shape)
    return budget


def validate_config(path: Path, arch: str, options: PlanOptions, compile: bool = False,
                    compile_progress=None) -> ValidationReport:
    """A config.json without weights: the architecture and config checks, the split rules of --tp, and the VRAM plan
    with weights estimated from the config (every attention/MLP/expert Linear NVFP4 W4A16, the rest bf16)."""
    config = read_config(path)
    checks = Checks()
    architecture = check_architecture(checks, config)
    shape = model_shape(checks, config)
    budget = None
    if shape is not None and options.tp > 1:
        problems = divisibility_problems(shape, options.tp)
        checks.check("tp-split", not problems, "", "; ".join(problems))
    if shape is not None and options.gpu is not None:
        budget = plan_budget(checks, shape, estimate_weight_bytes(shape), options)
        budget.notes.append("weights estimated from config.json alone: every attention, MLP and expert Linear in "
                            "NVFP4 (the decode kernel's layout), everything else in bf16")
    compiled = compile_check(checks, arch, compile_progress) if compile else None
    return ValidationReport(path, "config.json only", None, architecture, arch, 0, 0, checks.findings, checks.applied,
                            budget, compiled)


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot be read as JSON ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a config.json (a JSON object is expected)")
    return config


def check_checkpoint(path: str | Path, level: str = "full") -> ValidationReport:
    """The checks every command runs before it uses a checkpoint (those of `adaq validate`, without the VRAM plan):
    a CheckpointError naming the first problem when there is one, else the report (warnings included)."""
    require_folder(Path(path))
    report = validate_checkpoint(path, gpu=None, level=level)
    errors = report.errors
    if errors:
        more = f" (and {len(errors) - 1} more; `adaq validate {path}` lists them)" if len(errors) > 1 else ""
        raise CheckpointError(f"{path}: not a valid checkpoint: {errors[0].line()}{more}")
    return report


def require_folder(path: Path) -> None:
    if path.is_dir():
        return
    refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    raise CheckpointError(f"{path}: not a checkpoint folder (give the folder holding config.json and *.safetensors)")


def check_architecture(checks: Checks, config: dict) -> str:
    try:
        name = architecture_of(config)
    except UnsupportedArchitecture as error:
        checks.check("architecture", False, "", str(error))
        return ", ".join(config.get("architectures") or ["?"])
    checks.check("architecture", True, "", "")
    return name


def model_shape(checks: Checks, config: dict) -> ModelShape | None:
    if invalid := size_problems(config):  # open_checkpoint's own rule
        for problem in invalid:
            checks.check("config", False, "", f"config.json: {problem.message}")
        return None
    try:
        shape = ModelShape.from_config(config)
    except CheckpointError as error:
        checks.check("config", False, "", str(error))
        return None
    return shape if check_engine_config(checks, config) else None


def check_engine_config(checks: Checks, config: dict) -> bool:
    """The engine reads config.json through transformers' config class for its model_type: so does validate."""
    from adaq.models.registry import text_config

    try:
        text_config(config)
    except AdaqError as error:
        return checks.check("config", False, "", str(error))
    return checks.check("config", True, "", "")


def check_structure(checks: Checks, shape: ModelShape, checkpoint, quantized: set[str]) -> None:
    """Layers and Linear shapes against config.json: open_checkpoint's own rules (adaq.formats.consistency)."""
    specs = checkpoint.specs()
    problems = layer_problems(shape, specs)
    checks.check("layers", not problems, "", "; ".join(problem.message for problem in problems))
    for prefix, found, expected in linear_shapes(shape, specs, quantized):
        checks.check("shape-vs-config", found == expected, prefix, shape_problem(prefix, found, expected).message)
    for problem in missing_linear_problems(shape, specs) + embedding_problems(shape, specs):
        checks.check(problem.rule, False, problem.tensor, problem.message)


def kept_names(index: TensorIndex, prefixes: list[str], roles: TensorRoles | None) -> list[str]:
    """Floating tensors the engine keeps as they are (norms, embeddings, lm_head, routers, dense Linears)."""
    members = set(prefixes)
    return [name for name, entry in index.entries.items()
            if entry["dtype"] in FLOAT_DTYPES and (roles is None or name.rpartition(".")[0] not in members)]


def check_kept_values(checks: Checks, index: TensorIndex, names: list[str]) -> None:
    """NaN or inf in any kept tensor, streamed one tensor at a time, shard by shard."""
    from safetensors import safe_open

    by_shard: dict[Path, list[str]] = {}
    for name in names:
        by_shard.setdefault(index.shards[name], []).append(name)
    for shard, shard_names in by_shard.items():
        with safe_open(shard, framework="pt") as reader:
            for name in shard_names:
                problem = nonfinite(reader.get_tensor(name))
                checks.check("finite", problem is None, name, f"holds {problem}: the checkpoint is corrupt")


def check_tokenizer(checks: Checks, path: Path) -> None:
    """`adaq run` needs a tokenizer beside the weights: tokenizer.json (parsed here) or a SentencePiece model."""
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # the tokenizers library raises plain Exception subclasses for any bad file
            checks.check("tokenizer", False, "tokenizer.json", f"cannot be loaded: {str(error).splitlines()[0]}")
            return
        checks.check("tokenizer", True, "tokenizer.json", "")
        return
    present = any((path / name).is_file() for name in TOKENIZER_FILES)
    checks.check("tokenizer", present, "", "no tokenizer files (tokenizer.json or tokenizer.model): adaq run and "
                 "serve need one; copy them from the source model", severity="warning")


def check_quantization_config(checks: Checks, checkpoint, index: TensorIndex) -> None:
    if checkpoint.format == "dense":
        packed = [name for name in index.entries if name.endswith(".weight_packed")]
        checks.check("config", not packed, packed[0] if packed else "",
                     "looks like compressed-tensors NVFP4, but config.json has no quantization_config "
                     "with quant_method compressed-tensors")
        return
    # open_checkpoint has already refused compressed-tensors and ModelOpt configs that are not NVFP4.
    checks.check("tensors-present", bool(checkpoint.quantized_prefixes()), "",
                 f"config.json says {checkpoint.format} NVFP4 but no tensor is a quantized weight")


def weights_from_index(index: TensorIndex, prefixes: list[str], roles: TensorRoles | None) -> WeightBytes:
    """Quantized Linears as the kernels hold them; every other floating tensor at bf16 (the engine's GPU dtype)."""
    quantized = sum(quantized_linear_bytes(index, prefix, roles) for prefix in prefixes)
    members = set(prefixes)
    kept = sum(kept_bytes(entry) for name, entry in index.entries.items() if name.rpartition(".")[0] not in members)
    return WeightBytes(quantized, kept)


def quantized_linear_bytes(index: TensorIndex, prefix: str, roles: TensorRoles) -> int:
    packed = index.entries.get(f"{prefix}.{roles.packed}")
    if packed is None or len(packed["shape"]) != 2:  # already an error finding; count what is stored
        return sum(tensor_nbytes(e) for name, e in index.entries.items() if name.rpartition(".")[0] == prefix)
    n, k = packed["shape"][0], packed["shape"][1] * 2
    return nvfp4_linear_bytes(n, k, input_scale=f"{prefix}.{roles.input_scale}" in index.entries)


def kept_bytes(entry: dict) -> int:
    return 2 * math.prod(entry["shape"]) if entry["dtype"] in FLOAT_DTYPES else tensor_nbytes(entry)


def check_tensor_parallel(checks: Checks, shape: ModelShape, index: TensorIndex, prefixes: list[str],
                          roles: TensorRoles | None, size: int) -> None:
    problems = divisibility_problems(shape, size)
    checks.check("tp-split", not problems, "", "; ".join(problems))
    if roles is None:
        return
    packed = {p: index.entries.get(f"{p}.{roles.packed}") for p in prefixes}
    in_features = {p: 2 * e["shape"][1] for p, e in packed.items() if e is not None and len(e["shape"]) == 2}
    problems = block_split_problems(in_features, size)
    checks.check("tp-split-16", not problems, *(problems[0] if problems else ("", "")))
    for prefix, message in problems[1:]:
        checks.check("tp-split-16", False, prefix, message)


def check_budget(checks: Checks, budget: Budget, shape: ModelShape) -> None:
    if shape.max_position:
        checks.check("context", budget.context <= shape.max_position, "",
                     f"--context {budget.context} exceeds the model's max_position_embeddings {shape.max_position}")
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    checks.check("fits", budget.fits, "",
                 f"needs {gib(budget.total)} but {budget.gpu.name} offers {gib(budget.usable)} at "
                 f"gpu_memory_utilization {budget.utilization}; at --context {budget.context} the largest batch "
                 f"is {budget.max_batch}, at --batch {budget.batch} the largest context is {budget.max_context}")


def compile_check(checks: Checks, arch: str, progress=None) -> dict:
    """Delegate to adaq.kernels.build.compile_check (`progress(source, entry)` per source compiled); say plainly when
    it or nvcc is missing."""
    if shutil.which("nvcc") is None:
        message = ("nvcc not found on PATH: install the CUDA toolkit 12.4 or newer (e.g. `apt install cuda-nvcc-12-8` "
                   "or `pip install nvidia-cuda-nvcc-cu12`) to compile for sm_89")
        checks.check("compile", False, "", message)
        return {"ok": False, "error": message}
    try:
        from adaq.kernels.build import compile_check as kernels_compile_check
    except ImportError:
        message = "this adaq has no adaq.kernels.build.compile_check: its CUDA kernels are not part of this install"
        checks.check("compile", False, "", message)
        return {"ok": False, "error": message}
    try:
        result = dict(kernels_compile_check(arch=arch, progress=progress))
    except (AdaqError, OSError) as error:
        checks.check("compile", False, "", str(error))
        return {"ok": False, "error": str(error)}
    ok = result.get("ok")
    checks.check("compile", ok is True, "", result.get("error") or f"compile check for {arch} did not pass: {result}")
    return result
