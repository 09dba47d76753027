"""What the hardware allows: the bytes a decode step must move, and the memory bandwidth measured by a copy.

A decode step reads every weight it uses once (all dense weights, the routed experts of MoE layers, the whole
output layer, one embedding row per sequence) and, per sequence and layer, the K and V of every cached token in
the attention window, and writes the new token's K and V. A hybrid model's Gated DeltaNet layers have no KV: per
sequence and layer they read and write their states once (conv state and fp32 recurrent state, 2 x the state bytes).
Activations are left out: the figure is a lower bound, and `bytes / bandwidth` is the fastest a step can be.
"""

import json
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from adaq.backends.numerics.attention import KV_CACHE_DTYPE_NAMES, kv_bytes_per_token_head
from adaq.bench.shapes import (TensorSpec, gdn_state_bytes, is_linear_attention, layer_attention_shape, layer_windows,
                               text_config)
from adaq.engine.block_manager import sliding_pool_blocks
from adaq.formats.nvfp4 import GROUP_SIZE

NVFP4_GLOBAL_SCALE_BYTES = 4
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I32": 4,
               "I64": 8, "BOOL": 1, "U16": 2, "I16": 2}
KV_CACHE_DTYPES = KV_CACHE_DTYPE_NAMES  # fp8 (E4M3 + fp32 scale), bf16, nvfp4 (E2M1 + E4M3 / 16 + E8M0 exponent)
LM_HEAD_FORMATS = ("bf16", "fp8", "nvfp4")  # --lm-head (adaq.engine.config.LM_HEADS)
RTX_4090_BANDWIDTH = 1.0e12  # bytes/s (NOTES; the datasheet says 1.008 TB/s)


@dataclass(frozen=True)
class WeightBytes:
    """Stored bytes of a language model's weights, by role."""

    linear: int  # dense Linear layers (attention, MLPs), as stored: NVFP4 or bf16
    expert: int  # all MoE experts of all layers
    router: int
    lm_head: int  # the output layer; a tied embedding is read in full here
    embedding: int  # the whole input embedding table (a step gathers one row per sequence)
    embedding_row: int
    norm: int
    num_experts: int = 0
    experts_per_token: int = 0
    tied: bool = False  # the output layer is the embedding table: stored once, read in full by the output layer

    @property
    def total(self) -> int:
        """The whole checkpoint: what a model's size on disk (and its weight memory) is."""
        output_layer = 0 if self.tied else self.lm_head
        return self.linear + self.expert + self.router + output_layer + self.embedding + self.norm


@dataclass(frozen=True)
class StepTraffic:
    """Bytes of one decode step of a batch, averaged over the decode steps of a request."""

    weights: float
    kv_read: float
    kv_write: float
    batch: int
    state: float = 0.0  # Gated DeltaNet states read and written (hybrid models)

    @property
    def total(self) -> float:
        return self.weights + self.kv_read + self.kv_write + self.state

    def bound_step_seconds(self, bandwidth: float) -> float:
        return self.total / bandwidth

    def bound_tokens_per_second(self, bandwidth: float) -> float:
        return self.batch * bandwidth / self.total

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def nvfp4_bytes(rows: int, cols: int) -> int:
    """packed E2M1 (half a byte per value) + one E4M3 scale per 16 values + the fp32 global scale."""
    return rows * cols // 2 + rows * cols // GROUP_SIZE + NVFP4_GLOBAL_SCALE_BYTES


def weight_bytes(specs: list[TensorSpec], config: dict, *, quantized: bool, dtype_bytes: int = 2) -> WeightBytes:
    """Bytes by role for a model stored as NVFP4 Linear layers (quantized) or entirely in a 16-bit dtype."""
    def stored(spec: TensorSpec) -> int:
        if quantized and spec.quantizable:
            return nvfp4_bytes(*spec.shape)
        return spec.numel * dtype_bytes

    by_role: dict[str, int] = {}
    for spec in specs:
        by_role[spec.role] = by_role.get(spec.role, 0) + stored(spec)
    return _assemble(by_role, config, dtype_bytes)


def checkpoint_weight_bytes(folder: Path, config: dict) -> WeightBytes:
    """Bytes by role of a real checkpoint, read from its safetensors headers (no tensor is loaded)."""
    by_role: dict[str, int] = {}
    embedding_dtype_bytes = 2
    for name, dtype, shape in _safetensors_entries(folder):
        role = tensor_role(name)
        if role is None:
            continue
        count = 1
        for size in shape:
            count *= size
        by_role[role] = by_role.get(role, 0) + count * DTYPE_BYTES.get(dtype, 2)
        if role == "embedding":
            embedding_dtype_bytes = DTYPE_BYTES.get(dtype, 2)
    return _assemble(by_role, config, embedding_dtype_bytes)


def tensor_role(name: str) -> str | None:
    """The role of a stored tensor (any of a quantized Linear's parts); None for what the language model never reads."""
    if any(part in name for part in ("vision_tower", "multi_modal_projector", "vision_model", "audio")):
        return None
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head") or ".lm_head." in name:
        return "lm_head"
    if ".mlp.experts." in name:
        return "expert"
    if name.endswith("mlp.gate.weight"):
        return "router"
    parts = name.rsplit(".", 2)
    if len(parts) > 1 and "norm" in parts[-2]:
        return "norm"
    return "linear"


def _assemble(by_role: dict[str, int], config: dict, embedding_dtype_bytes: int) -> WeightBytes:
    text = text_config(config)
    embedding = by_role.get("embedding", 0)
    tied = "lm_head" not in by_role
    return WeightBytes(
        linear=by_role.get("linear", 0) + by_role.get("dense", 0), expert=by_role.get("expert", 0), router=by_role.get("router", 0),
        lm_head=embedding if tied else by_role["lm_head"], embedding=embedding,
        embedding_row=text["hidden_size"] * embedding_dtype_bytes, norm=by_role.get("norm", 0) + by_role.get("gdn", 0),
        num_experts=text.get("num_experts", 0) or 0, experts_per_token=text.get("num_experts_per_tok") or text.get("top_k_experts") or 0,
        tied=tied)


# Bytes per weight the output layer reads per decode step under --lm-head (plus 4 bytes of fp32 scale per row for
# fp8, and one fp32 global scale for nvfp4); "bf16" keeps the stored bytes.
LM_HEAD_BYTES_PER_WEIGHT = {"fp8": 1.0, "nvfp4": 0.5 + 1 / GROUP_SIZE}


def with_lm_head(weights: WeightBytes, config: dict, lm_head: str) -> WeightBytes:
    """The bytes the output layer actually reads when a dense lm_head is quantized at load (--lm-head fp8 / nvfp4):
    fp8 1 B per weight + an fp32 scale per row, nvfp4 0.5625 B + the global scale. A checkpoint whose lm_head is
    already quantized, and bf16, keep their stored bytes."""
    text = text_config(config)
    rows, cols = text["vocab_size"], text["hidden_size"]
    if lm_head == "bf16" or weights.lm_head < rows * cols * 2:
        return weights
    if lm_head == "fp8":
        nbytes = rows * cols + rows * 4
    else:
        nbytes = nvfp4_bytes(rows, cols)
    return replace(weights, lm_head=nbytes)


def expected_active_experts(num_experts: int, experts_per_token: int, batch: int) -> float:
    """Distinct experts a layer reads for `batch` tokens under uniform routing: E * (1 - (1 - k/E)^B)."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - experts_per_token / num_experts) ** batch)


def step_weight_bytes(weights: WeightBytes, batch: int) -> float:
    expert_share = expected_active_experts(weights.num_experts, weights.experts_per_token, batch) / max(
        weights.num_experts, 1)
    return (weights.linear + weights.expert * expert_share + weights.router + weights.lm_head + weights.norm
            + batch * weights.embedding_row)


def kv_bytes_per_token_per_layer(config: dict, kv_cache_dtype: str, layer: int = 0) -> int:
    """K and V of one token in one layer: per KV head its head_dim values plus the scheme's scales (Gemma 4's global
    layers have their own KV heads and head_dim; a Gated DeltaNet layer has none)."""
    if is_linear_attention(config, layer):
        return 0
    kv_heads, dim, _ = layer_attention_shape(config, layer)
    return 2 * kv_heads * kv_bytes_per_token_head(kv_cache_dtype, dim)


def kv_bytes_per_layer(config: dict, kv_cache_dtype: str) -> list[int]:
    return [kv_bytes_per_token_per_layer(config, kv_cache_dtype, layer)
            for layer in range(text_config(config)["num_hidden_layers"])]


def decode_traffic(weights: WeightBytes, config: dict, *, batch: int, input_len: int, output_len: int,
                   kv_cache_dtype: str) -> StepTraffic:
    """Mean bytes per decode step: decode step j (1 .. output_len-1) attends over input_len + j cached tokens."""
    steps = max(output_len - 1, 1)
    per_layer = kv_bytes_per_layer(config, kv_cache_dtype)
    windows = layer_windows(config)
    read_bytes = sum(per_token * min(input_len + step, window or input_len + step)
                     for step in range(1, steps + 1) for window, per_token in zip(windows, per_layer))
    kv_read = batch * read_bytes / steps
    kv_write = batch * sum(per_layer)
    state = batch * 2 * gdn_state_bytes(config)
    return StepTraffic(step_weight_bytes(weights, batch), kv_read, kv_write, batch, state)


def kv_cache_bytes(config: dict, kv_cache_dtype: str, tokens: int, *, num_seqs: int = 1,
                   step_tokens: int | None = None, block_size: int = 16, window_kv: bool = True) -> int:
    """KV bytes of an engine whose global pool holds `tokens` (num_seqs x context). With window-sized KV its
    sliding-window layers hold the sliding pool (num_seqs windows + a step of `step_tokens`, default `tokens`, plus the
    null block), never more blocks than the global layers (adaq.engine.block_manager.sliding_pool_blocks)."""
    per_layer = kv_bytes_per_layer(config, kv_cache_dtype)
    windows = layer_windows(config)
    sliding = [window for window in windows if window]
    if not window_kv or not sliding or len(sliding) == len(windows):
        return sum(per_layer) * tokens
    global_blocks = -(-tokens // block_size)
    need = sliding_pool_blocks(max(sliding), block_size, num_seqs, step_tokens or tokens)
    sliding_tokens = (min(global_blocks, need) + 1) * block_size
    return sum(nbytes * (sliding_tokens if window else tokens) for nbytes, window in zip(per_layer, windows))


def _safetensors_entries(folder: Path):
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with shard.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                yield name, entry["dtype"], entry["shape"]


def measure_copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of `repeats` timed copies."""
    import torch

    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del source, target
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]
