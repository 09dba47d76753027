"""`adaq quantize SRC -o DIR --compare rtn,search,search-act,gptq`: quantize with several methods, then score each
checkpoint and the source on the same WikiText windows (adaq.eval's perplexity, data/README.md's protocol) and report
perplexity against the source in one table (+ JSON in DIR/compare.json)."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adaq.errors import AdaqError
from adaq.formats.outputs import check_apart, make_parent
from adaq.quant.methods import CalibrationSpec, Progress, method_names

REPORT_FILE = "compare.json"


@dataclass
class CompareSettings:
    methods: list[str]
    schemes: list[str]
    text: Path  # the text scored, e.g. data/wikitext-2/test.txt
    max_windows: int | None = 64
    window: int = 512
    runner: str = "engine"  # adaq.eval runner: the engine, or "transformers" (its own decompression)
    backend: str = "reference"  # the engine's plain-PyTorch backend: the numerics spec, on CPU or GPU
    dtype: str = "fp32"  # compute dtype, as data/README.md's anchors were measured
    kv_cache_dtype: str = "bf16"  # the same for every row; fp8 would mix KV-cache error into the weights' figures
    device: str = "auto"
    batch_size: int = 8

    def __post_init__(self):
        known = method_names()
        unknown = [m for m in self.methods if m not in known]
        if not self.methods or unknown:
            raise AdaqError(f"--compare needs methods from: {', '.join(known)} (got {', '.join(unknown) or 'none'})")
        bad = [s for s in self.schemes if s not in ("nvfp4a16", "nvfp4")]
        if not self.schemes or bad:
            raise AdaqError(f"--compare schemes must be nvfp4a16 and/or nvfp4, got {', '.join(bad) or 'none'}")
        if not Path(self.text).is_file():
            raise AdaqError(f"--eval-text {self.text}: no such file")


@dataclass
class Row:
    label: str
    method: str
    scheme: str
    checkpoint: str
    quantize_s: float | None


def parse_methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _quantize_all(src: str, out_dir: Path, settings: CompareSettings, calibration: CalibrationSpec | None,
                  recipe_path: str | None, progress: Progress) -> list[Row]:
    from adaq.quant.pipeline import quantize_model

    rows = []
    for scheme in settings.schemes:
        for method in settings.methods:
            label = f"{method}/{scheme}"
            progress.log(f"quantizing {label}")
            target = out_dir / f"{method}-{scheme}"
            report = quantize_model(src, target, scheme=scheme, recipe_path=recipe_path, method=method,
                                    calibration=calibration, force=True, device=settings.device, progress=progress)
            rows.append(Row(label, method, scheme, str(target), report.seconds))
    return rows


def _score_all(src: str, rows: list[Row], settings: CompareSettings, progress: Progress) -> dict:
    from adaq.eval.data import read_text
    from adaq.eval.perplexity import make_windows, perplexity
    from adaq.eval.sources import load_scorer

    body = read_text(str(settings.text))
    engine = {"backend": settings.backend, "max_model_len": settings.window, "dtype": settings.dtype,
              "kv_cache_dtype": settings.kv_cache_dtype}
    results = {}
    for label, source in [("bf16", src)] + [(row.label, row.checkpoint) for row in rows]:
        scorer = load_scorer(source, runner=settings.runner,
                             **(engine if settings.runner == "engine" else {}))
        total = len(make_windows(scorer.tokenizer, body, settings.window, settings.max_windows))
        task = progress.task(f"perplexity {label}", total)
        results[label] = (source, perplexity(scorer, body, settings.window, settings.max_windows,
                                             settings.batch_size, lambda n, t=task: progress.advance(t, n)))
        del scorer
    return results


def check_compare_folder(out_dir: Path) -> None:
    """OUT is new, empty, or an earlier --compare's (its compare.json says so): never a folder of the user's."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    try:
        earlier = json.loads((out_dir / REPORT_FILE).read_text()).get("benchmark") == "quantize-compare"
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise AdaqError(f"{out_dir} exists and is not an earlier --compare's output (no adaq {REPORT_FILE}): "
                        "remove it yourself or choose another -o")


def compare_methods(src: str, out_dir: str | Path, settings: CompareSettings,
                    calibration: CalibrationSpec | None = None, recipe_path: str | None = None,
                    progress: Progress | None = None) -> dict:
    """Quantize SRC with every method and scheme into OUT_DIR/<method>-<scheme>/, score all; the report as a dict."""
    from adaq.eval.report import perplexity_json, write_json

    from adaq.quant.pipeline import declared_inputs

    progress, out_dir = progress or Progress(), Path(out_dir).expanduser().resolve()
    check_apart(out_dir, {**declared_inputs(src, calibration, recipe_path), "eval text": settings.text})
    check_compare_folder(out_dir)
    make_parent(out_dir)
    out_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    rows = _quantize_all(src, out_dir, settings, calibration, recipe_path, progress)
    results = _score_all(src, rows, settings, progress)
    report = perplexity_json(results, str(settings.text), time.perf_counter() - started)
    report["benchmark"] = "quantize-compare"
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    report["calibration"] = None if calibration is None else {
        "path": str(calibration.path), "num_samples": calibration.num_samples, "seq_len": calibration.seq_len}
    report["methods"] = [asdict(row) for row in rows]
    write_json(out_dir / REPORT_FILE, report)
    return report


def compare_table(report: dict):
    """A rich table: one row per method and scheme, perplexity and its change against the bf16 source."""
    from adaq.tables import Table

    models, comparisons = report["models"], report.get("comparisons", {})
    base = models["bf16"]["perplexity"]
    table = Table(title=f"perplexity on {Path(report['text']).name}, {models['bf16']['windows']} windows "
                        f"of {models['bf16']['window']} tokens")
    for column in ("method", "scheme", "quantize time", "perplexity", "vs bf16", "recovery"):
        table.add_column(column, justify="left" if column in ("method", "scheme") else "right")
    table.add_row("bf16 (source)", "—", "—", f"{base:.3f} ± {models['bf16']['stderr']:.3f}", "—", "—")
    for row in report["methods"]:
        model, delta = models[row["label"]], comparisons[f"{row['label']}_vs_bf16"]
        table.add_row(row["method"], row["scheme"], f"{row['quantize_s']:.0f} s",
                      f"{model['perplexity']:.3f} ± {model['stderr']:.3f}",
                      f"{delta['delta_percent']:+.1f}% ± {100 * delta['delta_stderr'] / base:.1f}",
                      f"{delta['recovery_percent']:.1f}%")
    return table
