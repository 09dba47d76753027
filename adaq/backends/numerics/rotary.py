"""Rotary position embeddings applied (rotate-half layout, as transformers applies them to Qwen3 and Gemma3)."""

import torch

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
