"""Fused 3-D expert tensors seen as the per-expert Linear weights llm-compressor quantizes and writes.

transformers 5 keeps some MoE experts fused (Gemma 4: `experts.gate_up_proj` [E, 2I, H], gate rows first, and
`experts.down_proj` [E, H, I]); llm-compressor linearizes them into one Linear per expert and projection, and its
checkpoints name them `experts.{e}.{gate,up,down}_proj`. `per_expert_view(checkpoint)` shows a checkpoint with fused
experts under those names (each read as a slice of the fused tensor), so loading and quantizing see one layout.
"""

from pathlib import Path

import torch
from safetensors import safe_open

from adaq.errors import CheckpointError
from adaq.formats.shards import Cols, Rows, rows_of

FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def expert_slices(name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, int, int]]:
    """Per-expert weight name -> (expert, first row, end row) in the fused tensor `name`; {} if it is not one."""
    head, _, last = name.rpartition(".")
    if not head.endswith("experts") or last not in FUSED or len(shape) != 3:
        return {}
    parts = FUSED[last]
    if shape[1] % len(parts):
        raise CheckpointError(f"{name} of shape {tuple(shape)}: {shape[1]} rows do not split into {parts}")
    rows = shape[1] // len(parts)
    return {f"{head}.{e}.{part}.weight": (e, i * rows, (i + 1) * rows)
            for e in range(shape[0]) for i, part in enumerate(parts)}


def split_experts(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused experts tensor as its per-expert weights (views); any other tensor as itself."""
    slices = expert_slices(name, tuple(tensor.shape))
    if not slices:
        return {name: tensor}
    return {part: tensor[e, start:end] for part, (e, start, end) in slices.items()}


class PerExpertView:
    """A Checkpoint whose fused expert tensors appear as per-expert `.weight` tensors (everything else as is)."""

    def __init__(self, checkpoint, fused: dict[str, dict[str, tuple[int, int, int]]]):
        self.base = checkpoint
        self.fused = fused  # fused tensor name -> its expert_slices
        self.parts = {part: (name, where) for name, slices in fused.items() for part, where in slices.items()}

    def __getattr__(self, attribute):
        return getattr(self.base, attribute)

    def _rename(self, names: list[str]) -> list[str]:
        kept = [name for name in names if name not in self.fused]
        return sorted(kept + [part for name in names if name in self.fused for part in self.fused[name]])

    def tensor_names(self) -> list[str]:
        return self._rename(self.base.tensor_names())

    def all_names(self) -> list[str]:
        return self._rename(self.base.all_names())

    def names_in(self, shard: Path) -> list[str]:
        return self._rename(self.base.names_in(shard))

    def shard_of(self, name: str) -> Path | None:
        return self.base.shard_of(self.parts[name][0] if name in self.parts else name)

    def tensor(self, name: str, rows: Rows = None, cols: Cols = None) -> torch.Tensor:
        if name not in self.parts:
            return self.base.tensor(name, rows, cols)
        fused, (e, start, end) = self.parts[name]
        cols = cols or (0, self.base.tensor_spec(fused)[1][2])
        with safe_open(self.base.shard_of(fused), framework="pt") as reader:
            sliced = reader.get_slice(fused)
            parts = [sliced[e:e + 1, start + a:start + b, cols[0]:cols[1]][0]
                     for a, b in rows_of(rows) or [(0, end - start)]]
        return torch.cat(parts)

    def tensor_spec(self, name: str) -> tuple[torch.dtype | None, tuple[int, ...]]:
        if name not in self.parts:
            return self.base.tensor_spec(name)
        fused, (_, start, end) = self.parts[name]
        dtype, shape = self.base.tensor_spec(fused)
        return dtype, (end - start, shape[2])


def per_expert_view(checkpoint):
    """The checkpoint itself when no tensor is a fused experts tensor, else a PerExpertView of it."""
    fused = {}
    for name in checkpoint.tensor_names():
        if name.endswith(tuple(f"experts.{last}" for last in FUSED)):
            slices = expert_slices(name, checkpoint.tensor_spec(name)[1])
            if slices:
                fused[name] = slices
    return PerExpertView(checkpoint, fused) if fused else checkpoint
