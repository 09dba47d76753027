"""The engine loop: requests in, one scheduled step at a time, outputs (with text deltas) out.

`add_request` and `abort_request` may be called from another thread than `step` (a server's event loop against
a worker thread that steps): they only validate and enqueue; `step` takes the queued work at its start.
"""

import itertools
import json
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaq.engine.config import EngineConfig, text_config
from adaq.engine.model_runner import ModelRunner
from adaq.engine.sampling_params import SamplingParams
from adaq.engine.scheduler import Scheduler
from adaq.engine.state_cache import make_block_manager
from adaq.engine.sequence import RequestMetrics, Sequence, SequenceStatus
from adaq.errors import AdaqError


LOOK_AHEAD_ENV = "ADAQ_DECODE_LOOKAHEAD"  # "0": read each step's tokens before launching the next
LOOK_AHEAD_TOKEN = 0  # stands in a sequence's token list for a token still on the device (never read as input)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # the output text so far (stop strings trimmed; while streaming, minus a possible partial stop)
    token_ids: list[int]  # the output tokens so far
    new_text: str  # text since this request's previous output
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: str | int | None  # the stop string or stop token that ended it
    metrics: RequestMetrics
    prompt_logprobs: torch.Tensor | None = None
    prompt_greedy: torch.Tensor | None = None
    candidate_logprobs: torch.Tensor | None = None
    next_token_argmax: int | None = None


@dataclass
class EngineStats:
    """Counters since the engine started: tokens and seconds spent in prefill steps and in decode steps."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    decode_tokens: int = 0
    decode_time: float = 0.0
    steps: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    step_times: list[float] = field(default_factory=list, repr=False)


class LLMEngine:
    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None, model_config: dict | None = None,
                 tokenizer=None, source_factory=None):
        """`model`: an already loaded model (one rank); `source_factory(device)`: what the weights are read from
        instead of the checkpoint folder (a picklable callable: tensor-parallel ranks each call it)."""
        self.source_factory = source_factory
        self.config = config
        self.model_config = model_config if model_config is not None else _read_model_config(config.model)
        self.tokenizer = tokenizer if tokenizer is not None or config.skip_tokenizer else load_tokenizer(config.model)
        self.model_max_len = _model_max_len(self.model_config)
        fit_context = config.max_model_len is None  # the model's own length: the KV cache may cap it
        config.max_model_len = self._resolve_max_model_len()
        self.workers = None  # tensor parallelism: ranks 1..N-1 (adaq.engine.tensor_parallel)
        self.runner = self._make_runner(model, fit_context)
        self.block_manager = make_block_manager(
            self.runner, self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
            self.runner.sliding_window if self.runner.num_sliding_blocks else None, self.runner.num_sliding_blocks)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = _eos_token_ids(config.model, self.model_config, self.tokenizer)
        self.stats = EngineStats()
        self._requests: dict[str, Sequence] = {}
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._ids = itertools.count()
        self._in_flight = None  # a launched step whose tokens the host has not read yet (decode look-ahead)
        self.look_ahead = os.environ.get(LOOK_AHEAD_ENV, "1") != "0"

    def _make_runner(self, model: torch.nn.Module | None, fit_context: bool) -> ModelRunner:
        config = self.config
        if config.tensor_parallel_size == 1:
            model = model if model is not None else load_model(self.model_config, config,
                                                                source_factory=self.source_factory)
            return ModelRunner(model, self.model_config, config, fit_context)
        if model is not None:
            raise AdaqError("tensor parallelism loads the model on every rank itself: pass no model")
        from adaq.engine.tensor_parallel import Workers

        self.workers = Workers(config, self.model_config, fit_context, self.source_factory)
        with self._tensor_parallel_step():
            model = load_model(self.model_config, config, self.workers.tp, self.source_factory)
            return ModelRunner(model, self.model_config, config, fit_context, link=self.workers.link)

    @contextmanager
    def _tensor_parallel_step(self):
        """Rank 0's side of a step (or of the start) that other ranks share: a dead rank fails it with an
        AdaqError naming the rank, and the workers are stopped."""
        workers = self.workers
        if workers is None:
            yield
            return
        workers.check()
        workers.busy_since = time.monotonic()
        try:
            yield
        except AdaqError as error:
            if workers.dead_worker() is None:
                raise  # the user's error (a prompt, a strict fallback): the ranks stay in step
            workers.close()
            raise workers.died(error) from None
        except Exception as error:
            failure = workers.died(error)
            workers.close()
            raise failure from error  # the cause's traceback stays in the log (ADAQ_DEBUG=1 raises it)
        finally:
            workers.busy_since = None

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do with one rank); the engine cannot step afterwards."""
        if self.workers is not None:
            self.workers.close()

    def memory_per_rank(self) -> list[dict]:
        """Each rank's weight, KV-cache and state-cache bytes and its GPU's peak allocation (rank 0 alone without
        tensor parallelism)."""
        from adaq.engine.tensor_parallel import memory_of

        mine = memory_of(self.runner)
        if self.workers is None:
            return [mine]
        with self._tensor_parallel_step():
            return self.workers.link.gather_memory(mine)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def fallbacks(self):
        """What runs slower or less exact than asked (adaq.backends.fallbacks.Fallbacks; empty when nothing)."""
        return self.runner.fallbacks

    def _resolve_max_model_len(self) -> int:
        asked = self.config.max_model_len
        if asked is None:
            return self.model_max_len
        if asked > self.model_max_len:
            raise AdaqError(f"--max-model-len {asked} is longer than the model's context "
                            f"(max_position_embeddings {self.model_max_len}): use at most {self.model_max_len}")
        return asked

    # ---- requests ---------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise AdaqError(f"{self.config.model}: no tokenizer loaded; pass token ids instead of text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (text or token ids); returns its id. Raises AdaqError for a prompt that cannot run."""
        params = params or SamplingParams()
        token_ids = self.encode(prompt) if isinstance(prompt, str) else [int(token) for token in prompt]
        self._check_prompt(token_ids, params, least_tokens=2 if params.prompt_logprobs else 1)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise AdaqError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, token_ids, params, prompt=prompt if isinstance(prompt, str) else None)
        seq.max_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        self._enqueue(seq)
        return request_id

    def _enqueue(self, seq: Sequence) -> None:
        self._requests[seq.request_id] = seq
        self._inbox.append(seq)

    def add_scoring_request(self, token_ids: list[int], score_from: int = 1,
                            candidates: list[int] | None = None) -> str:
        """A request that generates nothing: log p of prompt tokens [score_from:] given their prefixes and, with
        `candidates`, log p of each candidate id as the next token (plus the argmax there)."""
        params = SamplingParams(max_tokens=0, prompt_logprobs=True)
        token_ids = [int(token) for token in token_ids]
        self._check_prompt(token_ids, params, least_tokens=2 if candidates is None else 1)
        if not 1 <= score_from <= len(token_ids):
            raise AdaqError(f"score_from {score_from} outside [1, {len(token_ids)}]")
        seq = Sequence(f"score-{next(self._ids)}", token_ids, params)
        seq.score_from, seq.candidates = score_from, None if candidates is None else list(candidates)
        self._enqueue(seq)
        return seq.request_id

    def _check_prompt(self, token_ids: list[int], params: SamplingParams, least_tokens: int = 1) -> None:
        if not token_ids:
            raise AdaqError("the prompt is empty")
        room = 1 if params.max_tokens > 0 else 0
        if len(token_ids) + room > self.max_model_len:
            raise AdaqError(f"the prompt has {len(token_ids)} tokens, more than the context allows "
                            f"(--max-model-len {self.max_model_len}, up to {self.model_max_len} for this model): "
                            f"shorten the prompt or raise --max-model-len")
        vocab = text_config(self.model_config).get("vocab_size")
        if vocab and not all(0 <= token < vocab for token in token_ids):
            raise AdaqError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        if len(token_ids) < least_tokens:
            raise AdaqError(f"scoring needs a prompt of at least {least_tokens} tokens")

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (at the start of the next step)."""
        self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        return self._in_flight is not None or bool(self._inbox or self._aborts or self.scheduler.has_unfinished())

    def num_unfinished(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that produced tokens or finished.

        Decode look-ahead: while a pure decode step runs on the GPU, the next one is launched with the tokens it is
        about to produce (still on the device) before the host reads them, so the host's bookkeeping of a step
        overlaps the device's work on the next. A row whose sequence ends in between is computed and dropped."""
        outputs = self._take_inbox()
        with self._tensor_parallel_step():
            step, self._in_flight = self._in_flight, None
            if step is None:
                batch = self.scheduler.schedule()
                if batch is None:
                    return outputs
                step = self._launch(batch)
            if not outputs and self._can_look_ahead(step):
                self._in_flight = self._look_ahead(step)
            return outputs + self._complete(step)

    def _launch(self, batch, input_tokens=None):
        started = time.perf_counter()
        for seq in batch.seqs:
            seq.metrics.first_scheduled_time = seq.metrics.first_scheduled_time or started
        return self.runner.launch(batch, input_tokens)

    def _can_look_ahead(self, step) -> bool:
        """Only when the next step is certain to be this batch again, one token further: a decode step of every
        running sequence, nothing waiting, none at its token limit, the blocks it needs free (no preemption)."""
        seqs = step.batch.seqs
        return (self.look_ahead and step.batch.is_decode and step.tokens is not None
                and len(step.sample_rows) == len(seqs) and not self.scheduler.waiting
                and _same_objects(seqs, self.scheduler.running)
                and len(seqs) <= self.config.max_num_batched_tokens
                and self._look_ahead_blocks_free(seqs)
                and all(seq.num_output_tokens + 1 < seq.max_tokens and not seq.is_finished for seq in seqs))

    def _look_ahead_blocks_free(self, seqs) -> bool:
        """Whether both pools have the new blocks the look-ahead step takes: its token sits one past the one being
        computed now."""
        manager = self.block_manager
        needs = [manager.new_blocks_needed(seq, seq.num_computed_tokens + 2) for seq in seqs]
        return (manager.num_free_blocks >= sum(need for need, _ in needs)
                and manager.num_free_sliding_blocks >= sum(need for _, need in needs))

    def _look_ahead(self, step):
        for seq in step.batch.seqs:  # as if its token were known: computed, with a stand-in until it is read
            seq.num_computed_tokens += 1
            seq.token_ids.append(LOOK_AHEAD_TOKEN)
        step.advanced = True
        batch = self.scheduler.schedule()
        return self._launch(batch, step.tokens)

    def _complete(self, step) -> list[RequestOutput]:
        tokens = self.runner.collect(step)
        self._count_step(step.batch, time.perf_counter() - step.started)
        outputs = []
        for seq, count, token in zip(step.batch.seqs, step.batch.num_new_tokens, tokens):
            if seq.is_finished:  # ended (or aborted) while this step was in flight: its row is dropped
                continue
            if step.advanced:
                seq.token_ids[-1] = token  # the stand-in of _look_ahead
            else:
                seq.num_computed_tokens += count
            self.block_manager.register_computed_blocks(seq)
            self.block_manager.release_behind_window(seq)
            if token is not None:
                self._append_token(seq, token, placed=step.advanced)
            elif not seq.wants_tokens and seq.num_computed_tokens >= seq.num_prompt_tokens:
                seq.finish("length")
            if token is not None or seq.is_finished:
                outputs.append(self._output(seq))
            if seq.is_finished:
                self._retire(seq)
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        outputs = []
        while self._aborts:
            seq = self._requests.get(self._aborts.popleft())
            if seq is None or seq.is_finished:
                continue
            seq.finish("abort")
            self.stats.aborted_requests += 1
            self._retire(seq)
            outputs.append(self._output(seq))
        return outputs

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._requests.pop(seq.request_id, None)
        self.stats.finished_requests += seq.finish_reason != "abort"

    def _count_step(self, batch, elapsed: float) -> None:
        self.stats.steps += 1
        if batch.is_decode:
            self.stats.decode_tokens += batch.num_tokens
            self.stats.decode_time += elapsed
        else:
            self.stats.prompt_tokens += batch.num_tokens
            self.stats.prompt_time += elapsed

    def _append_token(self, seq: Sequence, token: int, placed: bool = False) -> None:
        if not placed:
            seq.token_ids.append(token)
        metrics = seq.metrics
        metrics.num_output_tokens = seq.num_output_tokens
        metrics.first_token_time = metrics.first_token_time or time.perf_counter()
        params = seq.params
        if self.tokenizer is not None:
            seq.output_text += seq.detokenizer.step(self.tokenizer, seq.token_ids, params.skip_special_tokens)
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop", token)
        elif token in params.stop_token_ids:
            seq.finish("stop", token)
        elif params.stop and self._hit_stop_string(seq):
            pass
        elif seq.num_output_tokens >= seq.max_tokens:
            seq.finish("length")
        ended_on_token = seq.is_finished and not isinstance(seq.stop_reason, str)
        if ended_on_token and self.tokenizer is not None:
            seq.output_text += seq.detokenizer.flush(self.tokenizer, seq.token_ids, params.skip_special_tokens)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        params = seq.params
        search_from = max(0, seq.emitted_text_len - params.max_stop_len)
        hits = [(seq.output_text.find(stop, search_from), stop) for stop in params.stop]
        hits = [(index, stop) for index, stop in hits if index >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        seq.output_text = seq.output_text[:index + len(stop) if params.include_stop_str_in_output else index]
        seq.finish("stop", stop)
        return True

    def _output(self, seq: Sequence) -> RequestOutput:
        visible = len(seq.output_text)
        if not seq.is_finished and seq.params.stop:
            visible = max(seq.emitted_text_len, visible - seq.params.max_stop_len + 1)
        new_text = seq.output_text[seq.emitted_text_len:visible]
        new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.emitted_token_count:]
        seq.emitted_text_len, seq.emitted_token_count = visible, seq.num_output_tokens
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, seq.output_text[:visible],
                             seq.output_token_ids, new_text, new_tokens, seq.is_finished, seq.finish_reason,
                             seq.stop_reason, seq.metrics, seq.prompt_logprobs, seq.prompt_greedy,
                             seq.candidate_logprobs, seq.next_token_argmax)

    # ---- state for servers and benchmarks -------------------------------------------------------------------
    def kv_usage(self) -> float:
        return self.block_manager.usage

    def prefix_cache_hit_rate(self) -> float:
        """Share of admitted prompt tokens whose KV came from the prefix cache."""
        manager = self.block_manager
        return manager.prefix_hit_tokens / manager.prefix_queried_tokens if manager.prefix_queried_tokens else 0.0

    def queue_lengths(self) -> tuple[int, int]:
        """(waiting, running) sequences."""
        return len(self._inbox) + len(self.scheduler.waiting), len(self.scheduler.running)

    def default_sampling_params(self) -> dict:
        """The sampling defaults the model's generation_config.json recommends (temperature, top_p, top_k, min_p)."""
        generation = _read_json(Path(self.config.model) / "generation_config.json")
        keys = ("temperature", "top_p", "top_k", "min_p")
        return {key: generation[key] for key in keys if generation.get(key) is not None}


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def load_model(model_config: dict, config: EngineConfig, tp=None, source_factory=None) -> torch.nn.Module:
    """The model on `config.device`, or with `tp` (adaq.backends.parallel.TPGroup) this rank's shard of it; from
    the checkpoint folder, or from `source_factory(device)`."""
    from adaq.formats.checkpoint import open_checkpoint
    from adaq.backends import get_backend
    from adaq.models import build_model, load_weights

    from adaq.backends.fallbacks import Fallbacks

    source = open_checkpoint(config.model) if source_factory is None else source_factory(config.device)
    # None: auto choosing the CPU is a fallback; a tensor-parallel rank runs where its rank puts it
    device = config.device if config.device_given or tp is not None else None
    options = {} if tp is None else {"tp": tp}
    backend = get_backend(config.backend, device, fallbacks=Fallbacks(strict=config.strict), **options)
    model = build_model(model_config, backend, config.dtype, config.device, lm_head=config.lm_head)
    load_weights(model, source)
    return model


def load_tokenizer(path: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(path) / name).is_file() for name in names):
        raise AdaqError(f"{path}: no tokenizer (tokenizer.json or tokenizer_config.json); copy the tokenizer files "
                        f"of the source model into the checkpoint folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many kinds; the user needs one line
        raise AdaqError(f"{path}: cannot load the tokenizer ({type(error).__name__}: {error})") from None


def _read_model_config(path: Path) -> dict:
    from adaq.formats.checkpoint import read_config

    return read_config(Path(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as error:
        raise AdaqError(f"{path}: not valid JSON ({error})") from None


def _model_max_len(model_config: dict) -> int:
    text = text_config(model_config)
    return int(text.get("max_position_embeddings") or model_config.get("max_position_embeddings") or 2048)


def _eos_token_ids(path: Path, model_config: dict, tokenizer) -> set[int]:
    candidates = [_read_json(Path(path) / "generation_config.json").get("eos_token_id"),
                  text_config(model_config).get("eos_token_id"), model_config.get("eos_token_id"),
                  getattr(tokenizer, "eos_token_id", None)]
    ids = set()
    for value in candidates:
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


__all__ = ["LLMEngine", "RequestOutput", "EngineStats", "SequenceStatus"]
