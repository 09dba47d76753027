"""Greedy agreement of the NVFP4 KV cache against the FP8 cache on the real Gemma3-270M (reference backend, CPU)."""
import json, sys, time
import torch
from adaq.engine.api import LLM
from adaq.engine.sampling_params import SamplingParams

torch.set_num_threads(1)
ckpt = sys.argv[1]
PROMPTS = [
    "The capital of France is",
    "In 1969, the first humans to land on the Moon were",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors of light are",
    "Once upon a time, in a small village at the edge of a forest,",
    "Photosynthesis is the process by which plants",
    "The following is a recipe for chocolate chip cookies. Ingredients:",
    "Water boils at 100 degrees Celsius at sea level because",
    "The history of the Roman Empire began when",
    "To install Python packages, you can use the command",
]
out = {}
for kv in sys.argv[2:]:
    llm = LLM(ckpt, backend="reference", kv_cache_dtype=kv, dtype="fp32", device="cpu", max_model_len=512)
    t = time.time()
    res = llm.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    out[kv] = {"token_ids": [r.token_ids for r in res], "text": [r.text for r in res], "seconds": time.time() - t}
    del llm
ref = out["fp8"]["token_ids"]
report = {"prompts": PROMPTS, "max_tokens": 64, "results": out, "agreement": {}}
for kv in out:
    same_prefix, exact, tok_match = [], 0, 0
    for a, b in zip(out[kv]["token_ids"], ref):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_prefix.append(n)
        exact += a == b
        tok_match += sum(x == y for x, y in zip(a, b))
    report["agreement"][kv] = {"identical_sequences": exact, "of": len(ref),
                               "tokens_before_first_divergence": same_prefix,
                               "mean_prefix": sum(same_prefix) / len(same_prefix),
                               "positionwise_token_agreement": tok_match / sum(len(b) for b in ref)}
json.dump(report, open("greedy_agreement.json", "w"), indent=1)
print(json.dumps(report["agreement"], indent=1))
