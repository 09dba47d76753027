"""The prefill routing sweep: every prefill path at M = 16 .. 4096 rows on the GPU at hand, and the thresholds the
route reads (adaq/backends/prefill_thresholds.json) computed from it.

Dense: one Qwen3-8B layer's four projections (qkv, o, gate_up, down) through the NVFP4 decode kernel, the mid-size
NVFP4 kernel, the exact path (dequantize + cuBLAS bf16), the FP8 path and cuBLAS bf16 on a dense weight
(prefill_bench.threshold_sweep: L2 flushed before each call, medians). MoE: one Qwen3-30B-A3B MoE layer (128
experts, top-8) at the same M, through the decode kernels, the grouped mid-size kernel, the exact grouped path, the
grouped FP8 path, per-expert cuBLAS bf16 (the reference loop) and the bf16 engine's grouped bf16 MoE
(adaq.backends.dense_moe, where Triton is there). Thresholds: the smallest M of the sweep from which a path is at
least as fast as what would run instead at that M and at every larger M (a crossover that holds, not a lucky point);
a path that was timed and never won gets twice the largest M swept ("not within the sweep").

    python -m adaq.bench.prefill_sweep --json sweep.json [--write-thresholds [PATH]] [--rows 16,32,...]
"""

import datetime
import json
from pathlib import Path

import torch

from adaq.backends import prefill_route
from adaq.bench import prefill_bench, prefill_moe_bench

SWEEP_ROWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def dense_sweep(rows: tuple[int, ...] = SWEEP_ROWS) -> dict:
    return prefill_bench.threshold_sweep(rows)


MOE_GROUP_ROWS = (16, 32, 64)  # the grouped mid path's variants beside its plan (prefill_moe_mid.group_rows)


def moe_sweep(rows: tuple[int, ...] = SWEEP_ROWS, shape: dict | None = None) -> dict:
    """ms per MoE layer at each M, per path (random experts generated on the GPU, random router logits)."""
    from adaq.backends import dense_moe, prefill_moe
    from adaq.backends.cuda import CudaBackend
    from adaq.backends.prefill_moe_exact import exact_moe_forward
    from adaq.backends.prefill_moe_mid import mid_moe_forward
    from adaq.backends.reference import ReferenceBackend
    from adaq.kernels import ops

    shape = shape or prefill_moe_bench.QWEN3_30B_A3B
    experts, top_k, hidden = shape["experts"], shape["top_k"], shape["hidden"]
    pairs, downs, dense_pairs, dense_down = prefill_moe_bench.random_experts(experts, hidden, shape["intermediate"])
    backend = CudaBackend("cuda")
    prepared = backend.prepare_experts(pairs, downs, dtype=torch.bfloat16)
    fp8 = _fp8_experts(prefill_moe, pairs, downs)
    bf16_backend = ReferenceBackend("cuda", dequant_cache_bytes=0)
    bf16 = bf16_backend.prepare_experts(dense_pairs, dense_down, dtype=torch.bfloat16)
    grouped = backend.prepare_experts(dense_pairs, dense_down, dtype=torch.bfloat16)
    grouped_ok = isinstance(grouped, dense_moe.DenseExperts)  # else no Triton: the fallback is reported, not timed
    entries = []
    for m in rows:
        generator = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, hidden, device="cuda", generator=generator).to(torch.bfloat16)
        logits = torch.randn(m, experts, device="cuda", generator=generator).to(torch.bfloat16)
        paths = {"decode": lambda: ops.moe_forward(x, logits, prepared.stacked, top_k, True),
                 "mid": lambda: mid_moe_forward(x, logits, prepared.stacked, top_k, True),
                 "exact": lambda: exact_moe_forward(x, logits, prepared.exact, top_k, True),
                 "bf16_cublas": lambda: bf16_backend.moe(x, logits, bf16, top_k, True)}
        for cut in MOE_GROUP_ROWS:
            paths[f"mid_g{cut}"] = (lambda cut=cut: mid_moe_forward(x, logits, prepared.stacked, top_k, True,
                                                                    max_group_rows=cut))
        if grouped_ok:
            paths["bf16_grouped"] = lambda: backend.moe(x, logits, grouped, top_k, True)
        if fp8 is not None:
            paths["fp8"] = lambda: prefill_moe.fp8_moe_forward(x, logits, fp8, top_k, True)
        entry = {"M": m}
        for name, step in paths.items():
            entry[f"{name}_ms"] = prefill_bench.median_ms(step, repeats=5, warmup=2)
        entries.append(entry)
    return {"shape": shape, "rows": entries, "fp8": fp8 is not None}


def _fp8_experts(prefill_moe, pairs, downs):
    if prefill_route.fp8_unavailable(torch.device("cuda")) is not None:
        return None
    return prefill_moe.Fp8Experts.from_weights(pairs, downs, "cuda")


def crossover(entries: list[dict], path: str, others: tuple[str, ...]) -> int | None:
    """The smallest M from which `path` is no slower than every one of `others` at that M and all larger M."""
    threshold = None
    for entry in reversed(entries):
        if f"{path}_ms" not in entry or any(entry[f"{path}_ms"] > entry[f"{other}_ms"] for other in others
                                            if f"{other}_ms" in entry):
            break
        threshold = entry["M"]
    return threshold


def threshold(entries: list[dict], path: str, others: tuple[str, ...]) -> int | None:
    """crossover(), or twice the largest M swept where `path` was timed and never won; None where it was not timed
    (the current value is then kept)."""
    if not any(f"{path}_ms" in entry for entry in entries):
        return None
    found = crossover(entries, path, others)
    return found if found is not None else 2 * max(entry["M"] for entry in entries)


def thresholds(dense: dict, moe: dict | None) -> dict:
    """What the route should use, from a sweep. The route tries fp8, exact, the mid-size kernel, the decode kernel
    in that order, so each is compared with those after it."""
    rows = dense["rows"]
    found = {"exact_min_tokens": threshold(rows, "exact", ("decode", "mid")),
             "fp8_min_tokens": threshold(rows, "fp8", ("decode", "mid", "exact")),
             "mid_min_tokens": threshold(rows, "mid", ("decode",)),
             "moe_exact_min_tokens": None, "moe_mid_min_tokens": None}
    if moe:
        found["moe_exact_min_tokens"] = threshold(moe["rows"], "exact", ("decode", "mid"))
        found["moe_mid_min_tokens"] = threshold(moe["rows"], "mid", ("decode",))
    return found


def write_thresholds(found: dict, path: Path, device_name: str, command: str) -> dict:
    """The route's JSON: a found value replaces the file's, a None keeps it (and the note says so)."""
    current = prefill_route.load_thresholds(path) if Path(path).is_file() else prefill_route.load_thresholds()
    keys = prefill_route.THRESHOLD_KEYS + prefill_route.OPTIONAL_THRESHOLD_KEYS
    kept = [key for key in keys if found.get(key) is None and current.get(key) is not None]
    values = {key: found.get(key) or current.get(key) for key in keys}
    note = (f"written by `{command}` on {device_name}, {datetime.date.today().isoformat()}: the smallest M of the "
            f"sweep from which each path is no slower than the paths the route would otherwise take (decode, mid, "
            f"exact, fp8 in that order) at every larger M; twice the largest M where it never was"
            + (f"; kept from before (the path was not timed): {', '.join(kept)}" if kept else ""))
    data = {"note": note, "measured": True, "device": device_name, **values}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return data


def summary_lines(report: dict) -> list[str]:
    lines = prefill_bench.sweep_lines(report["dense"])
    moe = report.get("moe")
    if moe:
        lines.append(f"MoE layer {moe['shape']}, ms:")
        lines.append(f"{'M':>5} {'decode':>8} {'mid':>8} {'exact':>8} {'fp8':>8} {'bf16':>8} {'bf16 grp':>8}")
        for e in moe["rows"]:
            fp8, mid, grouped = (f"{e[key]:8.3f}" if key in e else f"{'-':>8}"
                                 for key in ("fp8_ms", "mid_ms", "bf16_grouped_ms"))
            lines.append(f"{e['M']:>5} {e['decode_ms']:8.3f} {mid} {e['exact_ms']:8.3f} {fp8} "
                         f"{e['bf16_cublas_ms']:8.3f} {grouped}{_group_variants(e)}")
    lines.append(f"thresholds: {report['thresholds']}")
    return lines


def _group_variants(entry: dict) -> str:
    """The grouped mid path at each group size, where timed: '  g16 0.31 g32 0.35 g64 0.66'."""
    timed = [f"g{cut} {entry[f'mid_g{cut}_ms']:.3f}" for cut in MOE_GROUP_ROWS if f"mid_g{cut}_ms" in entry]
    return "  " + " ".join(timed) if timed else ""


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m adaq.bench.prefill_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every figure as JSON")
    parser.add_argument("--rows", default=",".join(map(str, SWEEP_ROWS)), help="M values, comma-separated")
    parser.add_argument("--no-moe", action="store_true", help="the dense projections only")
    parser.add_argument("--write-thresholds", nargs="?", const=str(prefill_route.THRESHOLDS_FILE), default=None,
                        metavar="PATH", help=f"write the route's thresholds (default {prefill_route.THRESHOLDS_FILE})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_sweep: needs a CUDA GPU (the paths are timed on it)")
    rows = tuple(int(m) for m in args.rows.split(","))
    report = {"device": torch.cuda.get_device_name(), "dense": dense_sweep(rows)}
    report["moe"] = None if args.no_moe else moe_sweep(rows)
    report["thresholds"] = thresholds(report["dense"], report["moe"])
    if args.write_thresholds:
        command = "python -m adaq.bench.prefill_sweep " + " ".join(sys.argv[1:] if argv is None else argv)
        report["written"] = write_thresholds(report["thresholds"], Path(args.write_thresholds), report["device"],
                                             command)
    print("\n".join(summary_lines(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
