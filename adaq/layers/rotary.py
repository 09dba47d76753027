"""Rotary position embeddings (rotate-half layout, as transformers applies them to Qwen3 and Gemma3)."""

import torch

from adaq.errors import UnsupportedArchitecture

# RoPE whose tables do not depend on the sequence length ("dynamic" and "longrope" do). "proportional" (Gemma 4's
# global layers): the first partial_rotary_factor of the frequencies rotate, the rest are zero (cos 1, sin 0).
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")


class RopeTables:
    """Per model: one inv_freq tensor per distinct RoPE setting, on the model's device (layers share it, and so
    the backend's cos/sin memo), with transformers' attention factor (YaRN's mscale). That factor multiplies cos
    and sin, i.e. q.k by its square: the models fold it into the attention scale."""

    def __init__(self, config, device: torch.device):
        self.config = config
        self.device = device
        self.tables: dict[tuple, tuple[torch.Tensor, float]] = {}

    def __call__(self, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        params = self.config.rope_parameters
        per_type = layer_type is not None and layer_type in params  # Gemma3: one entry per layer type
        key = (head_dim, layer_type if per_type else None)
        if key not in self.tables:
            rope = params[layer_type] if per_type else params
            inv_freq, factor = rope_frequencies(self.config, head_dim, rope, layer_type if per_type else None)
            self.tables[key] = (inv_freq.to(self.device), factor)
        return self.tables[key]


def rope_frequencies(config, head_dim: int, rope: dict, layer_type: str | None) -> tuple[torch.Tensor, float]:
    """(fp32 inv_freq [head_dim / 2], attention factor); scaled types come from transformers' own functions."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitecture(f"RoPE type {rope_type!r} is not supported (supported: "
                                      f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type in ("default", "linear"):
        return inverse_frequencies(head_dim, rope), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    extra = {"layer_type": layer_type} if layer_type else {}
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **extra)
    return inv_freq.float(), float(factor)


def inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """fp32 [head_dim / 2] of plain or linearly scaled RoPE from a `rope_parameters` entry (`rope_theta`, `factor`)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    return inv_freq


