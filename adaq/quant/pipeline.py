"""`adaq quantize` as a library call: resolve the source, run a registered method into a temp folder, add tokenizer
files, the applied recipe and adaq's metadata, check the result, and rename it into place (atomic: an interrupted
run leaves no OUT, and an existing OUT is replaced only once the new one is complete). OUT is kept apart from
every input and locked while written; adaq.formats.outputs has the rules."""

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from adaq.errors import AdaqError, CheckpointError
from adaq.formats.architectures import architecture_of
from adaq.formats.outputs import ADAQ_MARKER, check_apart, scratch_folder, staged_folder
from adaq.formats.safetensors_check import check_safetensors_folder
from adaq.quant.methods import CalibrationSpec, Progress, QuantJob, get_method
from adaq.quant.recipe import Recipe, default_recipe, load_recipe

METADATA_FILE = ADAQ_MARKER
RECIPE_FILE = "recipe.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "preprocessor_config.json",
                   "processor_config.json")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class QuantReport:
    source: str
    out: str
    method: str
    scheme: str
    recipe: str
    device: str
    quantized: int
    kept: list[str]
    bytes_in: int
    bytes_out: int
    seconds: float
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def resolve_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N, checked as the engine checks --device."""
    from adaq.engine import config

    chosen = config.resolve_device(None if device == "auto" else device)
    return device if device != "auto" else chosen.type


def resolve_hub_id(name: str) -> Path:
    """A hub id already in the local HF cache, never downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any lookup failure means "not cached"
        raise AdaqError(f"{name}: not a local folder, a .gguf file or a hub id in the local Hugging Face cache "
                        "(adaq never downloads; fetch it first with `hf download`)") from None


@contextmanager
def source_folder(src: str, scratch: Path):
    """The dense HF folder to quantize: SRC itself, its cached hub snapshot, a GGUF dequantized into scratch, or
    the embedded Gemma3-270M for `demo:gemma3-270m`."""
    path = Path(src).expanduser()
    if src.startswith("demo:"):
        from adaq.demo import demo_folder

        yield demo_folder(src), "demo"
    elif path.is_dir():
        yield path, "folder"
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise AdaqError(f"{path}: no such GGUF file")
        try:
            import gguf  # noqa: F401  (transformers dequantizes GGUF tensors through it)
        except ImportError:
            raise AdaqError("a .gguf source needs the gguf package: pip install 'adaq[demo]'") from None
        from adaq.formats.gguf import gguf_to_hf_folder

        folder = scratch / "gguf-source"
        gguf_to_hf_folder(path, folder)
        yield folder, "gguf"
    elif path.exists():
        raise AdaqError(f"{path}: not a checkpoint folder or a .gguf file")
    else:
        yield resolve_hub_id(src), "hub"


def check_source(folder: Path) -> dict:
    from adaq.formats.checkpoint import read_config

    try:
        config = read_config(folder)
    except CheckpointError as error:
        raise AdaqError(f"{error} (quantize needs a Hugging Face model folder)") from None
    architecture_of(config)
    check_safetensors_folder(folder)  # before anything (transformers, llm-compressor) could unpickle a .bin
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise AdaqError(f"{folder}: already quantized ({method}); quantize reads a bf16/fp16/fp32 checkpoint")
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise AdaqError(f"{folder}: no tokenizer ({' / '.join(TOKENIZER_MARKERS)}); the output must carry one")
    return config


def declared_inputs(src: str, calibration: CalibrationSpec | None, recipe_path: str | None) -> dict:
    return {"source": None if src.startswith("demo:") else src, "calibration data": calibration and calibration.path,
            "recipe": recipe_path}


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("adaq", "torch", "transformers", "safetensors", "compressed-tensors", "llmcompressor"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def check_output(folder: Path, scheme: str, expected: int) -> None:
    from adaq.formats.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(folder)
    if checkpoint.format != "compressed-tensors" or checkpoint.scheme != scheme:
        raise AdaqError(f"internal: the method wrote {checkpoint.format}/{checkpoint.scheme}, not "
                        f"compressed-tensors/{scheme}")
    if len(checkpoint.quantized_prefixes()) != expected:
        raise AdaqError(f"internal: {len(checkpoint.quantized_prefixes())} quantized layers written, "
                        f"{expected} expected")


def choose_recipe(config: dict, scheme: str | None, recipe_path: str | None) -> Recipe:
    if recipe_path:
        recipe = load_recipe(recipe_path)
        return recipe.with_scheme(scheme) if scheme and scheme != recipe.scheme else recipe
    return default_recipe(config, scheme or "nvfp4a16")


def write_metadata(folder: Path, report: QuantReport, kind: str, started: datetime) -> None:
    metadata = {**report.to_dict(), "source_kind": kind, "started": started.isoformat(timespec="seconds"),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def run_method(job: QuantJob, method: str, source: str, out: Path, started: datetime) -> QuantReport:
    """The method's tensors, then tokenizer, recipe and metadata, all inside the temp folder."""
    clock = time.perf_counter()
    result = get_method(method).run(job)
    copy_tokenizer(job.source, job.out_dir)
    if not (job.out_dir / RECIPE_FILE).exists():
        (job.out_dir / RECIPE_FILE).write_text(job.recipe.to_yaml())
    check_output(job.out_dir, job.scheme, len(result.quantized))
    seconds = round((datetime.now(timezone.utc) - started).total_seconds(), 2)
    report = QuantReport(source, str(out), method, job.scheme, job.recipe.source, job.device, len(result.quantized),
                         result.kept, safetensors_bytes(job.source), safetensors_bytes(job.out_dir), seconds,
                         {**result.notes, "method_seconds": round(time.perf_counter() - clock, 2)})
    return report


def quantize_model(src: str, out: str | Path, scheme: str | None = None, recipe_path: str | None = None,
                   method: str = "rtn", calibration: CalibrationSpec | None = None, force: bool = False,
                   device: str = "auto", progress: Progress | None = None) -> QuantReport:
    """Quantize SRC (folder, cached hub id, .gguf or demo:gemma3-270m) into the compressed-tensors folder OUT."""
    check_apart(out, declared_inputs(src, calibration, recipe_path))  # named as the user wrote it
    out, started = Path(out).expanduser().resolve(), datetime.now(timezone.utc)
    chosen = get_method(method)
    with staged_folder(out, force) as tmp, scratch_folder(out) as scratch:
        with source_folder(src, scratch) as (folder, kind):
            check_apart(out, {"source": folder})
            recipe = choose_recipe(check_source(folder), scheme, recipe_path)
            if (recipe.scheme == "nvfp4" or chosen.needs_calibration) and calibration is None:
                raise AdaqError(f"--scheme {recipe.scheme} with --method {method} needs calibration data: "
                                "pass --calib-data FILE|DIR")
            job = QuantJob(folder, tmp, recipe.scheme, recipe, calibration, resolve_device(device),
                           progress or Progress())
            report = run_method(job, method, src, out, started)
            write_metadata(tmp, report, kind, started)
    return report
