"""Calibration statistics for the activation-aware quantizers, gathered one decoder layer at a time.

The model runs on calibration text (WikiText-2 *valid*, never the test split) layer by layer: the hidden states
entering layer i are kept for all samples, hooks on the layer's Linear modules accumulate per-input-channel E[x²]
(and, for GPTQ, the full X^T X), the layer is quantized, and — when `sequential` — re-run with its quantized weights
so that layer i+1 is calibrated on the inputs it will really see. Memory: samples x seq_len x hidden fp32 for the
hidden states (32 x 512 x 640 x 4 B = 42 MB on Gemma3-270M) plus one layer's statistics.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adaq.errors import AdaqError


@dataclass
class InputStats:
    """What a Linear saw: sum of x² per input channel, optionally sum of x xᵀ, and the number of rows."""

    sum_squares: torch.Tensor
    gram: torch.Tensor | None = None
    rows: int = 0
    amax: float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.amax = max(self.amax, x.abs().amax().item())
        x = x.double()
        self.sum_squares += x.square().sum(0)
        if self.gram is not None:
            self.gram += x.T @ x
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
    num_samples: int = 32
    seq_len: int = 512
    micro_batch: int = 8
    sequential: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise AdaqError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 16:
            raise AdaqError(f"seq_len must be at least 16, got {self.seq_len}")
        if self.micro_batch < 1:
            raise AdaqError(f"micro_batch must be at least 1, got {self.micro_batch}")


def calibration_ids(tokenizer, text_path: str | Path, config: CalibrationConfig) -> torch.Tensor:
    """[num_samples, seq_len] token ids: BOS + seq_len-1 consecutive tokens from windows of the text picked by seed."""
    text = Path(text_path).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    span = config.seq_len - 1
    windows = len(ids) // span
    if windows < config.num_samples:
        raise AdaqError(f"{text_path} holds {windows} windows of {span} tokens, fewer than "
                        f"num_samples={config.num_samples}: lower --num-samples or --seq-len")
    generator = torch.Generator().manual_seed(config.seed)
    picked = torch.randperm(windows, generator=generator)[:config.num_samples].sort().values
    body = torch.stack([ids[w * span:(w + 1) * span] for w in picked.tolist()])
    bos = torch.full((config.num_samples, 1), tokenizer.bos_token_id, dtype=body.dtype)
    return torch.cat([bos, body], dim=1)


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
    stats: dict[str, InputStats] = {}
    handles = []
    for name, linear in linear_modules(layer).items():
        k, device = linear.in_features, linear.weight.device
        stats[name] = InputStats(torch.zeros(k, dtype=torch.float64, device=device),
                                 torch.zeros(k, k, dtype=torch.float64, device=device) if with_hessian else None)
        handles.append(linear.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0].detach())))
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
                        progress: Callable[[int, int], None] | None = None) -> None:
    """Gather each decoder layer's input statistics and hand them to `quantize_layer(index, layer, stats)`.

    With `config.sequential`, layer i+1's inputs come from the already-quantized layers 0..i.
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


def mean_squares_per_layer(model: nn.Module, ids: torch.Tensor, config: CalibrationConfig
                           ) -> dict[str, torch.Tensor]:
    """E[x²] per input channel of every Linear in the decoder layers, keyed by full module name (unquantized model)."""
    layers_prefix = _layers_prefix(model)
    found: dict[str, torch.Tensor] = {}

    def keep(index: int, _layer: nn.Module, stats: dict[str, InputStats]) -> None:
        for name, s in stats.items():
            found[f"{layers_prefix}.{index}.{name}"] = s.mean_square

    calibrate_layerwise(model, ids, keep, CalibrationConfig(**{**config.__dict__, "sequential": False}))
    return found


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
