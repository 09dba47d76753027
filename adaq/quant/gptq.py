"""GPTQ for NVFP4 with searched block scales.

GPTQ (Frantar et al., 2022) quantizes a weight column by column and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's calibration inputs (H = E[x xᵀ]), so that
the layer's *output* error is what gets minimised. Here each 16-column NVFP4 block gets its E4M3 scale when GPTQ
reaches it, from the scale search run on the already error-compensated weights of that block, weighted by diag(H);
values are then rounded one column at a time against that step. The output is ordinary NVFP4: codes, E4M3 block
scales and the fused group's global scale (RTN's), so every runtime reads it unchanged.

llm-compressor's own GPTQ (GPTQModifier with scheme NVFP4A16 / NVFP4) runs through `run_llmcompressor_recipe`
with the recipes in adaq/recipes/gptq_*.yaml.
"""

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from adaq.errors import AdaqError
from adaq.formats.nvfp4 import GROUP_SIZE, NVFP4Weight, block_scales, check_quantizable
from adaq.quant.methods import register_method
from adaq.quant.scale_search import SearchConfig, e2m1_round, encode, search_block_scales

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the Cholesky factorisation stable
    block_size: int = 128  # columns per lazy batch update (a multiple of 16)
    search: SearchConfig | None = SearchConfig()  # None: RTN block scales (from the compensated weights)

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise AdaqError(f"GPTQConfig.damp must be in (0, 1), got {self.damp}")
        if self.block_size < GROUP_SIZE or self.block_size % GROUP_SIZE:
            raise AdaqError(f"GPTQConfig.block_size must be a positive multiple of {GROUP_SIZE}, got {self.block_size}")


def _inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead input channels get H = 1 and zero weights."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h += torch.eye(len(h), dtype=h.dtype, device=h.device) * damp * torch.diag(h).mean()
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True).float()
    except torch.linalg.LinAlgError:
        raise AdaqError("GPTQ: the calibration Hessian is not positive definite; raise the damping "
                        "or the number of calibration samples") from None


def _block_scale(block: torch.Tensor, global_scale: torch.Tensor, importance: torch.Tensor,
                 search: SearchConfig | None) -> torch.Tensor:
    if search is None:
        return block_scales(block, global_scale)[:, 0]
    return search_block_scales(block, global_scale, importance, search)[0][:, 0]


@contextmanager
def _one_cpu_thread():
    """The column loop is thousands of small ops: on a busy 2-core CPU a second OpenMP thread makes each one wait
    for a scheduler slice (measured 7x slower); one thread loses nothing on an idle machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, global_scale: torch.Tensor,
                  config: GPTQConfig = GPTQConfig()) -> NVFP4Weight:
    """NVFP4 of `weight` [N, K] minimising ||(W - Q) X||² for inputs with E[x xᵀ] = `hessian` [K, K]."""
    check_quantizable(weight)
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise AdaqError(f"GPTQ: Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    global_scale = global_scale.float().reshape(1).to(weight.device)
    w = weight.float().clone()
    importance = torch.diag(hessian).float()
    hinv = _inverse_hessian_factor(hessian, w, config.damp)
    with _one_cpu_thread():
        quantized, scales = _column_loop(w, hinv, importance, global_scale, config)
    return encode(quantized, scales, global_scale)


def _column_loop(w: torch.Tensor, hinv: torch.Tensor, importance: torch.Tensor, global_scale: torch.Tensor,
                 config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's sweep over the columns (lazy batch updates of `block_size` columns): the quantized values, the scales."""
    n, k = w.shape
    scales = torch.empty(n, k // GROUP_SIZE, dtype=torch.float8_e4m3fn, device=w.device)
    quantized = torch.empty_like(w)
    for start in range(0, k, config.block_size):
        end = min(start + config.block_size, k)
        block, errors = w[:, start:end].clone(), torch.empty(n, end - start, device=w.device)
        h_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % GROUP_SIZE == 0:
                group = slice(i, i + GROUP_SIZE)
                scale = _block_scale(block[:, group], global_scale, importance[column:column + GROUP_SIZE],
                                     config.search)
                scales[:, column // GROUP_SIZE] = scale
                step = scale.float() / global_scale
            q = e2m1_round(block[:, i] / step) * step
            quantized[:, column] = q
            errors[:, i] = (block[:, i] - q) / h_block[i, i]
            block[:, i:] -= errors[:, i:i + 1] * h_block[i, i:].unsqueeze(0)
        w[:, end:] -= errors @ hinv[start:end, end:]
    return quantized, scales


def gptq_quantize_group(weights: list[torch.Tensor], hessian: torch.Tensor, global_scale: torch.Tensor,
                        config: GPTQConfig = GPTQConfig()) -> list[NVFP4Weight]:
    """GPTQ of Linears that read the same input (q/k/v, gate/up): one pass over their stacked rows."""
    stacked = gptq_quantize(torch.cat([w.float() for w in weights]), hessian, global_scale, config)
    rows = [w.shape[0] for w in weights]
    return [NVFP4Weight(packed, scale, stacked.global_scale.clone())
            for packed, scale in zip(stacked.packed.split(rows), stacked.block_scale.split(rows))]


def recipe_path(scheme: str) -> Path:
    """The shipped llm-compressor GPTQ recipe for an NVFP4 scheme ("nvfp4a16" or "nvfp4")."""
    path = RECIPES_DIR / f"gptq_{scheme.lower()}.yaml"
    if not path.is_file():
        raise AdaqError(f"no GPTQ recipe for scheme {scheme!r} (looked for {path})")
    return path


def gptq_group(config: GPTQConfig = GPTQConfig()):
    """An adaq.quant.activation_aware.GroupQuantizer running GPTQ on a fused group's stacked rows."""
    return lambda weights, stats, global_scale: gptq_quantize_group(weights, stats.hessian, global_scale, config)


@register_method("gptq", "GPTQ with searched E4M3 block scales, layer by layer on calibration text (needs "
                         "--calib-data); the most accurate", needs_calibration=True)
def quantize_gptq(job):
    from adaq.quant.activation_aware import quantize_calibrated

    config = GPTQConfig()
    return quantize_calibrated(job, gptq_group(config), with_hessian=True,
                               notes={"gptq": {"damp": config.damp, "block_size": config.block_size,
                                               "search": asdict(config.search)}})


def llmcompressor_recipe(scheme: str, ignore: list[str], targets: list[str]) -> str:
    """The shipped GPTQModifier recipe for the scheme, with the job's targets and ignore list."""
    document = yaml.safe_load(recipe_path(scheme).read_text())
    modifier = document["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    modifier.update(scheme=scheme.upper(), ignore=list(ignore), targets=list(targets))
    return yaml.safe_dump(document, sort_keys=False)


@register_method("gptq-llmcompressor", "llm-compressor's GPTQModifier with the NVFP4 scheme "
                                       "(recipes/gptq_<scheme>.yaml; needs --calib-data and adaq[quant])",
                 needs_calibration=True)
def quantize_gptq_llmcompressor(job):
    from dataclasses import replace

    from adaq.quant.llmcompressor_method import quantize_llmcompressor
    from adaq.quant.recipe import parse_recipe

    text = llmcompressor_recipe(job.scheme, job.recipe.ignore, job.recipe.targets)
    source = str(recipe_path(job.scheme))
    recipe = parse_recipe(text.replace("GPTQModifier", "QuantizationModifier"), source)
    recipe.document = yaml.safe_load(text)
    return quantize_llmcompressor(replace(job, recipe=recipe))
