"""`adaq bench kernels`: the kernel engineer's microbenchmarks (adaq.bench.microbench), each figure beside the
ceiling measured on this GPU and the bf16 reference kernel (cuBLAS), plus the RTX 4090 figure projected from the
measured efficiency. A projection is labelled as one: it assumes the kernel reaches the same fraction of the 4090's
bandwidth (or FP8 tensor-core peak) that it reaches here."""

import math

import torch
from rich.console import Console
from rich.table import Table

from adaq.bench.environment import describe
from adaq.bench.roofline import RTX_4090_BANDWIDTH
from adaq.errors import AdaqError

RTX_4090_FP8_TFLOPS = 330.0  # dense FP8 mma.sync with fp32 accumulation (NOTES)
PROJECTION_NOTE = ("rtx4090_* columns are projections, not measurements: this GPU's measured efficiency times the "
                   "RTX 4090's 1.0 TB/s (memory-bound kernels) or 330 TFLOP/s FP8 (compute-bound kernels)")


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        raise AdaqError("adaq bench kernels needs a CUDA GPU: none is visible (kernels are timed, not emulated)")
    from adaq.kernels.build import load

    load()  # raises AdaqError with the compiler's reason when the extension cannot be built
    from adaq.bench import microbench

    results = microbench.run_all(quick=quick)
    for rows in sections(results).values():
        for row in rows:
            add_projection(row)
    return {**results, **describe(torch.device("cuda")), "tensor_core_peaks": tensor_core_peaks(),
            "projection_note": PROJECTION_NOTE}


def tensor_core_peaks(size: int = 8192) -> dict:
    """TFLOP/s of cuBLAS bf16 and cuBLASLt FP8 (torch._scaled_mm) on size^3, random data: the library ceilings
    of this GPU, against which compute-bound kernels are read."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    peaks = {"bf16_cublas": _tflops(lambda: a @ b, size)}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    try:
        peaks["fp8_scaled_mm"] = _tflops(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), size)
    except (RuntimeError, TypeError) as error:  # FP8 GEMMs need sm_89 or newer
        peaks["fp8_scaled_mm_error"] = str(error).splitlines()[0]
    return peaks


def _tflops(matmul, size: int, repeats: int = 10) -> float:
    from adaq.bench.prefill_bench import median_ms

    return 2 * size**3 / (median_ms(matmul, repeats) / 1e3) / 1e12


def sections(results: dict) -> dict[str, list[dict]]:
    """The lists of per-shape rows in microbench's result (gemm, attention, and whatever it adds later)."""
    return {name: rows for name, rows in results.items()
            if isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows)}


def add_projection(row: dict) -> None:
    if row.get("pct_of_copy") and row.get("bytes"):
        projected_bytes_per_s = row["pct_of_copy"] / 100 * RTX_4090_BANDWIDTH
        row["rtx4090_projected_us"] = row["bytes"] / projected_bytes_per_s * 1e6
    peak_pct = row.get("pct_of_mma_peak") or row.get("pct_of_peak")
    if peak_pct and "fp8" in str(row.get("op", "")).lower():
        row["rtx4090_projected_TFLOP/s"] = peak_pct / 100 * RTX_4090_FP8_TFLOPS


def render(results: dict, console: Console | None = None) -> None:
    console = console or Console()
    copy = results.get("copy", {})
    measured = f": copy {copy['GB/s']:.0f} GB/s (read + write, measured)" if copy.get("GB/s") else ""
    console.print(f"[bold]adaq bench kernels[/bold] on {results['device']['name']}{measured}")
    peaks = results.get("tensor_core_peaks", {})
    if peaks.get("bf16_cublas"):
        fp8 = f", FP8 torch._scaled_mm {peaks['fp8_scaled_mm']:.0f}" if peaks.get("fp8_scaled_mm") else ""
        console.print(f"tensor-core ceilings (8192^3, measured): bf16 cuBLAS {peaks['bf16_cublas']:.0f}{fp8} TFLOP/s")
    for name, rows in sections(results).items():
        console.print(section_table(name, rows))
    console.print(f"[dim]{PROJECTION_NOTE}[/dim]")


def section_table(name: str, rows: list[dict]) -> Table:
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns and not isinstance(row[key], (list, dict))]
    table = Table(title=name, title_justify="left")
    for column in columns:
        table.add_column(column.replace("rtx4090_projected_", "4090 proj. "), justify="right")
    for row in rows:
        table.add_row(*[_cell(row.get(column)) for column in columns])
    return table


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)
