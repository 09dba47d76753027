"""Perplexity of output-layer variants on the real Gemma3-270M (the eval protocol: WikiText-2, windows of 512, CPU,
reference backend, FP8 KV), with per-window NLL for paired comparisons. Variants: bf16 (as stored), fp8 and nvfp4
(`--lm-head fp8|nvfp4`, what the engine runs: fp8 is W8A8, activations E4M3 per token), and fp8-weight-only (the
same E4M3 per-channel weight dequantized into a dense head, activations untouched: simulated, no such flag) to split
fp8's cost between its weight and activation roundings.

    python scripts/lm_head_ppl_variants.py CKPT TEXT WINDOWS VARIANT OUT.json
"""
import json
import sys
import time
from dataclasses import asdict

import torch

from adaq.formats import fp8_prefill
from adaq.layers import embedding

torch.set_num_threads(1)
ckpt, text, windows, variant, out_path = sys.argv[1:6]
lm_head = {"bf16": "bf16", "fp8": "fp8", "nvfp4": "nvfp4", "fp8-weight-only": "fp8"}[variant]
if variant == "fp8-weight-only":
    quantize = embedding.quantize_output_layer
    embedding.quantize_output_layer = lambda weight, fmt: fp8_prefill.dequantize_expanded(
        quantize(weight, fmt), weight.dtype)

from adaq.eval.data import read_text  # noqa: E402
from adaq.eval.perplexity import perplexity  # noqa: E402
from adaq.eval.sources import load_scorer  # noqa: E402

started = time.time()
scorer = load_scorer(ckpt, runner="engine", backend="reference", kv_cache_dtype="fp8", max_model_len=512,
                     lm_head=lm_head)
result = perplexity(scorer, read_text(text), 512, int(windows), 8, lambda n: None)
report = {"variant": variant, "lm_head": lm_head, "windows": int(windows), **asdict(result),
          "window_nll": result.window_nll, "elapsed_s": time.time() - started,
          "command": " ".join(["python", *sys.argv])}
json.dump(report, open(out_path, "w"), indent=1)
print(variant, report["perplexity"])
