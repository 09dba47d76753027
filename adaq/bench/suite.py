"""`adaq bench` as a library call: NVFP4 and its baselines on one workload, with the roofline beside each figure."""

from dataclasses import asdict, dataclass

import torch

from adaq.bench import roofline
from adaq.bench.environment import describe
from adaq.bench.runner import (BASELINES, PREFILL_VARIANTS, TP_SUFFIX, VariantOutcome, VariantSpec, Workload,
                               is_nvfp4, run_guarded, split_tp)
from adaq.bench.shapes import load_model_config, model_tensors, text_config
from adaq.errors import AdaqError

REPORT_VERSION = 1


@dataclass(frozen=True)
class BenchOptions:
    model: str  # checkpoint folder, or a synthetic model (bundled name or config.json path)
    synthetic: bool
    workload: Workload
    baselines: tuple[str, ...] = BASELINES
    backend: str = "auto"
    kv_cache_dtype: str = "fp8"
    device: str | None = None
    prefill_paths: tuple[str, ...] = ("auto",)  # one NVFP4 variant per path: PREFILL_VARIANTS
    strict: bool = False  # a fallback (adaq.backends.fallbacks) fails the variant instead of being measured
    # > 1: each NVFP4 variant also runs sharded over this many GPUs (variant nvfp4-tp2, ...), beside one GPU
    tensor_parallel_size: int = 1
    lm_head: str = "bf16"  # the NVFP4 variants' output layer (EngineConfig.lm_head); baselines keep bf16

    def __post_init__(self):
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise AdaqError(f"invalid --tensor-parallel-size {self.tensor_parallel_size}: must be >= 1")
        wrong = [path for path in self.prefill_paths if path not in PREFILL_VARIANTS]
        if wrong or not self.prefill_paths:
            raise AdaqError(f"invalid --prefill-path {wrong[0] if wrong else ''!r}: choose from "
                            f"{', '.join(PREFILL_VARIANTS)} (comma-separated for several NVFP4 variants)")
        unknown = [name for name in self.baselines if name not in BASELINES]
        if unknown:
            raise AdaqError(f"unknown baseline {unknown[0]!r} in --baselines: choose from {', '.join(BASELINES)}")
        if self.kv_cache_dtype not in roofline.KV_CACHE_DTYPES:
            raise AdaqError(f"invalid --kv-cache-dtype {self.kv_cache_dtype}: choose fp8, nvfp4 or bf16")
        if self.lm_head not in roofline.LM_HEAD_FORMATS:
            raise AdaqError(f"invalid --lm-head {self.lm_head}: choose one of {', '.join(roofline.LM_HEAD_FORMATS)}")
        if self.backend not in ("auto", "cuda", "reference"):
            raise AdaqError(f"invalid --backend {self.backend}: choose auto, cuda or reference")
        if self.backend == "cuda" and self.resolved_device().type != "cuda":
            raise AdaqError("--backend cuda needs a CUDA GPU and none is in use: use --backend reference (or auto)")

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def variants(self) -> list[str]:
        nvfp4 = [PREFILL_VARIANTS[path] for path in self.prefill_paths]
        size = self.tensor_parallel_size
        sharded = [f"{name}{TP_SUFFIX}{size}" for name in nvfp4] if size > 1 else []
        return [*nvfp4, *sharded, *self.baselines]


def run_bench(options: BenchOptions, on_variant=lambda variant: None, on_partial=lambda report: None) -> dict:
    """Run every variant; return the report (JSON-ready dict). `on_variant(name)` is told before each one runs,
    `on_partial(report)` gets the report so far after each one (so a run cut short keeps what it measured)."""
    device = options.resolved_device()
    config = model_config(options)
    environment = describe(device)
    bandwidth = roofline.measure_copy_bandwidth(device) if device.type == "cuda" else None
    outcomes = []
    for variant in options.variants:
        on_variant(variant)
        spec = VariantSpec(variant, options.model, options.synthetic, options.workload, options.backend,
                           options.kv_cache_dtype, str(device), options.strict, options.device is not None,
                           options.lm_head)
        outcome = run_guarded(spec)
        add_roofline(outcome, config, options, bandwidth)
        outcomes.append(outcome)
        add_speedups(outcomes)
        add_tp_scaling(outcomes)
        on_partial(assemble(options, config, environment, bandwidth, outcomes, device))
    if device.type == "cuda":  # the clocks at the start are the idle ones; these are right after the load
        from adaq.bench.environment import nvidia_smi

        environment["device"]["nvidia_smi_after"] = nvidia_smi(device.index or 0)
    return assemble(options, config, environment, bandwidth, outcomes, device)


def model_config(options: BenchOptions) -> dict:
    if options.synthetic:
        return load_model_config(options.model)
    from adaq.formats.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(options.model)
    if not checkpoint.quantized_prefixes():
        raise AdaqError(f"{options.model}: not an NVFP4 checkpoint; quantize it first (adaq quantize) or bench a "
                        f"synthetic model (--synthetic)")
    return checkpoint.config


def variant_weights(variant: str, config: dict, options: BenchOptions) -> roofline.WeightBytes:
    if is_nvfp4(variant) and not options.synthetic:
        from pathlib import Path

        weights = roofline.checkpoint_weight_bytes(Path(options.model), config)
    else:
        weights = roofline.weight_bytes(model_tensors(config), config, quantized=is_nvfp4(variant))
    return roofline.with_lm_head(weights, config, options.lm_head) if is_nvfp4(variant) else weights


def add_roofline(outcome: VariantOutcome, config: dict, options: BenchOptions, bandwidth: float | None) -> None:
    from adaq.bench.runner import attach_roofline

    weights = variant_weights(outcome.variant, config, options)
    outcome.weight_bytes = outcome.weight_bytes or asdict(weights)
    kv_dtype = options.kv_cache_dtype if is_nvfp4(outcome.variant) else "bf16"
    for result in outcome.results:
        traffic = roofline.decode_traffic(weights, config, batch=result.batch, input_len=result.input_len,
                                          output_len=result.output_len, kv_cache_dtype=kv_dtype)
        attach_roofline(result, traffic, bandwidth)


def add_speedups(outcomes: list[VariantOutcome]) -> None:
    """Decode and end-to-end tok/s of each variant over each other variant that ran the same batch."""
    by_batch = {(outcome.variant, result.batch): result for outcome in outcomes for result in outcome.results}
    for (variant, batch), result in by_batch.items():
        for baseline in BASELINES:
            other = by_batch.get((baseline, batch))
            if baseline == variant or other is None:
                continue
            result.speedup[baseline] = {"decode": result.decode_tokens_per_s / other.decode_tokens_per_s,
                                        "total": result.total_tokens_per_s / other.total_tokens_per_s}
            result.prefill_speedup[baseline] = result.prefill_tokens_per_s / other.prefill_tokens_per_s


def add_tp_scaling(outcomes: list[VariantOutcome]) -> None:
    """A sharded variant's tok/s over the same variant on one GPU, batch by batch."""
    by_batch = {(outcome.variant, result.batch): result for outcome in outcomes for result in outcome.results}
    for (variant, batch), result in by_batch.items():
        base, size = split_tp(variant)
        single = by_batch.get((base, batch))
        if size == 1 or single is None:
            continue
        result.tp_scaling = {"over": base, "ranks": size,
                             "decode": result.decode_tokens_per_s / single.decode_tokens_per_s,
                             "total": result.total_tokens_per_s / single.total_tokens_per_s}


def assemble(options: BenchOptions, config: dict, environment: dict, bandwidth: float | None,
             outcomes: list[VariantOutcome], device: torch.device) -> dict:
    text = text_config(config)
    return {
        "report": "adaq bench", "version": REPORT_VERSION, **environment,
        "model": {"name": options.model, "synthetic": options.synthetic,
                  "architecture": (config.get("architectures") or ["?"])[0],
                  "layers": text["num_hidden_layers"], "hidden_size": text["hidden_size"],
                  "vocab_size": text["vocab_size"]},
        "workload": {**asdict(options.workload), "batches": list(options.workload.batches),
                     "backend": options.backend, "kv_cache_dtype": options.kv_cache_dtype,
                     "prefill_paths": list(options.prefill_paths), "strict": options.strict,
                     "tensor_parallel_size": options.tensor_parallel_size, "lm_head": options.lm_head},
        "on_cpu": device.type != "cuda",
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rtx_4090_note": "rtx_4090_bound_tokens_per_s: the same bytes per step at the RTX 4090's 1.0 TB/s"
                         ": a roofline bound, not a measurement",
        "variants": [outcome.to_dict() for outcome in outcomes],
    }
