"""Which tensors of a dense checkpoint are Linear weights, which of them a recipe quantizes, and which share a
global scale — decided from tensor names and shapes alone, so that nothing is loaded to plan.

Linear modules of the supported architectures: attention q/k/v/o_proj, MLP and expert gate/up/down_proj (fused 3-D
experts seen per expert, adaq.formats.fused_experts), the MoE router (`mlp.gate`, Gemma 4's `router.proj`) and lm_head
(a module even when tied to the embedding, as llm-compressor lists it); in hybrid models (Qwen3.5, Qwen3-Next) also
the Gated DeltaNet projections (`linear_attn.in_proj_*`, `out_proj`) and the shared expert's gate
(`shared_expert_gate`); in multimodal checkpoints the towers' Linears (TOWER_LINEARS).
"""

import re
from dataclasses import dataclass, field

from adaq.errors import AdaqError
from adaq.formats.checkpoint import Checkpoint
from adaq.formats.nvfp4 import GROUP_SIZE
from adaq.quant.recipe import Recipe

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "out_proj", "fc1", "fc2", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz",
               "in_proj_ba", "shared_expert_gate")
# Multimodal towers (Qwen3.5's `visual`, Gemma 4's `vision_tower`, `audio_tower`, `embed_vision`): their Linears have
# names of their own (`attn.qkv`, `attn.proj`, `linear_fc1`, a `linear` inside Gemma 4's clippable wrappers,
# `input_proj`, `embedding_projection`); the recipes keep them in bf16 and `ignore` must list them, as llm-compressor
# does, or a reader such as vLLM expects them quantized.
TOWER = re.compile(r"(^|\.)(visual|vision_tower|audio_tower|embed_vision|embed_audio)\.")
TOWER_LINEARS = ("qkv", "proj", "linear", "linear_fc1", "linear_fc2", "input_proj", "embedding_projection")
# Siblings that read the same input and are fused into one GEMM at run time: one global scale each group.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@dataclass
class LinearPlan:
    quantize: list[str]  # module prefixes, in module order
    ignored: list[str]  # Linear modules the recipe keeps (config.json's `ignore`, as llm-compressor writes it)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # prefix -> its fused group (quantized only)


def _natural_key(name: str) -> tuple:
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


# The Gated DeltaNet's Linears in definition (named_modules) order: Qwen3-Next's fused pair before out_proj,
# Qwen3.5's four projections after it. The two families share only out_proj, so one list serves both.
LINEAR_ATTN_ORDER = ("in_proj_qkvz", "in_proj_ba", "out_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


def module_order(name: str) -> tuple:
    """named_modules() order where it matters (the ignore list): layers by number, lm_head last."""
    head, _, last = name.rpartition(".")
    if head.endswith("linear_attn") and last in LINEAR_ATTN_ORDER:
        name = f"{head}.{LINEAR_ATTN_ORDER.index(last)}"
    return (last == "lm_head", _natural_key(name))


def is_linear_prefix(prefix: str) -> bool:
    last = prefix.rsplit(".", 1)[-1]
    return (last in PROJECTIONS or last == "lm_head" or prefix.endswith(("mlp.gate", ".router.proj"))
            or last in ("w1", "w2", "w3") or (last in TOWER_LINEARS and TOWER.search(prefix) is not None))


def router_modules(prefixes: list[str]) -> list[str]:
    """Gemma 4's router modules around their `proj` Linear: compressed-tensors types any *Router class as a Linear,
    never quantizes it (no weight of its own) and so always lists it in `ignore`, as llm-compressor's output shows."""
    return [prefix.removesuffix(".proj") for prefix in prefixes if prefix.endswith(".router.proj")]


def linear_prefixes(checkpoint: Checkpoint) -> list[str]:
    """Prefixes of 2-D `.weight` tensors that belong to Linear modules, plus a tied lm_head."""
    prefixes = []
    for name in checkpoint.tensor_names():
        if name.endswith(".weight") and is_linear_prefix(name.removesuffix(".weight")):
            _, shape = checkpoint.tensor_spec(name)
            if len(shape) == 2:
                prefixes.append(name.removesuffix(".weight"))
    if "lm_head" not in prefixes and not any(p.endswith(".lm_head") for p in prefixes):
        prefixes.append("lm_head")  # tied to the embedding: a module without its own tensor
    return sorted(prefixes, key=module_order)


def fused_group(prefix: str, available: set[str]) -> tuple[str, ...]:
    head, _, last = prefix.rpartition(".")
    for members in FUSED_GROUPS:
        if last in members:
            group = tuple(f"{head}.{member}" for member in members if f"{head}.{member}" in available)
            return group or (prefix,)
    return (prefix,)


def plan_linears(checkpoint: Checkpoint, recipe: Recipe) -> LinearPlan:
    quantize, ignored = [], []
    prefixes = linear_prefixes(checkpoint)
    for prefix in prefixes:
        if not recipe.is_target(prefix):
            continue
        (ignored if recipe.is_ignored(prefix) else quantize).append(prefix)
    ignored = sorted(ignored + router_modules(prefixes), key=module_order)
    quantize = [p for p in quantize if f"{p}.weight" in checkpoint.tensor_names()]
    if not quantize:
        raise AdaqError(f"{checkpoint.path}: the recipe ({recipe.source}) selects no Linear weights to quantize")
    check_shapes(checkpoint, quantize)
    available = set(quantize)
    return LinearPlan(quantize, ignored, {p: fused_group(p, available) for p in quantize})


def check_shapes(checkpoint: Checkpoint, prefixes: list[str]) -> None:
    for prefix in prefixes:
        dtype, (rows, cols) = checkpoint.tensor_spec(f"{prefix}.weight")
        if cols % GROUP_SIZE:
            raise AdaqError(f"{checkpoint.path}: {prefix}.weight has K = {cols} (shape {rows}x{cols}); NVFP4 needs "
                            f"K to be a multiple of {GROUP_SIZE}: add it to the recipe's ignore list")
        if dtype is None or not dtype.is_floating_point:
            raise AdaqError(f"{checkpoint.path}: {prefix}.weight has dtype {dtype}; quantize reads float weights")
