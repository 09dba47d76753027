"""RTN throughput and memory: quantize a random Qwen3-shaped bf16 checkpoint, streamed shard by shard.

    python -m adaq.quant.benchmark --layers 8 --hidden 4096 --intermediate 12288 --device auto --json out.json

Reports wall time, source GB/s, peak resident memory (the streaming bound: it stays near one shard's largest
fused group, not the model) and the output size. The random checkpoint is written first and not timed.
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def _linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple]:
    return {
        "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }


def make_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> None:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    head_dim, heads, kv_heads = 128, hidden // 128, max(1, hidden // 512)
    shapes = _linear_shapes(hidden, intermediate, heads, kv_heads, head_dim)
    generator = torch.Generator().manual_seed(0)
    index = {}
    for layer in range(layers):
        tensors = {f"model.layers.{layer}.{name}.weight": (torch.randn(shape, generator=generator) * 0.02)
                   .to(torch.bfloat16) for name, shape in shapes.items()}
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shard = f"model-{layer + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        index.update({name: shard for name in tensors})
    last = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator).to(torch.bfloat16),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            "lm_head.weight": torch.randn(vocab, hidden, generator=generator).to(torch.bfloat16)}
    shard = f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors"
    save_file(last, str(folder / shard), metadata={"format": "pt"})
    index.update({name: shard for name in last})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run(layers: int, hidden: int, intermediate: int, vocab: int, device: str, workdir: Path) -> dict:
    from adaq.quant.pipeline import quantize_model

    import multiprocessing

    source = workdir / "src"
    source.mkdir()
    # Written by a child process, so that this process's peak RSS measures the quantization alone.
    child = multiprocessing.get_context("spawn").Process(target=make_checkpoint,
                                                         args=(source, layers, hidden, intermediate, vocab))
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError("writing the random checkpoint failed")
    rss_before = peak_rss_gib()
    start = time.perf_counter()
    report = quantize_model(str(source), workdir / "out", device=device)
    seconds = time.perf_counter() - start
    largest_shard = max(p.stat().st_size for p in source.glob("*.safetensors"))
    return {"device": report.device, "layers": layers, "hidden": hidden, "intermediate": intermediate,
            "linears_quantized": report.quantized, "bytes_in": report.bytes_in, "bytes_out": report.bytes_out,
            "seconds": round(seconds, 2), "source_gb_per_s": round(report.bytes_in / seconds / 1e9, 3),
            "peak_rss_gib": round(peak_rss_gib(), 2), "peak_rss_before_gib": round(rss_before, 2),
            "largest_source_shard_gib": round(largest_shard / 2**30, 2),
            "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        result = run(args.layers, args.hidden, args.intermediate, args.vocab, args.device, Path(workdir))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
