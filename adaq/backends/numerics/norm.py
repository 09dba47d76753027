"""RMSNorm, in the two flavours the supported models use."""

import torch

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Normalise in fp32. Qwen3: w * normed.to(dtype). Gemma3 (unit_offset): (normed * (1 + w)) in fp32, then dtype.

    The two orders of rounding are the ones transformers uses; they differ only in bf16.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)
