"""Checks of every quantized Linear: layout from the safetensors headers, values from the scale tensors.

Only scale tensors are read, one at a time (a 30B checkpoint's scales are read without holding its weights).
"""

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from adaq.formats.nvfp4 import GROUP_SIZE
from adaq.formats.safetensors_check import tensor_entries
from adaq.validate.rules import (
    BLOCK_SCALE_DTYPE,
    FUSED_GROUPS,
    GLOBAL_SCALE_DTYPE,
    PACKED_DTYPE,
    TensorRoles,
    TileRules,
)


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" makes the checkpoint invalid, "warning" does not
    rule: str  # a key of adaq.validate.rules.RULES
    tensor: str  # the tensor or module it is about, "" for the whole checkpoint
    message: str

    def line(self) -> str:
        where = f"{self.tensor}: " if self.tensor else ""
        return f"{where}{self.message} [{self.rule}]"


@dataclass
class TensorIndex:
    """Where each tensor lives and what its header says, for the whole folder."""

    entries: dict[str, dict]
    shards: dict[str, Path]

    @classmethod
    def from_headers(cls, headers: dict[Path, dict]) -> "TensorIndex":
        entries, shards = {}, {}
        for shard, header in headers.items():
            for name, entry in tensor_entries(header).items():
                entries[name], shards[name] = entry, shard
        return cls(entries, shards)


@dataclass
class Checks:
    """Findings plus how many times each rule was applied, for the report's rule table."""

    findings: list[Finding] = field(default_factory=list)
    applied: Counter = field(default_factory=Counter)

    def merge(self, other: "Checks") -> None:
        self.findings += other.findings
        self.applied += other.applied

    def check(self, rule: str, passed: bool, tensor: str, message: str, severity: str = "error") -> bool:
        self.applied[rule] += 1
        if not passed:
            self.findings.append(Finding(severity, rule, tensor, message))
        return passed


def check_linears(prefixes: list[str], index: TensorIndex, roles: TensorRoles, tiles: TileRules,
                  needs_input_scale: bool, read_values: bool = True) -> Checks:
    """Layout from the headers; with `read_values`, the scales too (streamed). Shapes against config.json are
    adaq.formats.consistency's rules, checked for every Linear by the validator."""
    checks = Checks()
    loadable = [p for p in prefixes if check_layout(checks, p, index, roles, tiles)]
    if read_values:
        check_fused_groups(checks, check_values(checks, loadable, index, roles, needs_input_scale))
    return checks


def check_layout(checks: Checks, prefix: str, index: TensorIndex, roles: TensorRoles, tiles: TileRules) -> bool:
    """Presence, dtypes and shapes from the headers; True when the scales can be read and judged."""
    names = {role: f"{prefix}.{getattr(roles, role)}" for role in ("packed", "block_scale", "global_scale")}
    missing = [name for name in names.values() if name not in index.entries]
    if not checks.check("tensors-present", not missing, prefix, f"missing {', '.join(missing)}"):
        return False
    packed, block, glob = (index.entries[names[role]] for role in ("packed", "block_scale", "global_scale"))
    dtypes_ok = all([
        check_dtype(checks, names["packed"], packed, PACKED_DTYPE),
        check_dtype(checks, names["block_scale"], block, BLOCK_SCALE_DTYPE),
        check_dtype(checks, names["global_scale"], glob, GLOBAL_SCALE_DTYPE),
    ])
    shapes_ok = check_shapes(checks, prefix, names, packed["shape"], block["shape"], glob["shape"])
    if shapes_ok:
        n, k = packed["shape"][0], packed["shape"][1] * 2
        check_alignment(checks, names["packed"], n, k, tiles)
    return dtypes_ok and shapes_ok


def check_dtype(checks: Checks, name: str, entry: dict, expected: str) -> bool:
    return checks.check("dtype", entry["dtype"] == expected, name, f"dtype {entry['dtype']}, expected {expected}")


def check_shapes(checks: Checks, prefix: str, names: dict[str, str], packed: list[int], block: list[int],
                 glob: list[int]) -> bool:
    if not checks.check("shape", len(packed) == 2, names["packed"], f"shape {packed} is not 2-D [N, K/2]"):
        return False
    n, k = packed[0], packed[1] * 2
    if not checks.check("k-multiple-of-16", k % GROUP_SIZE == 0 and k > 0, prefix,
                        f"K = {k} (packed {packed}) is not a positive multiple of {GROUP_SIZE}"):
        return False
    block_ok = checks.check("shape", block == [n, k // GROUP_SIZE], names["block_scale"],
                            f"shape {block}, expected [{n}, {k // GROUP_SIZE}] for packed {packed}")
    global_ok = checks.check("shape", math.prod(glob) == 1, names["global_scale"],
                             f"shape {glob} holds {math.prod(glob)} values, expected one")
    return block_ok and global_ok


def check_alignment(checks: Checks, name: str, n: int, k: int, tiles: TileRules) -> None:
    n_pad, k_pad = tiles.padded_shape(n, k)
    severity = "warning" if tiles.padded else "error"
    for rule, dim, size, padded, multiple in (("tile-n", "N", n, n_pad, tiles.n_multiple),
                                              ("tile-k", "K", k, k_pad, tiles.k_multiple)):
        effect = f"zero-padded to {padded} at load" if tiles.padded else "the kernel cannot run it"
        checks.check(rule, size == padded, name,
                     f"{dim} = {size} is not a multiple of {multiple} ({tiles.why}): {effect}", severity)


def check_values(checks: Checks, prefixes: list[str], index: TensorIndex, roles: TensorRoles,
                 needs_input_scale: bool) -> dict[str, tuple[float, ...]]:
    """Stream every scale tensor, shard by shard; return each prefix's (global[, input]) scales."""
    scales: dict[str, tuple[float, ...]] = {}
    by_shard = defaultdict(list)
    for prefix in prefixes:
        by_shard[index.shards[f"{prefix}.{roles.packed}"]].append(prefix)
    for shard, shard_prefixes in by_shard.items():
        with safe_open(shard, framework="pt") as reader:
            for prefix in shard_prefixes:
                read = partial(read_tensor, reader, shard, index)
                scales[prefix] = check_scales(checks, prefix, read, index, roles, needs_input_scale)
    return scales


def check_scales(checks: Checks, prefix: str, read, index: TensorIndex, roles: TensorRoles,
                 needs_input_scale: bool) -> tuple[float, ...]:
    global_name = f"{prefix}.{roles.global_scale}"
    global_value = read(global_name).float().reshape(-1)[0].item()
    check_positive(checks, "global-scale", global_name, global_value)
    block_name = f"{prefix}.{roles.block_scale}"
    check_block_scales(checks, block_name, read(block_name))
    input_name = f"{prefix}.{roles.input_scale}"
    if input_name not in index.entries:
        if needs_input_scale:
            checks.check("input-scale", False, prefix,
                         f"missing {input_name}: the W4A4 (NVFP4) scheme needs the calibrated input global scale")
        return (global_value,)
    entry = index.entries[input_name]
    if not (check_dtype(checks, input_name, entry, GLOBAL_SCALE_DTYPE)
            and checks.check("shape", math.prod(entry["shape"]) == 1, input_name,
                             f"shape {entry['shape']} holds {math.prod(entry['shape'])} values, expected one")):
        return (global_value,)
    input_value = read(input_name).float().reshape(-1)[0].item()
    check_positive(checks, "input-scale", input_name, input_value)
    return global_value, input_value


def read_tensor(reader, shard: Path, index: TensorIndex, name: str) -> torch.Tensor:
    """From the open shard when it holds the tensor, else from the shard that does (scales may be split)."""
    if index.shards[name] == shard:
        return reader.get_tensor(name)
    with safe_open(index.shards[name], framework="pt") as other:
        return other.get_tensor(name)


def check_positive(checks: Checks, rule: str, name: str, value: float) -> None:
    problem = describe_bad_scale(value)
    checks.check(rule, problem is None, name, f"scale is {problem}; it must be finite and positive")


def describe_bad_scale(value: float) -> str | None:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf"
    if value <= 0:
        return "zero" if value == 0 else f"negative ({value:g})"
    return None


def check_block_scales(checks: Checks, name: str, scale: torch.Tensor) -> None:
    values = scale.float()
    bad = ~values.isfinite() | (values < 0)
    if bad.any():
        counts = {"NaN": values.isnan().sum(), "inf": values.isinf().sum(), "negative": (values < 0).sum()}
        found = ", ".join(f"{int(count)} {kind}" for kind, count in counts.items() if count)
        first = [int(i) for i in bad.nonzero()[0].tolist()]
        checks.check("block-scale", False, name,
                     f"block scales must be finite and ≥ 0: {found} (first at block {first})")
        return
    checks.check("block-scale", True, name, "")
    checks.check("block-scale", bool(values.any()), name,
                 "every block scale is zero: this weight dequantizes to all zeros", severity="warning")


def check_fused_groups(checks: Checks, scales: dict[str, tuple[float, ...]]) -> None:
    """q/k/v (and gate/up) must share their global (and input) scales to be fused into one GEMM
    (adaq.backends.handles.can_fuse)."""
    for prefix in scales:
        parent, _, leaf = prefix.rpartition(".")
        if ".experts." in f"{parent}.":
            continue  # an expert's gate|up is fused with per-column scales, equal or not (kernels/backend_cuda.py)
        for group in FUSED_GROUPS:
            if leaf != group[0]:
                continue
            members = [f"{parent}.{name}" for name in group]
            if not all(member in scales for member in members):
                continue
            values = {member: scales[member] for member in members}
            checks.check("fused-group", len(set(values.values())) == 1, f"{parent}.{{{','.join(group)}}}",
                         "scales differ (" + ", ".join(f"{m.rpartition('.')[2]} {fmt(v)}" for m, v in values.items())
                         + "): the engine will run them as separate GEMMs", severity="warning")


def fmt(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:.6g}" for v in values)
