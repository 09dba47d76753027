"""VRAM budget of serving a checkpoint on a GPU: weights + KV cache + activations/workspace + CUDA context.

Every figure is in bytes and follows a stated formula, so a user can redo it by hand:
- weights: quantized Linears in the decode kernel's layout (nvfp4_linear_bytes), kept tensors at bf16;
- KV cache: tokens × 2 (K and V) × kv_heads × bytes per (token, kv head): bf16 2 × head_dim, FP8 head_dim + a
  4-byte scale, NVFP4 head_dim / 2 + head_dim / 16 + a 1-byte exponent
  (adaq.backends.numerics.attention.kv_bytes_per_token_head, docs/ARCHITECTURE.md), summed over layers. Global layers hold batch × context
  rounded up to KV_BLOCK_SIZE; with window-sized KV (the engine's default) sliding-window layers hold what the
  engine's sliding pool holds at max_num_seqs = batch: the lesser of that and batch × (window + 2 blocks) + one
  step's tokens, plus its null block (adaq.engine.block_manager.sliding_pool_blocks);
  every layer's KV sits in a slot as wide as the widest layer's (Gemma 4's global layers have their own
  kv_heads × head_dim: ModelShape.kv_slot);
- activations/workspace at the largest step the engine runs (see activation_bytes);
- CUDA context: the driver context and loaded kernels outside torch's allocator, a constant measured on a GPU;
- hybrid models (Gated DeltaNet): KV only in the full-attention layers, plus the state cache, batch × every GDN
  layer's conv state (C × (Kc-1) × 2 bytes) and recurrent state (Hv × Dk × Dv × 4 bytes) per sequence.
"""

import math
from dataclasses import dataclass, field

from adaq.backends.numerics.attention import KV_CACHE_DTYPE_NAMES, kv_bytes_per_token_head
from adaq.engine.block_manager import sliding_pool_blocks
from adaq.errors import AdaqError
from adaq.formats.nvfp4 import GROUP_SIZE
from adaq.formats.shapes import ModelShape
from adaq.validate.rules import kernel_tiles

GiB = 1024**3
MiB = 1024**2
KV_BLOCK_SIZE = 16  # tokens per paged KV block
MAX_BATCHED_TOKENS = 8192  # tokens the engine prefills in one step (at least one whole prompt)
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


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str) -> int:
    """One token's K and V in every layer with a KV cache, with the FP8 scheme's fp32 scale per (token, kv head)."""
    return kv_bytes_per_token_per_layer(shape, kv_dtype) * shape.kv_layers


def kv_bytes_per_token_per_layer(shape: ModelShape, kv_dtype: str) -> int:
    kv_heads, head_dim = shape.kv_slot
    return 2 * kv_heads * kv_bytes_per_token_head(kv_dtype, head_dim)


def windowed_layers(shape: ModelShape, window_kv: bool) -> int:
    """Layers whose KV the engine sizes to their window: the sliding ones, when global layers exist beside them."""
    return shape.sliding_layers if window_kv and 0 < shape.sliding_layers < shape.layers else 0


def sliding_kv_tokens(shape: ModelShape, batch: int, context: int, batched_tokens: int = MAX_BATCHED_TOKENS) -> int:
    """Tokens a sliding-window layer holds: the engine's sliding pool at max_num_seqs = batch, its null block
    included, never more blocks than the global layers hold."""
    global_blocks = batch * math.ceil(context / KV_BLOCK_SIZE)
    need = sliding_pool_blocks(shape.sliding_window, KV_BLOCK_SIZE, batch, batched_tokens)
    return (min(global_blocks, need) + 1) * KV_BLOCK_SIZE


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, kv_dtype: str, window_kv: bool = True,
                   batched_tokens: int = MAX_BATCHED_TOKENS) -> int:
    per_layer = kv_bytes_per_token_per_layer(shape, kv_dtype)
    windowed = windowed_layers(shape, window_kv)
    tokens = batch * math.ceil(context / KV_BLOCK_SIZE) * KV_BLOCK_SIZE
    sliding = sliding_kv_tokens(shape, batch, context, batched_tokens) if windowed else 0
    return per_layer * ((shape.kv_layers - windowed) * tokens + windowed * sliding)


def step_tokens(batch: int, context: int) -> int:
    """Tokens in the largest step: a prefill batch of up to MAX_BATCHED_TOKENS, never less than one prompt."""
    return min(batch * context, max(context, MAX_BATCHED_TOKENS))


def activation_bytes(shape: ModelShape, batch: int, context: int) -> dict[str, int]:
    """Peak activations and workspace of one step with T = step_tokens(batch, context), bf16 = 2 bytes:
    residual stream 2·T·H·2; the wider of attention T·(2·Hq + 2·Hkv)·D·2 (q/k/v and attention output) and
    MLP T·3·I·2 (gate/up output + activated; I = top-k × expert width for MoE, plus fp32 router logits T·E·4);
    the FP8 copy of a GEMM input T·Kmax + T·4; one NVFP4 weight expanded to FP8 for the prefill GEMM, fused
    gate/up or q/k/v, N·K + N·4; fp32 logits and sampling probabilities of the last token of each sequence
    2·B·V·4; flash-decoding partials B·Hq·DECODE_SPLITS·(D + 2)·4. Attention is fused (no T×T scores)."""
    t = step_tokens(batch, context)
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
    kv_per_token: int  # every layer, as if each held the whole context
    activations: dict[str, int]
    cuda_context: int
    max_batch: int  # at this context
    max_context: int  # at this batch
    max_context_capped: bool  # max_context stopped at the model's max_position_embeddings
    notes: list[str] = field(default_factory=list)
    state_cache: int = 0  # hybrid models: the Gated DeltaNet states of `batch` sequences

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
            "cuda_context_bytes": self.cuda_context, "total_bytes": self.total, "fits": self.fits,
            "max_batch_at_context": self.max_batch, "max_context_at_batch": self.max_context,
            "max_context_capped_by_model": self.max_context_capped, "notes": self.notes,
        }


def total_bytes(shape: ModelShape, weights: WeightBytes, batch: int, context: int, kv_dtype: str,
                window_kv: bool = True, batched_tokens: int = MAX_BATCHED_TOKENS) -> int:
    return (weights.total + kv_cache_bytes(shape, batch, context, kv_dtype, window_kv, batched_tokens)
            + batch * shape.state_bytes_per_sequence()
            + sum(activation_bytes(shape, batch, context).values()) + CUDA_CONTEXT_BYTES)


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
         batched_tokens: int = MAX_BATCHED_TOKENS) -> Budget:
    """`window_kv`: the engine's window-sized KV for sliding layers (EngineConfig.window_kv); `batched_tokens`: its
    max_num_batched_tokens (the chunk a sliding layer holds beyond its windows)."""
    check_plan_options(batch, context, kv_dtype, utilization)
    usable = int(gpu.memory * utilization)
    kv_options = (kv_dtype, window_kv, batched_tokens)
    fits = lambda b, t: total_bytes(shape, weights, b, t, *kv_options) <= usable  # noqa: E731
    context_limit = shape.max_position or MAX_SEARCH
    max_context = largest(lambda t: t == 0 or fits(batch, t), context_limit)
    return Budget(
        gpu=gpu, utilization=utilization, batch=batch, context=context, kv_dtype=kv_dtype, weights=weights,
        kv_cache=kv_cache_bytes(shape, batch, context, *kv_options), kv_per_token=kv_bytes_per_token(shape, kv_dtype),
        activations=activation_bytes(shape, batch, context), cuda_context=CUDA_CONTEXT_BYTES,
        max_batch=largest(lambda b: b == 0 or fits(b, context)),
        max_context=max_context, max_context_capped=max_context == context_limit and shape.max_position is not None,
        notes=budget_notes(shape, batch, context, window_kv, batched_tokens),
        state_cache=batch * shape.state_bytes_per_sequence(),
    )


def budget_notes(shape: ModelShape, batch: int = 1, context: int = 0, window_kv: bool = True,
                 batched_tokens: int = MAX_BATCHED_TOKENS) -> list[str]:
    notes = [f"activations at up to {MAX_BATCHED_TOKENS} prefill tokens per step (never less than one prompt); "
             f"CUDA context {CUDA_CONTEXT_BYTES // MiB} MiB"]
    if shape.global_layers:
        heads, dim = shape.kv_slot
        notes.append(f"Gemma 4: {len(shape.global_layers)} global layers (head_dim {shape.global_head_dim}, "
                     f"{shape.global_kv_heads} KV heads{', K used as V' if shape.k_eq_v else ''}) and "
                     f"{shape.layers - len(shape.global_layers)} others (head_dim {shape.head_dim}, {shape.kv_heads} "
                     f"KV heads); each layer's KV slot holds {heads} heads x {dim}, the widest layer's K or V")
    if windowed_layers(shape, window_kv):
        tokens = sliding_kv_tokens(shape, batch, context, batched_tokens)
        notes.append(f"window-sized KV: the {shape.sliding_layers} sliding-window layers (window "
                     f"{shape.sliding_window}) hold {min(tokens, batch * context)} tokens at most (windows of {batch} "
                     f"sequence(s) + a step of {batched_tokens}), the {shape.layers - shape.sliding_layers} global "
                     f"layers the whole context")
    elif shape.sliding_layers:
        notes.append(f"KV at full context in all {shape.layers} layers: the {shape.sliding_layers} sliding-window "
                     f"layers (window {shape.sliding_window}) allocated like the others (window-sized KV off)")
    if shape.linear_layers:
        notes.append(f"KV in the {shape.kv_layers} full-attention layers only; the {shape.linear_layers} Gated "
                     f"DeltaNet layers keep {shape.state_bytes_per_sequence() / MiB:.2f} MiB of state per sequence "
                     f"(conv bf16, recurrent fp32), whatever its length")
    return notes
