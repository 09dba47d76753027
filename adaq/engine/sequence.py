"""One request as the engine tracks it: its tokens, how many are in the KV cache, its blocks and its text."""

import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from adaq.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of a request's life, and its token counts."""

    arrival_time: float
    num_prompt_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_output_tokens: int = 0
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.finished_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        elapsed = self.finished_time - self.first_token_time
        return (self.num_output_tokens - 1) / elapsed if elapsed > 0 else None


@dataclass
class Detokenizer:
    """vLLM's incremental detokenization: decode a short window so multi-token characters and leading spaces
    come out right, and emit text only once it no longer ends in a partial UTF-8 character."""

    prefix_offset: int
    read_offset: int

    @classmethod
    def after_prompt(cls, num_prompt_tokens: int) -> "Detokenizer":
        return cls(prefix_offset=max(num_prompt_tokens - 5, 0), read_offset=num_prompt_tokens)

    def step(self, tokenizer, token_ids: list[int], skip_special_tokens: bool) -> str:
        prefix_text = tokenizer.decode(token_ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=skip_special_tokens)
        full_text = tokenizer.decode(token_ids[self.prefix_offset:], skip_special_tokens=skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full_text[len(prefix_text):]

    def flush(self, tokenizer, token_ids: list[int], skip_special_tokens: bool) -> str:
        """At the end, the text held back for an unfinished UTF-8 character (it stays as U+FFFD)."""
        if self.read_offset >= len(token_ids):
            return ""
        prefix_text = tokenizer.decode(token_ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=skip_special_tokens)
        full_text = tokenizer.decode(token_ids[self.prefix_offset:], skip_special_tokens=skip_special_tokens)
        self.prefix_offset = self.read_offset = len(token_ids)
        return full_text[len(prefix_text):]


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    max_tokens: int = 0  # params.max_tokens clipped to the context that is left
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K and V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks of block_table known to the prefix cache
    sliding_table: list[int] = field(default_factory=list)  # sliding-window layers' blocks (block_manager.py)
    num_released_blocks: int = 0  # leading entries of sliding_table given back (NULL_BLOCK)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    output_text: str = ""
    emitted_text_len: int = 0
    emitted_token_count: int = 0
    generator: torch.Generator | None = None
    prompt_logprobs: torch.Tensor | None = None  # [num_prompt_tokens - 1]: log p(token i+1 | tokens <= i)
    prompt_greedy: torch.Tensor | None = None  # [num_prompt_tokens - 1] bool: was token i+1 the argmax
    score_from: int = 1  # first prompt token whose log p is wanted (the output layer runs from score_from - 1)
    candidates: list[int] | None = None  # ids whose log p as the token after the whole prompt is wanted
    candidate_logprobs: torch.Tensor | None = None
    next_token_argmax: int | None = None
    detokenizer: Detokenizer | None = None
    metrics: RequestMetrics | None = None
    _block_hashes: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)
        self.detokenizer = Detokenizer.after_prompt(self.num_prompt_tokens)
        self.metrics = RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=self.num_prompt_tokens)
        if self.params.prompt_logprobs:
            self.prompt_logprobs = torch.full((self.num_prompt_tokens - 1,), float("nan"))
            self.prompt_greedy = torch.zeros(self.num_prompt_tokens - 1, dtype=torch.bool)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def wants_tokens(self) -> bool:
        """Whether the end of this sequence's next completed chunk is sampled (prompt scoring samples nothing)."""
        return self.max_tokens > 0

    def block_hashes(self, num_blocks: int, block_size: int) -> list[int]:
        """Hashes of the first `num_blocks` full blocks: each covers its tokens and, through its parent, all before."""
        num_blocks = min(num_blocks, self.num_tokens // block_size)
        while len(self._block_hashes) < num_blocks:
            index = len(self._block_hashes)
            parent = self._block_hashes[-1] if index else None
            tokens = tuple(self.token_ids[index * block_size:(index + 1) * block_size])
            self._block_hashes.append(hash((parent, tokens)))
        return self._block_hashes[:num_blocks]

    def max_reusable_tokens(self) -> int:
        """How many leading tokens may come from the prefix cache: the hidden states of the rest are needed (the
        last token's for sampling, the scored prompt positions' for log-probabilities)."""
        limit = self.num_tokens - 1
        if self.params.prompt_logprobs:
            limit = min(limit, self.score_from - 1)
        return limit

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finished_time = time.perf_counter()
