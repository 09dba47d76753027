"""Time one Qwen3-30B-A3B MoE layer on the exact prefill path (adaq.backends.prefill_moe_exact) as routing gets
skewed: a share of the tokens ranks one expert first (a hot expert). GPU only; run it on main and on a tree with
wip/exact-hot-experts.patch applied for the before / after.

    python scripts/exact_moe_skew_bench.py --tokens 2048 --shares 0,0.5,0.95 --json out.json
"""

import argparse
import json

import torch


def skewed_logits(tokens: int, experts: int, share: float, generator: torch.Generator) -> torch.Tensor:
    logits = torch.randn(tokens, experts, device="cuda", generator=generator)
    logits[:int(tokens * share), experts // 3] += 100.0  # first choice of that share of the tokens
    return logits.to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--shares", default="0,0.5,0.95")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("exact_moe_skew_bench: needs a CUDA GPU")

    from adaq.backends.cuda import CudaBackend
    from adaq.backends.prefill_moe_exact import exact_moe_forward
    from adaq.bench import prefill_bench, prefill_moe_bench

    shape = prefill_moe_bench.QWEN3_30B_A3B
    experts, top_k = shape["experts"], shape["top_k"]
    pairs, downs, _, _ = prefill_moe_bench.random_experts(experts, shape["hidden"], shape["intermediate"])
    handle = CudaBackend("cuda").prepare_experts(pairs, downs, dtype=torch.bfloat16)
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, shape["hidden"], device="cuda", generator=generator).to(torch.bfloat16)
    rows = []
    for share in (float(s) for s in args.shares.split(",")):
        logits = skewed_logits(args.tokens, experts, share, generator)
        ms = prefill_bench.median_ms(lambda: exact_moe_forward(x, logits, handle.exact, top_k, True), repeats=10)
        busiest = int(torch.bincount(torch.topk(logits.float(), top_k).indices.flatten(), minlength=experts).max())
        rows.append({"share": share, "ms": ms, "busiest_expert_rows": busiest})
        print(f"hot share {share:4.2f}: busiest expert {busiest:5d} rows, {ms:.3f} ms per layer")
    if args.json:
        with open(args.json, "w") as handle_out:
            json.dump({"tokens": args.tokens, "shape": shape, "device": torch.cuda.get_device_name(), "rows": rows},
                      handle_out, indent=1)


if __name__ == "__main__":
    main()
