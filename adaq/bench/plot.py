"""`--plot FILE.png`: decode tok/s against batch size per variant (with each variant's roofline bound), prefill
tok/s per variant and batch, and peak VRAM bars per variant and batch (GPU runs only)."""

from pathlib import Path

COLORS = {"nvfp4": "#76b900", "nvfp4-fp8": "#2ca02c", "nvfp4-decode": "#bcbd22", "nvfp4-exact": "#17becf",
          "bf16": "#1f77b4", "hf": "#ff7f0e"}
PANEL_WIDTH_IN = 6.4


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [variant for variant in report["variants"] if variant["results"]]
    panels = 2 if report["on_cpu"] else 3  # a CPU run has no GPU memory to draw
    figure, axes = plt.subplots(1, panels, figsize=(PANEL_WIDTH_IN * panels, 5))
    draw_speed(axes[0], variants)
    draw_prefill(axes[1], variants)
    if not report["on_cpu"]:
        draw_memory(axes[2], variants)
    figure.suptitle(title(report), fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temp, dpi=130)
    plt.close(figure)
    temp.replace(path)


def title(report: dict) -> str:
    model, workload = report["model"], report["workload"]
    bandwidth = report.get("copy_bandwidth_bytes_per_s")
    where = report["device"]["name"] + (f", copy {bandwidth / 1e12:.2f} TB/s" if bandwidth else " (CPU, no roofline)")
    return (f"adaq bench: {model['name']} ({'random weights' if model['synthetic'] else 'checkpoint'}) on {where}; "
            f"prompt {workload['input_len']}, {workload['output_len']} new tokens")


def draw_speed(axes, variants: list[dict]) -> None:
    import matplotlib.ticker

    for variant in variants:
        batches = [result["batch"] for result in variant["results"]]
        color = COLORS.get(variant["variant"])
        axes.plot(batches, [result["decode_tokens_per_s"] for result in variant["results"]], "o-", color=color,
                  label=legend(variant))
        bounds = [result.get("bound_tokens_per_s") for result in variant["results"]]
        if all(bounds) and variant["variant"] != "hf":
            axes.plot(batches, bounds, "--", color=color, alpha=0.5, label=f"{variant['variant']} roofline")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    batches = sorted({result["batch"] for variant in variants for result in variant["results"]})
    axes.set_xticks(batches, [str(batch) for batch in batches])
    axes.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.set_xlabel("batch size")
    axes.set_ylabel("decode tokens/s (all sequences)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)


def draw_prefill(axes, variants: list[dict]) -> None:
    draw_bars_by_batch(axes, variants, lambda result: result["prefill_tokens_per_s"], "%.0f",
                       "prefill tokens/s (prompt tokens over time to the last first token)")


def draw_bars_by_batch(axes, variants: list[dict], value, fmt: str, ylabel: str) -> None:
    """One group of bars per batch size, one bar per variant, each labelled with its `value(result)`."""
    batches = sorted({result["batch"] for variant in variants for result in variant["results"]})
    width = 0.8 / max(len(variants), 1)
    for index, variant in enumerate(variants):
        values = {result["batch"]: value(result) for result in variant["results"]}
        positions = [slot + (index - (len(variants) - 1) / 2) * width for slot in range(len(batches))]
        bars = axes.bar(positions, [values.get(batch, 0) for batch in batches], width,
                        color=COLORS.get(variant["variant"]), label=variant["variant"])
        axes.bar_label(bars, fmt=fmt, fontsize=7)
    axes.set_xticks(range(len(batches)), [str(batch) for batch in batches])
    axes.set_xlabel("batch size")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)


def legend(variant: dict) -> str:
    label = variant["label"].removeprefix("adaq ")
    return f"{variant['variant']}: {label}" if len(label) < 60 else variant["variant"]


def draw_memory(axes, variants: list[dict]) -> None:
    draw_bars_by_batch(axes, variants, lambda result: (result.get("peak_allocated_bytes") or 0) / 1e9, "%.1f",
                       "peak GPU memory, allocator (GB)")
