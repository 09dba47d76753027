"""The reference backend: plain PyTorch on any device, and the numerical spec every kernel is tested against.

NVFP4 linears are exact dequantize-then-matmul (optionally with W4A4 activation emulation, adaq.formats.nvfp4), the
KV cache is rounded to FP8 exactly as `adaq.backends.numerics.attention.quantize_kv_fp8` says, attention is fp32
softmax over the paged cache; the FP8 prefill path's emulation follows adaq.formats.fp8_prefill. The `cuda` backend
(adaq.backends.cuda) subclasses it and overrides the ops it has kernels for.
"""

import os

import torch

from adaq.backends import prefill_route
from adaq.backends.fallbacks import Fallbacks
from adaq.backends.handles import (ExpertsHandle, LinearHandle, Weight, can_fuse, check_shapes, fuse, weight_cols,
                                   weight_rows)
from adaq.backends.parallel import SINGLE, TPGroup
from adaq.backends.numerics import activation, attention, gated_delta, moe, norm, rotary
from adaq.formats import fp8_prefill, nvfp4
from adaq.formats.nvfp4 import NVFP4Weight, quantize_activation_nvfp4
DEQUANT_CACHE_FRACTION = 0.4  # of the memory free when the backend is made


class ReferenceBackend:
    """Plain PyTorch. Options:

    - activation_quant: emulate NVFP4 activations (compressed-tensors' W4A4 forward) for weights that carry an
      input_global_scale; False runs such checkpoints weight-only.
    - dequant_cache_bytes: how many bytes of dequantized weights (in the compute dtype) may be kept, so a linear
      is a plain matmul; None = 40% of the memory free now. 0 dequantizes on every call.
    - prefill_fp8: emulate the FP8 prefill path exactly (adaq.formats.fp8_prefill) for NVFP4 linears called with at
      least `prefill_fp8_min_tokens` rows; None = on when $ADAQ_PREFILL_PATH is `fp8`.
    - fallbacks: the record (adaq.backends.fallbacks) that this backend, and the engine that runs it, report
      fallbacks into; None = a fresh, non-strict one.
    - tp: the tensor-parallel group (adaq.backends.parallel) whose shard of the model this backend runs; None = one
      rank. Layers read their share from it and call `all_reduce` / `gather_columns` through it.
    """

    name = "reference"

    def __init__(self, device: torch.device | str | None = None, activation_quant: bool = True,
                 dequant_cache_bytes: int | None = None, prefill_fp8: bool | None = None,
                 prefill_fp8_min_tokens: int = prefill_route.MIN_TOKENS, fallbacks: Fallbacks | None = None,
                 tp: TPGroup | None = None):
        self.fallbacks = Fallbacks() if fallbacks is None else fallbacks
        self.tp = SINGLE if tp is None else tp
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.activation_quant = activation_quant
        self.prefill_fp8 = os.environ.get(prefill_route.PATH_ENV) == "fp8" if prefill_fp8 is None else prefill_fp8
        self.prefill_fp8_min_tokens = prefill_fp8_min_tokens
        self.dequant_cache_bytes = free_memory(self.device) * DEQUANT_CACHE_FRACTION \
            if dequant_cache_bytes is None else dequant_cache_bytes
        self.dequant_cached_bytes = 0
        self.cos_sin = rotary.CosSinMemo()

    # Linear layers
    def prepare_linear(self, weight: Weight, *, dtype: torch.dtype, role: str | None = None) -> LinearHandle:
        if isinstance(weight, fp8_prefill.FP8Weight):
            return self._prepare_channel_fp8(weight, dtype)
        if isinstance(weight, torch.Tensor):
            dense = weight.to(device=self.device, dtype=dtype)
            return LinearHandle(dense.shape[0], dense.shape[1], dtype, dense=dense)
        packed = weight.to(self.device)
        handle = LinearHandle(weight.out_features, weight.in_features, dtype, packed=packed)
        if self.activation_quant and weight.input_global_scale is not None:
            handle.input_global_scale = weight.input_global_scale.float().reshape(1).to(self.device)
        nbytes = handle.out_features * handle.in_features * dtype.itemsize
        if self.dequant_cached_bytes + nbytes <= self.dequant_cache_bytes:
            handle.dense = nvfp4.dequantize(packed, dtype)
            self.dequant_cached_bytes += nbytes
        if self.prefill_fp8 and prefill_route.covers(role):
            self._prepare_fp8(handle, packed)
        return handle

    def _prepare_channel_fp8(self, weight: fp8_prefill.FP8Weight, dtype: torch.dtype) -> LinearHandle:
        handle = LinearHandle(weight.out_features, weight.in_features, dtype, channel_fp8=weight.to(self.device))
        handle.fp8_f32 = None
        nbytes = handle.out_features * handle.in_features * 4
        if self.dequant_cached_bytes + nbytes <= self.dequant_cache_bytes:
            handle.fp8_f32 = handle.channel_fp8.values.float()
            self.dequant_cached_bytes += nbytes
        return handle

    def _prepare_fp8(self, handle: LinearHandle, packed: NVFP4Weight) -> None:
        handle.fp8 = fp8_prefill.expand_weight(packed)
        handle.fp8_f32 = None
        nbytes = handle.out_features * handle.in_features * 4
        if self.dequant_cached_bytes + nbytes <= self.dequant_cache_bytes:
            handle.fp8_f32 = handle.fp8.values.float()
            self.dequant_cached_bytes += nbytes

    def linear(self, x: torch.Tensor, handle: LinearHandle, bias: torch.Tensor | None = None) -> torch.Tensor:
        if handle.channel_fp8 is not None:
            return fp8_prefill.fp8_linear_reference(x, handle.channel_fp8, bias, getattr(handle, "fp8_f32", None))
        if handle.input_global_scale is not None:
            x = quantize_activation_nvfp4(x, handle.input_global_scale)
        if getattr(handle, "fp8", None) is not None and x.numel() >= self.prefill_fp8_min_tokens * x.shape[-1]:
            return fp8_prefill.fp8_linear_reference(x, handle.fp8, bias, handle.fp8_f32)
        return torch.nn.functional.linear(x, handle.weight(), bias)

    # Mixture of experts
    def prepare_experts(self, gate_up: list[list[Weight]], down: list[Weight], *,
                        dtype: torch.dtype) -> ExpertsHandle:
        intermediate = weight_rows(gate_up[0][0])
        hidden = weight_cols(gate_up[0][0])
        handles_gate_up, handles_down = [], []
        for pair, down_weight in zip(gate_up, down):
            check_shapes(pair, hidden, [intermediate, intermediate])
            check_shapes([down_weight], intermediate, [hidden])
            pair = [fuse(pair)] if can_fuse(pair) else pair
            handles_gate_up.append([self.prepare_linear(w, dtype=dtype) for w in pair])
            handles_down.append(self.prepare_linear(down_weight, dtype=dtype))
        return ExpertsHandle(handles_gate_up, handles_down, intermediate)

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertsHandle, top_k: int,
            renormalize: bool, *, activation: str = "silu", expert_scale: torch.Tensor | None = None,
            shared_expert: bool = False) -> torch.Tensor:
        fp8 = self.prefill_fp8 and x.shape[0] >= self.prefill_fp8_min_tokens  # the GPU's grouped FP8 path: the
        backend = _ExpertsOnFp8(self) if fp8 else self  # layer's size decides
        if shared_expert:
            return moe.moe_shared_reference(backend, x, router_logits, experts, top_k, renormalize, activation,
                                            shared_backend=self)
        return moe.moe_reference(backend, x, router_logits, experts, top_k, renormalize, activation=activation,
                                 expert_scale=expert_scale)

    # KV cache and attention
    def store_kv(self, k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping) -> None:
        attention.store_kv_reference(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)

    def attention(self, q, k_cache, v_cache, k_scale, v_scale, ctx, *, scale: float,
                  sliding_window: int | None = None, softcap: float | None = None, k=None, v=None) -> torch.Tensor:
        return attention.attention_reference(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=scale,
                                             sliding_window=sliding_window, softcap=softcap, k=k, v=v)

    def qk_norm_rope_store(self, q, k, v, q_weight, k_weight, eps: float, unit_offset: bool, positions, inv_freq,
                           k_cache, v_cache, k_scale, v_scale, slot_mapping) -> torch.Tensor:
        """The attention prologue of a step with a cache: q/k RMSNorm, RoPE, K/V stored; returns q. The composition
        of the ops below is the spec (the cuda backend runs it as one kernel)."""
        q = self.rms_norm(q, q_weight, eps, unit_offset=unit_offset)
        k = self.rms_norm(k, k_weight, eps, unit_offset=unit_offset)
        q, k = self.rotary(q, k, positions, inv_freq)
        self.store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)
        return q

    # Element-wise ops
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, *, unit_offset: bool = False):
        return norm.rms_norm(x, weight, eps, unit_offset)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream's step: (x + delta, rms_norm(x + delta))."""
        total = x + delta
        return total, self.rms_norm(total, weight, eps, unit_offset=unit_offset)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(x)

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return activation.gelu_tanh_and_mul(x)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
        cos, sin = self.cos_sin.get(positions, inv_freq, q.dtype)
        return rotary.apply_rotary(q, k, cos, sin)

    # Hybrid models: Gated DeltaNet and gated attention
    def moe_shared(self, routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        return moe.add_shared_expert(routed, shared, gate_logits)

    def sigmoid_gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_delta.sigmoid_gate(x, gate)

    def gdn_gates(self, a, b, a_log, dt_bias):
        return gated_delta.gdn_gates(a, b, a_log, dt_bias)

    def causal_conv1d(self, x, weight, conv_states, ctx) -> torch.Tensor:
        if _batched_decode(ctx, conv_states):
            return gated_delta.conv_decode(x, weight, conv_states, ctx.state_slots, ctx.context_lens > 1)
        return gated_delta.conv_step(x, weight, conv_states, ctx)

    def gated_delta_rule(self, q, k, v, a, b, a_log, dt_bias, ssm_states, ctx) -> torch.Tensor:
        g, beta = self.gdn_gates(a, b, a_log, dt_bias)
        if _batched_decode(ctx, ssm_states):
            return gated_delta.delta_rule_decode(q, k, v, g, beta, ssm_states, ctx.state_slots, ctx.context_lens > 1)
        return gated_delta.delta_rule_step(q, k, v, g, beta, ssm_states, ctx)

    def gated_rms_norm(self, x, z, weight, eps: float) -> torch.Tensor:
        return gated_delta.gated_rms_norm(x, z, weight, eps)


def _batched_decode(ctx, states: torch.Tensor | None) -> bool:
    """A pure decode step with a state cache: one token per sequence, the batched (graph-shaped) form."""
    return not ctx.is_prefill and states is not None and ctx.state_slots is not None


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class _ExpertsOnFp8:
    """The backend as moe_reference sees it when a whole MoE layer takes the FP8 prefill path: the GPU groups every
    routed expert into one FP8 GEMM once the layer has enough tokens, however few rows each expert gets."""

    def __init__(self, backend: ReferenceBackend):
        self.backend = backend

    def linear(self, x: torch.Tensor, handle: LinearHandle, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(handle, "fp8", None) is None:
            return self.backend.linear(x, handle, bias)
        if handle.input_global_scale is not None:
            x = quantize_activation_nvfp4(x, handle.input_global_scale)
        return fp8_prefill.fp8_linear_reference(x, handle.fp8, bias, handle.fp8_f32)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.silu_and_mul(x)

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.gelu_tanh_and_mul(x)
