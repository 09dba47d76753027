"""`adaq quantize SRC -o OUT`: a Hugging Face checkpoint (folder, cached hub id or .gguf) -> NVFP4 compressed-tensors."""

import json
from pathlib import Path

import typer

from adaq.errors import AdaqError


def quantize(
    src: str = typer.Argument(..., help="Model folder, hub id already in the local HF cache, a .gguf file, "
                                         "or demo:gemma3-270m (the embedded real model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    scheme: str = typer.Option(None, help="nvfp4a16 (weights only, default) or nvfp4 (W4A4, calibrated); "
                                          "overrides the recipe's scheme."),
    recipe: str = typer.Option(None, help="Recipe YAML in llm-compressor's shape; default: the shipped one for "
                                          "the architecture (recipes/nvfp4a16-dense.yaml, ...-moe.yaml, "
                                          "...-gemma4.yaml)."),
    method: str = typer.Option("rtn", help="rtn (ours, streamed), search (MSE scale search), search-act "
                                           "(activation-aware search), gptq (GPTQ + searched scales, most "
                                           "accurate), gptq-llmcompressor or llmcompressor (oneshot)."),
    calib_data: Path = typer.Option(None, help="Calibration text: a .txt/.jsonl/.json/.parquet file or a folder."),
    num_samples: int = typer.Option(64, help="Calibration windows."),
    seq_len: int = typer.Option(512, help="Tokens per calibration window."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu or cuda[:N]."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    compare: str = typer.Option(None, help="Comma-separated methods (e.g. rtn,search,search-act,gptq): quantize "
                                           "with each into OUT/<method>-<scheme>/ and print perplexity vs the "
                                           "source in one table (+ OUT/compare.json)."),
    eval_text: Path = typer.Option(None, help="--compare: text scored (data/README.md's windows) [default: the "
                                              "repository's data/wikitext-2/test.txt]."),
    max_windows: int = typer.Option(64, help="--compare: windows of 512 tokens scored (0: all)."),
    runner: str = typer.Option("engine", help="--compare: engine (adaq's reference/CUDA backend) or "
                                              "transformers (its own decompression)."),
) -> None:
    """Quantize a checkpoint to NVFP4 in the compressed-tensors format llm-compressor writes and vLLM reads."""
    from adaq.quant.methods import CalibrationSpec
    from adaq.quant.pipeline import quantize_model

    if scheme is not None and scheme not in ("nvfp4a16", "nvfp4"):
        raise AdaqError(f"--scheme must be nvfp4a16 or nvfp4, got {scheme!r}")
    calibration = CalibrationSpec(calib_data, num_samples, seq_len) if calib_data else None
    if compare:
        _compare(src, out, compare, scheme, recipe, calibration, device, eval_text, max_windows, runner, as_json)
        return
    with RichProgress(enabled=not as_json) as progress:
        report = quantize_model(src, out, scheme=scheme, recipe_path=recipe, method=method,
                                calibration=calibration, force=force, device=device, progress=progress)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)


def _compare(src, out, methods, scheme, recipe, calibration, device, eval_text, max_windows, runner, as_json):
    from rich.console import Console

    from adaq.eval.data import WIKITEXT_TEST, repo_data
    from adaq.quant.compare import CompareSettings, compare_methods, compare_table, parse_methods

    schemes = [scheme] if scheme else ["nvfp4a16"]
    eval_text = eval_text or repo_data(WIKITEXT_TEST)
    settings = CompareSettings(parse_methods(methods), schemes, eval_text, max_windows or None, runner=runner,
                               device=device)
    with RichProgress(enabled=not as_json) as progress:
        report = compare_methods(src, out, settings, calibration, recipe, progress)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        Console().print(compare_table(report))


class RichProgress:
    """adaq.quant.methods.Progress drawn with rich bars (silent with --json)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.enabled:
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=False)
            self._bars.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._bars.__exit__(*exc)

    def task(self, description: str, total: int | None) -> int:
        return self._bars.add_task(description, total=total) if self.enabled else 0

    def advance(self, task: int, amount: int = 1) -> None:
        if self.enabled:
            self._bars.advance(task, amount)

    def log(self, message: str) -> None:
        if self.enabled:
            self._bars.console.log(message)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def render(report) -> None:
    from rich.console import Console

    from adaq.tables import Table

    table = Table(title=f"adaq quantize → {report.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    ratio = report.bytes_in / report.bytes_out if report.bytes_out else 0
    kept = ", ".join(report.kept[:4]) + (f", … ({len(report.kept)} in all)" if len(report.kept) > 4 else "")
    rows = [("source", report.source), ("method / scheme", f"{report.method} / {report.scheme}"),
            ("recipe", report.recipe), ("device", report.device),
            ("Linear layers quantized", str(report.quantized)), ("Linear layers kept", kept or "none"),
            ("size before", _size(report.bytes_in)), ("size after", f"{_size(report.bytes_out)} ({ratio:.2f}× smaller)"),
            ("time", f"{report.seconds:.1f} s")]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
