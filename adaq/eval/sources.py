"""What an evaluation can be pointed at: an adaq/llm-compressor NVFP4 folder, a bf16 HF folder, or a GGUF file."""

import hashlib
import os
import tempfile
from pathlib import Path

from adaq.errors import AdaqError

RUNNERS = ("engine", "transformers")


def cache_dir() -> Path:
    return Path(os.environ.get("ADAQ_CACHE", Path.home() / ".cache" / "adaq"))


def model_folder(source: str | Path) -> Path:
    """An HF folder for `source`; a GGUF file is dequantized once (bf16) into adaq's cache."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_folder(path)
    if not path.is_dir():
        raise AdaqError(f"{path}: not a model folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise AdaqError(f"{path}: no config.json (expected an HF checkpoint folder or a .gguf file)")
    return path


def gguf_folder(path: Path) -> Path:
    from adaq.formats.gguf import gguf_to_hf_folder
    from adaq.formats.outputs import replace_folder

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        gguf_to_hf_folder(path, tmp)
        replace_folder(tmp, target)
    return target


def load_scorer(source: str | Path, runner: str = "engine", **settings):
    """A scorer for lm-eval: adaq's engine by default, transformers to cross-check it."""
    if runner not in RUNNERS:
        raise AdaqError(f"invalid runner {runner!r}: choose one of {', '.join(RUNNERS)}")
    folder = model_folder(source)
    if runner == "transformers":
        from adaq.eval.scoring import TransformersScorer

        return TransformersScorer.from_pretrained(str(folder))
    return engine_scorer(folder, **settings)


def engine_scorer(folder: Path, **settings):
    try:
        from adaq.engine.api import LLM
    except ImportError as missing:
        raise AdaqError(f"adaq's engine cannot be imported ({missing}); use --runner transformers") from None
    from adaq.eval.scoring import EngineScorer

    chosen = {name: value for name, value in settings.items() if value is not None}
    return EngineScorer(LLM(str(folder), **chosen))
