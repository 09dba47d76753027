"""CUDA graphs for decode steps, one per batch-size bucket, sharing one memory pool.

A decode step of B sequences replays the graph of the smallest bucket >= B: the live step context (slots, context
lengths, block tables) and the tokens are copied into the bucket's static buffers first; padded rows write to
slot -1 (the store kernel skips it) and attend over one key of a valid block, and their outputs are dropped.
Attention's split count is fixed at capture for `max_model_len`, so one graph serves every context length.
Only the `cuda` backend is captured: its kernels never sync with the host nor allocate outside torch's allocator.
"""

import os
import warnings
from dataclasses import dataclass

import torch

from adaq.engine.context import get_context, reset_context, set_context

DISABLE_ENV = "ADAQ_CUDA_GRAPHS"  # "0" turns decode graphs off


def default_buckets(max_num_seqs: int) -> list[int]:
    small = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    large = list(range(80, 129, 16)) + list(range(160, 513, 32))
    buckets = [b for b in small + large if b < max_num_seqs]
    return buckets + [max_num_seqs]


@dataclass
class _Bucket:
    size: int
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    hidden: torch.Tensor


class DecodeGraphs:
    """`run(input_ids, positions) -> hidden | None`, the seam ModelRunner calls for decode steps."""

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, buckets: list[int] | None = None):
        self.model = model
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.buckets: list[_Bucket] = []
        sizes = sorted(set(buckets or default_buckets(max_num_seqs)), reverse=True)
        with torch.inference_mode():
            for size in sizes:  # largest first: the smaller graphs reuse its pool memory
                self.buckets.append(self._capture(size))
        self.buckets.sort(key=lambda b: b.size)

    def _capture(self, size: int) -> _Bucket:
        device = self.device
        input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        positions = torch.zeros(size, dtype=torch.int64, device=device)
        slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        context_lens = torch.ones(size, dtype=torch.int32, device=device)
        block_tables = torch.zeros((size, self.max_blocks), dtype=torch.int32, device=device)
        set_context(is_prefill=False, context_lens=context_lens, slot_mapping=slot_mapping,
                    block_tables=block_tables, max_seqlen_q=1, max_context_len=self.max_model_len)
        try:
            self.model(input_ids, positions)  # warm-up outside the graph: lazy inits, autotuning, workspaces
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self.model(input_ids, positions)
        finally:
            reset_context()
        return _Bucket(size, graph, input_ids, positions, slot_mapping, context_lens, block_tables, hidden)

    def bucket_for(self, batch: int) -> _Bucket | None:
        for bucket in self.buckets:
            if bucket.size >= batch:
                return bucket
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        ctx = get_context()
        batch = input_ids.numel()
        bucket = self.bucket_for(batch)
        if bucket is None or ctx.block_tables is None or ctx.block_tables.shape[1] > self.max_blocks:
            return None
        bucket.input_ids[:batch].copy_(input_ids)
        bucket.positions[:batch].copy_(positions)
        bucket.slot_mapping[:batch].copy_(ctx.slot_mapping)
        bucket.slot_mapping[batch:].fill_(-1)
        bucket.context_lens[:batch].copy_(ctx.context_lens)
        bucket.context_lens[batch:].fill_(1)
        width = ctx.block_tables.shape[1]
        bucket.block_tables[:batch, :width].copy_(ctx.block_tables)
        # A padded row attends over block_tables[row, 0]; keep it a real block even after -1 padding came in.
        bucket.block_tables[batch:, 0].fill_(0)
        bucket.graph.replay()
        return bucket.hidden[:batch]


def graph_safe(model: torch.nn.Module) -> bool:
    """Every op of a decode step runs on a kernel: the reference fallbacks of attention (unsupported head shapes)
    and of MoE (bf16 experts) read device values on the host, which a capture cannot contain."""
    from adaq.kernels.backend_cuda import ATTENTION_GROUPS, ATTENTION_HEAD_DIMS, KernelExpertsHandle

    for module in model.modules():
        if hasattr(module, "num_kv_heads") and hasattr(module, "k_cache"):
            groups = module.num_heads // max(module.num_kv_heads, 1)
            if module.head_dim not in ATTENTION_HEAD_DIMS or groups not in ATTENTION_GROUPS:
                return False
        experts = getattr(module, "experts", None)
        if experts is not None and not isinstance(experts, (KernelExpertsHandle, torch.nn.Module, list)):
            return False
    return True


def maybe_decode_graphs(runner) -> DecodeGraphs | None:
    """Decode graphs for a runner whose model uses the cuda backend on a GPU, unless ADAQ_CUDA_GRAPHS=0 or the
    engine config says enforce_eager."""
    backend = getattr(runner.model, "backend", None)
    if (runner.device.type != "cuda" or getattr(backend, "name", None) != "cuda"
            or os.environ.get(DISABLE_ENV, "1") == "0" or getattr(runner.config, "enforce_eager", False)
            or not graph_safe(runner.model)):
        return None
    try:
        return DecodeGraphs(runner.model, runner.config.max_num_seqs, runner.max_model_len,
                            runner.geometry.block_size, runner.device)
    except RuntimeError as error:  # a capture that fails must not take the engine down: decode runs eagerly
        warnings.warn(f"CUDA-graph capture failed, decoding eagerly: {str(error).splitlines()[0]}", stacklevel=2)
        return None
