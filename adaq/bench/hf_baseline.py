"""The `hf` baseline: transformers' own model and `generate()` with a static cache, as its users run it.

Random bf16 weights (transformers' initialisation) in the same architecture and the same prompts as the other
variants; greedy, exactly `output_len` new tokens. On a GPU, transformers compiles the forward for a static cache by
itself (torch.compile, CUDA graphs): the warm-up generate of each batch size absorbs that. A logits processor stamps
the time each token's logits are ready, which gives TTFT and inter-token latencies the same way as for our engine.
"""

import time

import torch

from adaq.bench.runner import Generation, MemoryProbe, VariantOutcome, VariantSpec, summarize
from adaq.bench.shapes import load_model_config, text_config
from adaq.errors import AdaqError


class TokenClock:
    """A transformers LogitsProcessor that records when each step's logits exist (one row per request)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def run_hf(spec: VariantSpec) -> VariantOutcome:
    device = torch.device(spec.device)
    config = hf_config(spec)
    probe = MemoryProbe(device)
    probe.reset()
    started = time.perf_counter()
    try:
        model = build_hf_model(config, device)
    except torch.OutOfMemoryError as error:
        return VariantOutcome("hf", "transformers", skipped=f"out of GPU memory while loading ({error})")
    dtype = next(model.parameters()).dtype
    compiled = ", torch.compile (automatic)" if device.type == "cuda" else ""
    label = (f"transformers {_transformers_version()} generate(), static cache{compiled}, "
             f"{str(dtype).removeprefix('torch.')}" + ("" if spec.synthetic else ", random weights of the same shapes"))
    outcome = VariantOutcome("hf", label, load_s=time.perf_counter() - started,
                             resident_weight_bytes=torch.cuda.memory_allocated(device) if device.type == "cuda" else None)
    vocab = text_config(config)["vocab_size"]
    for batch in spec.workload.batches:
        prompts = torch.tensor(spec.workload.prompts(batch, vocab), device=device)
        started = time.perf_counter()
        hf_generate(model, prompts, spec.workload.output_len)  # warm-up: compilation and CUDA graphs
        probe.warmup_s = time.perf_counter() - started
        probe.reset()
        generations = []
        for _ in range(spec.workload.repeats):
            generations.append(hf_generate(model, prompts, spec.workload.output_len))
            probe.sample()
        outcome.results.append(summarize("hf", generations, probe.read(), probe.warmup_s))
    return outcome


def hf_config(spec: VariantSpec) -> dict:
    if spec.synthetic:
        config = load_model_config(spec.model)
    else:
        from adaq.formats.checkpoint import read_config
        from pathlib import Path

        config = read_config(Path(spec.model))
    return {key: value for key, value in config.items() if key != "quantization_config"}


def build_hf_model(config: dict, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {key: value for key, value in config.items() if key != "model_type"}
    try:
        hf_config = AutoConfig.for_model(config.get("model_type"), **fields)
    except (ValueError, TypeError, KeyError) as error:
        raise AdaqError(f"transformers cannot read this config ({error})") from None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


def hf_generate(model, prompts: torch.Tensor, output_len: int) -> Generation:
    clock = TokenClock(prompts.device)
    on_gpu = prompts.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(prompts.device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, cache_implementation="static", logits_processor=[clock], pad_token_id=0,
            eos_token_id=None, disable_compile=not on_gpu)
    if output.shape[1] - prompts.shape[1] != output_len or len(clock.stamps) != output_len:
        raise AdaqError(f"transformers generated {output.shape[1] - prompts.shape[1]} tokens, not {output_len}")
    return Generation(start, [list(clock.stamps) for _ in range(prompts.shape[0])], prompts.shape[1])


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
