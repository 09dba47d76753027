"""Gated DeltaNet linear attention (Qwen3.5, Qwen3-Next): input projections, causal conv1d over q|k|v, the gated
delta rule with a per-sequence recurrent state, gated RMSNorm, output projection. Numerics:
adaq.backends.numerics.gated_delta; the states live in the engine's state cache, whose slots the step context names."""

import torch
from torch import nn

from adaq.backends.context import get_context
from adaq.backends.handles import Weight
from adaq.backends.interface import Backend
from adaq.errors import CheckpointError
from adaq.layers.linear import Linear


class GatedDeltaNet(nn.Module):
    """The model runner sets `conv_state` [slots, C, Kc-1] (compute dtype) and `ssm_state` [slots, Hv, Dk, Dv]
    (fp32) after it allocates the state cache; while they are None every sequence starts from zero states and
    nothing is kept (warm-up)."""

    def __init__(self, backend: Backend, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, conv_kernel: int, eps: float):
        super().__init__()
        if num_v_heads % num_k_heads:
            raise CheckpointError(f"linear_num_value_heads {num_v_heads} is not a multiple of "
                                  f"linear_num_key_heads {num_k_heads}")
        self.backend = backend
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel = conv_kernel
        self.eps = eps
        # q|k|v, z, b, a: one GEMM when the four weights fuse (llm-compressor's recipes keep them all bf16).
        self.in_proj = Linear(backend, hidden_size, [self.conv_dim, self.value_dim, num_v_heads, num_v_heads],
                              role="in_proj")
        self.out_proj = Linear(backend, self.value_dim, hidden_size, role="out_proj")
        self.conv_weight: torch.Tensor | None = None  # [C, Kc]
        self.a_log: torch.Tensor | None = None
        self.dt_bias: torch.Tensor | None = None
        self.norm_weight: torch.Tensor | None = None
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    def conv_state_shape(self) -> tuple[int, int]:
        return self.conv_dim, self.conv_kernel - 1

    def ssm_state_shape(self) -> tuple[int, int, int]:
        return self.num_v_heads, self.head_k_dim, self.head_v_dim

    def load(self, reader, prefix: str) -> None:
        names = [f"{prefix}.in_proj_{p}" for p in ("qkv", "z", "b", "a")]
        self.load_projections([reader.linear(n) for n in names], reader, prefix)

    def load_projections(self, in_weights: list[Weight], reader, prefix: str) -> None:
        """in_weights: q|k|v [C, hidden], z [Hv Dv, hidden], b and a [Hv, hidden] (de-interleaved already)."""
        device, dtype = self.backend.device, reader.dtype
        self.in_proj.load(in_weights, dtype)
        self.out_proj.load(reader.linear(f"{prefix}.out_proj"), dtype)
        conv = reader.tensor(f"{prefix}.conv1d.weight")
        if tuple(conv.shape) != (self.conv_dim, 1, self.conv_kernel):
            raise CheckpointError(f"{prefix}.conv1d.weight of shape {tuple(conv.shape)} where "
                                  f"{(self.conv_dim, 1, self.conv_kernel)} was expected")
        self.conv_weight = conv[:, 0].to(device=device, dtype=dtype)
        self.a_log = reader.tensor(f"{prefix}.A_log").to(device=device, dtype=dtype)
        self.dt_bias = reader.tensor(f"{prefix}.dt_bias").to(device=device, dtype=dtype)
        self.norm_weight = reader.tensor(f"{prefix}.norm.weight").to(device=device, dtype=dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ctx, backend, tokens = get_context(), self.backend, hidden.shape[0]
        qkv, z, b, a = self.in_proj(hidden).split(self.in_proj.out_sizes, dim=-1)
        qkv = backend.causal_conv1d(qkv.contiguous(), self.conv_weight, self.conv_state, ctx)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        out = backend.gated_delta_rule(q.reshape(tokens, self.num_k_heads, self.head_k_dim),
                                       k.reshape(tokens, self.num_k_heads, self.head_k_dim),
                                       v.reshape(tokens, self.num_v_heads, self.head_v_dim), a, b, self.a_log,
                                       self.dt_bias, self.ssm_state, ctx)
        out = backend.gated_rms_norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim),
                                     self.norm_weight, self.eps)
        return self.out_proj(out.reshape(tokens, self.value_dim))
