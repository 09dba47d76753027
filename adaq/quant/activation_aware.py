"""Activation-aware NVFP4: calibration statistics gathered one decoder layer at a time, and the methods built on them.

The model runs on calibration text (WikiText-2 *valid*, never the test split) layer by layer: the hidden states
entering layer i are kept for all samples, hooks on the layer's Linear modules accumulate per-input-channel E[x²]
(and, for GPTQ, the full X^T X), the layer is quantized, and — when `sequential` — re-run with its quantized weights
so that layer i+1 is calibrated on the inputs it will really see. Memory: samples x seq_len x hidden fp32 for the
hidden states (64 x 512 x 640 x 4 B = 84 MB on Gemma3-270M) plus one layer's statistics.

`--method search-act` weights each block's squared error by its input channels' E[x²] when it searches the E4M3
scale (adaq.quant.scale_search): errors on channels that carry large activations cost more. `quantize_calibrated`
is the driver it shares with GPTQ: it loads the model (fp32), runs the layers, quantizes each fused group as it
goes, and writes the checkpoint through the same streaming writer as RTN, so the output holds the same tensors and
config as RTN's and only the codes and block scales differ.
"""

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from adaq.errors import AdaqError
from adaq.formats.nvfp4 import GROUP_SIZE, NVFP4Weight, block_scales, dequantize, global_scale_from_amax
from adaq.quant.methods import register_method
from adaq.quant.scale_search import SearchConfig, e2m1_round, quantize_searched, rtn_global_scale


@dataclass
class InputStats:
    """What a Linear saw: sum of x² per input channel, optionally sum of x xᵀ, and the number of rows."""

    sum_squares: torch.Tensor
    gram: torch.Tensor | None = None
    rows: int = 0
    amax: float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.amax = max(self.amax, x.abs().amax().item())
        self.sum_squares += x.square().sum(0, dtype=torch.float64)
        if self.gram is not None:
            self.gram += x.T @ x  # fp32 product per micro-batch, fp64 running sum
        self.rows += x.shape[0]

    @property
    def mean_square(self) -> torch.Tensor:
        """Per-input-channel E[x²] in fp32: the diagonal of the layer's Hessian, the activation-aware error weight."""
        return (self.sum_squares / max(self.rows, 1)).float()

    @property
    def hessian(self) -> torch.Tensor:
        """E[x xᵀ] in fp32."""
        if self.gram is None:
            raise AdaqError("these statistics were gathered without the full Hessian")
        return (self.gram / max(self.rows, 1)).float()


@dataclass
class CalibrationConfig:
    micro_batch: int = 8  # calibration windows run through a layer at once
    sequential: bool = True  # layer i+1 calibrated on the outputs of the quantized layers 0..i

    def __post_init__(self):
        if self.micro_batch < 1:
            raise AdaqError(f"CalibrationConfig.micro_batch must be at least 1, got {self.micro_batch}")


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.language_model.layers"):
        module = model
        try:
            for name in path.split("."):
                module = getattr(module, name)
        except AttributeError:
            continue
        return module
    raise AdaqError(f"{type(model).__name__}: no decoder layers found at model.layers")


def _layer_kwargs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering layer 0 for each micro-batch, and the keyword arguments each layer is called with."""
    layers = decoder_layers(model)
    first_inputs: list[torch.Tensor] = []
    kwargs_per_layer: list[dict] = [{} for _ in layers]

    def grab(index: int, stop: bool):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                first_inputs.append(hidden.detach())
            if not kwargs_per_layer[index]:
                kwargs_per_layer[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if stop:
                raise _Captured
        return hook

    body = model.model if hasattr(model, "model") else model
    for batch_index, batch in enumerate(ids):
        full_run = batch_index == 0  # one full pass records every layer's kwargs (local vs global attention)
        handles = [layer.register_forward_pre_hook(grab(i, stop=not full_run and i == 0), with_kwargs=True)
                   for i, layer in enumerate(layers)]
        try:
            body(input_ids=batch, use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
    return first_inputs, kwargs_per_layer


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def _gather_stats(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, with_hessian: bool
                  ) -> dict[str, InputStats]:
    """Statistics of every Linear's input; fused siblings (q/k/v, gate/up) read one tensor and share one record."""
    linears = linear_modules(layer)
    stats: dict[str, InputStats] = {}
    handles = []
    for group in FusedGroups().of(list(linears)):
        first = linears[group[0]]
        k, device = first.in_features, first.weight.device
        shared = InputStats(torch.zeros(k, dtype=torch.float64, device=device),
                            torch.zeros(k, k, dtype=torch.float64, device=device) if with_hessian else None)
        stats.update({name: shared for name in group})
        handles.append(first.register_forward_pre_hook(lambda _m, args, s=shared: s.add(args[0].detach())))
    try:
        _run_layer(layer, inputs, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs:
        out = layer(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


LayerQuantizer = Callable[[int, nn.Module, dict[str, InputStats]], None]


@torch.no_grad()
def calibrate_layerwise(model: nn.Module, ids: torch.Tensor, quantize_layer: LayerQuantizer,
                        config: CalibrationConfig, with_hessian: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """Gather each decoder layer's input statistics and hand them to `quantize_layer(index, layer, stats)`.

    With `config.sequential`, layer i+1's inputs come from the already-quantized layers 0..i. Returns the hidden
    states leaving the last layer, per micro-batch.
    """
    layers = decoder_layers(model)
    hidden, kwargs_per_layer = _layer_kwargs(model, ids.split(config.micro_batch))
    for index, layer in enumerate(layers):
        stats = _gather_stats(layer, hidden, kwargs_per_layer[index], with_hessian)
        unquantized_outputs = None if config.sequential else _run_layer(layer, hidden, kwargs_per_layer[index])
        quantize_layer(index, layer, stats)
        hidden = _run_layer(layer, hidden, kwargs_per_layer[index]) if config.sequential else unquantized_outputs
        if progress:
            progress(index + 1, len(layers))
    return hidden


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise AdaqError("decoder layers not found among the model's modules")


@dataclass
class FusedGroups:
    """Linears that share one global scale (their outputs are fused into one GEMM at run time)."""

    groups: list[tuple[str, ...]] = field(default_factory=lambda: [("q_proj", "k_proj", "v_proj"),
                                                                    ("gate_proj", "up_proj")])

    def of(self, names: list[str]) -> list[list[str]]:
        """Partition a layer's Linear names into fused groups (by their last component) and singletons."""
        remaining, result = list(names), []
        for group in self.groups:
            members = [n for n in remaining if n.rsplit(".", 1)[-1] in group]
            if len(members) == len(group) and len({n.rsplit(".", 1)[0] for n in members}) == 1:
                result.append(members)
                remaining = [n for n in remaining if n not in members]
        return result + [[n] for n in remaining]


GroupQuantizer = Callable[[list[torch.Tensor], InputStats, torch.Tensor], list[NVFP4Weight]]
"""(weights of one fused group in their stored dtype, their shared input statistics, RTN's global scale) -> NVFP4."""


def fake_quantize_activations(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of activations along K, dynamic E4M3 scale per 16 values (what W4A4 runs)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = block_scales(rows, input_global_scale)
    step = (scale.float() / input_global_scale).unsqueeze(-1)
    quantized = e2m1_round(rows.unflatten(-1, (-1, GROUP_SIZE)) / step) * step
    return quantized.flatten(-2).reshape(x.shape).to(x.dtype)


def _input_scale(amax: float) -> torch.Tensor:
    return global_scale_from_amax(torch.tensor(amax, dtype=torch.bfloat16))


class _CalibratedQuantizer:
    """Quantizes each decoder layer's fused groups as calibrate_layerwise reaches them; keeps the results."""

    def __init__(self, model: nn.Module, checkpoint, plan, quantize_group: GroupQuantizer, w4a4: bool, device):
        self.model, self.checkpoint, self.plan, self.w4a4 = model, checkpoint, plan, w4a4
        self.quantize_group, self.device = quantize_group, device
        self.prefix = _layers_prefix(model)
        self.weights: dict[str, NVFP4Weight] = {}
        self.input_amax: dict[str, torch.Tensor] = {}
        self.hooks: list = []

    def __call__(self, index: int, layer: nn.Module, stats: dict[str, InputStats]) -> None:
        linears = linear_modules(layer)
        wanted = set(self.plan.quantize)
        for group in FusedGroups().of(list(linears)):
            names = [n for n in group if f"{self.prefix}.{index}.{n}" in wanted]
            if names:
                self._quantize(index, names, [linears[n] for n in names], stats[names[0]])

    def _quantize(self, index: int, names: list[str], modules: list[nn.Linear], stats: InputStats) -> None:
        prefixes = [f"{self.prefix}.{index}.{n}" for n in names]
        originals = [self.checkpoint.tensor(f"{p}.weight").to(self.device) for p in prefixes]
        quantized = self.quantize_group(originals, stats, rtn_global_scale(originals))
        for prefix, module, original, weight in zip(prefixes, modules, originals, quantized):
            self.weights[prefix] = weight
            self.input_amax[prefix] = torch.tensor(stats.amax, dtype=torch.bfloat16)
            module.weight.data.copy_(dequantize(weight, original.dtype).float())
            if self.w4a4:
                scale = _input_scale(stats.amax).to(self.device)
                hook = lambda _m, args, s=scale: (fake_quantize_activations(args[0], s),)  # noqa: E731
                self.hooks.append(module.register_forward_pre_hook(hook))

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _fingerprint(weight: torch.Tensor) -> tuple:
    data = weight.detach().cpu().contiguous()
    return tuple(data.shape), str(data.dtype), hashlib.blake2b(data.view(torch.uint8).numpy().tobytes()).digest()


def _replay(checkpoint, weights: dict[str, NVFP4Weight]):
    """A quantize_fn for rtn.quantize_checkpoint that hands back the precomputed NVFP4 of whichever weight it is
    given, recognised by its bytes (the writer does not say which prefix it is quantizing)."""
    by_content: dict[tuple, list[str]] = {}
    for prefix in weights:
        by_content.setdefault(_fingerprint(checkpoint.tensor(f"{prefix}.weight")), []).append(prefix)

    def quantize_fn(weight: torch.Tensor, global_scale: torch.Tensor) -> NVFP4Weight:
        candidates = by_content.get(_fingerprint(weight))
        if not candidates:
            raise AdaqError("this method quantizes the Linear layers of the decoder layers only; add the others "
                            "to the recipe's ignore list")
        found = weights[candidates.pop(0)]
        if not torch.equal(found.global_scale.cpu(), global_scale.float().reshape(1).cpu()):
            raise AdaqError("internal: the writer's global scale differs from the one the method used")
        return NVFP4Weight(found.packed.cpu(), found.block_scale.cpu(), found.global_scale.cpu())

    return quantize_fn


def quantize_calibrated(job, quantize_group: GroupQuantizer, with_hessian: bool,
                        config: CalibrationConfig = CalibrationConfig(), notes: dict | None = None):
    """Run a calibrated method on job.source and write job.out_dir (adaq.quant.methods.QuantJob -> MethodResult)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaq.formats.checkpoint import open_checkpoint
    from adaq.quant.calibration import calibration_windows, load_texts
    from adaq.quant.methods import MethodResult
    from adaq.quant.plan import plan_linears
    from adaq.quant.rtn import input_global_scales, quantize_checkpoint

    if job.calibration is None:
        raise AdaqError("this method calibrates on text: pass --calib-data FILE|DIR (e.g. wikitext-2/valid.txt)")
    checkpoint = open_checkpoint(job.source)
    plan = plan_linears(checkpoint, job.recipe)
    tokenizer = AutoTokenizer.from_pretrained(str(job.source))
    spec = job.calibration
    ids = calibration_windows(tokenizer, load_texts(spec.path), spec.num_samples, spec.seq_len).to(job.device)
    model = AutoModelForCausalLM.from_pretrained(str(job.source), dtype=torch.float32,
                                                 use_safetensors=True).to(job.device).eval()
    w4a4 = job.scheme == "nvfp4"
    quantizer = _CalibratedQuantizer(model, checkpoint, plan, quantize_group, w4a4, job.device)
    task = job.progress.task("calibrating and quantizing layers", len(decoder_layers(model)))
    try:
        calibrate_layerwise(model, ids, quantizer, config, with_hessian,
                            progress=lambda done, total: job.progress.advance(task))
    finally:
        quantizer.remove_hooks()
    del model
    input_scales = input_global_scales(plan, quantizer.input_amax) if w4a4 else None
    quantize_checkpoint(checkpoint, job.out_dir, plan, job.scheme, input_scales, "cpu", job.progress,
                        quantize_fn=_replay(checkpoint, quantizer.weights))
    return MethodResult(quantized=plan.quantize, kept=plan.ignored,
                        notes={"calibration_windows": len(ids), "sequential": config.sequential, **(notes or {})})


def search_act_group(config: SearchConfig = SearchConfig()) -> GroupQuantizer:
    return lambda weights, stats, global_scale: [
        quantize_searched(w, global_scale, stats.mean_square, config) for w in weights]


@register_method("search-act", "activation-aware scale search: per-block E4M3 scale minimising the error weighted "
                               "by calibration E[x²] (needs --calib-data)", needs_calibration=True)
def quantize_search_act(job):
    return quantize_calibrated(job, search_act_group(), with_hessian=False, notes={"search": asdict(SearchConfig())})
