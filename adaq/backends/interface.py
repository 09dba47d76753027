"""What layers may call on a backend, with shapes. Both backends (reference, cuda) implement all of it.

Hybrid models (Gated DeltaNet): Hk key / Hv value heads of Dk / Dv dims, conv channels C = 2 Hk Dk + Hv Dv, conv
kernel Kc; per-sequence states live in slots (`ctx.state_slots`), numerics in adaq.backends.numerics.gated_delta.

T tokens of one step packed one sequence after another, H query heads and Hkv KV heads of D dims, hidden size K,
output features N, experts E, intermediate size I. Weights (`Weight`: an NVFP4Weight or a dense [N, K] tensor)
reach a backend once, at load, through `prepare_*`, which returns a handle the layer passes back on every call.
Activations arrive in the model's compute dtype and come back in it.
"""

from typing import Protocol

import torch

from adaq.backends.context import Context
from adaq.backends.handles import ExpertsHandle, LinearHandle, Weight
from adaq.backends.parallel import TPGroup


class Backend(Protocol):
    name: str
    device: torch.device
    tp: TPGroup  # the tensor-parallel group whose shard this backend runs (adaq.backends.parallel; SINGLE: one rank)

    def prepare_linear(self, weight: Weight, *, dtype: torch.dtype, role: str | None = None) -> LinearHandle:
        """At load: keep (or repack) one weight. `role` names the projection (qkv_proj, o_proj, gate_up_proj,
        down_proj) for paths that treat roles differently."""

    def linear(self, x: torch.Tensor, handle: LinearHandle, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [.., K] -> [.., N] = x W^T (+ bias)."""

    def prepare_experts(self, gate_up: list[list[Weight]], down: list[Weight], *, dtype: torch.dtype) -> ExpertsHandle:
        """At load: per expert its [gate, up] weights ([I, K] each) and its down weight ([K, I])."""

    def qk_norm_rope_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                           k_weight: torch.Tensor, eps: float, unit_offset: bool, positions: torch.Tensor,
                           inv_freq: torch.Tensor, k_cache, v_cache, k_scale, v_scale,
                           slot_mapping: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k, v [T, Hkv, D] -> q: rms_norm of q and k (q_weight, k_weight [D]), rotary, then store_kv
        of k and v; exactly that composition (one kernel on the cuda backend)."""

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertsHandle, top_k: int,
            renormalize: bool, *, activation: str = "silu", expert_scale: torch.Tensor | None = None,
            shared_expert: bool = False) -> torch.Tensor:
        """x [T, K], router_logits [T, E] -> [T, K]: softmax in fp32, top-k, optional renormalisation, experts'
        outputs summed in ascending expert order. `activation` gates the experts ("silu" or "gelu_tanh");
        `expert_scale` [E] (Gemma 4) multiplies each chosen expert's fp32 weight after renormalisation.
        `shared_expert`: the last of the E + 1 experts is a shared expert that every token runs, weighted by
        sigmoid of the logits' last column (adaq.backends.numerics.moe.moe_shared_reference)."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
        """k, v [T, Hkv, D] into caches [blocks, block_size, Hkv, D] (FP8 scales [blocks, block_size, Hkv]; NVFP4:
        uint8 caches [..., D/2 + D/16] and uint8 exponents [blocks, block_size, Hkv]) at slot_mapping [T] (-1: skip)."""

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                  k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, ctx: Context, *, scale: float,
                  sliding_window: int | None = None, softcap: float | None = None, k: torch.Tensor | None = None,
                  v: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, H, D] over each sequence's cached keys -> [T, H, D]; without caches, over the step's own k/v."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, *, unit_offset: bool = False) -> torch.Tensor:
        """x [T, K] normalised in fp32, times w (or Gemma's 1 + w with unit_offset)."""

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream's step: (x + delta, rms_norm(x + delta)), [T, K] each."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """gate|up [T, 2I] -> [T, I]."""

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """gate|up [T, 2I] -> [T, I]."""

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D] rotated (rotate-half layout) at positions [T] with inv_freq fp32 [D/2]."""

    # ---- hybrid models: Gated DeltaNet layers and gated attention (Qwen3.5, Qwen3-Next) ----
    def moe_shared(self, routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        """routed [T, K] + sigmoid(gate_logits [T, 1]) * shared [T, K]: the shared expert's gated contribution."""

    def sigmoid_gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(gate), [T, N] each: the gated attention's output gate."""

    def gdn_gates(self, a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor,
                  dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b [T, Hv] -> (g = -exp(A_log) softplus(a + dt_bias) in fp32, beta = sigmoid(b))."""

    def causal_conv1d(self, x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor | None,
                      ctx: Context) -> torch.Tensor:
        """x [T, C] -> silu(depthwise causal conv) [T, C] with weight [C, Kc]; each sequence continues from its
        slot's state in conv_states [slots, C, Kc-1] (zero state when it has no cached tokens) and leaves its last
        Kc-1 inputs there. conv_states None: zero states, nothing stored (warm-up)."""

    def gated_delta_rule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         a_log: torch.Tensor, dt_bias: torch.Tensor, ssm_states: torch.Tensor | None,
                         ctx: Context) -> torch.Tensor:
        """q, k [T, Hk, Dk], v [T, Hv, Dv], the raw gate inputs a, b [T, Hv] (gates as `gdn_gates`, so that a decode
        kernel computes them in place) -> [T, Hv, Dv]; recurrent states fp32 [slots, Hv, Dk, Dv] read and updated
        per sequence as for `causal_conv1d`."""

    def gated_rms_norm(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x, z [N, Dv] -> w * rms_norm(x) * silu(z)."""
