"""Accuracy of the FP8 prefill path on a real NVFP4 checkpoint (CPU, reference backend), as JSON.

1. Weight expansion error: every NVFP4 linear expanded to E4M3 (adaq.formats.fp8_prefill) against its exact
   dequantization: relative Frobenius error and the largest element error relative to the row's amax.
2. Perplexity (adaq.eval.perplexity windows) of the exact NVFP4 path and of the emulated FP8 path.

    python scripts/prefill_fp8_accuracy.py CHECKPOINT --windows 16 [--text data/wikitext-2/test.txt]
"""

import argparse
import json
import os
import time

import torch


def weight_errors(folder: str) -> dict:
    from adaq.formats import nvfp4
    from adaq.formats.checkpoint import open_checkpoint
    from adaq.formats import fp8_prefill

    checkpoint = open_checkpoint(folder)
    sq_err = sq_ref = 0.0
    worst = 0.0
    per_layer = {}
    for prefix in checkpoint.quantized_prefixes():
        weight = checkpoint.nvfp4(prefix)
        exact = nvfp4.dequantize(weight).double()
        approx = fp8_prefill.dequantize_expanded(fp8_prefill.expand_weight(weight)).double()
        err = (approx - exact)
        sq_err += float(err.square().sum())
        sq_ref += float(exact.square().sum())
        row_amax = exact.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        worst = max(worst, float((err.abs() / row_amax).max()))
        per_layer[prefix] = float(err.norm() / exact.norm().clamp(min=1e-30))
    return {"relative_frobenius": (sq_err / sq_ref) ** 0.5, "max_error_over_row_amax": worst,
            "worst_layer": max(per_layer, key=per_layer.get), "worst_layer_relative": max(per_layer.values()),
            "layers": len(per_layer)}


def perplexity_of(folder: str, text: str, windows: int, path: str) -> dict:
    from adaq.engine.api import LLM
    from adaq.eval.perplexity import perplexity
    from adaq.eval.scoring import EngineScorer

    os.environ["ADAQ_PREFILL_PATH"] = path
    started = time.perf_counter()
    scorer = EngineScorer(LLM(folder, backend="reference", device="cpu"))
    result = perplexity(scorer, text, window=512, max_windows=windows, batch_size=4)
    return {"perplexity": result.perplexity, "stderr": result.stderr, "windows": result.num_windows,
            "scored_tokens": result.num_scored_tokens, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "../data/wikitext-2/test.txt"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    text = open(args.text, encoding="utf-8").read()
    report = {"checkpoint": args.checkpoint, "weights": weight_errors(args.checkpoint)}
    print(json.dumps(report["weights"]), flush=True)
    report["nvfp4"] = perplexity_of(args.checkpoint, text, args.windows, "nvfp4")
    print(json.dumps(report["nvfp4"]), flush=True)
    report["fp8"] = perplexity_of(args.checkpoint, text, args.windows, "fp8")
    report["fp8_vs_nvfp4"] = report["fp8"]["perplexity"] / report["nvfp4"]["perplexity"] - 1
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
