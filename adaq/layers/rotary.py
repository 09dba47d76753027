"""Rotary position embeddings (rotate-half layout, as transformers applies them to Qwen3 and Gemma3)."""

import torch

from adaq.errors import UnsupportedArchitecture

SUPPORTED_ROPE_TYPES = ("default", "linear")


def inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """fp32 [head_dim / 2] from a transformers `rope_parameters` entry (`rope_theta`, `rope_type`, `factor`)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitecture(f"RoPE type {rope_type!r} is not supported (supported: "
                                      f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    return inv_freq


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, D] cos and sin: angles in fp32, then rounded to the compute dtype (as transformers does)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hkv, D] rotated by their token positions [T]."""
    cos, sin = cos_sin(positions, inv_freq, q.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
