"""The benchmark run: one workload, several variants (NVFP4 and its baselines), each timed the same way.

Every variant sees the same prompts (random token ids, seeded by batch size), generates exactly `output_len`
tokens per request (EOS ignored, greedy), is warmed up once per batch size (compilation, CUDA-graph capture and
allocator growth stay out of the numbers) and timed `repeats` times; figures are medians over repeats. On a GPU
each variant runs in its own process, so one variant's memory, caches and peak counters never leak into another's.
"""

import gc
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from adaq.bench import roofline
from adaq.bench.shapes import load_model_config, model_tensors
from adaq.errors import AdaqError

BASELINES = ("bf16", "hf")
# NVFP4 variants by prefill path (ADAQ_PREFILL_PATH in the variant's process; adaq.kernels.fp8_gemm):
# auto = the FP8 path where the GPU has one, else exact (the default); fp8 = the FP8 path; exact = dequantize + cuBLAS
# bf16 for large M; nvfp4 = decode kernels only.
PREFILL_VARIANTS = {"auto": "nvfp4", "fp8": "nvfp4-fp8", "exact": "nvfp4-exact", "nvfp4": "nvfp4-decode"}


TP_SUFFIX = "-tp"  # nvfp4-tp2: the nvfp4 variant sharded over 2 GPUs (tensor parallelism)


def split_tp(variant: str) -> tuple[str, int]:
    """(the variant without its tensor-parallel suffix, ranks): nvfp4-tp2 -> (nvfp4, 2), bf16 -> (bf16, 1)."""
    base, _, size = variant.rpartition(TP_SUFFIX)
    return (base, int(size)) if base and size.isdigit() else (variant, 1)


def is_nvfp4(variant: str) -> bool:
    return split_tp(variant)[0] in PREFILL_VARIANTS.values()


def prefill_path_of(variant: str) -> str | None:
    return next((path for path, name in PREFILL_VARIANTS.items() if name == split_tp(variant)[0]), None)
MEMORY_MARGIN = 1 << 30  # activations, CUDA graphs and the allocator's slack, on top of weights and KV cache


@dataclass(frozen=True)
class Workload:
    batches: tuple[int, ...] = (1, 4, 16)
    input_len: int = 128
    output_len: int = 256
    repeats: int = 3
    seed: int = 0

    def __post_init__(self):
        if not self.batches or min(self.batches) < 1:
            raise AdaqError(f"invalid --batch {','.join(map(str, self.batches))}: batch sizes must be >= 1")
        if self.input_len < 1:
            raise AdaqError(f"invalid --input-len {self.input_len}: must be >= 1")
        if self.output_len < 2:
            raise AdaqError(f"invalid --output-len {self.output_len}: must be >= 2 (decode starts at the 2nd token)")
        if self.repeats < 1:
            raise AdaqError(f"invalid --repeats {self.repeats}: must be >= 1")

    @property
    def max_len(self) -> int:
        return self.input_len + self.output_len

    def prompts(self, batch: int, vocab_size: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + batch)
        return torch.randint(0, vocab_size, (batch, self.input_len), generator=generator).tolist()


@dataclass(frozen=True)
class VariantSpec:
    """What one process runs: a variant of a model on a device."""

    variant: str  # nvfp4 | nvfp4-fp8 | nvfp4-decode (PREFILL_VARIANTS) | bf16 | hf
    model: str  # bundled config name, config.json path or checkpoint folder
    synthetic: bool
    workload: Workload
    backend: str = "auto"
    kv_cache_dtype: str = "fp8"
    device: str = "cuda"
    strict: bool = False  # EngineConfig.strict: a fallback fails the variant
    device_given: bool = True  # False: the device was the default, so auto choosing the CPU is a fallback
    lm_head: str = "bf16"  # the NVFP4 variants' output layer; baselines keep bf16

    @property
    def tensor_parallel_size(self) -> int:
        return split_tp(self.variant)[1]


@dataclass
class Generation:
    """One timed generation of a batch: when each request's tokens arrived (time.perf_counter)."""

    start: float
    token_times: list[list[float]]
    input_len: int

    @property
    def batch(self) -> int:
        return len(self.token_times)

    @property
    def output_len(self) -> int:
        return len(self.token_times[0])

    @property
    def prefill_end(self) -> float:
        return max(times[0] for times in self.token_times)

    @property
    def end(self) -> float:
        return max(times[-1] for times in self.token_times)

    def ttfts(self) -> list[float]:
        return [times[0] - self.start for times in self.token_times]

    def inter_token_latencies(self) -> list[float]:
        return [later - earlier for times in self.token_times for earlier, later in zip(times, times[1:])]

    def figures(self) -> dict:
        prefill_s, decode_s, total_s = self.prefill_end - self.start, self.end - self.prefill_end, self.end - self.start
        decode_tokens = self.batch * (self.output_len - 1)
        return {
            "ttft_s": percentile(self.ttfts(), 50),
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": self.batch * self.input_len / prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else math.inf,
            "total_s": total_s,
            "total_tokens_per_s": self.batch * self.output_len / total_s,
        }


@dataclass
class BatchResult:
    variant: str
    batch: int
    input_len: int
    output_len: int
    repeats: int
    ttft_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    decode_s: float
    decode_tokens_per_s: float
    itl_p50_s: float
    itl_p99_s: float
    total_s: float
    total_tokens: int
    total_tokens_per_s: float
    peak_allocated_bytes: int | None
    device_used_bytes: int | None
    traffic: dict | None = None  # roofline.StepTraffic.to_dict(), bytes per decode step
    achieved_bytes_per_s: float | None = None
    roofline_fraction: float | None = None
    bound_tokens_per_s: float | None = None
    rtx_4090_bound_tokens_per_s: float | None = None  # the same bytes at the 4090's bandwidth: a bound, not a run
    speedup: dict = field(default_factory=dict)  # decode tok/s over each baseline's, same batch
    prefill_speedup: dict = field(default_factory=dict)  # prefill tok/s over each baseline's, same batch
    warmup_s: float | None = None  # the untimed first generation (compilation, graph capture)
    # What fell back by the end of this batch (adaq.backends.fallbacks: "what" of each); None: not our engine (hf)
    fallbacks: list[str] | None = None
    graph_replays: int | None = None  # decode CUDA graphs replayed during this batch's timed runs (None: no graphs)
    # Tensor parallelism: decode and end-to-end tok/s over the same variant on one GPU, same batch
    tp_scaling: dict | None = None


@dataclass
class VariantOutcome:
    variant: str
    label: str  # what ran, e.g. "adaq cuda, NVFP4 weights, fp8 KV"
    results: list[BatchResult] = field(default_factory=list)
    skipped: str | None = None  # did not fit, with the numbers
    error: str | None = None  # failed: the one-line reason (error_detail holds the traceback's end)
    error_detail: str | None = None
    load_s: float | None = None
    weight_bytes: dict | None = None
    resident_weight_bytes: int | None = None  # allocator bytes after loading, before any KV cache
    kv_cache_bytes: int | None = None  # the engine's KV allocation (both pools with window-sized KV)
    fallbacks: list[dict] | None = None  # adaq.backends.fallbacks.Fallback as dicts (what, cause, setting)
    # Tensor parallelism: each rank's weight, KV and state bytes and GPU peak (LLMEngine.memory_per_rank)
    rank_memory: list[dict] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(variant: str, generations: list[Generation], memory: tuple[int | None, int | None],
              warmup_s: float | None = None) -> BatchResult:
    """Medians over repeats; inter-token latencies pooled over every request of every repeat."""
    figures = [generation.figures() for generation in generations]
    median = {key: percentile([entry[key] for entry in figures], 50) for key in figures[0]}
    latencies = [value for generation in generations for value in generation.inter_token_latencies()]
    first = generations[0]
    return BatchResult(variant=variant, batch=first.batch, input_len=first.input_len, output_len=first.output_len,
                       repeats=len(generations), itl_p50_s=percentile(latencies, 50),
                       itl_p99_s=percentile(latencies, 99), total_tokens=first.batch * first.output_len,
                       peak_allocated_bytes=memory[0], device_used_bytes=memory[1], warmup_s=warmup_s, **median)


def attach_roofline(result: BatchResult, traffic: roofline.StepTraffic, bandwidth: float | None) -> None:
    result.traffic = traffic.to_dict()
    result.rtx_4090_bound_tokens_per_s = traffic.bound_tokens_per_second(roofline.RTX_4090_BANDWIDTH)
    if bandwidth is None or result.decode_s <= 0:
        return
    result.achieved_bytes_per_s = traffic.total * (result.output_len - 1) / result.decode_s
    result.roofline_fraction = result.achieved_bytes_per_s / bandwidth
    result.bound_tokens_per_s = traffic.bound_tokens_per_second(bandwidth)


# ---- memory -----------------------------------------------------------------------------------------------------
class MemoryProbe:
    """Allocator peak (torch) and device-level used memory (driver: total - free, this process and any other)."""

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self.device = device
        self.device_used = 0
        self.warmup_s: float | None = None
        self.graph_replays: int | None = None

    def reset(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_used = 0

    def sample(self) -> None:
        if self.on_gpu:
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_used = max(self.device_used, total - free)

    def read(self) -> tuple[int | None, int | None]:
        if not self.on_gpu:
            return None, None
        self.sample()
        return torch.cuda.max_memory_allocated(self.device), self.device_used


# ---- our engine ---------------------------------------------------------------------------------------------------
def run_variant(spec: VariantSpec) -> VariantOutcome:
    """Load the variant, then warm up and time every batch size of the workload."""
    if spec.variant == "hf":
        from adaq.bench.hf_baseline import run_hf

        return run_hf(spec)
    path = prefill_path_of(spec.variant)
    if path is None:
        return _run_engine_variant(spec)
    from adaq.backends.prefill_route import PATH_ENV

    previous = os.environ.get(PATH_ENV)
    os.environ[PATH_ENV] = path  # read by the cuda backend at load and per linear
    try:
        return _run_engine_variant(spec)
    finally:
        if previous is None:
            os.environ.pop(PATH_ENV, None)
        else:
            os.environ[PATH_ENV] = previous


def _run_engine_variant(spec: VariantSpec) -> VariantOutcome:
    device = torch.device(spec.device)
    config, source, weights = open_source(spec)
    kv_dtype = spec.kv_cache_dtype if is_nvfp4(spec.variant) else "bf16"
    # sharded over several GPUs, no one GPU holds the whole: the ranks' own allocations decide
    reason = does_not_fit(weights, config, spec, kv_dtype, device) if spec.tensor_parallel_size == 1 else None
    if reason:
        return VariantOutcome(spec.variant, spec.variant, skipped=reason)
    probe = MemoryProbe(device)
    probe.reset()
    started = time.perf_counter()
    try:
        engine = build_engine(spec, config, source, kv_dtype, device)
    except torch.OutOfMemoryError as error:
        return VariantOutcome(spec.variant, spec.variant, skipped=f"out of GPU memory while loading ({error})")
    try:
        return _time_variant(spec, engine, config, weights, kv_dtype, device, probe, time.perf_counter() - started)
    finally:
        engine.close()
        del engine
        _release(device)


def _time_variant(spec: VariantSpec, engine, config: dict, weights, kv_dtype: str, device: torch.device,
                  probe: "MemoryProbe", load_s: float) -> VariantOutcome:
    outcome = VariantOutcome(spec.variant, engine_label(engine, spec.variant, kv_dtype),
                             load_s=load_s, weight_bytes=asdict(weights),
                             resident_weight_bytes=_allocated(device), kv_cache_bytes=engine.runner.kv_cache_bytes)
    vocab = model_vocab(config)
    for batch in spec.workload.batches:
        try:
            generations = time_engine(engine, spec.workload, batch, vocab, probe)
        except torch.OutOfMemoryError:
            outcome.skipped = f"batch {batch} and larger: out of GPU memory"
            break
        result = summarize(spec.variant, generations, probe.read(), probe.warmup_s)
        result.fallbacks, result.graph_replays = engine.fallbacks.names(), probe.graph_replays
        outcome.results.append(result)
    outcome.fallbacks = engine.fallbacks.as_dicts()
    if spec.tensor_parallel_size > 1:
        outcome.rank_memory = engine.memory_per_rank()
    return outcome


@dataclass(frozen=True)
class SourceOf:
    """A variant's weight source on a given device: what a tensor-parallel rank loads its shard from (synthetic
    weights are seeded by tensor name, so every rank makes the same ones)."""

    spec: VariantSpec

    def __call__(self, device: torch.device):
        from dataclasses import replace

        return open_source(replace(self.spec, device=str(device)))[1]


def open_source(spec: VariantSpec):
    """(config, weight source, WeightBytes) for the variant: synthetic or a checkpoint (dequantized for bf16)."""
    if spec.synthetic:
        from adaq.bench.synthetic import SyntheticCheckpoint

        config = load_model_config(spec.model)
        quantized = is_nvfp4(spec.variant)
        source = SyntheticCheckpoint(config, quantized=quantized, device=spec.device, name=spec.model)
        return source.config, source, roofline.weight_bytes(model_tensors(config), config, quantized=quantized)
    from adaq.formats.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(spec.model)
    if is_nvfp4(spec.variant) or not checkpoint.quantized_prefixes():
        return checkpoint.config, checkpoint, roofline.checkpoint_weight_bytes(checkpoint.path, checkpoint.config)
    config = {key: value for key, value in checkpoint.config.items() if key != "quantization_config"}
    dense = DequantizedCheckpoint(checkpoint, device=spec.device)
    return config, dense, roofline.weight_bytes(model_tensors(config), config, quantized=False)


class DequantizedCheckpoint:
    """An NVFP4 checkpoint seen as a bf16 one: the bf16 baseline of a real checkpoint runs its exact weights."""

    def __init__(self, checkpoint, device: str, dtype: torch.dtype = torch.bfloat16):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        self.path = checkpoint.path
        self.config = {key: value for key, value in checkpoint.config.items() if key != "quantization_config"}
        self.format, self.scheme = "dense", None
        self._quantized = set(checkpoint.quantized_prefixes())

    def quantized_prefixes(self) -> list[str]:
        return []

    def nvfp4(self, prefix: str):
        raise KeyError(prefix)

    def tensor_names(self) -> list[str]:
        return sorted(self.checkpoint.tensor_names() + [f"{prefix}.weight" for prefix in self._quantized])

    def tensor(self, name: str) -> torch.Tensor:
        from adaq.formats.nvfp4 import dequantize

        prefix = name.removesuffix(".weight")
        if prefix in self._quantized:
            return dequantize(self.checkpoint.nvfp4(prefix).to(self.device), self.dtype)
        return self.checkpoint.tensor(name)


def does_not_fit(weights: roofline.WeightBytes, config: dict, spec: VariantSpec, kv_dtype: str,
                 device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    workload = spec.workload
    max_batch = max(workload.batches)
    kv = roofline.kv_cache_bytes(config, kv_dtype, max_batch * workload.max_len, num_seqs=max_batch,
                                 step_tokens=engine_step_tokens(workload),
                                 window_kv=spec.variant != "hf")  # transformers' cache holds every layer's context
    free, _ = torch.cuda.mem_get_info(device)
    needed = weights.total + kv + MEMORY_MARGIN
    if needed <= free:
        return None
    return (f"does not fit: {spec.variant} weights {weights.total / 1e9:.1f} GB + KV cache {kv / 1e9:.1f} GB + "
            f"{MEMORY_MARGIN / 2**30:.0f} GiB margin > {free / 1e9:.1f} GB free on the GPU")


def engine_step_tokens(workload) -> int:
    """Every prompt of the largest batch in one step: the bench times whole prefills."""
    return max(max(workload.batches) * workload.input_len, workload.max_len)


def build_engine(spec: VariantSpec, config: dict, source, kv_dtype: str, device: torch.device):
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine
    from adaq.backends import get_backend
    from adaq.backends.fallbacks import Fallbacks
    from adaq.models import build_model, load_weights

    workload = spec.workload
    max_batch = max(workload.batches)
    blocks_per_seq = -(-workload.max_len // 16)
    engine_config = EngineConfig(
        model=str(source.path), backend=spec.backend, kv_cache_dtype=kv_dtype, max_model_len=workload.max_len,
        max_num_seqs=max_batch, max_num_batched_tokens=engine_step_tokens(workload),
        num_kv_blocks=max_batch * blocks_per_seq, block_size=16, device=device, skip_tokenizer=True,
        strict=spec.strict, tensor_parallel_size=spec.tensor_parallel_size,
        lm_head=spec.lm_head if is_nvfp4(spec.variant) else "bf16")
    if spec.tensor_parallel_size > 1:  # every rank makes its own source and reads its shard of it
        return LLMEngine(engine_config, model_config=config, source_factory=SourceOf(spec))
    backend = get_backend(spec.backend, device if spec.device_given else None,
                          fallbacks=Fallbacks(strict=spec.strict))
    model = build_model(config, backend, engine_config.dtype, device, lm_head=engine_config.lm_head)
    load_weights(model, source)
    return LLMEngine(engine_config, model=model, model_config=config)


def engine_label(engine, variant: str, kv_dtype: str) -> str:
    backend = getattr(getattr(engine.runner.model, "backend", None), "name", "?")
    weights = "NVFP4 weights" if is_nvfp4(variant) else "bf16 weights"
    graphs = ", CUDA graphs" if getattr(engine.runner, "decode_graphs", None) is not None else ""
    prefill = ""
    if is_nvfp4(variant) and backend == "cuda":
        from adaq.backends.prefill_route import describe

        prefill = f", {describe(prefill_path_of(variant))}"
    elif is_nvfp4(variant) and prefill_path_of(variant) == "fp8":
        prefill = ", prefill: FP8 PATH emulated (reference backend)"
    ranks = split_tp(variant)[1]
    sharded = f", tensor parallel over {ranks} ranks" if ranks > 1 else ""
    head = engine.config.lm_head
    output = f", {head} lm_head" if head != "bf16" else ""
    return f"adaq {backend} backend, {weights}{output}, {kv_dtype} KV{graphs}{prefill}{sharded}"


def model_vocab(config: dict) -> int:
    from adaq.bench.shapes import text_config

    return text_config(config)["vocab_size"]


def time_engine(engine, workload: Workload, batch: int, vocab: int, probe: MemoryProbe) -> list[Generation]:
    from adaq.engine.sampling_params import SamplingParams

    prompts = workload.prompts(batch, vocab)
    params = SamplingParams(max_tokens=workload.output_len, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    generate_with_engine(engine, prompts, params)  # warm-up: graphs, kernels and allocator, not timed
    probe.warmup_s = time.perf_counter() - started
    probe.reset()
    graphs = getattr(engine.runner, "decode_graphs", None)
    replays_before = graphs.replays if graphs is not None else 0
    generations = []
    for _ in range(workload.repeats):
        generations.append(generate_with_engine(engine, prompts, params))
        probe.sample()
    probe.graph_replays = graphs.replays - replays_before if graphs is not None else None
    return generations


def generate_with_engine(engine, prompts: list[list[int]], params) -> Generation:
    _synchronize(engine.config.device)
    start = time.perf_counter()
    request_ids = [engine.add_request(prompt, params) for prompt in prompts]
    times: dict[str, list[float]] = {request_id: [] for request_id in request_ids}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            times[output.request_id].extend([now] * len(output.new_token_ids))
    token_times = [times[request_id] for request_id in request_ids]
    check_lengths(token_times, params.max_tokens)
    return Generation(start, token_times, len(prompts[0]))


def check_lengths(token_times: list[list[float]], expected: int) -> None:
    lengths = sorted({len(times) for times in token_times})
    if lengths != [expected]:
        raise AdaqError(f"bench asked every request for {expected} tokens but got {lengths}: the engine stopped early")


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- orchestration ------------------------------------------------------------------------------------------------
def run_isolated(spec: VariantSpec) -> VariantOutcome:
    """run_variant in a fresh process on a GPU (clean memory and counters); in this process on the CPU."""
    if torch.device(spec.device).type != "cuda":
        return run_variant(spec)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_variant, spec).result()


def run_guarded(spec: VariantSpec) -> VariantOutcome:
    """run_isolated, where a variant that fails is reported as failed and the others still run."""
    try:
        return run_isolated(spec)
    except Exception as error:  # an engine or kernel bug in one variant must not hide the other variants' figures
        detail = str(error.__cause__ or "") or traceback.format_exc()
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        return VariantOutcome(spec.variant, spec.variant, error=reason[:500], error_detail=detail[-3000:])
