"""Where a prefill step's GPU time goes (device script): one prefill of `--batch` prompts of `--input-len` tokens per
variant (bf16 engine, NVFP4 exact path, NVFP4 FP8 path), profiled with torch.profiler, kernel time summed by kind.

    python scripts/profile_prefill_step.py --model qwen3-8b --input-len 2048 --batch 1 --out $OUT

Prints per variant: prefill wall ms and GPU ms per kind (GEMM, attention, KV store, weight expansion, activation
quantization, dequantization, norms, element-wise, other), the top kernels and the top host-side ops (self CPU
time: where a wall time above the GPU time goes), then the backend ops' own times over two more prefills: host ms
(the time to issue each op, nothing synchronised) and synced ms (a device sync before and after each op: its wall
including the GPU), with the rest of the step (layers' Python, torch ops outside the backend) as "outside ops".
Writes prefill_profile.json.
"""

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from adaq.bench.runner import VariantSpec, Workload, build_engine, model_vocab, open_source, prefill_path_of
from adaq.engine.sampling_params import SamplingParams

KINDS = (  # first match wins; kernel names lower-cased
    ("attention", ("paged_attention", "flash", "merge_splits", "prefill_attention")),
    ("kv store", ("store_kv",)),
    ("weight expansion", ("expand", "nvfp4_to_e4m3")),
    ("activation quant", ("quantize_rows", "quant_act", "per_token", "rms_norm_quant")),
    ("dequantize", ("dequant",)),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "ampere", "sm80", "sm89", "gemv", "splitk")),
    ("norm", ("rms_norm",)),
    ("rotary", ("rotary",)),
    ("element-wise", ("silu", "gelu", "elementwise", "copy", "fill", "cat", "index", "add", "mul")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "other")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefill_once(engine, prompts) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    synchronize()
    start = time.perf_counter()
    engine.step()
    synchronize()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return elapsed


BACKEND_OPS = ("linear", "moe", "qk_norm_rope_store", "store_kv", "attention", "rms_norm", "add_rms_norm",
               "silu_and_mul", "gelu_tanh_and_mul", "rotary", "moe_shared", "sigmoid_gate", "gdn_gates",
               "causal_conv1d", "gated_delta_rule", "gated_rms_norm")


def backend_op_times(engine, prompts, synced: bool) -> dict:
    """{op: [ms, calls]} for one prefill, each outermost backend op timed on the host (synced: with a device sync
    before and after it), and "outside ops": the step's wall minus the ops'."""
    backend = engine.runner.model.backend
    times, depth = {}, [0]

    def timed(name, method):
        def call(*args, **kwargs):
            if depth[0]:
                return method(*args, **kwargs)
            depth[0] += 1
            if synced:
                synchronize()
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if synced:
                    synchronize()
                entry = times.setdefault(name, [0.0, 0])
                entry[0] += (time.perf_counter() - start) * 1e3
                entry[1] += 1
                depth[0] -= 1
        return call

    wrapped = [name for name in BACKEND_OPS if callable(getattr(backend, name, None))]
    for name in wrapped:
        setattr(backend, name, timed(name, getattr(backend, name)))
    try:
        wall = prefill_once(engine, prompts) * 1e3
    finally:
        for name in wrapped:
            delattr(backend, name)
    times["outside ops"] = [wall - sum(ms for ms, _ in times.values()), 1]
    return {"wall_ms": wall, "ops_ms": dict(sorted(times.items(), key=lambda item: -item[1][0]))}


def profile_variant(spec: VariantSpec, prompts) -> dict:
    from torch.profiler import ProfilerActivity, profile

    config, source, _ = open_source(spec)
    engine = build_engine(spec, config, source, spec.kv_cache_dtype, torch.device(spec.device))
    prefill_once(engine, prompts)
    walls = sorted(prefill_once(engine, prompts) for _ in range(3))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        prefill_once(engine, prompts)
    kernels = {}
    on_gpu = torch.cuda.is_available()
    for event in prof.key_averages():  # kernels only (with CPU activity on, aten ops carry device time too)
        if event.self_device_time_total > 0 and (not on_gpu or event.device_type == torch.autograd.DeviceType.CUDA):
            kernels[event.key] = kernels.get(event.key, 0.0) + event.self_device_time_total / 1e3
    kinds = {}
    for name, ms in kernels.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda item: -item[1])[:25]
    host = sorted(((event.key, event.self_cpu_time_total / 1e3, event.count) for event in prof.key_averages()),
                  key=lambda item: -item[1])[:25]
    host_ops = backend_op_times(engine, prompts, synced=False)
    synced_ops = backend_op_times(engine, prompts, synced=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return {"wall_ms": walls[1] * 1e3, "gpu_ms": sum(kernels.values()), "kinds_ms": kinds,
            "top_kernels_ms": [[name[:120], ms] for name, ms in top],
            "top_host_ms": [[name[:120], ms, count] for name, ms, count in host],
            "backend_ops_host": host_ops, "backend_ops_synced": synced_ops}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", default="bf16,nvfp4,nvfp4-fp8")
    parser.add_argument("--out", default="out")
    parser.add_argument("--backend", default="cuda", help="cuda, or reference for a CPU smoke run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload(batches=(args.batch,), input_len=args.input_len, output_len=2, repeats=1)
    results = {}
    for variant in args.variants.split(","):
        path = prefill_path_of(variant)
        if path:
            os.environ["ADAQ_PREFILL_PATH"] = path
        spec = VariantSpec(variant, args.model, True, workload, args.backend, "bf16" if variant == "bf16" else "fp8",
                           "cuda" if args.backend == "cuda" else "cpu")
        config, _, _ = open_source(spec)
        prompts = workload.prompts(args.batch, model_vocab(config))
        results[variant] = profile_variant(spec, prompts)
        os.environ.pop("ADAQ_PREFILL_PATH", None)
        r = results[variant]
        kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in sorted(r["kinds_ms"].items(), key=lambda i: -i[1]))
        print(f"{variant:<10} wall {r['wall_ms']:.1f} ms, GPU {r['gpu_ms']:.1f} ms: {kinds}", flush=True)
        for name, ms in r["top_kernels_ms"][:8]:
            print(f"    {ms:8.2f} ms  {name}")
        print("    host (self CPU time):")
        for name, ms, count in r["top_host_ms"][:12]:
            print(f"    {ms:8.2f} ms  {count:6d}x  {name}")
        host, synced = r["backend_ops_host"], r["backend_ops_synced"]
        print(f"    backend ops, host ms (prefill wall {host['wall_ms']:.1f}) / synced ms (wall "
              f"{synced['wall_ms']:.1f}) / calls:")
        for name, (ms, calls) in synced["ops_ms"].items():
            print(f"    {host['ops_ms'].get(name, [0.0])[0]:8.2f} {ms:8.2f} {calls:6d}x  {name}")
    (out / "prefill_profile.json").write_text(json.dumps({"model": args.model, "input_len": args.input_len,
                                                          "batch": args.batch, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
