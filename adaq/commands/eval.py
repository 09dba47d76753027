"""`adaq eval`: MMLU-Pro through lm-eval and windowed perplexity, a checkpoint beside its baseline, offline."""

import os
import time
from pathlib import Path

import typer

from adaq.commands import LM_HEAD_HELP, STRICT_HELP, TP_HELP
from adaq.errors import AdaqError

app = typer.Typer(help="Accuracy of a checkpoint next to its baseline: MMLU-Pro (lm-eval) and perplexity, offline.",
                  no_args_is_help=True)

RUNNER_HELP = "engine: adaq's engine (the default); transformers: cross-check through transformers"


def _engine_settings(backend, kv_cache_dtype, dtype, max_model_len, strict: bool = False,
                     tensor_parallel_size: int = 1) -> dict:
    return {"backend": backend, "kv_cache_dtype": kv_cache_dtype, "dtype": dtype, "max_model_len": max_model_len,
            "strict": strict or None, "tensor_parallel_size": tensor_parallel_size}


def _label(source: str) -> str:
    from adaq.formats.checkpoint import open_checkpoint

    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        scheme = open_checkpoint(path).scheme
        return scheme or "bf16"
    return "bf16"


def _settings_for(label: str, settings: dict, lm_head: str | None) -> dict:
    """--lm-head applies to the checkpoint under test, never to the baseline it is compared with."""
    return settings if label == "baseline" else {**settings, "lm_head": lm_head}


def _labels(checkpoint: str, baseline: str | None) -> list[tuple[str, str]]:
    label = _label(checkpoint)
    if baseline is None:
        return [(label, checkpoint)]
    return [("baseline", baseline), (label if label != "bf16" else "model", checkpoint)]


def _require_positive(**settings: int | None) -> None:
    for name, value in settings.items():
        if value is not None and value < 1:
            raise AdaqError(f"invalid setting --{name.replace('_', '-')} {value}: must be >= 1")


def _check_outputs(inputs: dict[str, str | Path | None], **outputs: str | Path | None) -> None:
    """Before any work: each output file is writable and is none of the inputs."""
    from adaq.formats.outputs import check_writable_file

    for flag, path in outputs.items():
        check_writable_file(path, f"--{flag}", inputs)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn())


class _Bar:
    """The progress interface adaq.eval expects (start(total), advance(n)) on a rich progress bar."""

    def __init__(self, progress, description: str):
        self.progress, self.description, self.task = progress, description, None

    def start(self, total: int) -> None:
        self.task = self.progress.add_task(self.description, total=total)

    def advance(self, amount: int) -> None:
        self.progress.advance(self.task, amount)


def _emit(report: dict, table, json_path: str | None) -> None:
    from rich.console import Console

    from adaq.eval.report import write_json

    Console().print(table)
    if json_path:
        write_json(json_path, report)
        Console(stderr=True).print(f"wrote {json_path}")


@app.command("mmlu-pro")
def mmlu_pro(
    checkpoint: str = typer.Argument(..., help="NVFP4 checkpoint folder (or any HF folder / .gguf)"),
    baseline: str = typer.Option(None, help="baseline to compare with: bf16/fp16 HF folder or .gguf"),
    variant: str = typer.Option("loglikelihood", help="loglikelihood (leaderboard, one pass per question) or cot"),
    limit: int = typer.Option(None, help="number of test questions, spread evenly over the categories"),
    categories: str = typer.Option(None, help="comma-separated categories, e.g. 'math,computer science'"),
    num_fewshot: int = typer.Option(5, help="few-shot examples (0-5)"),
    data_dir: str = typer.Option(None, help="folder with MMLU-Pro's parquet files [env ADAQ_DATA_DIR; "
                                            "default: the repository's data/mmlu_pro]"),
    samples: Path = typer.Option(None, help="per-question JSONL; an interrupted run resumes from it"),
    json_path: str = typer.Option(None, "--json", help="write the results as JSON to this file"),
    runner: str = typer.Option("engine", help=RUNNER_HELP),
    backend: str = typer.Option(None, help="engine backend: auto, reference, cuda"),
    kv_cache_dtype: str = typer.Option(None, help="engine KV cache: fp8, nvfp4 or bf16"),
    lm_head: str = typer.Option(None, "--lm-head", help=LM_HEAD_HELP + " Not applied to --baseline."),
    dtype: str = typer.Option(None, help="compute dtype (default: bf16 on GPU, fp32 on CPU)"),
    max_model_len: int = typer.Option(None, help="context length for the engine"),
    batch_size: int = typer.Option(64, help="requests handed to the engine at once"),
    chunk_size: int = typer.Option(16, help="questions per lm-eval call (samples are saved after each)"),
    strict: bool = typer.Option(False, "--strict", envvar="ADAQ_STRICT", help=STRICT_HELP),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", help=TP_HELP),
):
    """MMLU-Pro accuracy of CHECKPOINT (and of --baseline on the same questions), through lm-eval, offline."""
    _require_positive(limit=limit, batch_size=batch_size, chunk_size=chunk_size, max_model_len=max_model_len,
                      tensor_parallel_size=tensor_parallel_size)
    if tensor_parallel_size > 1 and baseline is not None:
        raise AdaqError("--tensor-parallel-size with --baseline: MMLU-Pro alternates the two models and one process "
                        "holds one tensor-parallel engine; evaluate them in two runs with the same --samples file")
    _check_outputs({"checkpoint": checkpoint, "baseline": baseline, "data": data_dir}, json=json_path,
                   samples=samples)
    os.environ["TQDM_DISABLE"] = "1"
    from adaq.eval.data import go_offline

    go_offline()
    from adaq.eval.mmlu_pro import MMLUProRun, ModelUnderTest, run_mmlu_pro
    from adaq.eval.report import mmlu_pro_json, mmlu_pro_table

    run = MMLUProRun(variant=variant, limit=limit, num_fewshot=num_fewshot, data_dir=data_dir, samples_path=samples,
                     categories=[c for c in categories.split(",") if c.strip()] if categories else None,
                     chunk_size=chunk_size)
    settings = _engine_settings(backend, kv_cache_dtype, dtype, max_model_len, strict, tensor_parallel_size)
    models = [ModelUnderTest(label, source, _lm_factory(source, runner, batch_size,
                                                        _settings_for(label, settings, lm_head)))
              for label, source in _labels(checkpoint, baseline)]
    started = time.perf_counter()
    with _progress() as progress:
        question_ids, scores = run_mmlu_pro(models, run, _Bar(progress, f"MMLU-Pro {variant}"))
    report = mmlu_pro_json(question_ids, scores, variant, num_fewshot, samples, time.perf_counter() - started)
    _emit(report, mmlu_pro_table(report), json_path)


def _lm_factory(source: str, runner: str, batch_size: int, settings: dict):
    def make(progress):
        from adaq.eval.lm_backend import AdaqLM
        from adaq.eval.sources import load_scorer

        return AdaqLM(scorer=load_scorer(source, runner=runner, **settings), batch_size=batch_size, progress=progress)

    return make


@app.command("ppl")
def ppl(
    checkpoint: str = typer.Argument(..., help="NVFP4 checkpoint folder (or any HF folder / .gguf)"),
    text: str = typer.Option(None, help="plain-text file [default: the repository's data/wikitext-2/test.txt]"),
    baseline: str = typer.Option(None, help="baseline to compare with: bf16/fp16 HF folder or .gguf"),
    window: int = typer.Option(512, help="tokens per window (BOS + window-1 text tokens)"),
    max_windows: int = typer.Option(None, help="score only the first N windows (data/README.md's anchors: 64)"),
    json_path: str = typer.Option(None, "--json", help="write the results as JSON to this file"),
    runner: str = typer.Option("engine", help=RUNNER_HELP),
    backend: str = typer.Option(None, help="engine backend: auto, reference, cuda"),
    kv_cache_dtype: str = typer.Option(None, help="engine KV cache: fp8, nvfp4 or bf16"),
    lm_head: str = typer.Option(None, "--lm-head", help=LM_HEAD_HELP + " Not applied to --baseline."),
    dtype: str = typer.Option(None, help="compute dtype (default: bf16 on GPU, fp32 on CPU)"),
    batch_size: int = typer.Option(8, help="windows handed to the engine at once"),
    strict: bool = typer.Option(False, "--strict", envvar="ADAQ_STRICT", help=STRICT_HELP),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", help=TP_HELP),
):
    """Perplexity over fixed non-overlapping windows (data/README.md's protocol), CHECKPOINT beside --baseline."""
    _require_positive(batch_size=batch_size, max_windows=max_windows, tensor_parallel_size=tensor_parallel_size)
    if window < 2:
        raise AdaqError(f"invalid setting --window {window}: must be >= 2 (BOS and one scored token)")
    _check_outputs({"checkpoint": checkpoint, "baseline": baseline, "text": text}, json=json_path)
    from adaq.eval.data import WIKITEXT_TEST, go_offline, read_text, repo_data

    go_offline()
    text = text or str(repo_data(WIKITEXT_TEST))
    from adaq.eval.perplexity import make_windows, perplexity
    from adaq.eval.report import perplexity_json, perplexity_table, write_json
    from adaq.eval.sources import load_scorer

    body = read_text(text)
    settings = _engine_settings(backend, kv_cache_dtype, dtype, max(window, 2), strict, tensor_parallel_size)
    started = time.perf_counter()
    results = {}
    with _progress() as progress:
        for label, source in _labels(checkpoint, baseline):
            scorer = load_scorer(source, runner=runner, **_settings_for(label, settings, lm_head))
            total = len(make_windows(scorer.tokenizer, body, window, max_windows))
            bar = progress.add_task(f"perplexity {label}", total=total)
            results[label] = (source, perplexity(scorer, body, window, max_windows, batch_size,
                                                 lambda n, bar=bar: progress.advance(bar, n)))
            close = getattr(scorer, "close", None)
            if close is not None:  # tensor-parallel workers stop before the next model's start
                close()
            del scorer
            if json_path:  # a long run keeps what it has measured so far
                write_json(json_path, perplexity_json(results, text, time.perf_counter() - started))
    report = perplexity_json(results, text, time.perf_counter() - started)
    _emit(report, perplexity_table(report), json_path)


@app.command("lm-eval-plugin")
def lm_eval_plugin(
    uninstall: bool = typer.Option(False, "--uninstall", help="remove the hook instead"),
    site_dir: str = typer.Option(None, help="site-packages folder (default: this environment's)"),
):
    """Let `lm_eval --model adaq --model_args pretrained=PATH` work: installs a start-up hook (a .pth file)
    that registers adaq's model with lm-eval. adaq's task YAMLs: --include_path from `adaq eval tasks-dir`."""
    from adaq.eval import plugin

    path = plugin.uninstall(site_dir) if uninstall else plugin.install(site_dir)
    typer.echo(f"{'removed' if uninstall else 'wrote'} {path}")


@app.command("tasks-dir")
def tasks_dir():
    """Print the folder of adaq's offline MMLU-Pro task YAMLs (for lm_eval --include_path)."""
    from adaq.eval.mmlu_pro import TASKS_DIR

    typer.echo(str(TASKS_DIR))
