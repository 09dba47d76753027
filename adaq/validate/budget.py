"""VRAM budget of serving a checkpoint on a GPU: weights + KV cache + activations/workspace + CUDA context.

Every figure is in bytes and follows a stated formula, so a user can redo it by hand:
- weights: quantized Linears in the decode kernel's layout (nvfp4_linear_bytes), kept tensors at bf16;
- KV cache: the engine's own layout and sizing (adaq.engine.kv_layout, the rule model_runner.py allocates with):
  each layer's (KV heads, head_dim, window) from config.json; one pool, or with window-sized KV (the engine's
  default) a global pool and a pool of the sliding-window layers; per layer and token a slot as wide as its pool's
  widest layer, 2 (K and V) x kv_heads x bytes per (token, kv head): bf16 2 x head_dim, FP8 head_dim + a 4-byte
  scale, NVFP4 head_dim / 2 + head_dim / 16 + a 1-byte exponent (kv_bytes_per_token_head, docs/ARCHITECTURE.md).
  The global pool holds batch x context rounded up to KV_BLOCK_SIZE; the sliding pool what the engine's holds at
  max_num_seqs = batch: the lesser of that and batch x (window + 2 blocks) + one step's tokens, plus its null block
  (adaq.engine.block_manager.sliding_pool_blocks);
- activations/workspace at the largest step the engine runs (see activation_bytes);
- CUDA context: the driver context and loaded kernels outside torch's allocator, a constant measured on a GPU;
- hybrid models (Gated DeltaNet): KV only in the full-attention layers, plus the state cache, batch × every GDN
  layer's conv state (C × (Kc-1) × 2 bytes) and recurrent state (Hv × Dk × Dv × 4 bytes) per sequence
  (adaq.engine.state_cache.StateGeometry, as the engine allocates it).
"""

import math
from dataclasses import dataclass, field

from adaq.backends.numerics.attention import KV_CACHE_DTYPE_NAMES, kv_bytes_per_token_head
from adaq.engine.config import BATCHED_TOKENS_RULE, KV_CACHE_DTYPES, default_batched_tokens
from adaq.engine.kv_layout import KVPools, LayerKV
from adaq.engine.state_cache import StateGeometry
from adaq.errors import AdaqError
from adaq.formats.nvfp4 import GROUP_SIZE
from adaq.formats.shapes import ModelShape
from adaq.validate.rules import kernel_tiles

GiB = 1024**3
MiB = 1024**2
KV_BLOCK_SIZE = 16  # tokens per paged KV block
FIT_BATCHES = (1, 16)  # batches whose largest context every budget reports
DECODE_SPLITS = 16  # flash-decoding partial results per (sequence, head)
# Memory outside torch's allocator, measured on the H100 (driver 580, torch 2.11 + CUDA 13, lazy module loading):
# 619 MiB for the bare context, 695 MiB once cuBLAS/cuBLASLt (bf16 and FP8 GEMM), SDPA and elementwise kernels
# ran, 757 MiB with adaq's extension loaded too (tests/test_validate.py, gpu). Eager loading would take 1765 MiB.
CUDA_CONTEXT_BYTES = 768 * MiB
DEFAULT_UTILIZATION = 0.9  # adaq.engine.LLM's gpu_memory_utilization default
MAX_SEARCH = 1 << 24

# Total memory as nvidia-smi reports it (MiB). torch.cuda.mem_get_info, which the engine's
# gpu_memory_utilization multiplies, sees a little less (H100: 81079 of 81559 MiB, measured).
GPUS = {"rtx4090": 24564 * MiB, "rtx4080": 16376 * MiB, "l40s": 46068 * MiB, "h100": 81559 * MiB}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes

    @classmethod
    def parse(cls, spec: str) -> "Gpu":
        """A preset name (rtx4090, rtx4080, l40s, h100) or a size in GiB ("24", "11.5")."""
        key = spec.strip().lower().replace("-", "").replace(" ", "")
        if key in GPUS:
            return cls(key, GPUS[key])
        try:
            gib = float(key.removesuffix("gib").removesuffix("gb"))
        except ValueError:
            gib = 0.0
        if not (0 < gib < 1e5):
            raise AdaqError(f"--gpu {spec!r}: give one of {', '.join(GPUS)} or a memory size in GiB")
        return cls(f"{gib:g} GiB", int(gib * GiB))


@dataclass(frozen=True)
class WeightBytes:
    quantized: int  # NVFP4 Linears in the decode kernel's layout (0 for a dense checkpoint)
    kept: int  # everything else (embeddings, lm_head unless tied, norms, routers, dense Linears) at bf16

    @property
    def total(self) -> int:
        return self.quantized + self.kept


def nvfp4_linear_bytes(n: int, k: int, input_scale: bool = False) -> int:
    """An NVFP4 Linear on the GPU in the decode kernel's layout: over [N, K] padded to its tile, E2M1 nibbles (half a
    byte per weight) and one E4M3 scale per 16, then one fp32 multiplier per padded output column, and for W4A4
    the fp32 input global scale."""
    tiles = kernel_tiles()
    n_pad, k_pad = tiles.padded_shape(n, k)
    return n_pad * k_pad // 2 + n_pad * k_pad // GROUP_SIZE + n_pad * tiles.column_scale_bytes + 4 * input_scale


def estimate_weight_bytes(shape: ModelShape, quantized: bool = True, input_scale: bool = False) -> WeightBytes:
    """Weights from the config alone: every attention/MLP/expert Linear in NVFP4 (or bf16), the rest in bf16."""
    per_layer = [shape.layer_linears(layer) for layer in range(shape.layers)]
    attention = [nk for layer in per_layer[:shape.kv_layers] for name, nk in layer.items()
                 if name.startswith("self_attn.")]  # hybrid models: full-attention layers only, all alike
    dense_mlp = [nk for name, nk in per_layer[0].items() if name.startswith("mlp.")]
    linears = attention + dense_mlp * shape.dense_layers
    if shape.moe_layers:
        linears += [*shape.expert_linears().values()] * shape.experts * shape.moe_layers
        linears += [*shape.shared_expert_linears().values()] * shape.moe_layers
    linear_params = sum(n * k for n, k in linears)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    norms = shape.norms_per_layer * shape.layers + shape.hidden
    routers = (shape.experts + bool(shape.shared_expert_intermediate)) * shape.hidden * shape.moe_layers
    kept = 2 * (embeddings + norms + routers + linear_attention_params(shape))
    if not quantized:
        return WeightBytes(0, kept + 2 * linear_params)
    return WeightBytes(sum(nvfp4_linear_bytes(n, k, input_scale) for n, k in linears), kept)


def linear_attention_params(shape: ModelShape) -> int:
    """Gated DeltaNet layers, kept in bf16 as the hybrid recipes keep them: projections, conv, A_log, dt_bias, norm."""
    projections = sum(n * k for n, k in shape.linear_attention_linears().values())
    conv = shape.linear_conv_dim * shape.linear_conv_kernel
    return shape.linear_layers * (projections + conv + 2 * shape.linear_value_heads + shape.linear_value_dim)


def kv_layer_shapes(shape: ModelShape) -> list[LayerKV]:
    """Each layer with a KV cache as the engine sees it: KV heads, head_dim, sliding window (None: global)."""
    if shape.global_layers:  # Gemma 4: global layers have their own KV heads and head_dim
        return [LayerKV(*shape.attention_shape(layer), None if layer in shape.global_layers else shape.sliding_window)
                for layer in range(shape.layers)]
    sliding = min(shape.sliding_layers, shape.kv_layers)
    return [LayerKV(shape.kv_heads, shape.head_dim, shape.sliding_window if layer < sliding else None)
            for layer in range(shape.kv_layers)]


def kv_pools(shape: ModelShape, kv_dtype: str, window_kv: bool, batch: int, batched_tokens: int) -> KVPools:
    """The engine's KV pools for this model at max_num_seqs = batch and max_num_batched_tokens = batched_tokens."""
    return KVPools.plan(kv_layer_shapes(shape), window_kv=window_kv, block_size=KV_BLOCK_SIZE,
                        dtype=KV_CACHE_DTYPES[kv_dtype], max_num_seqs=batch, max_step_tokens=batched_tokens)


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str, window_kv: bool = True) -> int:
    """One token's K and V in every layer with a KV cache (in its pool's slot), scales included."""
    return kv_pools(shape, kv_dtype, window_kv, batch=1, batched_tokens=1).bytes_per_token()  # whatever the step


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, kv_dtype: str, window_kv: bool,
                   batched_tokens: int) -> int:
    """Both pools when the global one holds `batch` sequences of `context` tokens."""
    return kv_pools(shape, kv_dtype, window_kv, batch, batched_tokens).nbytes(batch * math.ceil(context /
                                                                                                KV_BLOCK_SIZE))


def state_geometry(shape: ModelShape) -> StateGeometry:
    """The Gated DeltaNet state slots as the engine allocates them on a GPU (conv states in bf16)."""
    conv = (shape.linear_conv_dim, shape.linear_conv_kernel - 1)
    ssm = (shape.linear_value_heads, shape.linear_key_dim, shape.linear_value_dim)
    return StateGeometry(shape.linear_layers, conv, ssm, KV_CACHE_DTYPES["bf16"])


def state_bytes_per_sequence(shape: ModelShape) -> int:
    return state_geometry(shape).bytes_per_slot() if shape.linear_layers else 0


def step_tokens(batch: int, context: int, batched_tokens: int) -> int:
    """Tokens in the largest step: the scheduler cuts prompts into chunks so that no step exceeds batched_tokens."""
    return min(batch * context, batched_tokens)


def activation_bytes(shape: ModelShape, batch: int, context: int, batched_tokens: int) -> dict[str, int]:
    """Peak activations and workspace of one step with T = step_tokens(batch, context, batched_tokens), bf16 = 2
    bytes: residual stream 2·T·H·2; the wider of attention T·(2·Hq + 2·Hkv)·D·2 (q/k/v and attention output) and
    MLP T·3·I·2 (gate/up output + activated; I = top-k × expert width for MoE, plus fp32 router logits T·E·4);
    the FP8 copy of a GEMM input T·Kmax + T·4; one NVFP4 weight expanded to FP8 for the prefill GEMM, fused
    gate/up or q/k/v, N·K + N·4; fp32 logits and sampling probabilities of the last token of each sequence
    2·B·V·4; flash-decoding partials B·Hq·DECODE_SPLITS·(D + 2)·4. Attention is fused (no T×T scores)."""
    t = step_tokens(batch, context, batched_tokens)
    attention = t * (2 * shape.q_width + 2 * shape.kv_width) * 2
    mlp = t * 3 * shape.mlp_width * 2 + t * shape.experts * 4
    k_max = max(shape.hidden, shape.q_width, shape.dense_intermediate, shape.moe_intermediate)
    fused = [(shape.q_width + 2 * shape.kv_width, shape.hidden), (shape.hidden, k_max),
             (2 * max(shape.dense_intermediate, shape.moe_intermediate), shape.hidden)]
    n, k = max(fused, key=lambda nk: nk[0] * nk[1])
    return {
        "residual stream": 2 * t * shape.hidden * 2,
        "attention or MLP": max(attention, mlp),
        "FP8 GEMM input": t * k_max + t * 4,
        "weight workspace": n * k + n * 4,
        "logits": 2 * batch * shape.vocab * 4,
        "decode partials": batch * shape.heads * DECODE_SPLITS * (shape.head_dim + 2) * 4,
    }


@dataclass
class Budget:
    gpu: Gpu
    utilization: float
    batch: int
    context: int
    kv_dtype: str
    weights: WeightBytes
    kv_cache: int
    kv_per_token: int  # every layer (in its pool's slot), as if each held the whole context
    activations: dict[str, int]
    cuda_context: int
    max_batch: int  # at this context
    max_context: int  # at this batch
    max_context_capped: bool  # max_context stopped at the model's max_position_embeddings
    batched_tokens: int  # max_num_batched_tokens: the prefill chunk
    notes: list[str] = field(default_factory=list)
    state_cache: int = 0  # hybrid models: the Gated DeltaNet states of `batch` sequences
    window_kv: bool = True
    context_fit: dict[int, int] = field(default_factory=dict)  # batch -> largest context (FIT_BATCHES and `batch`)
    context_limit: int | None = None  # the model's max_position_embeddings, where every search stops

    @property
    def usable(self) -> int:
        return int(self.gpu.memory * self.utilization)

    @property
    def total(self) -> int:
        return (self.weights.total + self.kv_cache + self.state_cache + sum(self.activations.values())
                + self.cuda_context)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def as_dict(self) -> dict:
        return {
            "gpu": self.gpu.name, "gpu_memory_bytes": self.gpu.memory, "gpu_memory_utilization": self.utilization,
            "usable_bytes": self.usable, "batch": self.batch, "context": self.context, "kv_cache_dtype": self.kv_dtype,
            "weights_quantized_bytes": self.weights.quantized, "weights_kept_bytes": self.weights.kept,
            "kv_cache_bytes": self.kv_cache, "kv_bytes_per_token": self.kv_per_token,
            "state_cache_bytes": self.state_cache,
            "activations_bytes": sum(self.activations.values()), "activations": self.activations,
            "activation_step_tokens": self.step_tokens,
            "cuda_context_bytes": self.cuda_context, "total_bytes": self.total, "fits": self.fits,
            "max_batch_at_context": self.max_batch, "max_context_at_batch": self.max_context,
            "max_context_capped_by_model": self.max_context_capped, "window_kv": self.window_kv,
            "max_num_batched_tokens": self.batched_tokens,
            "max_context_by_batch": {str(batch): {"max_context": context, "capped_by_model": self.capped(context)}
                                     for batch, context in self.context_fit.items()},
            "notes": self.notes,
        }

    @property
    def step_tokens(self) -> int:
        return step_tokens(self.batch, self.context, self.batched_tokens)

    def capped(self, context: int) -> bool:
        return self.context_limit is not None and context == self.context_limit


def total_bytes(shape: ModelShape, weights: WeightBytes, batch: int, context: int, kv_dtype: str,
                window_kv: bool, batched_tokens: int) -> int:
    return (weights.total + kv_cache_bytes(shape, batch, context, kv_dtype, window_kv, batched_tokens)
            + batch * state_bytes_per_sequence(shape)
            + sum(activation_bytes(shape, batch, context, batched_tokens).values()) + CUDA_CONTEXT_BYTES)


def largest(fits, limit: int = MAX_SEARCH) -> int:
    """Largest x in [0, limit] with fits(x), for a fits that holds up to some point and fails after it."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def check_plan_options(batch: int, context: int | None, kv_dtype: str, utilization: float) -> None:
    if kv_dtype not in KV_CACHE_DTYPE_NAMES:
        raise AdaqError(f"--kv-cache-dtype {kv_dtype}: choose one of {', '.join(KV_CACHE_DTYPE_NAMES)}")
    if batch < 1 or (context is not None and context < 1):
        raise AdaqError(f"--batch and --context must be at least 1 (got {batch} and {context})")
    if not 0 < utilization <= 1:
        raise AdaqError(f"--gpu-memory-utilization {utilization}: must be in (0, 1]")


def plan(shape: ModelShape, weights: WeightBytes, gpu: Gpu, batch: int, context: int, kv_dtype: str = "fp8",
         utilization: float = DEFAULT_UTILIZATION, window_kv: bool = True,
         batched_tokens: int | None = None) -> Budget:
    """`window_kv`: the engine's window-sized KV for sliding layers (EngineConfig.window_kv); `batched_tokens`: its
    max_num_batched_tokens (the prefill chunk: the largest step's activations, and what a sliding layer holds beyond
    its windows), None for the engine's default on this GPU. The engine is taken to run with max_num_seqs = batch."""
    check_plan_options(batch, context, kv_dtype, utilization)
    batched_tokens = default_batched_tokens(gpu.memory) if batched_tokens is None else batched_tokens
    if batched_tokens < 1:
        raise AdaqError(f"--max-num-batched-tokens {batched_tokens}: must be at least 1")
    usable = int(gpu.memory * utilization)
    kv_options = (kv_dtype, window_kv, batched_tokens)
    fits = lambda b, t: total_bytes(shape, weights, b, t, *kv_options) <= usable  # noqa: E731
    context_limit = shape.max_position or MAX_SEARCH
    context_fit = {b: largest(lambda t, b=b: t == 0 or fits(b, t), context_limit)
                   for b in sorted({*FIT_BATCHES, batch})}
    return Budget(
        gpu=gpu, utilization=utilization, batch=batch, context=context, kv_dtype=kv_dtype, weights=weights,
        kv_cache=kv_cache_bytes(shape, batch, context, *kv_options),
        kv_per_token=kv_bytes_per_token(shape, kv_dtype, window_kv),
        activations=activation_bytes(shape, batch, context, batched_tokens), cuda_context=CUDA_CONTEXT_BYTES,
        max_batch=largest(lambda b: b == 0 or fits(b, context)),
        max_context=context_fit[batch],
        max_context_capped=context_fit[batch] == context_limit and shape.max_position is not None,
        notes=budget_notes(shape, batch, context, window_kv, batched_tokens, kv_dtype),
        state_cache=batch * state_bytes_per_sequence(shape), window_kv=window_kv, batched_tokens=batched_tokens,
        context_fit=context_fit, context_limit=shape.max_position,
    )


def budget_notes(shape: ModelShape, batch: int, context: int, window_kv: bool, batched_tokens: int,
                 kv_dtype: str) -> list[str]:
    notes = [f"activations of a step of {step_tokens(batch, context, batched_tokens)} tokens: prompts are prefilled "
             f"in chunks of max_num_batched_tokens {batched_tokens} (default {BATCHED_TOKENS_RULE}), the step at "
             f"which the engine's warm-up measures its activation peak (max_num_seqs = batch); CUDA context "
             f"{CUDA_CONTEXT_BYTES // MiB} MiB"]
    pools = kv_pools(shape, kv_dtype, window_kv, batch, batched_tokens)
    if shape.global_layers:
        notes.append(f"Gemma 4: {len(shape.global_layers)} global layers (head_dim {shape.global_head_dim}, "
                     f"{shape.global_kv_heads} KV heads{', K used as V' if shape.k_eq_v else ''}) and "
                     f"{shape.layers - len(shape.global_layers)} others (head_dim {shape.head_dim}, {shape.kv_heads} "
                     f"KV heads); {pool_slots(pools)}")
    if pools.sliding:
        blocks = pools.sliding_blocks_beside(batch * math.ceil(context / KV_BLOCK_SIZE))
        notes.append(f"window-sized KV: the {pools.sliding.num_layers} sliding-window layers (window "
                     f"{pools.sliding_window}) hold {blocks * KV_BLOCK_SIZE} tokens at most (windows of {batch} "
                     f"sequence(s) + a step of {batched_tokens} + the null block), the {pools.geometry.num_layers} "
                     f"global layers the whole context")
    elif shape.sliding_layers:
        notes.append(f"KV at full context in all {shape.layers} layers: the {shape.sliding_layers} sliding-window "
                     f"layers (window {shape.sliding_window}) allocated like the others (window-sized KV off)")
    if shape.linear_layers:
        notes.append(f"KV in the {shape.kv_layers} full-attention layers only; the {shape.linear_layers} Gated "
                     f"DeltaNet layers keep {state_bytes_per_sequence(shape) / MiB:.2f} MiB of state per sequence "
                     f"(conv bf16, recurrent fp32), whatever its length")
    return notes


def pool_slots(pools: KVPools) -> str:
    """The engine's KV slots, e.g. 'KV slots of 4 heads x 512 (global pool) and 16 x 256 (sliding pool)'."""
    slot = lambda g: f"{g.num_kv_heads} heads x {g.head_dim}"  # noqa: E731
    if pools.sliding:
        return f"KV slots of {slot(pools.geometry)} (global pool) and {slot(pools.sliding)} (sliding pool)"
    return f"one KV pool, each layer's slot {slot(pools.geometry)}, the widest layer's K or V"
