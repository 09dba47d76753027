"""Round-to-nearest NVFP4, streamed shard by shard: byte-identical to llm-compressor's NVFP4A16 output.

Memory stays bounded by one fused group of weights (q/k/v or gate/up): each source shard becomes one output shard
whose header is planned up front and whose tensors are written as soon as they are quantized. Quantization runs on
the GPU when there is one (the same torch ops give the same bytes on CPU and CUDA). For W4A4 (`nvfp4`), activation
global scales come from adaq.quant.calibration.
"""

from pathlib import Path

import torch

from adaq.errors import AdaqError
from adaq.formats import nvfp4
from adaq.formats.checkpoint import Checkpoint, open_checkpoint
from adaq.formats.compressed_tensors import (
    StreamingShard,
    TensorSpec,
    nvfp4_specs,
    nvfp4_tensors,
    shard_names,
    write_config,
    write_index,
)
from adaq.quant.methods import MethodResult, QuantJob, register_method
from adaq.quant.plan import LinearPlan, plan_linears


class GlobalScales:
    """One global scale per fused group, from the largest amax of its members (llm-compressor's linking)."""

    def __init__(self, checkpoint: Checkpoint, plan: LinearPlan, device: str):
        self.checkpoint, self.plan, self.device = checkpoint, plan, device
        self._scales: dict[str, torch.Tensor] = {}

    def of(self, prefix: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        if prefix not in self._scales:
            group = self.plan.groups[prefix]
            amaxes = [nvfp4.tensor_amax(self._weight(member, loaded)) for member in group]
            scale = nvfp4.global_scale_from_amax(torch.stack(amaxes).amax())
            self._scales.update({member: scale for member in group})
        return self._scales[prefix]

    def _weight(self, prefix: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        if prefix in loaded:
            return loaded[prefix]
        return self.checkpoint.tensor(f"{prefix}.weight").to(self.device)


def input_global_scales(plan: LinearPlan, input_amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """448 * 6 / amax of each Linear's calibrated input, shared across a fused group."""
    scales = {}
    for prefix in plan.quantize:
        group = [member for member in plan.groups[prefix] if member in input_amax]
        if not group:
            raise ValueError(f"no calibrated activations for {prefix}")
        scales[prefix] = nvfp4.global_scale_from_amax(torch.stack([input_amax[m] for m in group]).amax())
    return scales


def shard_outputs(checkpoint: Checkpoint, shard: Path, plan: LinearPlan) -> list[tuple[str, list[str]]]:
    """The shard's work items in write order: ("keep", [tensor]) or ("quantize", [fused prefixes in this shard])."""
    quantized = set(plan.quantize)
    items, done = [], set()
    for name in checkpoint.names_in(shard):
        prefix = name.removesuffix(".weight")
        if name in done:
            continue
        if name.endswith(".weight") and prefix in quantized:
            members = [m for m in plan.groups[prefix] if checkpoint.shard_of(f"{m}.weight") == shard]
            done.update(f"{m}.weight" for m in members)
            items.append(("quantize", members))
        else:
            done.add(name)
            items.append(("keep", [name]))
    return items


def item_specs(checkpoint: Checkpoint, kind: str, names: list[str], w4a4: bool) -> list[TensorSpec]:
    specs = []
    for name in names:
        if kind == "keep":
            dtype, shape = checkpoint.tensor_spec(name)
            specs.append(TensorSpec(name, dtype, shape))
        else:
            _, (rows, cols) = checkpoint.tensor_spec(f"{name}.weight")
            specs += nvfp4_specs(name, rows, cols, w4a4)
    return specs


def quantize_checkpoint(checkpoint: Checkpoint, out_dir: Path, plan: LinearPlan, scheme: str,
                        input_scales: dict[str, torch.Tensor] | None, device: str, progress,
                        quantize_fn=nvfp4.quantize) -> None:
    """Stream every shard of `checkpoint` into `out_dir` as compressed-tensors, quantizing `plan.quantize`."""
    w4a4 = scheme == "nvfp4"
    scales = GlobalScales(checkpoint, plan, device)
    shards = checkpoint.shards()
    task = progress.task("quantizing", len(plan.quantize))
    written = {}
    for shard, out_name in zip(shards, shard_names(len(shards))):
        items = shard_outputs(checkpoint, shard, plan)
        specs = [spec for kind, names in items for spec in item_specs(checkpoint, kind, names, w4a4)]
        writer = StreamingShard(out_dir / out_name, specs)
        for kind, names in items:
            if kind == "keep":
                writer.write(names[0], checkpoint.tensor(names[0]))
                continue
            loaded = {p: checkpoint.tensor(f"{p}.weight").to(device) for p in names}
            for prefix in names:
                try:
                    weight = quantize_fn(loaded[prefix], scales.of(prefix, loaded))
                except AdaqError as error:
                    raise AdaqError(f"{checkpoint.path}: {prefix}.weight: {error}") from None
                if w4a4:
                    weight.input_global_scale = input_scales[prefix]
                for name, tensor in nvfp4_tensors(prefix, weight).items():
                    writer.write(name, tensor)
                progress.advance(task)
        writer.close()
        written[out_name] = specs
    write_index(out_dir, written)
    write_config(out_dir, checkpoint.config, scheme, plan.ignored)


@register_method("rtn", "round-to-nearest, streamed shard by shard; NVFP4A16 bytes identical to llm-compressor's")
def quantize_rtn(job: QuantJob) -> MethodResult:
    checkpoint = open_checkpoint(job.source)
    plan = plan_linears(checkpoint, job.recipe)
    input_scales = None
    if job.scheme == "nvfp4":
        from adaq.quant.calibration import calibrate_input_amax

        input_scales = input_global_scales(plan, calibrate_input_amax(job, plan))
    quantize_checkpoint(checkpoint, job.out_dir, plan, job.scheme, input_scales, job.device, job.progress)
    return MethodResult(quantized=plan.quantize, kept=plan.ignored)
