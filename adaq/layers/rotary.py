"""Rotary position embeddings (rotate-half layout, as transformers applies them to Qwen3 and Gemma3)."""

import torch

from adaq.errors import UnsupportedArchitecture

SUPPORTED_ROPE_TYPES = ("default", "linear")


class InverseFrequencies:
    """One inv_freq tensor per distinct RoPE setting of a model, on its device (so layers share it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tables: dict[tuple, torch.Tensor] = {}

    def __call__(self, head_dim: int, rope: dict) -> torch.Tensor:
        key = (head_dim, tuple(sorted((k, str(v)) for k, v in rope.items())))
        if key not in self.tables:
            self.tables[key] = inverse_frequencies(head_dim, rope).to(self.device)
        return self.tables[key]


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


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hkv, D] rotated by the cos/sin [T, D] of their positions."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class CosSinMemo:
    """The cos/sin of the last positions tensor seen with each inv_freq tensor: layers that share both (one
    forward, one RoPE base) compute them once."""

    def __init__(self):
        self.entries: dict[int, tuple] = {}

    def get(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        entry = self.entries.get(id(inv_freq))
        if entry is not None and entry[0] is inv_freq and entry[1] is positions and entry[2].dtype == dtype:
            return entry[2], entry[3]
        cos, sin = cos_sin(positions, inv_freq, dtype)
        self.entries[id(inv_freq)] = (inv_freq, positions, cos, sin)
        return cos, sin
