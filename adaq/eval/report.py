"""Side-by-side results (baseline, NVFP4, delta, recovery, stderr) as a rich table and as JSON."""

import json
import math
import os
import sys
import tempfile
from pathlib import Path

from adaq.eval.mmlu_pro import ModelScores, mean, sample_stderr
from adaq.eval.perplexity import PerplexityResult


def command_line() -> str:
    return " ".join(["adaq", *sys.argv[1:]]) if sys.argv else "adaq"


def _paired(base: list[dict], other: list[dict]) -> tuple[float, float]:
    """Accuracy difference and its paired standard error (both models answered the same questions)."""
    diffs = [float(o["correct"]) - float(b["correct"]) for b, o in zip(base, other)]
    return mean(diffs), sample_stderr(diffs)


def _model_json(scores: ModelScores) -> dict:
    per_category = {name: {"accuracy": mean(r["correct"] for r in records), "n": len(records),
                           "stderr": sample_stderr([float(r["correct"]) for r in records])}
                    for name, records in scores.by_category().items()}
    return {"source": scores.source, "accuracy": scores.accuracy, "stderr": scores.stderr,
            "n": len(scores.records), "per_category": per_category}


def mmlu_pro_json(question_ids: list[int], scores: list[ModelScores], variant: str, num_fewshot: int,
                  samples_path: Path | None, elapsed_s: float | None = None) -> dict:
    report = {"command": command_line(), "benchmark": "mmlu_pro", "variant": variant, "num_fewshot": num_fewshot,
              "metric": "acc" if variant == "loglikelihood" else "exact_match", "questions": len(question_ids),
              "samples_file": str(samples_path) if samples_path else None, "elapsed_s": elapsed_s,
              "models": {s.label: _model_json(s) for s in scores}}
    if len(scores) > 1:
        base = scores[0]
        report["comparisons"] = {}
        for other in scores[1:]:
            delta, stderr = _paired(base.records, other.records)
            recovery = 100 * other.accuracy / base.accuracy if base.accuracy else float("nan")
            report["comparisons"][f"{other.label}_vs_{base.label}"] = {
                "delta": delta, "delta_stderr": stderr, "recovery_percent": recovery}
    return report


def perplexity_json(results: dict[str, tuple[str, PerplexityResult]], text_path: str, elapsed_s: float | None) -> dict:
    report = {"command": command_line(), "benchmark": "perplexity", "text": text_path, "elapsed_s": elapsed_s,
              "models": {label: {"source": source, "perplexity": r.perplexity, "stderr": r.stderr,
                                 "mean_nll": r.mean_nll, "windows": r.num_windows,
                                 "scored_tokens": r.num_scored_tokens, "window": r.window}
                         for label, (source, r) in results.items()}}
    labels = list(results)
    if len(labels) > 1:
        base = results[labels[0]][1]
        report["comparisons"] = {}
        for label in labels[1:]:
            other = results[label][1]
            report["comparisons"][f"{label}_vs_{labels[0]}"] = {
                "delta": other.perplexity - base.perplexity,
                "delta_percent": 100 * (other.perplexity / base.perplexity - 1),
                "recovery_percent": 100 * base.perplexity / other.perplexity,
                "delta_stderr": _paired_ppl_stderr(base, other)}
    return report


def _paired_ppl_stderr(base: PerplexityResult, other: PerplexityResult) -> float:
    """Standard error of the perplexity difference, from per-window NLL differences on the same windows."""
    scored = base.window - 1
    diffs = [(o - b) / scored for b, o in zip(base.window_nll, other.window_nll)]
    return other.perplexity * sample_stderr(diffs)


def write_json(path: str | Path, report: dict) -> None:
    """Atomic: a temp file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(report, handle, indent=2, default=_plain)
        handle.write("\n")
    os.replace(tmp, path)


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _pct(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def mmlu_pro_table(report: dict):
    from adaq.tables import Table

    labels = list(report["models"])
    title = (f"MMLU-Pro ({report['variant']}, {report['num_fewshot']}-shot), {report['questions']} questions: "
             f"{report['metric']} %")
    table = Table(title=title)
    table.add_column("category")
    for label in labels:
        table.add_column(label, justify="right")
    for label in labels[1:]:
        table.add_column(f"Δ {label}", justify="right")
        table.add_column(f"recovery {label}", justify="right")
    table.add_column("n", justify="right")
    first = report["models"][labels[0]]
    rows = [("all", {label: report["models"][label] for label in labels})]
    rows += [(name, {label: report["models"][label]["per_category"][name] for label in labels})
             for name in first["per_category"]] if len(first["per_category"]) > 1 else []
    for name, cells in rows:
        values = [f"{_pct(cells[l]['accuracy'])} ± {_pct(cells[l]['stderr'])}" for l in labels]
        base = cells[labels[0]]["accuracy"]
        for label in labels[1:]:
            delta = cells[label]["accuracy"] - base
            recovery = f"{100 * cells[label]['accuracy'] / base:.1f}%" if base else "—"
            values += [_delta_cell(name, label, delta, report), recovery]
        table.add_row(name, *values, str(cells[labels[0]]["n"]))
    return table


def _delta_cell(row: str, label: str, delta: float, report: dict) -> str:
    if row != "all":
        return f"{100 * delta:+.2f}"
    stderr = report["comparisons"][f"{label}_vs_{list(report['models'])[0]}"]["delta_stderr"]
    return f"{100 * delta:+.2f} ± {_pct(stderr)}"


def perplexity_table(report: dict):
    from adaq.tables import Table

    labels = list(report["models"])
    first = report["models"][labels[0]]
    compared = len(labels) > 1  # one model alone: no column comparing it with itself
    table = Table(title=f"Perplexity on {Path(report['text']).name}: {first['windows']} windows of "
                        f"{first['window']} tokens, {first['scored_tokens']} scored")
    columns = ("model", "source", "perplexity", "stderr") + (("Δ vs " + labels[0], "recovery") if compared else ())
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "source") else "right")
    for label in labels:
        model = report["models"][label]
        row = [label, model["source"], f"{model['perplexity']:.3f}", f"{model['stderr']:.3f}"]
        table.add_row(*row, *(_comparison_cells(report, label, labels[0]) if compared else ()))
    return table


def _comparison_cells(report: dict, label: str, baseline: str) -> tuple[str, str]:
    comparison = report.get("comparisons", {}).get(f"{label}_vs_{baseline}")
    if not comparison:
        return "—", "—"
    return f"{comparison['delta']:+.3f} ({comparison['delta_percent']:+.1f}%)", f"{comparison['recovery_percent']:.1f}%"
