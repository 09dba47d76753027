"""`adaq validate --tp N`: can the checkpoint be sharded over N GPUs as adaq shards it, and what does one GPU hold?

The split rules are the engine's (adaq.layers, adaq.backends.parallel.kv_head_share): attention heads split
evenly; KV heads split evenly, or, when fewer than N, N a multiple of them (each replicated); the MLP's, the
experts' and the shared expert's intermediate sizes and the Gated DeltaNet key heads split evenly; the vocabulary
in shares of ceil(V / N). Row-parallel NVFP4 Linears (o_proj, down_proj, experts' down_proj, GDN out_proj) are cut
along their input columns, and every cut must fall on a 16-value block (rule `tp-split-16`, naming the Linear).

Per GPU: every sharded tensor's 1/N (norms and routers, replicated, are counted as split too: a few MiB), the KV
of the KV heads a rank holds, 1/N of the Gated DeltaNet state; activations and the CUDA context as for one GPU.
"""

from dataclasses import replace

from adaq.formats.nvfp4 import GROUP_SIZE
from adaq.formats.shapes import ModelShape
from adaq.validate.budget import WeightBytes

ROW_PARALLEL = (".o_proj", ".down_proj", ".out_proj")


def rank_kv_heads(kv_heads: int, size: int) -> int:
    return kv_heads // size if kv_heads >= size else 1


def divisibility_problems(shape: ModelShape, size: int) -> list[str]:
    """Dimensions that do not split over `size` ranks, each as a sentence."""
    splits = [("num_attention_heads", shape.heads), ("intermediate_size", shape.intermediate),
              ("moe_intermediate_size", shape.moe_intermediate),
              ("shared_expert_intermediate_size", shape.shared_expert_intermediate),
              ("linear_num_key_heads", shape.linear_key_heads)]
    problems = [f"{name} {value} does not split over {size} ranks" for name, value in splits if value % size]
    for name, kv in (("num_key_value_heads", shape.kv_heads), ("num_global_key_value_heads", shape.global_kv_heads)):
        if kv and kv < size and size % kv:
            problems.append(f"{name} {kv}: fewer than {size} ranks and {size} is not a multiple of it (each KV head "
                            f"is replicated over size / {kv} ranks)")
        elif kv >= size and kv % size:
            problems.append(f"{name} {kv} does not split over {size} ranks")
    return problems


def block_split_problems(in_features: dict[str, int], size: int) -> list[tuple[str, str]]:
    """(first Linear, message) per kind of row-parallel NVFP4 Linear whose input split misses a 16-column block;
    `in_features`: quantized Linear prefix -> K."""
    bad: dict[str, list[str]] = {}
    for prefix, k in sorted(in_features.items()):
        kind = next((suffix for suffix in ROW_PARALLEL if prefix.endswith(suffix)), None)
        if kind is None or (k % size == 0 and (k // size) % GROUP_SIZE == 0):
            continue
        bad.setdefault(f"{kind}:{k}", []).append(prefix)
    problems = []
    for key, prefixes in bad.items():
        k = int(key.rsplit(":", 1)[1])
        more = f" (and {len(prefixes) - 1} more Linears alike)" if len(prefixes) > 1 else ""
        problems.append((prefixes[0], f"split over {size} ranks at input column {k / size:g} of {k}: not a multiple "
                                      f"of {GROUP_SIZE} (an NVFP4 block and its scale must stay on one rank){more}"))
    return problems


def rank_shape(shape: ModelShape, size: int) -> ModelShape:
    """The shape one rank holds (the budget's per-GPU arithmetic)."""
    if size == 1:
        return shape
    return replace(shape, heads=shape.heads // size, kv_heads=rank_kv_heads(shape.kv_heads, size),
                   global_kv_heads=rank_kv_heads(shape.global_kv_heads, size) if shape.global_kv_heads else 0,
                   intermediate=shape.intermediate // size, moe_intermediate=shape.moe_intermediate // size,
                   shared_expert_intermediate=shape.shared_expert_intermediate // size,
                   linear_key_heads=shape.linear_key_heads // size,
                   linear_value_heads=shape.linear_value_heads // size, vocab=-(-shape.vocab // size))


def rank_weights(weights: WeightBytes, size: int) -> WeightBytes:
    return WeightBytes(-(-weights.quantized // size), -(-weights.kept // size))


def budget_note(shape: ModelShape, size: int) -> str:
    kv = rank_kv_heads(shape.kv_heads, size)
    replicated = " (replicated: fewer KV heads than ranks)" if shape.kv_heads < size else ""
    return (f"tensor parallel over {size} GPUs: figures per GPU; {shape.heads // size} of {shape.heads} query heads "
            f"and {kv} of {shape.kv_heads} KV heads{replicated} per GPU, weights 1/{size} each (norms and routers, "
            f"replicated, counted as split)")
