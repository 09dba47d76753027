"""Perplexity of KV-cache variants on the real Gemma3-270M, simulated exactly: the engine runs with an fp32 cache
and the reference store writes the dequantized values of the chosen format (what the reference's gather would read
back from a real cache of that format). K and V may use different formats; 'h' = a Hadamard rotation along
head_dim before NVFP4 (undone after dequantization: the same as rotating q and the output)."""
import json, sys, time
import torch
from adaq.backends.numerics import attention as A
from adaq.engine import config as C

torch.set_num_threads(1)
ckpt, text, windows, k_fmt, v_fmt, out_path = sys.argv[1:7]
windows = int(windows)


def hadamard(d):
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def fake(x, fmt):
    x = x.float()
    if fmt == "fp8":
        return A.dequantize_kv_fp8(*A.quantize_kv_fp8(x))
    if fmt == "nvfp4":
        return A.dequantize_kv_nvfp4(*A.quantize_kv_nvfp4(x))
    if fmt == "nvfp4h":
        h = hadamard(x.shape[-1])
        return A.dequantize_kv_nvfp4(*A.quantize_kv_nvfp4(x @ h)) @ h.T
    if fmt == "bf16":
        return x.to(torch.bfloat16).float()
    raise ValueError(fmt)


original = A.store_kv_reference


def store(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping):
    if k_cache.dtype == torch.float32:
        k, v = fake(k, k_fmt), fake(v, v_fmt)
    return original(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)


A.store_kv_reference = store
C.KV_CACHE_DTYPES["fp32sim"] = torch.float32

from adaq.eval.data import read_text  # noqa: E402
from adaq.eval.perplexity import perplexity  # noqa: E402
from adaq.eval.sources import load_scorer  # noqa: E402

started = time.time()
scorer = load_scorer(ckpt, runner="engine", backend="reference", kv_cache_dtype="fp32sim", dtype=None,
                     max_model_len=512)
result = perplexity(scorer, read_text(text), 512, windows, 8, lambda n: None)
from dataclasses import asdict, is_dataclass  # noqa: E402
report = {"k": k_fmt, "v": v_fmt, "windows": windows, "result": asdict(result) if is_dataclass(result) else result,
          "elapsed_s": time.time() - started}
json.dump(report, open(out_path, "w"), indent=1, default=str)
print(json.dumps(report, default=str))
