"""The `cuda` backend: the reference backend with its hot ops replaced by adaq's sm_89 kernels.

What runs on a kernel (bf16 activations on a CUDA device): NVFP4 linears (decode GEMM, weights repacked at load;
large M: exact dequantize + cuBLAS bf16 or the opt-in FP8 path, adaq.backends.prefill_route.route),
MoE experts (fused router, grouped GEMM), KV-cache store (FP8, NVFP4 or bf16), paged attention (decode and prefill
over the cache; NVFP4 needs pages of a multiple of 16 keys), RMSNorm, SiLU/gelu-tanh gating, RoPE, and the Gated
DeltaNet ops of hybrid models (decode: conv update and the fused gates + delta rule over state slots, gated RMSNorm;
prefill: fla-core's chunked kernel where installed, the conv as batched torch ops). Everything else
(dense bf16 linears: cuBLAS; other dtypes or shapes the kernels do not cover) falls through to the reference
implementation, and each such fallback is reported once per (op, cause) into `self.fallbacks` (adaq.backends.fallbacks)
where it happens: a dict lookup once known, no device work, so a fallback met during a CUDA-graph capture costs no
sync (under --strict it stops the capture).
"""

import torch

from adaq.backends import dense_moe, gdn_prefill, prefill_moe, prefill_moe_exact, prefill_moe_mid, prefill_route
from adaq.backends.fallbacks import KERNEL_SETTING, PREFILL_SETTING
from adaq.backends.handles import LinearHandle, can_fuse, check_shapes
from adaq.backends.numerics import moe as moe_numerics
from adaq.backends.numerics.attention import nvfp4_kv_row_bytes
from adaq.backends.reference import ReferenceBackend
from adaq.formats.fp8_prefill import FP8Weight
from adaq.formats.nvfp4 import NVFP4Weight, quantize_activation_nvfp4
from adaq.kernels import fp8_gemm, layout, moe_bf16, ops

ATTENTION_HEAD_DIMS = (64, 128, 256, 512)
ATTENTION_GROUPS = (1, 2, 4, 8)
ATTENTION_EXTRA_SHAPES = ((256, 6),)  # (head_dim, group) beyond the grid above: Qwen3.5-27B's 24 over 4 heads
EXPERT_GROUP_VALUES = 1 << 26  # weights per expert-group repack (its temporaries: ~20 bytes per weight)
PAGED_ONLY_HEAD_DIMS = (512,)  # tensor-core kernels only: pages must hold a multiple of 16 keys (the engine's 16 do)
PROLOGUE_HEAD_DIMS = (64, 128, 256)  # qk_norm_rope_store's instantiations (whole-slot caches only)


def attention_covers(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Whether the attention kernels (decode and prefill, every KV dtype) take this head shape."""
    if kv_heads < 1 or heads % kv_heads:
        return False
    group = heads // kv_heads
    in_grid = head_dim in ATTENTION_HEAD_DIMS and group in ATTENTION_GROUPS
    return in_grid or (head_dim, group) in ATTENTION_EXTRA_SHAPES


GDN_KEY_HEAD_DIMS = (32, 64, 128, 256)  # csrc/gated_delta.cu's instantiations; value head dims: multiples of 32
GDN_CONV_WIDTHS = (2, 3, 4)


class KernelLinearHandle(LinearHandle):
    """A LinearHandle whose NVFP4 weight lives in the kernel layout; `weight()` dequantizes it for fallbacks."""

    def __init__(self, packed: layout.PackedNVFP4, dtype: torch.dtype, input_global_scale=None):
        super().__init__(packed.out_features, packed.in_features, dtype, input_global_scale=input_global_scale)
        self.kernel_weight = packed

    def weight(self) -> torch.Tensor:
        return layout.dequantize(self.kernel_weight, self.dtype)


class KernelExpertsHandle:
    def __init__(self, stacked: ops.StackedExperts):
        self.stacked = stacked
        self.intermediate_size = stacked.intermediate
        self._scale_source: torch.Tensor | None = None
        self._scale_f32: torch.Tensor | None = None

    def expert_scale_f32(self, scale: torch.Tensor | None) -> torch.Tensor | None:
        """Gemma 4's per-expert scale as the route kernel reads it (fp32, contiguous), converted once per tensor:
        the first (eager) call converts, the decode steps captured later reuse it (no launch per layer)."""
        if scale is None:
            return None
        if self._scale_source is not scale:
            self._scale_source, self._scale_f32 = scale, scale.float().contiguous()
        return self._scale_f32


class CudaBackend(ReferenceBackend):
    name = "cuda"

    def __init__(self, device: torch.device | str | None = None, **options):
        super().__init__(device or "cuda", **options)  # the reference backend's options, passed through
        if self.device.type != "cuda":
            from adaq.errors import AdaqError

            raise AdaqError("the cuda backend needs a CUDA device")
        ops.ext()
        ops.counters(self.device)  # allocate now, never inside a CUDA-graph capture
        self._prefill_checked = False

    def _fell_back(self, op: str, cause: str) -> None:
        self.fallbacks.report(f"{op} kernel -> reference", cause, KERNEL_SETTING)

    def _check_prefill_route(self) -> None:
        """Once, at the first NVFP4 linear: whether `auto` gives the FP8 prefill path or gives way to exact, and
        whether the exact path itself can run (else large prefills run on the decode kernels)."""
        self._prefill_checked = True
        path = prefill_route.configured_path()
        cause = prefill_route.fp8_unavailable(self.device) if path == "auto" else None
        if cause:
            self.fallbacks.report("FP8 prefill -> exact", cause, PREFILL_SETTING)
        if path != "nvfp4" and not fp8_gemm.exact_available():
            self.fallbacks.report("exact prefill -> NVFP4 decode kernels", "the kernels lack gemm_dequantize "
                                  "(a stale build?)", "--prefill-path nvfp4 asks for the decode kernels")

    # ---- linear layers ---------------------------------------------------------------------------------------
    def prepare_linear(self, weight, *, dtype: torch.dtype, role: str | None = None) -> LinearHandle:
        if isinstance(weight, FP8Weight):
            return self._prepare_channel_fp8(weight, dtype)
        if not isinstance(weight, NVFP4Weight):  # dense: cuBLAS through the reference op, by design
            return super().prepare_linear(weight, dtype=dtype, role=role)
        if dtype != torch.bfloat16:
            self._fell_back("NVFP4 linear", f"compute dtype {dtype} (the kernels take bf16)")
            return super().prepare_linear(weight, dtype=dtype, role=role)
        if not self._prefill_checked:
            self._check_prefill_route()
        packed = layout.repack(weight, self.device)
        scale = None
        if self.activation_quant and weight.input_global_scale is not None:
            scale = weight.input_global_scale.float().reshape(1).to(self.device)
        handle = KernelLinearHandle(packed, dtype, scale)
        if role == prefill_route.OUTPUT_ROLE:  # NVFP4 kernels at every M: no workspace the size of the vocabulary
            return handle
        if prefill_route.covers(role) and prefill_route.fp8_enabled(self.device):  # expanded from the decode layout
            handle.fp8_scales = fp8_gemm.Fp8Scales.of(weight, self.device)
            fp8_gemm.workspace(self.device, packed.out_features, packed.in_features)  # grown now, not in a prefill
        if prefill_route.configured_path() != "nvfp4" and fp8_gemm.exact_available():  # workspace sized now
            handle.exact_plan = fp8_gemm.exact_plan(packed)
            fp8_gemm.reserve_dense_workspace(self.device, packed.out_features, packed.in_features)
        return handle

    def _prepare_channel_fp8(self, weight: FP8Weight, dtype: torch.dtype) -> LinearHandle:
        """An E4M3 weight with per-channel scales (--lm-head fp8): the FP8 GEMM at every M, or its reference."""
        handle = LinearHandle(weight.out_features, weight.in_features, dtype,
                              channel_fp8=weight.to(self.device))
        cause = _channel_fp8_cause(weight, dtype, self.device)
        handle.fp8_kind = None if cause else fp8_gemm.gpu_fp8_kind(self.device)
        if cause:
            self._fell_back("FP8 linear (per-channel E4M3)", cause)
        return handle

    def linear(self, x: torch.Tensor, handle: LinearHandle, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(handle, "fp8_kind", None) is not None and x.dtype == torch.bfloat16:
            y = fp8_gemm.fp8_linear_e4m3(x.reshape(-1, x.shape[-1]), handle.channel_fp8.values,
                                         handle.channel_fp8.col_scale, None if bias is None else bias.to(x.dtype),
                                         handle.fp8_kind)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if not isinstance(handle, KernelLinearHandle):  # dense, or NVFP4 prepared for another dtype (reported)
            return super().linear(x, handle, bias)
        if x.dtype != torch.bfloat16 or not x.is_cuda:
            self._fell_back("NVFP4 linear", f"input {x.dtype} on {x.device.type} (the kernels take bf16 on the GPU)")
            return super().linear(x, handle, bias)
        if handle.input_global_scale is not None:
            x = quantize_activation_nvfp4(x, handle.input_global_scale)
        lead = x.shape[:-1]
        rows = x.numel() // x.shape[-1]
        route = prefill_route.route(rows, x.device)  # ADAQ_PREFILL_PATH: auto | fp8 | exact | nvfp4
        scales = getattr(handle, "fp8_scales", None)
        if route == "fp8" and scales is not None:
            y = fp8_gemm.fp8_linear_packed(x.reshape(-1, x.shape[-1]), handle.kernel_weight, scales,
                                              None if bias is None else bias.to(x.dtype))
            return y.reshape(*lead, y.shape[-1])
        if route == "fp8":  # a role the FP8 path excludes: the exact path where it beats the decode kernels
            route = prefill_route.route(rows, x.device, path="exact")
        plan = getattr(handle, "exact_plan", None)
        if route == "exact" and (plan is None or torch.cuda.is_current_stream_capturing()):
            route = prefill_route.route(rows, x.device, path="nvfp4")  # the output layer; graphs: NVFP4 kernels
        if route == "exact":
            y = fp8_gemm.exact_linear(x.reshape(-1, x.shape[-1]), handle.kernel_weight, plan,
                                         None if bias is None else bias.to(x.dtype))
            return y.reshape(*lead, y.shape[-1])
        nvfp4_linear = ops.nvfp4_linear_mid if route == "mid" else ops.nvfp4_linear
        y = nvfp4_linear(x.reshape(-1, x.shape[-1]), handle.kernel_weight,
                         None if bias is None else bias.to(torch.bfloat16))
        return y.reshape(*lead, y.shape[-1])

    # ---- mixture of experts ----------------------------------------------------------------------------------
    def prepare_experts(self, gate_up, down, *, dtype: torch.dtype):
        weights = [w for pair in gate_up for w in pair] + list(down)
        quantized = all(isinstance(w, NVFP4Weight) and w.input_global_scale is None for w in weights)
        if all(isinstance(w, torch.Tensor) for w in weights) and dtype == torch.bfloat16:
            return self._prepare_dense_experts(gate_up, down)
        if not quantized or dtype != torch.bfloat16:
            self._fell_back("MoE experts", "experts neither all NVFP4A16 nor all bf16 (W4A4 or mixed)" if not quantized
                            else f"compute dtype {dtype} (the kernels take bf16)")
            return super().prepare_experts(gate_up, down, dtype=dtype)
        intermediate, hidden = gate_up[0][0].out_features, gate_up[0][0].in_features
        for pair, down_weight in zip(gate_up, down):
            check_shapes(pair, hidden, [intermediate] * len(pair))
            check_shapes([down_weight], intermediate, [hidden])
        if (len(gate_up[0]) * intermediate) % layout.TILE_N == 0 and hidden % layout.TILE_N == 0:
            handle = KernelExpertsHandle(stacked_by_groups(gate_up, down, self.device))
        else:  # an expert's rows end inside a tile: each expert repacked alone
            handle = KernelExpertsHandle(ops.StackedExperts([self._fused_pair(pair) for pair in gate_up],
                                                            [layout.repack(w, self.device) for w in down]))
        if prefill_route.configured_path() != "nvfp4" and fp8_gemm.exact_available():  # auto's large prefills
            batched = prefill_moe_exact.batched_available(self.device)
            handle.exact = prefill_moe_exact.ExactExperts.of(handle.stacked, batched)
            if not batched:
                self.fallbacks.report("exact MoE prefill: one batched GEMM per chunk -> one GEMM per expert",
                                      f"torch {torch.__version__} has no bmm(out_dtype=float32)", PREFILL_SETTING)
            fp8_gemm.reserve_dense_workspace(self.device, handle.exact.workspace_elements(), 1)
        # The grouped FP8 path (adaq.backends.prefill_moe) runs both expert projections in FP8, down included, whose
        # accuracy no real MoE checkpoint here has measured: only when asked for (--prefill-path fp8), not by
        # `auto`. It expands from the decode kernels' layout; shapes that layout cannot serve as one weight (N % 16
        # or K % 128) keep a stacked copy of the NVFP4 bytes instead.
        if prefill_route.configured_path() == "fp8" and prefill_route.fp8_enabled(self.device):
            if hidden % 16 == 0 and intermediate % 16 == 0:
                handle.fp8 = (prefill_moe.Fp8Experts.from_layout(handle.stacked, gate_up, down, self.device)
                              or prefill_moe.Fp8Experts.from_weights(gate_up, down, self.device))
            else:
                self.fallbacks.report("FP8 MoE prefill -> NVFP4 expert kernels", f"hidden {hidden} or intermediate "
                                      f"{intermediate} not a multiple of 16", PREFILL_SETTING)
        return handle

    def _prepare_dense_experts(self, gate_up, down):
        """bf16 experts (the bf16 engine): stacked for the grouped Triton GEMM, or the reference where no Triton."""
        if not moe_bf16.available(self.device):
            self._fell_back("MoE experts (bf16)", "Triton is not installed (the grouped bf16 GEMM is a Triton kernel)")
            return super().prepare_experts(gate_up, down, dtype=torch.bfloat16)
        return dense_moe.DenseExperts.of(gate_up, down, self.device)

    def _fused_pair(self, pair: list[NVFP4Weight]) -> layout.PackedNVFP4:
        """gate|up as one weight; per-column global scales keep it exact even when the two scales differ."""
        fused = NVFP4Weight(torch.cat([w.packed for w in pair]), torch.cat([w.block_scale for w in pair]),
                            pair[0].global_scale)
        columns = torch.cat([w.global_scale.float().reshape(1).expand(w.out_features) for w in pair])
        return layout.repack(fused, self.device, column_global_scales=None if can_fuse(pair) else columns)

    def moe(self, x, router_logits, experts, top_k: int, renormalize: bool, *, activation: str = "silu",
            expert_scale=None, shared_expert: bool = False):
        options = dict(activation=activation, expert_scale=expert_scale, shared_expert=shared_expert)
        if isinstance(experts, dense_moe.DenseExperts):
            return dense_moe.dense_moe_forward(self, x, router_logits, experts, top_k, renormalize, **options)
        if not isinstance(experts, KernelExpertsHandle):  # prepared on the reference path (reported there)
            return super().moe(x, router_logits, experts, top_k, renormalize, **options)
        if x.dtype != torch.bfloat16:
            self._fell_back("MoE experts", f"input {x.dtype} (the kernels take bf16)")
            return super().moe(x, router_logits, experts, top_k, renormalize, **options)
        route = "decode" if torch.cuda.is_current_stream_capturing() else prefill_route.moe_route(x.shape[0],
                                                                                                   x.device)
        logits = router_logits.to(torch.bfloat16)
        path = self._moe_path(route, experts, x, activation, expert_scale)
        if path == "decode":
            return ops.moe_forward(x, logits, experts.stacked, top_k, renormalize, activation,
                                   experts.expert_scale_f32(expert_scale), shared_expert)
        if shared_expert:  # the prefill paths route the experts before it; the shared one runs on the NVFP4 GEMMs
            shared = experts.stacked.num_experts - 1
            routed = self._moe_prefill(path, x, logits[:, :shared], experts, top_k, renormalize, activation)
            alone = ops.expert_forward(x, experts.stacked, shared, activation, mid=path == "mid")
            return moe_numerics.add_shared_expert(routed, alone, logits[:, shared:])
        return self._moe_prefill(path, x, logits, experts, top_k, renormalize, activation, expert_scale)

    @staticmethod
    def _moe_path(route: str, experts, x: torch.Tensor, activation: str, expert_scale) -> str:
        """fp8 (--prefill-path fp8: grouped FP8 GEMMs), exact (grouped dequantize + cuBLAS bf16), mid (the grouped
        mid-size NVFP4 kernel) or decode."""
        plain = activation == "silu" and expert_scale is None  # what the grouped FP8 path implements
        if route == "fp8" and getattr(experts, "fp8", None) is not None and plain:
            return "fp8"
        if route == "fp8":
            route = prefill_route.moe_route(x.shape[0], x.device, path="exact")
        if route == "exact" and getattr(experts, "exact", None) is None:
            route = prefill_route.moe_route(x.shape[0], x.device, path="nvfp4")
        return route

    @staticmethod
    def _moe_prefill(path: str, x, router_logits, experts, top_k: int, renormalize: bool, activation: str,
                     expert_scale=None):
        if path == "fp8":
            return prefill_moe.fp8_moe_forward(x, router_logits, experts.fp8, top_k, renormalize)
        if path == "mid":
            return prefill_moe_mid.mid_moe_forward(x, router_logits, experts.stacked, top_k, renormalize, activation,
                                                   expert_scale)
        return prefill_moe_exact.exact_moe_forward(x, router_logits, experts.exact, top_k, renormalize, activation,
                                                   expert_scale)

    # ---- KV cache and attention ------------------------------------------------------------------------------
    def store_kv(self, k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping) -> None:
        if not self._kv_kernel_ok(k, k_cache) or v.dtype != torch.bfloat16:
            self._fell_back("KV store", _kv_cause(k, k_cache) or f"values {v.dtype} (the kernel takes bf16)")
            return super().store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)
        ops.store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)

    def attention(self, q, k_cache, v_cache, k_scale, v_scale, ctx, *, scale: float, sliding_window=None,
                  softcap=None, k=None, v=None) -> torch.Tensor:
        if k_cache is None:  # a prefill before any cache exists (warm-up, tests): attends over its own K/V
            return super().attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=scale,
                                     sliding_window=sliding_window, softcap=softcap, k=k, v=v)
        cause = _kv_cause(q, k_cache) or attention_kernel_cause(q.shape[1], k_cache.shape[2], q.shape[2], None)
        if cause:
            self._fell_back("attention", cause)
            return super().attention(q, k_cache, v_cache, k_scale, v_scale, ctx, scale=scale,
                                     sliding_window=sliding_window, softcap=softcap, k=k, v=v)
        tokens, group, fp8 = q.shape[0], q.shape[1] // k_cache.shape[2], k_cache.dtype == torch.float8_e4m3fn
        nvfp4 = k_cache.dtype == torch.uint8
        query_seq = query_ctx = query_blocks = None
        if ctx.is_prefill:  # block_tokens > 1: several queries of a sequence per block, K/V read once for them all
            block_tokens = ops.prefill_block_tokens(q.shape[2], group, fp8, k_cache.shape[1], nvfp4=nvfp4)
            query_seq, query_ctx, query_blocks = prefill_maps(ctx, tokens, block_tokens)
        max_context = ctx.max_context_len or k_cache.shape[1] * ctx.block_tables.shape[1]
        if sliding_window:
            max_context = min(max_context, sliding_window)
        splits = ops.attention_splits(tokens, k_cache.shape[2], max_context, head_dim=q.shape[2], group=group,
                                      fp8=fp8, block_size=k_cache.shape[1], nvfp4=nvfp4)
        return ops.paged_attention(q, k_cache, v_cache, k_scale, v_scale, ctx.block_tables, ctx.context_lens,
                                   scale=scale, sliding_window=sliding_window, softcap=softcap, query_seq=query_seq,
                                   query_ctx=query_ctx, splits=splits, query_blocks=query_blocks)

    def qk_norm_rope_store(self, q, k, v, q_weight, k_weight, eps: float, unit_offset: bool, positions, inv_freq,
                           k_cache, v_cache, k_scale, v_scale, slot_mapping) -> torch.Tensor:
        """One launch (ops.qk_norm_rope_store) where the kernel takes the tensors; else the composition of this
        backend's own ops (each reporting its own fallback)."""
        if not (self._kv_kernel_ok(k, k_cache) and k_cache.is_contiguous() and v_cache.is_contiguous()
                and q.shape[-1] in PROLOGUE_HEAD_DIMS and all(_dense_heads(t) for t in (q, k, v))
                and q.shape[-1] == k.shape[-1] == v.shape[-1] and q_weight.dtype == k_weight.dtype == torch.bfloat16
                and inv_freq.numel() * 2 == q.shape[-1]):
            return super().qk_norm_rope_store(q, k, v, q_weight, k_weight, eps, unit_offset, positions, inv_freq,
                                              k_cache, v_cache, k_scale, v_scale, slot_mapping)
        return ops.qk_norm_rope_store(q, k, v, q_weight, k_weight, eps, unit_offset, positions, inv_freq, k_cache,
                                      v_cache, k_scale, v_scale, slot_mapping)

    @staticmethod
    def _kv_kernel_ok(x: torch.Tensor, cache: torch.Tensor | None) -> bool:
        return _kv_cause(x, cache) is None

    # ---- element-wise ----------------------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps: float, *, unit_offset: bool = False):
        if not (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0
                and x.stride(-1) == 1 and x.dim() in (2, 3) and x.data_ptr() % 16 == 0
                and all(s % 8 == 0 for s in x.stride()[:-1])):
            self._fell_back("RMSNorm", _elementwise_cause(x, weight))
            return super().rms_norm(x, weight, eps, unit_offset=unit_offset)
        return ops.rms_norm(x, weight, eps, unit_offset)

    def add_rms_norm(self, x, delta, weight, eps: float, *, unit_offset: bool = False):
        if not (x.is_cuda and x.dtype == delta.dtype == weight.dtype == torch.bfloat16 and x.shape == delta.shape
                and x.shape[-1] % 8 == 0 and x.is_contiguous() and delta.is_contiguous()
                and x.data_ptr() % 16 == 0 and delta.data_ptr() % 16 == 0):
            self._fell_back("add + RMSNorm", _elementwise_cause(x, weight, delta))
            return super().add_rms_norm(x, delta, weight, eps, unit_offset=unit_offset)
        return ops.add_rms_norm(x, delta, weight, eps, unit_offset)

    def silu_and_mul(self, x):
        if not self._gated_ok(x):
            self._fell_back("SiLU and mul", _elementwise_cause(x))
            return super().silu_and_mul(x)
        return ops.silu_and_mul(x)

    def gelu_tanh_and_mul(self, x):
        if not self._gated_ok(x):
            self._fell_back("gelu-tanh and mul", _elementwise_cause(x))
            return super().gelu_tanh_and_mul(x)
        return ops.gelu_tanh_and_mul(x)

    @staticmethod
    def _gated_ok(x: torch.Tensor) -> bool:
        return (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] % 16 == 0
                and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0)

    # ---- Gated DeltaNet (hybrid models) -----------------------------------------------------------------------
    def causal_conv1d(self, x, weight, conv_states, ctx):
        cause = _gdn_conv_cause(x, weight, conv_states)
        if cause:
            self._fell_back("GDN conv1d", cause)
            return super().causal_conv1d(x, weight, conv_states, ctx)
        if ctx.is_prefill:  # the packed step in two launches (numerics: gated_delta.conv_packed)
            return ops.gdn_conv_prefill(x, weight, conv_states, _slots(ctx, conv_states), ctx.context_lens,
                                        ctx.query_offsets().int().contiguous())
        return ops.gdn_conv_update(x, weight, conv_states, _slots(ctx, conv_states), ctx.context_lens)

    def gated_delta_rule(self, q, k, v, a, b, a_log, dt_bias, ssm_states, ctx):
        cause = _gdn_rule_cause(q, v, ssm_states, a_log, dt_bias)
        if cause:
            self._fell_back("gated delta rule", cause)
            return super().gated_delta_rule(q, k, v, a, b, a_log, dt_bias, ssm_states, ctx)
        if not ctx.is_prefill:
            return ops.gdn_decode(q, k, v, a, b, a_log, dt_bias, ssm_states, _slots(ctx, ssm_states),
                                  ctx.context_lens)
        missing = gdn_prefill.unavailable()
        if missing:
            self.fallbacks.report("GDN chunked prefill kernel -> reference", missing, gdn_prefill.INSTALL_HINT)
            return super().gated_delta_rule(q, k, v, a, b, a_log, dt_bias, ssm_states, ctx)
        g, beta = self.gdn_gates(a, b, a_log, dt_bias)
        return gdn_prefill.chunk_prefill(q, k, v, g, beta, ssm_states, ctx)

    def gated_rms_norm(self, x, z, weight, eps: float):
        if not (x.is_cuda and x.dtype == z.dtype == weight.dtype == torch.bfloat16 and x.dim() == 2
                and x.is_contiguous() and z.stride(-1) == 1):
            self._fell_back("gated RMSNorm", _elementwise_cause(x, z, weight))
            return super().gated_rms_norm(x, z, weight, eps)
        return ops.gated_rms_norm(x, z, weight, eps)

    def rotary(self, q, k, positions, inv_freq):
        if not (q.is_cuda and q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16 and q.dim() == 3):
            self._fell_back("RoPE", _elementwise_cause(q, k))
            return super().rotary(q, k, positions, inv_freq)
        return ops.rotary(q, k, positions, inv_freq)


def stacked_by_groups(gate_up: list[list[NVFP4Weight]], down: list[NVFP4Weight], device) -> ops.StackedExperts:
    """A MoE layer's experts in the kernel layout, repacked a group at a time (rows concatenated, per-column global
    scales: equal to one repack per expert when each expert's rows fill whole tiles), groups of at most
    EXPERT_GROUP_VALUES weights so the repack's temporaries stay small next to a loaded model."""
    per_expert = sum(w.out_features for w in gate_up[0]) * gate_up[0][0].in_features
    size = max(1, EXPERT_GROUP_VALUES // per_expert)
    groups = [range(i, min(i + size, len(down))) for i in range(0, len(down), size)]
    return ops.StackedExperts.from_concatenated(
        [(repack_rows([w for e in group for w in gate_up[e]], device), len(group)) for group in groups],
        [(repack_rows([down[e] for e in group], device), len(group)) for group in groups])


def repack_rows(weights: list[NVFP4Weight], device) -> layout.PackedNVFP4:
    """Weights of one input width as one, rows one after another, each row keeping its own global scale."""
    joined = NVFP4Weight(torch.cat([w.packed for w in weights]), torch.cat([w.block_scale for w in weights]),
                         weights[0].global_scale)
    columns = torch.cat([w.global_scale.float().reshape(1).expand(w.out_features) for w in weights])
    return layout.repack(joined, device, column_global_scales=columns)


def _channel_fp8_cause(weight: FP8Weight, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the FP8 GEMM cannot run this per-channel E4M3 weight (its reference emulation runs instead), or None."""
    if dtype != torch.bfloat16:
        return f"compute dtype {dtype} (the FP8 GEMM writes bf16)"
    if weight.in_features % 16 or weight.out_features % 16:
        return "N or K not a multiple of 16 (the FP8 GEMM's alignment)"
    if fp8_gemm.gpu_fp8_kind(device) is None:
        return "this GPU has no FP8 GEMM (sm_89 or sm_90 needed)"
    if not fp8_gemm.extension_ok():
        return f"the FP8 extension did not load ({fp8_gemm.extension_error()})"
    return None


def _dense_heads(x: torch.Tensor) -> bool:
    """[T, heads, D] bf16 on the GPU whose heads lie back to back (a view of the fused qkv output is)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2])


def _kv_cause(x: torch.Tensor, cache: torch.Tensor | None) -> str | None:
    """Why the KV-store / attention kernels do not take these tensors (categories, not shapes: one report each), or
    None when they do."""
    if not x.is_cuda or x.dtype != torch.bfloat16:
        return f"activations {x.dtype} on {x.device.type} (the kernels take bf16 on the GPU)"
    if x.shape[-1] not in ATTENTION_HEAD_DIMS:
        return f"head_dim {x.shape[-1]} (kernels: {ATTENTION_HEAD_DIMS})"
    return "no KV cache" if cache is None else _cache_cause(cache, x.shape[-1])


def attention_kernel_cause(heads: int, kv_heads: int, head_dim: int, cache: torch.Tensor | None) -> str | None:
    """Why the attention kernels do not serve a layer of these heads (and this cache, when attached), or None: what
    the decode graphs ask of every layer before capturing (adaq.engine.cuda_graph.graph_blocker)."""
    if head_dim not in ATTENTION_HEAD_DIMS:
        return f"head_dim {head_dim} has no attention kernel (kernels: {ATTENTION_HEAD_DIMS})"
    if not attention_covers(head_dim, heads, kv_heads):
        return f"{heads} query heads over {kv_heads} KV heads have no attention kernel (kernels: groups of " \
               f"{ATTENTION_GROUPS}, and {ATTENTION_EXTRA_SHAPES} as (head_dim, group))"
    return None if cache is None else _cache_cause(cache, head_dim)


def _cache_cause(cache: torch.Tensor, dim: int) -> str | None:
    if cache.dtype not in (torch.float8_e4m3fn, torch.bfloat16, torch.uint8):
        return f"KV cache dtype {cache.dtype} (kernels: fp8, bf16, nvfp4)"
    if cache.dtype == torch.uint8 and cache.shape[-1] != nvfp4_kv_row_bytes(dim):
        return f"NVFP4 KV rows of {cache.shape[-1]} bytes for head_dim {dim}"
    if (cache.dtype == torch.uint8 or dim in PAGED_ONLY_HEAD_DIMS) and cache.shape[1] % 16:
        return f"pages of {cache.shape[1]} keys (NVFP4 KV and head_dim {PAGED_ONLY_HEAD_DIMS} need multiples of 16)"
    if not _paged_layout(cache, _slot_alignment(cache, dim)):
        return "a KV cache layout the kernels do not take (heads or rows not dense)"
    return None


def _slot_alignment(cache: torch.Tensor, dim: int) -> int:
    """Bytes the kernels' loads need each slot aligned to (csrc/binding.cpp cache_alignment)."""
    return {64: 4, 128: 8}.get(dim, 16) if cache.dtype == torch.uint8 else 16


def _paged_layout(cache: torch.Tensor, alignment: int) -> bool:
    """[blocks, block_size, Hkv, row] with dense heads and rows; the slots may be wider than Hkv rows (a layer's
    view into the slot of the widest layer: Gemma 4), whole rows per slot, aligned (csrc/binding.cpp cache_slot_rows)."""
    if cache.dim() != 4:
        return False
    _, block_size, heads, row = cache.shape
    stride = cache.stride()
    return (stride[3] == 1 and stride[2] == row and stride[1] >= heads * row and stride[1] % row == 0
            and stride[0] == block_size * stride[1]
            and (stride[1] * cache.element_size()) % alignment == 0 and cache.data_ptr() % alignment == 0)


def _slots(ctx, states: torch.Tensor | None) -> torch.Tensor | None:
    return None if states is None else ctx.state_slots


def _gdn_conv_cause(x: torch.Tensor, weight: torch.Tensor, states: torch.Tensor | None) -> str | None:
    """Why the GDN conv kernel does not take these tensors (categories, one report each), or None."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return f"tensors {x.dtype}, {weight.dtype} on {x.device.type} (the kernels take bf16 on the GPU)"
    if weight.shape[1] not in GDN_CONV_WIDTHS:
        return f"conv kernel width {weight.shape[1]} (kernels: {GDN_CONV_WIDTHS})"
    if states is not None and (states.dtype != torch.bfloat16 or not states.is_contiguous()):
        return f"conv states {states.dtype} (the kernel takes a contiguous bf16 state cache)"
    return None


def _gdn_rule_cause(q: torch.Tensor, v: torch.Tensor, states: torch.Tensor | None, a_log: torch.Tensor,
                    dt_bias: torch.Tensor) -> str | None:
    if not q.is_cuda or {q.dtype, v.dtype, a_log.dtype, dt_bias.dtype} != {torch.bfloat16}:
        return f"tensors {q.dtype}, {a_log.dtype} on {q.device.type} (the kernels take bf16 on the GPU)"
    if q.shape[-1] not in GDN_KEY_HEAD_DIMS or v.shape[-1] % 32:
        return f"head dims {q.shape[-1]} / {v.shape[-1]} (kernels: key {GDN_KEY_HEAD_DIMS}, value a multiple of 32)"
    if states is not None and not states.is_contiguous():
        return "a non-contiguous state cache"
    return None


def _elementwise_cause(x: torch.Tensor, *others: torch.Tensor) -> str:
    """Why an element-wise kernel does not take `x` (categories, not shapes: one report each)."""
    dtypes = {str(t.dtype) for t in (x, *others)}
    if not x.is_cuda or dtypes != {"torch.bfloat16"}:
        return f"tensors {', '.join(sorted(dtypes))} on {x.device.type} (the kernels take bf16 on the GPU)"
    if x.shape[-1] % 8:
        return f"last dimension not a multiple of 8 (or 16 for gating): {x.shape[-1]}"
    return "a layout the kernel does not take (strides, alignment or rank)"


def prefill_maps(ctx, tokens: int, block_tokens: int):
    """(query_seq, query_ctx, query_blocks or None) of a prefill step, made once per step and kept on its context:
    every layer of the step reuses them (about ten small device ops each otherwise)."""
    cached = getattr(ctx, "_adaq_prefill_maps", None)
    if (cached is not None and cached[0] == (tokens, block_tokens) and cached[1] is ctx.cu_seqlens_q
            and cached[2] is ctx.context_lens):
        return cached[3]
    query_seq, query_ctx = prefill_queries(ctx, tokens)
    blocks = ops.prefill_query_blocks(ctx.query_offsets(), tokens, block_tokens) if block_tokens > 1 else None
    maps = (query_seq, query_ctx, blocks)
    ctx._adaq_prefill_maps = ((tokens, block_tokens), ctx.cu_seqlens_q, ctx.context_lens, maps)
    return maps


def prefill_queries(ctx, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query token: its sequence and how many keys it sees (causal), without a host sync."""
    offsets = ctx.query_offsets().long()
    q_lens = offsets[1:] - offsets[:-1]
    seqs = torch.arange(q_lens.numel(), device=q_lens.device)
    query_seq = torch.repeat_interleave(seqs, q_lens, output_size=tokens)
    index_in_seq = torch.arange(tokens, device=q_lens.device) - offsets[:-1][query_seq]
    first_ctx = ctx.context_lens.long() - q_lens + 1
    query_ctx = first_ctx[query_seq] + index_in_seq
    return query_seq.int(), query_ctx.int()


__all__ = ["CudaBackend", "KernelLinearHandle", "KernelExpertsHandle"]
