"""NVFP4 scale search: per 16-value block, the E4M3 scale that minimises the block's (weighted) squared error.

Round-to-nearest takes `e4m3(global_scale * amax / 6)`: the block's largest value lands on the top E2M1 code and the
E4M3 rounding of that scale decides the rest. Both choices are free in the format. The search tries the E4M3 codes
around that scale — smaller steps that clip the largest value, larger steps that put it on a smaller top code (4 or
3, where the grid is finer relative to the step) — and keeps, per block, the one with the least error. RTN's own
scale is always the first candidate and wins ties, so no block ever gets worse than RTN at the same global scale.

The error may be weighted per input channel (`importance`, e.g. calibration E[x²]): that is the activation-aware
variant. The global scale can be searched too, over fractions of one E4M3 step below RTN's; its candidates are
bf16-representable because compressed-tensors rounds global scales through the model dtype when it loads them.
"""

from dataclasses import asdict, dataclass

import torch

from adaq.errors import AdaqError
from adaq.formats.nvfp4 import (
    FP4_MAX,
    FP8_MAX,
    GROUP_SIZE,
    NVFP4Weight,
    block_scales,
    check_quantizable,
    e2m1_encode,
    effective_scales,
    global_scale_from_amax,
    pack_nibbles,
    tensor_amax,
)
from adaq.quant.methods import register_method

_E4M3_MAX_CODE = 0x7E  # 448; 0x7F is NaN in float8_e4m3fn
_CHUNK_ELEMENTS = 1 << 23  # candidates x rows x K per vectorised step: ~32 MB per fp32 temporary


@dataclass(frozen=True)
class SearchConfig:
    """Which E4M3 codes the block search tries, relative to the code of `global_scale * amax / 6`."""

    codes_below: int = 5  # smaller steps (each code ~1/8 octave): the block's largest value clips to 6
    codes_above: int = 14  # larger steps: the largest value lands on a smaller top code (8 codes = 2x, 14 = ~3.4x)
    global_steps: int = 1  # global-scale candidates per E4M3 step (1 = keep RTN's global scale)

    def __post_init__(self):
        for field in ("codes_below", "codes_above"):
            if not 0 <= getattr(self, field) <= 32:
                raise AdaqError(f"SearchConfig.{field} must be in 0..32, got {getattr(self, field)}")
        if not 1 <= self.global_steps <= 16:
            raise AdaqError(f"SearchConfig.global_steps must be in 1..16, got {self.global_steps}")


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E2M1 value, exactly as e2m1_encode + decode would (ties to even, saturation at 6).

    The grid is uniform within [0, 2), [2, 4) and [4, 6] (steps 0.5, 1, 2), so rounding is torch.round (half to
    even, as the codec's ties are) at a power-of-two scale per range: exact, and a few SIMD passes."""
    magnitude = x.abs()
    unit = torch.where(magnitude < 2, 2.0, torch.where(magnitude < 4, 1.0, 0.5))
    return torch.copysign(torch.round(magnitude * unit).div_(unit).clamp_(max=FP4_MAX), x)


def block_errors(weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                 importance: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of each block [N, K/16] when `weight` is quantized with the given scales (weighted per column)."""
    blocks = weight.float().unflatten(-1, (-1, GROUP_SIZE))
    step = effective_scales(block_scale, global_scale).unsqueeze(-1)
    error = (blocks - e2m1_round(blocks / step) * step).square()
    if importance is not None:
        error = error * importance.float().unflatten(-1, (-1, GROUP_SIZE))
    return error.sum(-1)


def _candidate_codes(weight: torch.Tensor, global_scale: torch.Tensor, config: SearchConfig) -> torch.Tensor:
    """[C, N, K/16] E4M3 codes: RTN's first, then a window around the unclamped ideal code."""
    rtn_code = block_scales(weight, global_scale).view(torch.uint8)
    ideal = global_scale.float() * weight.float().unflatten(-1, (-1, GROUP_SIZE)).abs().amax(-1) / FP4_MAX
    ideal_code = ideal.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    offsets = torch.arange(-config.codes_below, config.codes_above + 1, dtype=torch.int16, device=weight.device)
    window = (ideal_code.unsqueeze(0) + offsets.view(-1, 1, 1)).clamp(1, _E4M3_MAX_CODE)
    return torch.cat([rtn_code.to(torch.int16).unsqueeze(0), window]).to(torch.uint8)


def _best_codes(weight: torch.Tensor, global_scale: torch.Tensor, importance: torch.Tensor | None,
                config: SearchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the candidate code with the least error (first one on ties) and that error.

    All candidates are evaluated in one broadcast [C, N, K/16, 16] pass: few large ops, which matters on a busy
    2-core CPU, where each parallel op can wait a scheduler slice for its second thread."""
    codes = _candidate_codes(weight, global_scale, config)
    step = effective_scales(codes.view(torch.float8_e4m3fn), global_scale).unsqueeze(-1)
    blocks = weight.float().unflatten(-1, (-1, GROUP_SIZE)).unsqueeze(0)
    error = (blocks - e2m1_round(blocks / step) * step).square()
    if importance is not None:
        error = error * importance.float().unflatten(-1, (-1, GROUP_SIZE))
    errors = error.sum(-1)
    best = errors.argmin(0, keepdim=True)
    return codes.gather(0, best)[0], errors.gather(0, best)[0]


def search_block_scales(weight: torch.Tensor, global_scale: torch.Tensor, importance: torch.Tensor | None = None,
                        config: SearchConfig = SearchConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 block scales [N, K/16] minimising each block's (weighted) squared error, and those errors (fp32)."""
    check_quantizable(weight)
    global_scale = global_scale.float().reshape(1).to(weight.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // ((config.codes_below + config.codes_above + 2) * weight.shape[1]))
    results = [_best_codes(chunk, global_scale, importance, config) for chunk in weight.split(rows_per_chunk)]
    codes = torch.cat([codes for codes, _ in results])
    return codes.view(torch.float8_e4m3fn), torch.cat([errors for _, errors in results])


def global_scale_candidates(base: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """`base` and `steps - 1` bf16-representable scales spread over one E4M3 step (2^(1/8)) below it."""
    factors = [2.0 ** (-i / (8 * steps)) for i in range(steps)]
    candidates = [(base.float() * f).to(torch.bfloat16).float().reshape(1) for f in factors]
    candidates[0] = base.float().reshape(1)
    unique: list[torch.Tensor] = []
    for candidate in candidates:
        if all(candidate.item() != seen.item() for seen in unique):
            unique.append(candidate)
    return unique


def search_global_scale(weights: list[torch.Tensor], base: torch.Tensor,
                        importances: list[torch.Tensor | None] | None = None,
                        config: SearchConfig = SearchConfig()) -> torch.Tensor:
    """The global scale (shared by a fused group of weights) whose block search gives the least total error."""
    importances = importances or [None] * len(weights)
    best_scale, best_error = base.float().reshape(1), float("inf")
    for candidate in global_scale_candidates(base, config.global_steps):
        total = sum(search_block_scales(w, candidate, imp, config)[1].double().sum().item()
                    for w, imp in zip(weights, importances))
        if total < best_error:
            best_scale, best_error = candidate, total
    return best_scale


def encode(weight: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> NVFP4Weight:
    """Pack `weight` with given scales, rounding each value to the nearest E2M1 code (the reference encoder)."""
    check_quantizable(weight)
    global_scale = global_scale.float().reshape(1).to(weight.device)
    step = effective_scales(block_scale, global_scale).unsqueeze(-1)
    codes = e2m1_encode(weight.float().unflatten(-1, (-1, GROUP_SIZE)) / step).flatten(-2)
    return NVFP4Weight(pack_nibbles(codes), block_scale, global_scale)


def rtn_global_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """RTN's global scale for a fused group: 448 * 6 / amax over all of them, in their dtype (as llm-compressor)."""
    return global_scale_from_amax(torch.stack([tensor_amax(w) for w in weights]).amax())


def quantize_searched(weight: torch.Tensor, global_scale: torch.Tensor | None = None,
                      importance: torch.Tensor | None = None, config: SearchConfig = SearchConfig()) -> NVFP4Weight:
    """NVFP4 of one weight with searched block scales (and RTN's global scale unless one is given)."""
    if global_scale is None:
        global_scale = rtn_global_scale([weight])
    scales, _ = search_block_scales(weight, global_scale, importance, config)
    return encode(weight, scales, global_scale)


@register_method("search", "MSE scale search: per-block E4M3 scale with the least squared error (no calibration "
                           "for weights; W4A4 still calibrates input scales)")
def quantize_search(job):
    from functools import partial

    from adaq.formats.checkpoint import open_checkpoint
    from adaq.quant.methods import MethodResult
    from adaq.quant.plan import plan_linears
    from adaq.quant.rtn import input_global_scales, quantize_checkpoint

    checkpoint = open_checkpoint(job.source)
    plan = plan_linears(checkpoint, job.recipe)
    input_scales = None
    if job.scheme == "nvfp4":
        from adaq.quant.calibration import calibrate_input_amax

        input_scales = input_global_scales(plan, calibrate_input_amax(job, plan))
    quantize_checkpoint(checkpoint, job.out_dir, plan, job.scheme, input_scales, job.device, job.progress,
                        quantize_fn=partial(quantize_searched, importance=None, config=SearchConfig()))
    return MethodResult(quantized=plan.quantize, kept=plan.ignored, notes={"search": asdict(SearchConfig())})
