"""Runs the model for one scheduled batch: packs the tokens, sets the step context, owns the KV cache.

The KV cache is one tensor for all layers, `[2 (K, V), layers, blocks, block_size, kv_heads, head_dim]` in the
cache dtype, plus for FP8 one fp32 scale tensor `[2, layers, blocks, block_size, kv_heads]`; NVFP4 rows are
`head_dim / 2 + head_dim / 16` bytes (uint8) with one uint8 E8M0 exponent per (token, head) in the scale tensor (the
schemes are in docs/ARCHITECTURE.md); layers whose KV heads or head_dim differ (Gemma 4) each see their own
`[blocks, block_size, kv_heads, row]` view inside a slot as wide as the widest layer's (the kernels take such
strided views: csrc/binding.cpp cache_slot_rows). With window-sized KV on, Gemma 4's sliding and global layers sit
in pools of their own, each of one shape, so no slot is wider than its layers. On a GPU its size is what
`gpu_memory_utilization` leaves after the weights and the
activation peak of a warm-up step; on the CPU it is `kv_cache_memory`, by default enough for the sequences that
fit in 1 GiB, never less than one sequence of `max_model_len` tokens. When `max_model_len` is the model's own
(max_position_embeddings, not --max-model-len) and one sequence of it does not fit that budget, the context is
capped to what fits, with one line that says so: a config claiming a 1e9-token context must not ask for 256 GB.

Window-sized KV (`EngineConfig.window_kv`, on by default): a model with both sliding-window and global layers
gets two such tensors, one per group, each with its own blocks (block_manager.py). The sliding pool holds what
`max_num_seqs` windows and one step's chunks need (`sliding_pool_blocks`), never more blocks than the global pool;
the rest of the memory goes to the global pool. The pools' shapes and sizes follow adaq.engine.kv_layout, the rule
that `adaq validate`'s budget computes with too.

Hybrid models (Gated DeltaNet layers) also get a per-sequence state cache (adaq.engine.state_cache), sized from
the same budget: its slots first (up to one per `max_num_seqs`, at most half the budget), the KV cache from the
rest; each step's slot of every sequence goes into the step context.

Logits are computed only where they are needed: the last token of each sequence that samples in this step, and
every prompt position of a request that asked for prompt log-probabilities (in slices, so a long prompt never
holds a full [T, vocab] tensor).
"""

import gc
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from adaq.engine.block_manager import NULL_BLOCK
from adaq.engine.config import EngineConfig, text_config
from adaq.engine.kv_layout import KVGeometry, KVPools, LayerKV, split_pools
from adaq.backends.context import reset_context, set_context
from adaq.backends.fallbacks import CUDA_GRAPHS_SETTING, backend_fallbacks
from adaq.backends.parallel import SINGLE
from adaq.backends.numerics.attention import NVFP4_KV_EXP_BIAS, nvfp4_kv_row_bytes
from adaq.engine.sampler import Sampler
from adaq.engine.sampling_params import SamplingParams
from adaq.engine.scheduler import ScheduledBatch
from adaq.engine.sequence import Sequence
from adaq.engine.state_cache import StateCache, StateGeometry, StateSlots
from adaq.errors import AdaqError

log = logging.getLogger("adaq.engine")

CPU_DEFAULT_KV_BYTES = 2**30
HOST_MEMORY_SHARE = 0.8  # of the free RAM, at most, for a CPU KV cache: the rest is the activations' and the OS's
LOGPROB_SLICE_ROWS = 64  # 64 x a 262k vocabulary in fp32: 67 MB per slice


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    sample_rows: list[int]  # index in the batch of each sequence that samples
    sample_token_index: list[int]  # its last token's index in the packed T tokens
    score_rows: list[tuple[int, int, int, int]]  # (batch index, first packed index, first position, count)
    candidate_rows: list[tuple[int, int]]  # (batch index, packed index of the prompt's last token)
    graph_bucket: object = None  # a decode step staged into a CUDA graph's buffers (adaq.engine.cuda_graph)


@dataclass
class StepPlan:
    """One step's model inputs as host lists: what rank 0 schedules and every tensor-parallel rank stages alike."""

    is_decode: bool
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    sliding_slots: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    sliding_tables: list[list[int]] | None = None
    state_slots: list[int] | None = None
    graph: bool = False  # a decode step every sequence samples from: staged into a CUDA graph's bucket


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device; `ModelRunner.collect` waits for its tokens."""

    batch: ScheduledBatch
    sample_rows: list[int]
    tokens: torch.Tensor | None  # [len(sample_rows)] on the model's device
    host_tokens: torch.Tensor | None  # a pinned copy being made (GPU), read once `ready` has passed
    ready: object  # torch.cuda.Event | None
    started: float = field(default_factory=time.perf_counter)
    advanced: bool = False  # the engine already counted its tokens as computed (a step was launched after it)


def available_host_bytes() -> int:
    """Free RAM: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelRunner:
    """Owns the model, its KV cache and the sampler.

    CUDA-graph seam: a decode step (every sequence computes one token) goes through `self.decode_graphs` when it is
    set: an object with `run(input_ids, positions) -> hidden | None` that reads the step context (already set),
    copies into its static buffers and replays (None: no graph for this batch, run eagerly).
    """

    def __init__(self, model: torch.nn.Module, model_config: dict, config: EngineConfig, fit_context: bool = False,
                 link=None):
        """`fit_context`: config.max_model_len is the model's own, and may be lowered to what the KV cache holds.
        `link` (tensor parallelism, rank 0): what sends each step to the other ranks (adaq.engine.tensor_parallel);
        every rank builds its runner alike, so the warm-up and graph captures run the same collectives everywhere."""
        self.model = model
        self.link = link
        self.tp = getattr(getattr(model, "backend", None), "tp", SINGLE)
        self.fit_context = fit_context
        self.config = config
        self.device = config.device
        # One record for the backend's fallbacks and the runner's own (decode graphs); strict before any work runs.
        self.fallbacks = backend_fallbacks(getattr(model, "backend", None))
        if config.strict:
            self.fallbacks.make_strict()
        self.attention_layers = [module for module in model.modules() if hasattr(module, "k_cache")]
        if not self.attention_layers:
            raise AdaqError("the model has no attention layers with a k_cache attribute: cannot attach a KV cache")
        self.global_layers, self.sliding_layers = _kv_groups(self.attention_layers, config.window_kv)
        self.kv_pools = KVPools.plan(_layer_kv(model_config, self.attention_layers), window_kv=config.window_kv,
                                     block_size=config.block_size, dtype=config.kv_dtype,
                                     max_num_seqs=config.max_num_seqs,
                                     max_step_tokens=config.max_num_batched_tokens)
        self.sliding_window = self.kv_pools.sliding_window
        self.geometry, self.sliding_geometry = self.kv_pools.geometry, self.kv_pools.sliding
        self.state_layers = [module for module in model.modules() if hasattr(module, "ssm_state")]
        state_dtype = getattr(model, "dtype", config.dtype)  # conv states hold the model's activations
        self.state_geometry = StateGeometry.of(self.state_layers, state_dtype) if self.state_layers else None
        self.num_state_slots = 0
        self.state_cache: StateCache | None = None
        self.state_slots: StateSlots | None = None
        self.max_model_len = config.max_model_len
        self.sampler = Sampler()
        self.decode_graphs = None
        self.kv_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None
        self.sliding_kv_cache: torch.Tensor | None = None
        self.sliding_kv_scales: torch.Tensor | None = None
        self.num_blocks, self.num_sliding_blocks = self._plan_num_blocks()
        self._allocate_kv_cache()
        self._allocate_state_cache()
        from adaq.engine.cuda_graph import maybe_decode_graphs  # cuda backend on a GPU only

        self.decode_graphs = maybe_decode_graphs(self)

    # ---- KV cache -------------------------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_pools.nbytes(self.num_blocks)

    def _plan_num_blocks(self) -> tuple[int, int]:
        """(global blocks, sliding blocks including the null block; 0 without a sliding pool)."""
        if self.config.num_kv_blocks is not None:
            self._plan_state_slots(None)
            num_blocks = self.config.num_kv_blocks
        elif self.config.kv_cache_memory is not None:
            num_blocks = self._global_blocks_in(self._plan_state_slots(self.config.kv_cache_memory))
        elif self.device.type == "cuda":
            num_blocks = self._global_blocks_in(self._plan_state_slots(self._gpu_free_bytes_after_warmup()))
        else:
            num_blocks = self._cpu_default_blocks()
        if self.fit_context:
            self._fit_context(num_blocks)
        self._check_capacity(num_blocks)
        sliding = self._sliding_blocks_beside(num_blocks)
        if self.device.type == "cpu":
            sliding_bytes = sliding * self.sliding_geometry.bytes_per_block() if self.sliding_geometry else 0
            self._check_host_memory(num_blocks * self.geometry.bytes_per_block() + sliding_bytes)
        return num_blocks, sliding

    def _cpu_default_blocks(self) -> int:
        blocks_per_seq = -(-self.max_model_len // self.geometry.block_size)
        affordable = max(1, self._global_blocks_in(self._plan_state_slots(CPU_DEFAULT_KV_BYTES)))
        wanted = min(affordable, blocks_per_seq * self.config.max_num_seqs)
        if self.fit_context or blocks_per_seq * self.geometry.bytes_per_block() > _physical_memory_bytes() // 2:
            return wanted  # too small for one sequence: _fit_context caps the context, or _check_capacity says so
        return max(blocks_per_seq, wanted)

    def _fit_context(self, num_blocks: int) -> None:
        capacity = num_blocks * self.geometry.block_size
        if 0 < capacity < self.max_model_len:
            log.warning(f"context capped at {capacity} tokens, what the KV cache holds (the model claims "
                        f"{self.max_model_len}); set --max-model-len (and --kv-cache-memory or "
                        f"--gpu-memory-utilization) to change it")
            self.max_model_len = self.config.max_model_len = capacity

    def _sliding_blocks_beside(self, num_blocks: int) -> int:
        return self.kv_pools.sliding_blocks_beside(num_blocks)

    def _global_blocks_in(self, budget: int) -> int:
        return self.kv_pools.global_blocks_in(budget)

    def _plan_state_slots(self, budget: int | None) -> int:
        """Hybrid models: choose the state slots (all of max_num_seqs when `budget` is None) and return the bytes
        of `budget` left for the KV cache; other models: `budget` unchanged."""
        if self.state_geometry is None:
            return budget
        g, max_seqs = self.state_geometry, self.config.max_num_seqs
        self.num_state_slots = max_seqs if budget is None else g.slots_within(budget, max_seqs)
        return None if budget is None else max(budget - self.num_state_slots * g.bytes_per_slot(), 0)

    def _allocate_state_cache(self) -> None:
        if self.state_geometry is not None:
            self.state_cache = StateCache(self.state_layers, self.state_geometry, self.num_state_slots, self.device)
            self.state_slots = StateSlots(self.num_state_slots)

    @property
    def state_cache_bytes(self) -> int:
        return 0 if self.state_cache is None else self.state_cache.nbytes

    def _check_capacity(self, num_blocks: int) -> None:
        capacity = num_blocks * self.geometry.block_size
        if capacity >= self.max_model_len:
            return
        if self.config.num_kv_blocks is not None:
            knob = "raise --num-kv-blocks"
        elif self.config.kv_cache_memory is not None or self.device.type != "cuda":
            knob = "raise --kv-cache-memory"
        else:
            knob = f"raise --gpu-memory-utilization (now {self.config.gpu_memory_utilization})"
        raise AdaqError(f"the KV cache holds {capacity} tokens, fewer than one sequence of --max-model-len "
                        f"{self.max_model_len}: {knob} or lower --max-model-len")

    def _check_host_memory(self, kv_bytes: int) -> None:
        """A KV cache larger than the free RAM fails here, in one line, not in a huge allocation."""
        free = int(available_host_bytes() * HOST_MEMORY_SHARE)
        if kv_bytes <= free:
            return
        if self.config.kv_cache_memory is not None or self.config.num_kv_blocks is not None:
            knob = "lower --kv-cache-memory"
        else:
            fits = free // self.geometry.bytes_per_block() * self.geometry.block_size
            knob = f"pass --max-model-len {fits} or less (the model's context is {self.max_model_len})"
        raise AdaqError(f"the KV cache would take {kv_bytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB it may take "
                        f"of the free RAM: {knob}")

    def _allocate_kv_cache(self) -> None:
        self.kv_cache, self.kv_scales = _cache_tensors(self.geometry, self.num_blocks, self.device)
        self._attach_cache(self.global_layers, self.kv_cache, self.kv_scales, self.geometry)
        if self.sliding_geometry is not None:
            self.sliding_kv_cache, self.sliding_kv_scales = _cache_tensors(self.sliding_geometry,
                                                                           self.num_sliding_blocks, self.device)
            self._attach_cache(self.sliding_layers, self.sliding_kv_cache, self.sliding_kv_scales,
                               self.sliding_geometry, in_sliding_pool=True)

    @staticmethod
    def _attach_cache(layers: list[torch.nn.Module], kv_cache: torch.Tensor, kv_scales: torch.Tensor | None,
                      geometry: "KVGeometry", in_sliding_pool: bool = False) -> None:
        for index, layer in enumerate(layers):
            heads = getattr(layer, "num_kv_heads", None) or geometry.num_kv_heads
            dim = getattr(layer, "head_dim", None) or geometry.head_dim
            width = nvfp4_kv_row_bytes(dim) if geometry.nvfp4 else dim  # NVFP4: packed values, then block scales
            layer.k_cache, layer.v_cache = (layer_view(kv_cache[kind, index], heads, width) for kind in (0, 1))
            layer.k_scale = None if kv_scales is None else kv_scales[0, index, ..., :heads]
            layer.v_scale = None if kv_scales is None else kv_scales[1, index, ..., :heads]
            layer.in_sliding_pool = in_sliding_pool

    def _gpu_free_bytes_after_warmup(self) -> int:
        # An engine dropped earlier in this process may still hold its cache through a reference cycle (a captured
        # decode graph's closures name its model): collected now, its memory is this engine's to take.
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.warmup()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        budget = self._least_over_ranks(int(total * self.config.gpu_memory_utilization - (total - free) -
                                                (peak - current)))
        if budget <= 0:
            used_gib = (total - free + peak - current) / 2**30
            raise AdaqError(f"no GPU memory left for the KV cache: weights and activations take {used_gib:.1f} GiB "
                            f"of {total / 2**30:.1f} GiB; raise --gpu-memory-utilization (now "
                            f"{self.config.gpu_memory_utilization}) or lower --max-num-batched-tokens")
        return budget

    def _least_over_ranks(self, value: int) -> int:
        """Tensor parallelism: every rank sizes its cache for the same blocks, the fewest any rank can hold."""
        if not self.tp.sharded:
            return value
        import torch.distributed as dist

        least = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN, group=self.tp.group)
        return int(least.item())

    @torch.inference_mode()
    def warmup(self) -> None:
        """One step as large as the scheduler allows, against a one-block cache that every sequence aliases:
        it measures the activation peak before the real cache exists."""
        num_seqs = max(1, min(self.config.max_num_seqs, self.config.max_num_batched_tokens))
        seq_len = max(1, min(self.config.max_num_batched_tokens // num_seqs, self.max_model_len))
        g = self.geometry
        groups = [(self.global_layers, g)] + [(self.sliding_layers, self.sliding_geometry)] * bool(self.sliding_layers)
        for layers, geometry in groups:  # no sliding tables in this context: every layer reads block 0
            dummy, dummy_scales = _cache_tensors(geometry, 1, self.device, unit_scales=True)
            self._attach_cache(layers, dummy, dummy_scales, geometry)
        num_tokens = num_seqs * seq_len
        lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=self.device)
        set_context(is_prefill=True, cu_seqlens_q=_offsets(lens), max_seqlen_q=seq_len, context_lens=lens,
                    slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
                    block_tables=torch.zeros((num_seqs, -(-seq_len // g.block_size)), dtype=torch.int32,
                                             device=self.device),
                    max_context_len=seq_len)
        try:
            input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
            positions = torch.arange(seq_len, device=self.device).repeat(num_seqs)
            hidden = self.model(input_ids, positions)
            logits = self.model.compute_logits(hidden[seq_len - 1::seq_len])
            warm_params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05)
            self.sampler(logits, [Sequence(f"warmup-{i}", [0], warm_params) for i in range(num_seqs)])
        finally:
            reset_context()

    # ---- one step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Compute the batch's tokens; return the sampled token of each sequence (None where nothing is sampled).
        Prompt log-probabilities are written into the sequences' own tensors."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, input_tokens: torch.Tensor | None = None) -> LaunchedStep:
        """Queue the batch's work on the device and return without waiting for it. `input_tokens` (a device tensor,
        one per sequence) replaces the batch's input ids: a decode step launched before the previous step's tokens
        reached the host feeds them straight from the previous step's output."""
        inputs = self._prepare(batch, input_tokens)
        try:
            hidden = self._forward(inputs)
            tokens = self._sample(batch, inputs, hidden)
            for row, first, position, count in inputs.score_rows:
                self._score_prompt(batch.seqs[row], hidden[first:first + count], position)
            for row, index in inputs.candidate_rows:
                self._score_candidates(batch.seqs[row], hidden[index:index + 1])
        finally:
            reset_context()
        return LaunchedStep(batch, inputs.sample_rows, tokens, *self._copy_to_host(tokens))

    def collect(self, step: LaunchedStep) -> list[int | None]:
        """Wait for a launched step's tokens (only its own work, not what was queued after it)."""
        tokens: list[int | None] = [None] * len(step.batch.seqs)
        if step.tokens is None:
            return tokens
        if step.ready is not None:
            step.ready.synchronize()
        values = (step.host_tokens if step.host_tokens is not None else step.tokens).tolist()
        for row, token in zip(step.sample_rows, values):
            tokens[row] = token
        return tokens

    def _copy_to_host(self, tokens: torch.Tensor | None):
        if tokens is None or tokens.device.type != "cuda":
            return None, None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _sample(self, batch: ScheduledBatch, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor | None:
        """The sampled token ids [len(sample_rows)] on the device, or None when no sequence samples."""
        if not inputs.sample_rows:
            return None
        index = inputs.sample_token_index
        if index == list(range(len(index))):  # decode: every row samples its only token, no gather needed
            rows = hidden[:len(index)]
        else:
            rows = hidden[torch.tensor(index, device=self.device)]
        logits = self._logits(rows)
        return self.sampler(logits, [batch.seqs[row] for row in inputs.sample_rows])

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        return self.forward(inputs.input_ids, inputs.positions, inputs.graph_bucket, len(inputs.sample_rows))

    def forward(self, input_ids, positions, graph_bucket=None, batch: int = 0) -> torch.Tensor:
        """The staged step's hidden states: a graph replay (`batch` rows of its bucket) or an eager forward."""
        if graph_bucket is not None:
            return self.decode_graphs.replay(graph_bucket, batch)
        return self.model(input_ids, positions)

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        if self.link is not None:  # the other ranks compute their vocabulary shares of the same rows
            self.link.send_logits(rows)
        return self.model.compute_logits(rows)

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor, first_position: int) -> None:
        """log p(token[p + 1] | tokens[:p + 1]) and whether it was the argmax, for the given prompt positions."""
        for start in range(0, hidden.shape[0], LOGPROB_SLICE_ROWS):
            rows = hidden[start:start + LOGPROB_SLICE_ROWS]
            position = first_position + start
            targets = torch.tensor(seq.token_ids[position + 1:position + 1 + rows.shape[0]], device=self.device)
            logprobs = self._logits(rows).float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
            seq.prompt_logprobs[position:position + rows.shape[0]] = chosen.cpu()
            seq.prompt_greedy[position:position + rows.shape[0]] = (logprobs.argmax(dim=-1) == targets).cpu()

    def _score_candidates(self, seq: Sequence, hidden: torch.Tensor) -> None:
        logprobs = self._logits(hidden).float().log_softmax(dim=-1)[0]
        seq.candidate_logprobs = logprobs[torch.tensor(seq.candidates, device=self.device)].cpu()
        seq.next_token_argmax = int(logprobs.argmax())

    def _prepare(self, batch: ScheduledBatch, input_tokens: torch.Tensor | None = None) -> StepInputs:
        plan, rows = self._plan(batch)
        if self.link is not None:  # tensor parallelism: every rank runs the same step
            self.link.send_step(plan, input_tokens)
        rows.input_ids, rows.positions, rows.graph_bucket = self.stage(plan, input_tokens)
        if plan.graph and rows.graph_bucket is None:  # unreachable by construction (buckets up to max_num_seqs)
            self.fallbacks.report("decode CUDA graphs -> eager", "a decode step larger than the largest bucket "
                                  "or with a block table longer than max_model_len", CUDA_GRAPHS_SETTING)
        return rows

    def _plan(self, batch: ScheduledBatch) -> tuple["StepPlan", StepInputs]:
        """The step's model inputs as plain lists (what tensor-parallel ranks receive), and which rows sample or
        score (rank 0's business only)."""
        bs = self.geometry.block_size
        sliding = self.sliding_geometry is not None
        plan = StepPlan(is_decode=batch.is_decode)
        sample_rows, sample_index, score_rows, candidate_rows = [], [], [], []
        for row, (seq, count) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + count
            first = len(plan.input_ids)
            plan.input_ids.extend(seq.token_ids[start:end])
            plan.positions.extend(range(start, end))
            plan.slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            if sliding:
                plan.sliding_slots.extend(seq.sliding_table[p // bs] * bs + p % bs for p in range(start, end))
            plan.query_lens.append(count)
            plan.context_lens.append(end)
            if end == seq.num_tokens and seq.wants_tokens:
                sample_rows.append(row)
                sample_index.append(first + count - 1)
            scored_start, scored_end = max(start, seq.score_from - 1), min(end, seq.num_prompt_tokens - 1)
            if seq.params.prompt_logprobs and scored_start < scored_end:
                score_rows.append((row, first + scored_start - start, scored_start, scored_end - scored_start))
            if seq.candidates is not None and end == seq.num_tokens:
                candidate_rows.append((row, first + count - 1))
        plan.tables = [seq.block_table for seq in batch.seqs]
        plan.sliding_tables = [seq.sliding_table for seq in batch.seqs] if sliding else None
        plan.state_slots = [self.state_slots.slot_of(seq) for seq in batch.seqs] if self.state_slots is not None else None
        plan.graph = batch.is_decode and self.decode_graphs is not None and len(sample_rows) == len(batch.seqs)
        return plan, StepInputs(None, None, sample_rows, sample_index, score_rows, candidate_rows)

    def stage(self, plan: "StepPlan", input_tokens: torch.Tensor | None = None):
        """(input_ids, positions, graph bucket | None) on the device, and the step context set. `input_tokens` (a
        device tensor, one per sequence) replaces the plan's input ids (decode look-ahead)."""
        if plan.graph:
            bucket = self.decode_graphs.staged(len(plan.tables), plan.input_ids, plan.positions, plan.slots,
                                               plan.context_lens, plan.tables, plan.sliding_slots,
                                               plan.sliding_tables, plan.state_slots)
            if bucket is not None:
                if input_tokens is not None:
                    bucket.input_ids[:len(plan.tables)].copy_(input_tokens)
                set_context(is_prefill=False, max_seqlen_q=1, context_lens=bucket.context_lens,
                            slot_mapping=bucket.slot_mapping, block_tables=bucket.block_tables,
                            max_context_len=max(plan.context_lens), sliding_slot_mapping=bucket.sliding_slot_mapping,
                            sliding_block_tables=bucket.sliding_block_tables, state_slots=bucket.state_slots)
                return None, None, bucket
        sliding = plan.sliding_tables is not None
        tables = plan.tables
        width = max(len(table) for table in tables)
        padded = _padded(tables, width, -1)
        sliding_padded = _padded(plan.sliding_tables, width, NULL_BLOCK) if sliding else []
        input_ids, positions, slot_mapping, sliding_slot_mapping = self._upload(
            plan.input_ids + plan.positions + plan.slots + plan.sliding_slots, torch.int64,
            [len(plan.input_ids)] * 2 + [len(plan.slots), len(plan.sliding_slots)])
        if input_tokens is not None:
            input_ids = input_tokens
        lens, query, flat_tables, flat_sliding = self._upload(
            plan.context_lens + plan.query_lens + padded + sliding_padded, torch.int32,
            [len(plan.context_lens), len(plan.query_lens), len(padded), len(sliding_padded)])
        state_slots = None if plan.state_slots is None else \
            self._upload(plan.state_slots, torch.int64, [len(plan.state_slots)])[0]
        decode = plan.is_decode
        set_context(is_prefill=not decode, cu_seqlens_q=None if decode else _offsets(query),
                    max_seqlen_q=max(plan.query_lens), context_lens=lens, slot_mapping=slot_mapping,
                    block_tables=flat_tables.view(len(tables), width), max_context_len=max(plan.context_lens),
                    sliding_slot_mapping=sliding_slot_mapping if sliding else None,
                    sliding_block_tables=flat_sliding.view(len(tables), width) if sliding else None,
                    state_slots=state_slots)
        return input_ids, positions, None

    def _upload(self, values: list[int], dtype: torch.dtype, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        """One host-to-device copy (from pinned memory on a GPU) for several index tensors, returned as views."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cpu":
            host = host.pin_memory().to(self.device, non_blocking=True)
        return torch.split(host, sizes)


def _padded(tables: list[list[int]], width: int, pad: int) -> list[int]:
    return [value for table in tables for value in table + [pad] * (width - len(table))]


def _cache_tensors(g: "KVGeometry", num_blocks: int, device, unit_scales: bool = False):
    """One group's cache [2, layers, blocks, block_size, kv_heads, row] and, for FP8 and NVFP4, its scales (fp32, or
    NVFP4's E8M0 exponent bytes); `unit_scales`: every scale 1 (a warm-up cache), else 0."""
    shape = g.cache_shape(num_blocks)
    unit = NVFP4_KV_EXP_BIAS if g.nvfp4 else 1.0  # E8M0 127 = 2^0
    try:
        cache = torch.zeros(shape, dtype=g.dtype, device=device)
        scales = torch.full(shape[:-1], unit if unit_scales else 0, dtype=g.scale_dtype, device=device) \
            if g.has_scales else None
    except (RuntimeError, MemoryError) as error:  # torch's CPU and CUDA out-of-memory errors are RuntimeErrors
        raise AdaqError(f"cannot allocate the KV cache ({num_blocks * g.bytes_per_block() / 2**30:.2f} GiB for "
                        f"{num_blocks} blocks: {str(error).splitlines()[0][:200]}); lower --max-model-len or "
                        f"--kv-cache-memory") from None
    return cache, scales


def _kv_groups(layers: list[torch.nn.Module], window_kv: bool) -> tuple[list, list]:
    """(global-pool layers, sliding-pool layers), as kv_layout.split_pools splits them."""
    global_, sliding = split_pools([getattr(layer, "sliding_window", None) for layer in layers], window_kv)
    return [layers[index] for index in global_], [layers[index] for index in sliding]


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2**62  # unknown: no cap


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _layer_kv(model_config: dict, layers: list[torch.nn.Module]) -> list[LayerKV]:
    """Each attention layer's KV heads, head_dim and window, from the layer itself, else from config.json."""
    text = text_config(model_config)
    num_heads = text["num_attention_heads"]
    default_dim = text.get("head_dim") or text["hidden_size"] // num_heads
    default_heads = text.get("num_key_value_heads") or num_heads
    return [LayerKV(getattr(layer, "num_kv_heads", None) or default_heads,
                    getattr(layer, "head_dim", None) or default_dim, getattr(layer, "sliding_window", None))
            for layer in layers]


def layer_view(cache: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """A layer's [blocks, block_size, heads, dim] in the first heads * dim values of each slot of `cache`."""
    if cache.shape[-2:] == (heads, dim):
        return cache
    return cache.flatten(2)[..., :heads * dim].unflatten(2, (heads, dim))
