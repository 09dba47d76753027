"""`adaq bench`: NVFP4 against its baselines on one workload (tok/s, TTFT, ITL, VRAM, roofline), and
`adaq bench kernels`: each kernel against the hardware's measured ceilings and the bf16 reference kernels."""

import typer
from typer.core import TyperGroup

from adaq.commands import LM_HEAD_HELP, STRICT_HELP
from adaq.errors import AdaqError


class _BenchGroup(TyperGroup):
    """`adaq bench [CKPT]` and `adaq bench kernels`: a first argument naming a subcommand is that subcommand,
    never a checkpoint (click would otherwise give it to the optional CKPT argument)."""

    def parse_args(self, ctx, args):
        if args and args[0] in self.commands:
            declared = self.params
            arguments = [param for param in declared if param.param_type_name == "argument"]
            self.params = [param for param in declared if param.param_type_name != "argument"]
            try:
                rest = super().parse_args(ctx, args)
            finally:
                self.params = declared
            ctx.params.update({param.name: None for param in arguments})
            return rest
        ctx.allow_interspersed_args = True  # `adaq bench CKPT --batch 16`: options may follow the checkpoint
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_BenchGroup, invoke_without_command=True,
                  help="Benchmark NVFP4 against bf16 and transformers side by side: tok/s, TTFT, inter-token "
                       "latency, peak VRAM and % of the memory-bandwidth roofline. `adaq bench kernels` times each "
                       "kernel.")


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise AdaqError(f"invalid --batch {text!r}: give a batch size or a comma-separated list, e.g. 1,4,16") from None
    if not batches or min(batches) < 1:
        raise AdaqError(f"invalid --batch {text!r}: batch sizes must be >= 1")
    return tuple(sorted(set(batches)))


def parse_baselines(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip() and part.strip() != "none")


def _check_outputs(checkpoint: str | None, synthetic: str | None, json_path: str | None, plot_path: str | None):
    """Before the benchmark runs: --json and --plot can be written and are none of the inputs."""
    from adaq.formats.outputs import check_writable_file

    inputs = {"checkpoint": checkpoint, "synthetic config": synthetic}
    check_writable_file(json_path, "--json", inputs)
    check_writable_file(plot_path, "--plot", {**inputs, "--json file": json_path})


@app.callback()
def bench(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(None, metavar="CKPT", help="NVFP4 checkpoint folder to benchmark"),
    synthetic: str = typer.Option(None, help="random weights in a real model's shapes, made on the GPU: "
                                             "qwen3-8b, qwen3-30b-a3b, gemma3-4b, gemma3-27b, ... or a config.json"),
    batch: str = typer.Option("1,4,16", help="batch size, or a comma-separated list"),
    input_len: int = typer.Option(128, help="prompt tokens per request"),
    output_len: int = typer.Option(256, help="generated tokens per request (EOS ignored)"),
    kv_cache_dtype: str = typer.Option("fp8", help="KV cache of the NVFP4 variant: fp8, nvfp4 or bf16 (baselines: bf16)"),
    lm_head: str = typer.Option("bf16", "--lm-head", help=LM_HEAD_HELP + " NVFP4 variants only (baselines: bf16)."),
    repeats: int = typer.Option(3, help="timed runs per batch size after one warm-up; figures are medians"),
    baselines: str = typer.Option("bf16,hf", help="comma-separated: bf16 (our engine, bf16 weights, cuBLAS), "
                                                  "hf (transformers generate, static cache), or none"),
    backend: str = typer.Option("auto", help="engine backend: auto, cuda or reference"),
    prefill_path: str = typer.Option(None, help="NVFP4 prefill path(s), comma-separated, one NVFP4 variant each: "
                                                "auto (variant nvfp4: FP8 on sm_89 / sm_90, else exact), fp8 "
                                                "(nvfp4-fp8), exact (nvfp4-exact: dequantize + cuBLAS bf16), "
                                                "nvfp4 (nvfp4-decode: NVFP4 kernels at every M); default: "
                                                "$ADAQ_PREFILL_PATH, else auto"),
    device: str = typer.Option(None, help="cuda, cuda:1 or cpu (default: cuda when available)"),
    json_path: str = typer.Option(None, "--json", help="write every figure, the GPU, versions and command as JSON"),
    plot_path: str = typer.Option(None, "--plot", help="write a PNG: tok/s against batch per variant, VRAM bars"),
    strict: bool = typer.Option(False, "--strict", envvar="ADAQ_STRICT", help=STRICT_HELP),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", help="also run each NVFP4 variant "
                                             "sharded over N GPUs (variant nvfp4-tpN): per-rank memory and the "
                                             "scaling over one GPU"),
):
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from adaq.backends.prefill_route import configured_path  # $ADAQ_PREFILL_PATH (checked), else auto, as run/serve
    from adaq.bench import report as bench_report
    from adaq.bench.runner import Workload
    from adaq.bench.suite import BenchOptions, run_bench

    if (checkpoint is None) == (synthetic is None):
        raise AdaqError("give either a checkpoint folder (adaq bench CKPT) or --synthetic NAME, not both or neither")
    _check_outputs(checkpoint, synthetic, json_path, plot_path)
    if device is not None:
        from adaq.engine.config import resolve_device

        resolve_device(device)
    if checkpoint is not None:
        from adaq.validate import check_checkpoint

        check_checkpoint(checkpoint, level="layout")  # validate's own rules: what it calls valid, bench runs
    workload = Workload(parse_batches(batch), input_len, output_len, repeats)
    prefill_paths = parse_baselines(prefill_path or configured_path())
    options = BenchOptions(checkpoint or synthetic, synthetic is not None, workload, parse_baselines(baselines),
                           backend, kv_cache_dtype, device, prefill_paths, strict, tensor_parallel_size, lm_head)
    errors = Console(stderr=True)
    partial = (lambda report: bench_report.write_json(report, json_path)) if json_path else (lambda report: None)
    with errors.status("measuring copy bandwidth") as status:
        result = run_bench(options, on_variant=lambda name: status.update(f"running {name}: load, warm up, "
                                                                          f"{repeats} timed runs per batch"),
                           on_partial=partial)
    bench_report.render(result)
    if json_path:
        bench_report.write_json(result, json_path)
        errors.print(f"wrote {json_path}")
    if plot_path:
        from adaq.bench.plot import plot

        plot(result, plot_path)
        errors.print(f"wrote {plot_path}")
    failed = [f"{variant['variant']} ({variant['error']})" for variant in result["variants"] if variant.get("error")]
    if failed:
        raise AdaqError(f"variants failed: {'; '.join(failed)}", exit_code=1)


@app.command("kernels")
def kernels(
    json_path: str = typer.Option(None, "--json", help="write every measurement as JSON"),
    quick: bool = typer.Option(False, help="fewer shapes and repeats"),
):
    """Each kernel by shape (GEMMs by M/N/K, attention by context): time, % of the measured copy bandwidth or
    tensor-core peak, against the bf16 reference kernels (cuBLAS); RTX 4090 figures are labelled projections."""
    from adaq.bench import kernels as kernel_bench
    from adaq.formats.outputs import check_writable_file

    check_writable_file(json_path, "--json")
    result = kernel_bench.run(quick=quick)
    kernel_bench.render(result)
    if json_path:
        from adaq.bench.report import write_json

        write_json(result, json_path)


@app.command("show")
def show(
    json_file: str = typer.Argument(..., help="a JSON report written by adaq bench --json"),
    plot_path: str = typer.Option(None, "--plot", help="draw its PNG too"),
):
    """Print the tables of a saved report (e.g. bench/results/*.json) and optionally redraw its plot."""
    import json
    from pathlib import Path

    from adaq.bench import report as bench_report
    from adaq.formats.outputs import check_writable_file

    check_writable_file(plot_path, "--plot", {"report": json_file})
    try:
        result = json.loads(Path(json_file).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AdaqError(f"{json_file}: cannot read a bench report ({error})") from None
    if result.get("report") != "adaq bench":
        raise AdaqError(f"{json_file}: not an adaq bench report")
    bench_report.render(result)
    if plot_path:
        from adaq.bench.plot import plot

        plot(result, plot_path)
