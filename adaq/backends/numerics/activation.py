"""Gated activations on a [T, 2I] gate|up tensor -> [T, I]."""

import torch
import torch.nn.functional as F

from adaq.errors import UnsupportedArchitecture

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def activation_kind(name: str) -> str:
    """Map a transformers activation name to 'silu' or 'gelu_tanh'."""
    if name not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]
