"""CUDA graphs for decode steps, one per batch-size bucket, sharing one memory pool.

A decode step of B sequences replays the graph of the smallest bucket >= B: the live step context (slots, context
lengths, block tables; with a sliding-window pool also its slots and tables; for a hybrid model the state slots of
its Gated DeltaNet layers) and the tokens are copied into the bucket's static buffers first; padded rows write to
slot -1 (the store kernel skips it), keep state slot -1 (the GDN kernels neither read nor write a state for it) and
attend over one key of a valid block, and their outputs are dropped.
Attention's split count is fixed at capture for `max_model_len`, so one graph serves every context length.
Only the `cuda` backend is captured: its kernels never sync with the host nor allocate outside torch's allocator.
A model that cannot be captured, or a capture that fails, decodes eagerly and says so as a fallback
(adaq.backends.fallbacks: a warning, or an AdaqError under --strict); `replays` counts the graphs replayed.
"""

import os
from dataclasses import dataclass

import torch

from adaq.backends.context import get_context, reset_context, set_context
from adaq.backends.fallbacks import CUDA_GRAPHS_SETTING, Fallbacks, backend_fallbacks

DISABLE_ENV = "ADAQ_CUDA_GRAPHS"  # "0" turns decode graphs off


def default_buckets(max_num_seqs: int) -> list[int]:
    small = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    large = list(range(80, 129, 16)) + list(range(160, 513, 32))
    buckets = [b for b in small + large if b < max_num_seqs]
    return buckets + [max_num_seqs]


@dataclass
class _Bucket:
    """A graph and its static inputs: two flat buffers (int64: tokens | positions | slots [| sliding slots]
    [| state slots]; int32: context lengths | block tables [| sliding block tables]) so that a step's inputs arrive
    in two host-to-device copies (see `staged`)."""

    size: int
    graph: torch.cuda.CUDAGraph
    longs: torch.Tensor  # [(3 + sliding + hybrid) * size] int64
    ints: torch.Tensor  # [size * (1 + (1 + sliding) * max_blocks)] int32
    hidden: torch.Tensor
    sliding: bool = False
    hybrid: bool = False

    @property
    def input_ids(self) -> torch.Tensor:
        return self.longs[:self.size]

    @property
    def positions(self) -> torch.Tensor:
        return self.longs[self.size:2 * self.size]

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.longs[2 * self.size:3 * self.size]

    @property
    def sliding_slot_mapping(self) -> torch.Tensor | None:
        return self.longs[3 * self.size:4 * self.size] if self.sliding else None

    @property
    def state_slots(self) -> torch.Tensor | None:
        start = (3 + self.sliding) * self.size
        return self.longs[start:start + self.size] if self.hybrid else None

    @property
    def context_lens(self) -> torch.Tensor:
        return self.ints[:self.size]

    @property
    def block_tables(self) -> torch.Tensor:
        tables = self.ints[self.size:].view(1 + self.sliding, self.size, -1)
        return tables[0]

    @property
    def sliding_block_tables(self) -> torch.Tensor | None:
        return self.ints[self.size:].view(2, self.size, -1)[1] if self.sliding else None


def pack_decode_inputs(size: int, max_blocks: int, input_ids: list[int], positions: list[int], slots: list[int],
                       context_lens: list[int], tables: list[list[int]], sliding_slots: list[int] | None = None,
                       sliding_tables: list[list[int]] | None = None,
                       state_slots: list[int] | None = None) -> tuple[list[int], list[int]]:
    """A decode step's inputs in a bucket's two flat buffers (`_Bucket`'s views), padded to `size` rows: a padded
    row has token 0 at position 0, writes to slot -1, has state slot -1 and attends over one key of block 0 (of
    either pool)."""
    pad = size - len(input_ids)
    longs = input_ids + [0] * pad + positions + [0] * pad + slots + [-1] * pad
    ints = context_lens + [1] * pad
    _pack_tables(ints, tables, max_blocks, pad)
    if sliding_tables is not None:
        longs += sliding_slots + [-1] * pad
        _pack_tables(ints, sliding_tables, max_blocks, pad)
    if state_slots is not None:
        longs += state_slots + [-1] * pad
    return longs, ints


def _pack_tables(ints: list[int], tables: list[list[int]], max_blocks: int, pad: int) -> None:
    for table in tables:
        ints += table
        ints += [0] * (max_blocks - len(table))
    ints += [0] * (pad * max_blocks)


class DecodeGraphs:
    """`run(input_ids, positions) -> hidden | None`, the seam ModelRunner calls for decode steps."""

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, buckets: list[int] | None = None, sliding: bool = False,
                 hybrid: bool = False):
        self.model = model
        self.sliding = sliding  # a sliding-window pool: its slots and block tables are graph inputs too
        self.hybrid = hybrid  # a state cache (Gated DeltaNet layers): the state slots are graph inputs too
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.buckets: list[_Bucket] = []
        self.replays = 0  # graphs replayed since capture (tests and benchmarks check that decode used them)
        sizes = sorted(set(buckets or default_buckets(max_num_seqs)), reverse=True)
        with torch.inference_mode():
            for size in sizes:  # largest first: the smaller graphs reuse its pool memory
                self.buckets.append(self._capture(size))
        self.buckets.sort(key=lambda b: b.size)

    def _capture(self, size: int) -> _Bucket:
        device = self.device
        groups = 1 + self.sliding
        longs = torch.zeros((2 + groups + self.hybrid) * size, dtype=torch.int64, device=device)
        ints = torch.zeros(size * (1 + groups * self.max_blocks), dtype=torch.int32, device=device)
        bucket = _Bucket(size, torch.cuda.CUDAGraph(), longs, ints, longs, self.sliding, self.hybrid)
        longs[2 * size:].fill_(-1)
        bucket.context_lens.fill_(1)
        set_context(is_prefill=False, context_lens=bucket.context_lens, slot_mapping=bucket.slot_mapping,
                    block_tables=bucket.block_tables, max_seqlen_q=1, max_context_len=self.max_model_len,
                    sliding_slot_mapping=bucket.sliding_slot_mapping, sliding_block_tables=bucket.sliding_block_tables,
                    state_slots=bucket.state_slots)
        try:
            self.model(bucket.input_ids, bucket.positions)  # warm-up outside the graph: lazy inits, workspaces
            torch.cuda.synchronize(device)
            with torch.cuda.graph(bucket.graph, pool=self.pool):
                bucket.hidden = self.model(bucket.input_ids, bucket.positions)
        finally:
            reset_context()
        return bucket

    def bucket_for(self, batch: int) -> _Bucket | None:
        for bucket in self.buckets:
            if bucket.size >= batch:
                return bucket
        return None

    def staged(self, batch: int, input_ids: list[int], positions: list[int], slots: list[int],
               context_lens: list[int], tables: list[list[int]], sliding_slots: list[int] | None = None,
               sliding_tables: list[list[int]] | None = None, state_slots: list[int] | None = None) -> _Bucket | None:
        """Write a decode step's inputs straight into its bucket's buffers, padded: a padded row writes to slot -1
        and attends over one key of block 0 (any real block). Two host-to-device copies; None when no bucket fits."""
        bucket = self.bucket_for(batch)
        if bucket is None or max(len(table) for table in tables) > self.max_blocks:
            return None
        if self.hybrid and state_slots is None:
            return None
        longs, ints = pack_decode_inputs(bucket.size, self.max_blocks, input_ids, positions, slots, context_lens,
                                         tables, sliding_slots, sliding_tables, state_slots if self.hybrid else None)
        bucket.longs.copy_(torch.tensor(longs, dtype=torch.int64).pin_memory(), non_blocking=True)
        bucket.ints.copy_(torch.tensor(ints, dtype=torch.int32).pin_memory(), non_blocking=True)
        return bucket

    def replay(self, bucket: _Bucket, batch: int) -> torch.Tensor:
        bucket.graph.replay()
        self.replays += 1
        return bucket.hidden[:batch]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        ctx = get_context()
        batch = input_ids.numel()
        bucket = self.bucket_for(batch)
        if (bucket is None or ctx.block_tables is None or ctx.block_tables.shape[1] > self.max_blocks
                or (self.hybrid and ctx.state_slots is None)):
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
        if self.sliding:
            bucket.sliding_slot_mapping[:batch].copy_(ctx.sliding_slot_mapping)
            bucket.sliding_slot_mapping[batch:].fill_(-1)
            bucket.sliding_block_tables[:batch, :width].copy_(ctx.sliding_block_tables)
            bucket.sliding_block_tables[batch:, 0].fill_(0)
        if self.hybrid:
            bucket.state_slots[:batch].copy_(ctx.state_slots)
            bucket.state_slots[batch:].fill_(-1)
        return self.replay(bucket, batch)


def graph_blocker(model: torch.nn.Module) -> str | None:
    """Why a decode step of this model cannot be captured, or None when every op of it runs on a kernel: the
    reference fallbacks of attention (head shapes or caches the kernels do not take), of MoE (W4A4 experts, bf16
    experts off the GPU) and of the Gated DeltaNet ops read device values on the host, which a capture cannot
    contain. Layers of different KV shapes (Gemma 4) are fine: the kernels take a layer's view into a wider cache
    slot."""
    from adaq.backends.cuda import KernelExpertsHandle, attention_kernel_cause
    from adaq.backends.dense_moe import DenseExperts

    for module in model.modules():
        if hasattr(module, "ssm_state") and (cause := _gdn_blocker(module)):
            return cause
    for module in model.modules():
        if hasattr(module, "num_kv_heads") and hasattr(module, "k_cache"):
            cache = module.k_cache if isinstance(module.k_cache, torch.Tensor) else None
            cause = attention_kernel_cause(module.num_heads, module.num_kv_heads, module.head_dim, cache)
            if cause is not None:
                return cause
        experts = getattr(module, "experts", None)
        if experts is not None and not isinstance(experts, (KernelExpertsHandle, DenseExperts, torch.nn.Module, list)):
            return "MoE experts on the reference path (W4A4 experts, or bf16 experts off the GPU)"
    return None


def _gdn_blocker(layer) -> str | None:
    """A Gated DeltaNet layer whose decode ops would take the reference path (it reads the state slots on the host)."""
    from adaq.backends.cuda import GDN_CONV_WIDTHS, GDN_KEY_HEAD_DIMS

    prefix = "Gated DeltaNet layers on the reference path (their ops read the state slots on the host): "
    dtype = None if layer.conv_weight is None else layer.conv_weight.dtype
    if dtype is not None and dtype != torch.bfloat16:
        return prefix + f"compute dtype {dtype} (the kernels take bf16)"
    if layer.head_k_dim not in GDN_KEY_HEAD_DIMS or layer.head_v_dim % 32:
        return prefix + (f"head dims {layer.head_k_dim} / {layer.head_v_dim} (kernels: key {GDN_KEY_HEAD_DIMS}, "
                         "value a multiple of 32)")
    if layer.conv_kernel not in GDN_CONV_WIDTHS:
        return prefix + f"conv kernel width {layer.conv_kernel} (kernels: {GDN_CONV_WIDTHS})"
    return None


def graph_safe(model: torch.nn.Module) -> bool:
    return graph_blocker(model) is None


def maybe_decode_graphs(runner) -> DecodeGraphs | None:
    """Decode graphs for a runner whose model uses the cuda backend on a GPU, unless ADAQ_CUDA_GRAPHS=0 or the
    engine config says enforce_eager (both on purpose, no fallback). A model that cannot be captured, or a capture
    that fails, is reported to the runner's fallbacks and decodes eagerly (under --strict: an AdaqError)."""
    backend = getattr(runner.model, "backend", None)
    if runner.device.type != "cuda" or getattr(backend, "name", None) != "cuda":
        return None  # CPU, or the reference backend: asked for, or reported by get_backend when auto chose it
    if os.environ.get(DISABLE_ENV, "1") == "0" or getattr(runner.config, "enforce_eager", False):
        return None
    fallbacks = getattr(runner, "fallbacks", None)
    fallbacks = fallbacks if isinstance(fallbacks, Fallbacks) else backend_fallbacks(backend)
    blocker = graph_blocker(runner.model)
    if blocker is not None:
        fallbacks.report("decode CUDA graphs -> eager", blocker, CUDA_GRAPHS_SETTING)
        return None
    try:
        return DecodeGraphs(runner.model, runner.config.max_num_seqs, runner.max_model_len,
                            runner.geometry.block_size, runner.device,
                            sliding=getattr(runner, "sliding_geometry", None) is not None,
                            hybrid=getattr(runner, "state_cache", None) is not None)
    except RuntimeError as error:  # a capture that fails must not take the engine down unless --strict
        fallbacks.report("decode CUDA graphs -> eager", f"capture failed: {str(error).strip()}",
                         CUDA_GRAPHS_SETTING)
        return None
