"""How evenly a synthetic MoE model's router spreads prompts over its experts, layer by layer: the busiest expert
of one prefill, what that costs the exact prefill path (its batched GEMM pads the experts of a chunk to a common
width: the chunk's busiest expert, or `slab_width`'s choice, the busier ones running alone), and how many distinct
experts the last tokens of `--sequences` prompts choose (what a decode step of that batch reads) against uniform
routing's expectation (what the bench roofline counts). The model's first layers on the CPU reference backend.

    python scripts/moe_routing_skew.py --model qwen3-30b-a3b --layers 4 --tokens 2048
    python scripts/moe_routing_skew.py --model qwen3-30b-a3b --layers 4 --tokens 128 --sequences 16
"""

import argparse
import json

import torch


def record_routing(backend_cls, log: list) -> None:
    original = backend_cls.moe

    def moe(self, x, router_logits, experts, top_k, renormalize, **options):
        ids = torch.topk(router_logits.float(), top_k, dim=-1).indices
        log.append((torch.bincount(ids.flatten(), minlength=router_logits.shape[-1]).tolist(), ids))
        return original(self, x, router_logits, experts, top_k, renormalize, **options)

    backend_cls.moe = moe


def padding_factor(counts: list[int], chunk: int, split_hot: bool) -> float:
    """Rows the exact path multiplies / rows routed. Per chunk of experts: chunk x its busiest expert's rows (one
    slab), or with split_hot the slab of `slab_width` plus each lone expert's rows and LAUNCH_ROWS for its launch."""
    from adaq.backends.prefill_moe_exact import LAUNCH_ROWS, slab_width

    multiplied = 0
    for first in range(0, len(counts), chunk):
        part = counts[first:first + chunk]
        width = slab_width(part) if split_hot else max(part)
        multiplied += len(part) * width + sum(c + LAUNCH_ROWS for c in part if c > width)
    return multiplied / max(1, sum(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=1, help="prompts of --tokens each, prefilled together")
    parser.add_argument("--chunk", type=int, default=21, help="experts per bmm (Qwen3-30B-A3B gate|up: 21)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import tempfile

    from adaq.backends.reference import ReferenceBackend
    from adaq.bench.shapes import load_model_config, text_config
    from adaq.bench.synthetic import synthetic_engine
    from adaq.engine.config import EngineConfig
    from adaq.engine.sampling_params import SamplingParams

    config = load_model_config(args.model)
    text = text_config(config)
    text["num_hidden_layers"] = args.layers
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:args.layers]
    log: list = []
    record_routing(ReferenceBackend, log)
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/config.json"
        with open(path, "w") as handle:
            json.dump(config, handle)
        engine = synthetic_engine(path, EngineConfig(model=folder, backend="reference", device="cpu",
                                                     skip_tokenizer=True,
                                                     max_num_batched_tokens=args.tokens * args.sequences,
                                                     max_model_len=args.tokens + 8, kv_cache_memory="1GiB"))
    prompts = torch.randint(0, text["vocab_size"], (args.sequences, args.tokens),
                            generator=torch.Generator().manual_seed(0))
    for prompt in prompts.tolist():
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    rows = []
    experts, top_k = len(log[0][0]), log[0][1].shape[1]
    uniform = experts * (1 - (1 - top_k / experts) ** args.sequences)
    for layer, (counts, ids) in enumerate(log):
        mean = sum(counts) / len(counts)
        last = ids.view(args.sequences, args.tokens, top_k)[:, -1]
        row = {"layer": layer, "max": max(counts), "mean": mean, "max_over_mean": max(counts) / mean,
               "empty": sum(c == 0 for c in counts), "padding": padding_factor(counts, args.chunk, False),
               "padding_split_hot": padding_factor(counts, args.chunk, True),
               "last_tokens_distinct_experts": int(last.unique().numel()), "uniform_distinct_experts": uniform,
               "counts": counts}
        rows.append(row)
        print(f"layer {layer:2d}: busiest expert {row['max']:5d} rows (mean {mean:.0f}, {row['max_over_mean']:.1f}x), "
              f"{row['empty']} empty; the exact path multiplies {row['padding']:.2f}x the routed rows "
              f"({row['padding_split_hot']:.2f}x with slab_width); the {args.sequences} last tokens choose "
              f"{row['last_tokens_distinct_experts']} distinct experts (uniform: {uniform:.1f})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "tokens": args.tokens, "sequences": args.sequences, "chunk": args.chunk,
                       "layers": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
