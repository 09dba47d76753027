"""Largest context that fits on a 24 GB card (rtx4090 preset: 24564 MiB, gpu_memory_utilization 0.9) at batch 1 and
16, Gemma3-27B and Gemma4-31B NVFP4 (weights estimated from config.json), window-sized KV off (before) and on
(after), per KV dtype and prefill chunk; and the KV cache of one 32k-token sequence. Every figure is what
`adaq validate CONFIG --json` prints (the same library call); run from the repository root:

    PYTHONPATH=$PWD python bench/results/window_kv/context_fit.py > bench/results/window_kv/context_fit.json
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODELS = ("gemma3-27b", "gemma4-31b")
KV_DTYPES = ("fp8", "nvfp4", "bf16")
CHUNKS = (8192, 2048)
GPU, CONTEXT = "rtx4090", 32768


def command(model: str, kv_dtype: str, window_kv: bool, chunk: int) -> list[str]:
    return ["validate", f"adaq/bench/configs/{model}.json", "--gpu", GPU, "--batch", "1", "--context", str(CONTEXT),
            "--kv-cache-dtype", kv_dtype, "--window-kv" if window_kv else "--no-window-kv",
            "--max-num-batched-tokens", str(chunk), "--json"]


def row(model: str, kv_dtype: str, window_kv: bool, chunk: int) -> dict:
    """One `adaq validate` run, by the library function the command calls."""
    from adaq.validate import validate_checkpoint

    report = validate_checkpoint(ROOT / "adaq" / "bench" / "configs" / f"{model}.json", gpu=GPU, batch=1,
                                 context=CONTEXT, kv_cache_dtype=kv_dtype, window_kv=window_kv,
                                 max_num_batched_tokens=chunk)
    budget = report.as_dict()["budget"]
    return {"model": model, "kv_cache_dtype": kv_dtype, "window_kv": window_kv, "max_num_batched_tokens": chunk,
            "command": "adaq " + " ".join(command(model, kv_dtype, window_kv, chunk)),
            "max_context_by_batch": budget["max_context_by_batch"],
            "kv_cache_bytes_32k_batch1": budget["kv_cache_bytes"], "kv_bytes_per_token": budget["kv_bytes_per_token"],
            "weights_bytes": budget["weights_quantized_bytes"] + budget["weights_kept_bytes"],
            "activations_bytes_32k_batch1": budget["activations_bytes"], "usable_bytes": budget["usable_bytes"]}


def main() -> None:
    rows = [row(model, kv_dtype, window_kv, chunk) for model in MODELS for kv_dtype in KV_DTYPES for chunk in CHUNKS
            for window_kv in (False, True)]
    json.dump({"gpu": GPU, "gpu_memory_utilization": 0.9, "note": __doc__.strip(), "rows": rows}, sys.stdout,
              indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
