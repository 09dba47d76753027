"""`adaq validate CKPT`: check an NVFP4 checkpoint against the sm_89 kernels' rules and plan its VRAM."""

import json
from pathlib import Path

import typer

from adaq.errors import CheckpointError

MAX_FINDINGS_SHOWN = 40


def validate(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder (config.json + *.safetensors), or a config.json alone "
                                          "to plan its VRAM with every Linear estimated in NVFP4."),
    arch: str = typer.Option("sm_89", help="Target of the kernels' layout rules: sm_89 (Ada) or sm_90."),
    gpu: str = typer.Option("rtx4090", help="GPU for the VRAM budget: rtx4090, rtx4080, l40s, h100 or a size in GiB."),
    batch: int = typer.Option(1, help="Concurrent sequences for the VRAM budget."),
    context: int = typer.Option(None, help="Tokens per sequence (prompt + output); default min(4096, model max)."),
    kv_cache_dtype: str = typer.Option("fp8", help="KV cache dtype: fp8 (E4M3 + fp32 scales), nvfp4 (E2M1 + E4M3 per 16 + E8M0 per token) or bf16."),
    gpu_memory_utilization: float = typer.Option(0.9, help="Share of GPU memory the engine may use (as `adaq run`)."),
    window_kv: bool = typer.Option(True, "--window-kv/--no-window-kv",
                                   help="Size sliding-window layers' KV to their window, as the engine does."),
    max_num_batched_tokens: int | None = typer.Option(
        None, "--max-num-batched-tokens", help="Tokens per engine step (the chunk that sliding-window layers hold "
        "beyond their windows); default as the engine: 2048 on GPUs under 70 GiB, 8192 on larger ones."),
    compile: bool = typer.Option(False, "--compile", help="Also compile the CUDA kernels for --arch with nvcc."),
    tp: int = typer.Option(1, "--tp", "--tensor-parallel-size", help="GPUs to shard the model over: checks the "
                           "split rules (16-column NVFP4 blocks included) and plans one GPU's share."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every quantized tensor's layout and scales for the sm_89 kernels and say whether the model fits.

    Exit 0 when valid, 1 when not (each problem names its tensor and rule)."""
    from adaq.validate import validate_checkpoint

    try:
        report = validate_checkpoint(ckpt, arch=arch, gpu=gpu, batch=batch, context=context,
                                     kv_cache_dtype=kv_cache_dtype, compile=compile,
                                     utilization=gpu_memory_utilization, window_kv=window_kv,
                                     max_num_batched_tokens=max_num_batched_tokens, tp=tp,
                                     compile_progress=_CompileLines(arch) if compile and not as_json else None)
    except CheckpointError as error:
        if as_json:
            typer.echo(json.dumps({"path": str(ckpt), "valid": False, "error": str(error)}))
        raise CheckpointError(str(error), exit_code=1) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        render(report)
    if not report.valid:
        raise typer.Exit(1)


class _CompileLines:
    """Progress of `--compile` on stderr: a line when nvcc starts, then one per CUDA source as it finishes."""

    def __init__(self, arch: str):
        from rich.console import Console

        self.arch, self.console, self.started = arch, Console(stderr=True), False

    def __call__(self, source: str, entry: dict | None) -> None:
        if entry is None:
            if not self.started:
                self.started = True
                self.console.print(f"[dim]compiling the CUDA kernels for {self.arch} with nvcc and ptxas[/]")
            return
        kernels, spills = len(entry.get("kernels") or {}), entry.get("spills", 0)
        verdict = "ok" if entry.get("ok") else "[red]FAILED[/]"
        self.console.print(f"  {source}: {verdict} ({kernels} kernels, {spills} bytes spilled)")


def render(report) -> None:
    from rich.console import Console

    console = Console()
    console.print(summary_table(report))
    console.print(rules_table(report))
    if report.findings:
        console.print(findings_table(report))
    if report.budget:
        console.print(budget_table(report.budget))
    if report.compile is not None:
        console.print(compile_table(report.compile))
    console.print(verdict(report), soft_wrap=True)


def summary_table(report):
    from rich.markup import escape

    from adaq.tables import Table

    table = Table(title=escape(f"adaq validate {report.path}"), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("format", f"{report.format}" + (f" ({report.scheme})" if report.scheme else ""))
    table.add_row("architecture", escape(report.architecture))
    if report.shape is not None:
        table.add_row("layers", layers_line(report.shape))
    table.add_row("kernel target", report.arch)
    table.add_row("quantized linears", str(report.quantized_linears))
    table.add_row("tensors", str(report.tensors))
    return table


LAYER_KINDS = {"linear_attention": "Gated DeltaNet", "sliding_attention": "sliding-window attention",
               "full_attention": "full attention"}


def layers_line(shape) -> str:
    """'4: 3 Gated DeltaNet, 1 full attention; 4 MoE' from the model's shape."""
    kinds = ", ".join(f"{count} {LAYER_KINDS[kind]}" for kind, count in shape.layer_types().items())
    moe = f"; {shape.moe_layers} MoE" if shape.moe_layers else ""
    return f"{shape.layers}: {kinds}{moe}"


def rules_table(report):
    from adaq.tables import Table
    from adaq.validate.rules import RULES

    table = Table(title="rules")
    for column in ("rule", "demands", "checked", "failed"):
        table.add_column(column, justify="right" if column in ("checked", "failed") else "left")
    for rule, description in RULES.items():
        if report.rules_applied[rule]:
            failed = report.failed(rule)
            table.add_row(rule, description, str(report.rules_applied[rule]),
                          f"[red]{failed}[/red]" if failed else "0")
    return table


def findings_table(report):
    from rich.markup import escape

    from adaq.tables import Table

    table = Table(title=f"findings ({len(report.errors)} errors, {len(report.warnings)} warnings)")
    for column in ("", "rule", "tensor", "problem"):
        table.add_column(column)
    for finding in report.findings[:MAX_FINDINGS_SHOWN]:
        mark = "[red]error[/red]" if finding.severity == "error" else "[yellow]warning[/yellow]"
        table.add_row(mark, finding.rule, escape(finding.tensor), escape(finding.message))
    hidden = len(report.findings) - MAX_FINDINGS_SHOWN
    if hidden > 0:
        table.add_row("", "", f"… and {hidden} more", "(--json lists all)")
    return table


def budget_table(budget):
    from rich.markup import escape

    from adaq.tables import Table

    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    window = "window-sized" if budget.window_kv else "full-context"
    table = Table(title=f"VRAM on {budget.gpu.name}: batch {budget.batch} × context {budget.context}, "
                        f"KV {budget.kv_dtype} ({window}), prefill chunk {budget.batched_tokens}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    if budget.weights.quantized:
        table.add_row("weights, quantized (NVFP4)", gib(budget.weights.quantized))
        table.add_row("weights, kept (bf16)", gib(budget.weights.kept))
    else:
        table.add_row("weights (bf16)", gib(budget.weights.kept))
    table.add_row(f"KV cache ({budget.kv_per_token:,} B/token)", gib(budget.kv_cache))
    if budget.state_cache:
        table.add_row(f"state cache (Gated DeltaNet, {budget.state_cache // budget.batch:,} B/sequence)",
                      gib(budget.state_cache))
    table.add_row(f"activations + workspace (a step of {budget.step_tokens} tokens)",
                  gib(sum(budget.activations.values())))
    table.add_row("CUDA context", gib(budget.cuda_context))
    table.add_row("[bold]total[/bold]", f"[bold]{gib(budget.total)}[/bold]")
    table.add_row(f"usable ({budget.utilization:g} × {gib(budget.gpu.memory)})", gib(budget.usable))
    table.add_row("fits", "[green]yes[/green]" if budget.fits else "[red]no[/red]")
    table.add_row(f"largest batch at context {budget.context}", str(budget.max_batch))
    for batch, context in budget.context_fit.items():
        capped = " (model max)" if budget.capped(context) else ""
        table.add_row(f"largest context at batch {batch}", f"{context}{capped}")
    table.caption = escape("; ".join(budget.notes))
    return table


def compile_table(result: dict):
    """adaq.kernels.build.compile_check's report: one row per CUDA source, or its keys when it has no sources."""
    from rich.markup import escape

    from adaq.tables import Table

    sources = result.get("sources")
    if not isinstance(sources, dict):
        table = Table(title="compile check", show_header=False)
        for key, value in result.items():
            table.add_row(escape(str(key)), escape(value if isinstance(value, str) else json.dumps(value)))
        return table
    table = Table(title=f"compile check for {result.get('arch')} ({escape(str(result.get('nvcc', 'nvcc')))})")
    for column in ("source", "ok", "kernels", "max regs", "spills", "intended", "Hopper-only"):
        table.add_column(column, no_wrap=True)
    for name, entry in sources.items():
        required = {**entry.get("required_ptx", {}), **entry.get("required_sass", {})}
        kernels = entry.get("kernels", {})
        table.add_row(escape(name), "[green]yes[/green]" if entry.get("ok") else "[red]no[/red]", str(len(kernels)),
                      str(max((k.get("registers", 0) for k in kernels.values()), default=0)),
                      str(entry.get("spills", "?")), f"{sum(map(bool, required.values()))}/{len(required)}",
                      escape(", ".join(entry.get("forbidden_ptx", [])) or "none"))
    table.caption = escape(fp8_mma_line(sources))
    return table


def fp8_mma_line(sources: dict) -> str:
    found = sorted({instruction for entry in sources.values()
                    for instruction, ok in {**entry.get("required_ptx", {}), **entry.get("required_sass", {})}.items()
                    if ok and "mma" in instruction.lower() and ("e4m3" in instruction or "E4M3" in instruction)})
    if found:
        return f"FP8 MMA in the machine code: {', '.join(found)}"
    return "FP8 MMA: none of these sources is meant to use it (the decode GEMM multiplies in bf16 mma.sync)"


def verdict(report) -> str:
    from rich.markup import escape

    if report.valid:
        warned = f" ({len(report.warnings)} warnings)" if report.warnings else ""
        return f"[bold green]valid[/bold green]{warned}: {escape(str(report.path))}"
    first = escape(report.errors[0].line())
    more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
    return f"[bold red]invalid[/bold red]: {first}{more}"
