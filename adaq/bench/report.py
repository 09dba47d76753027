"""Render a bench report (the dict run_bench returns): rich tables for people, JSON for machines."""

import json
import math
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from adaq.tables import Table

GB = 1e9


def write_json(report: dict, path: Path) -> None:
    """Atomically: a temp file beside the target, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(finite(report), out, indent=2, allow_nan=False)
            out.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def finite(value):
    """JSON has no inf or NaN: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def render(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(headline(report))
    console.print(main_table(report))
    console.print(adallm_table(report))
    console.print(prefill_table(report))
    for line in notes(report):
        console.print(Text(line, style="red" if " failed: " in line or " FALLBACK " in line else "dim"))
    for line in tensor_parallel_lines(report):
        console.print(Text(line))


def tensor_parallel_lines(report: dict) -> list[str]:
    """Per sharded variant: each rank's memory, and tok/s over the same variant on one GPU."""
    lines = []
    for variant in report["variants"]:
        for rank in variant.get("rank_memory") or []:
            peak = rank.get("peak_allocated_bytes")
            lines.append(f"{variant['variant']} rank {rank['rank']} ({rank['device']}): weights "
                         f"{rank['weight_bytes'] / 2**30:.2f} GiB, KV cache {rank['kv_cache_bytes'] / 2**30:.2f} GiB"
                         + (f", peak allocated {peak / 2**30:.2f} GiB" if peak is not None else ""))
        for result in variant.get("results") or []:
            scaling = result.get("tp_scaling")
            if scaling:
                lines.append(f"{variant['variant']} batch {result['batch']}: decode {scaling['decode']:.2f}x, "
                             f"end to end {scaling['total']:.2f}x {scaling['over']} on one rank "
                             f"({scaling['ranks']} ranks)")
    return lines


def headline(report: dict) -> str:
    device = report["device"]
    model, workload = report["model"], report["workload"]
    source = "synthetic random weights" if model["synthetic"] else "checkpoint"
    where = device["name"]
    smi = device.get("nvidia_smi") or {}
    if smi.get("clocks.sm"):
        where += f" (SM {smi['clocks.sm']}, mem {smi.get('clocks.mem', '?')}, max SM {smi.get('clocks.max.sm', '?')})"
    bandwidth = report.get("copy_bandwidth_bytes_per_s")
    measured = f", copy bandwidth {bandwidth / 1e12:.2f} TB/s (measured)" if bandwidth else ", CPU: no roofline"
    return (f"[bold]adaq bench[/bold] {escape(model['name'])} ({model['architecture']}, {source}) on {where}{measured}\n"
            f"prompt {workload['input_len']} tokens, {workload['output_len']} new tokens, greedy, "
            f"median of {workload['repeats']} after a warm-up")


def main_table(report: dict) -> Table:
    on_gpu = not report["on_cpu"]
    table = Table(title="Per variant and batch", title_justify="left")
    columns = ["variant", "batch", "TTFT ms", "prefill tok/s", "ITL p50 ms", "ITL p99 ms", "decode tok/s"]
    if on_gpu:
        columns += ["bytes/step GB", "GB/s", "% roofline", "bound tok/s", "peak alloc GB", "device GB"]
    columns += [f"vs {name}" for name in baselines_present(report)]
    columns += ["fallbacks"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("variant", "fallbacks") else "right")
    for variant, result in rows(report):
        cells = [variant["variant"], str(result["batch"]), _ms(result["ttft_s"]), _num(result["prefill_tokens_per_s"]),
                 _ms(result["itl_p50_s"]), _ms(result["itl_p99_s"]), _num(result["decode_tokens_per_s"])]
        if on_gpu:
            traffic = result.get("traffic") or {}
            cells += [_gb(traffic.get("total")), _gb(result.get("achieved_bytes_per_s")),
                      _pct(result.get("roofline_fraction")), _num(result.get("bound_tokens_per_s")),
                      _gb(result.get("peak_allocated_bytes")), _gb(result.get("device_used_bytes"))]
        cells += [_speedup(result["speedup"].get(name)) for name in baselines_present(report)]
        cells.append(fallback_cell(result))
        table.add_row(*cells, style="red" if result.get("fallbacks") else None)
    return table


def adallm_table(report: dict) -> Table:
    """AdaLLM's published view: batch, total tokens, seconds, tok/s (all generated tokens over wall time), peak GB."""
    table = Table(title="End to end (AdaLLM's view)", title_justify="left")
    for column in ("variant", "batch", "total tokens", "seconds", "tok/s", "peak GB"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, result in rows(report):
        table.add_row(variant["variant"], str(result["batch"]), str(result["total_tokens"]), f"{result['total_s']:.2f}",
                      _num(result["total_tokens_per_s"]), _gb(result.get("peak_allocated_bytes")))
    return table


def prefill_table(report: dict) -> Table:
    """Prefill alone: TTFT (median over requests), prompt tokens per second of the prefill phase, and that rate
    over each baseline's at the same batch."""
    table = Table(title="Prefill", title_justify="left")
    others = baselines_present(report)
    for column in ("variant", "batch", "prompt tokens", "TTFT ms", "prefill tok/s", *[f"vs {name}" for name in others]):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, result in rows(report):
        ratios = result.get("prefill_speedup") or {}
        table.add_row(variant["variant"], str(result["batch"]), str(result["batch"] * result["input_len"]),
                      _ms(result["ttft_s"]), _num(result["prefill_tokens_per_s"]),
                      *["-" if name not in ratios else f"{ratios[name]:.2f}x" for name in others])
    return table


def notes(report: dict) -> list[str]:
    lines = [f"{variant['variant']}: {variant['label']}" for variant in report["variants"] if variant["results"]]
    lines += [f"{variant['variant']} FALLBACK {f['what']}: {f['cause']} ({f['setting']})"
              for variant in report["variants"] for f in variant.get("fallbacks") or []]
    lines += [f"{variant['variant']} skipped: {variant['skipped']}" for variant in report["variants"]
              if variant["skipped"]]
    lines += [f"{variant['variant']} failed: {variant['error']}" for variant in report["variants"]
              if variant.get("error")]
    if report["on_cpu"]:
        lines.append("CPU run: timings of the reference backend; no roofline or memory figures")
    else:
        lines.append("bytes/step: weights read + KV read and written per decode step (a lower bound); "
                     "% roofline = achieved GB/s over the measured copy bandwidth; vs = decode tok/s ratio")
    lines.append(f"command: {report['command']}")
    return lines


def fallback_cell(result: dict) -> str:
    """'none', the fallbacks' names, or '-' where the variant is not adaq's engine (reports older than the column
    too)."""
    fallbacks = result.get("fallbacks")
    if fallbacks is None:
        return "-"
    return "; ".join(fallbacks) if fallbacks else "none"


def rows(report: dict):
    for variant in report["variants"]:
        for result in variant["results"]:
            yield variant, result


def baselines_present(report: dict) -> list[str]:
    from adaq.bench.runner import BASELINES

    return [variant["variant"] for variant in report["variants"] if variant["results"] and variant["variant"] in BASELINES]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _speedup(entry: dict | None) -> str:
    return "-" if not entry else f"{entry['decode']:.2f}x"
