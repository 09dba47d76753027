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
    nothing is kept (warm-up).

    Tensor parallelism splits the heads: a rank holds Hk / N key heads and the Hv / N value heads that read them
    (value head h reads key head h // (Hv / Hk), so both shares are contiguous), i.e. those rows of in_proj's q, k,
    v, z, b and a, those conv channels, A_log and dt_bias entries, and those columns of out_proj (row-parallel, one
    all-reduce); the norm weight (one per value dim) is whole on every rank. Head counts below are this rank's."""

    def __init__(self, backend: Backend, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, conv_kernel: int, eps: float):
        super().__init__()
        if num_v_heads % num_k_heads:
            raise CheckpointError(f"linear_num_value_heads {num_v_heads} is not a multiple of "
                                  f"linear_num_key_heads {num_k_heads}")
        self.backend = backend
        tp = backend.tp
        self.k_share = tp.split(num_k_heads, "Gated DeltaNet key heads") if tp.sharded else (0, num_k_heads)
        self.v_share = tp.split(num_v_heads, "Gated DeltaNet value heads") if tp.sharded else (0, num_v_heads)
        self.global_key_dim = num_k_heads * head_k_dim
        num_k_heads, num_v_heads = num_k_heads // tp.size, num_v_heads // tp.size
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel = conv_kernel
        self.eps = eps
        # q|k|v, z, b, a: one GEMM when the four weights fuse (llm-compressor's recipes keep them all bf16).
        self.in_proj = Linear(backend, hidden_size, [self.conv_dim, self.value_dim, num_v_heads, num_v_heads],
                              role="in_proj")
        self.out_proj = Linear(backend, self.value_dim, hidden_size, role="out_proj", reduce=True)
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

    @property
    def sharded(self) -> bool:
        return self.backend.tp.sharded

    def qkv_rows(self) -> list[tuple[int, int]] | None:
        """This rank's rows of in_proj_qkv (and channels of conv1d): its q, k and v heads."""
        if not self.sharded:
            return None
        (k0, k1), (v0, v1), dk, dv = self.k_share, self.v_share, self.head_k_dim, self.head_v_dim
        keys = self.global_key_dim
        return [(k0 * dk, k1 * dk), (keys + k0 * dk, keys + k1 * dk), (2 * keys + v0 * dv, 2 * keys + v1 * dv)]

    def value_rows(self, per_head: int) -> tuple[int, int] | None:
        return None if not self.sharded else (self.v_share[0] * per_head, self.v_share[1] * per_head)

    def load(self, reader, prefix: str) -> None:
        rows = [self.qkv_rows(), self.value_rows(self.head_v_dim), self.value_rows(1), self.value_rows(1)]
        names = [f"{prefix}.in_proj_{p}" for p in ("qkv", "z", "b", "a")]
        self.load_projections([reader.linear(n, r) for n, r in zip(names, rows)], reader, prefix)

    def load_projections(self, in_weights: list[Weight], reader, prefix: str) -> None:
        """in_weights: q|k|v [C, hidden], z [Hv Dv, hidden], b and a [Hv, hidden] (de-interleaved already)."""
        device, dtype = self.backend.device, reader.dtype
        self.in_proj.load(in_weights, dtype)
        self.out_proj.load(reader.linear(f"{prefix}.out_proj", cols=self.value_rows(self.head_v_dim)), dtype)
        conv = reader.tensor(f"{prefix}.conv1d.weight", self.qkv_rows())
        if tuple(conv.shape) != (self.conv_dim, 1, self.conv_kernel):
            raise CheckpointError(f"{prefix}.conv1d.weight of shape {tuple(conv.shape)} where "
                                  f"{(self.conv_dim, 1, self.conv_kernel)} was expected")
        self.conv_weight = conv[:, 0].to(device=device, dtype=dtype)
        self.a_log = reader.tensor(f"{prefix}.A_log", self.value_rows(1)).to(device=device, dtype=dtype)
        self.dt_bias = reader.tensor(f"{prefix}.dt_bias", self.value_rows(1)).to(device=device, dtype=dtype)
        self.norm_weight = reader.tensor(f"{prefix}.norm.weight").to(device=device, dtype=dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ctx, backend, tokens = get_context(), self.backend, hidden.shape[0]
        qkv, z, b, a = self.in_proj(hidden).split(self.in_proj.out_sizes, dim=-1)
        qkv = backend.causal_conv1d(qkv, self.conv_weight, self.conv_state, ctx)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        out = backend.gated_delta_rule(q.reshape(tokens, self.num_k_heads, self.head_k_dim),
                                       k.reshape(tokens, self.num_k_heads, self.head_k_dim),
                                       v.reshape(tokens, self.num_v_heads, self.head_v_dim), a, b, self.a_log,
                                       self.dt_bias, self.ssm_state, ctx)
        out = backend.gated_rms_norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim),
                                     self.norm_weight, self.eps)
        return self.out_proj(out.reshape(tokens, self.value_dim))
