"""Where a decode step's time goes (device script): the engine's wall time per step against the GPU time of the
captured forward, lm_head and sampler, and the kernel table of a few profiled steps.

    python scripts/profile_decode_step.py --model qwen3-8b --batch 1,16 --out $OUT

Prints one line per batch: wall ms per step, graph replay ms, logits+sample ms, host gap ms. Writes
profile_<model>_b<batch>.txt (torch.profiler kernel table) and profile_<model>.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from adaq.bench.runner import VariantSpec, Workload, build_engine, model_vocab, open_source
from adaq.engine.sampling_params import SamplingParams
from adaq.bench.prefill_bench import median_ms


def engine_step_times(engine, prompts, new_tokens: int) -> list[float]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # prefill
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def phase_times(engine, batch: int) -> dict:
    runner = engine.runner
    graphs = runner.decode_graphs
    out = {"graphs": graphs is not None}
    if graphs is None:
        return out
    bucket = graphs.bucket_for(batch)
    out["bucket"] = bucket.size
    out["replay_ms"] = median_ms(bucket.graph.replay)
    hidden = bucket.hidden[:batch]
    out["lm_head_ms"] = median_ms(lambda: runner.model.compute_logits(hidden))
    logits = runner.model.compute_logits(hidden)
    out["argmax_ms"] = median_ms(lambda: logits.argmax(dim=-1))
    return out


def profile_steps(engine, prompts, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    path.write_text(table + "\n\nBY CPU TIME\n" + cpu_table)  # two tables in one file: the device tool brings back 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--variant", default="nvfp4")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = tuple(int(b) for b in args.batch.split(","))
    workload = Workload(batches=batches, input_len=128, output_len=64, repeats=1)
    spec = VariantSpec(args.variant, args.model, True, workload, "cuda", "fp8" if args.variant == "nvfp4" else "bf16")
    device = torch.device("cuda")
    config, source, _ = open_source(spec)
    engine = build_engine(spec, config, source, spec.kv_cache_dtype, device)
    vocab = model_vocab(config)
    results = {}
    for batch in batches:
        prompts = workload.prompts(batch, vocab)
        engine_step_times(engine, prompts, 16)  # warm-up
        steps = engine_step_times(engine, prompts, 64)
        wall = sorted(steps)[len(steps) // 2] * 1e3
        phases = phase_times(engine, batch)
        gpu = phases.get("replay_ms", 0) + phases.get("lm_head_ms", 0) + phases.get("argmax_ms", 0)
        results[batch] = {"wall_ms": wall, **phases, "host_gap_ms": wall - gpu}
        print(f"{args.model} {args.variant} batch {batch}: wall {wall:.3f} ms/step, replay "
              f"{phases.get('replay_ms', float('nan')):.3f}, lm_head {phases.get('lm_head_ms', float('nan')):.3f}, "
              f"argmax {phases.get('argmax_ms', float('nan')):.3f}, host gap {wall - gpu:.3f} ms", flush=True)
        profile_steps(engine, prompts, out / f"profile_{args.model}_{args.variant}_b{batch}.txt")
    (out / f"profile_{args.model}_{args.variant}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
