"""What a request asks of the sampler and of the stopping rules; validated on creation."""

import math
from dataclasses import dataclass, field

from adaq.errors import AdaqError


class InvalidSamplingParams(AdaqError):
    """A sampling value out of its range; the message names the field."""


@dataclass
class SamplingParams:
    """Per-request generation settings, with vLLM's names and meanings.

    temperature 0 is greedy; top_k 0 or -1 and top_p 1 and min_p 0 disable those filters. `stop` strings are
    matched on the decoded text and trimmed from it; `stop_token_ids` and the model's EOS ids end generation on
    the token. max_tokens 0 is allowed only with prompt_logprobs (scoring a prompt without generating).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [text for text in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check()

    def _check(self) -> None:
        _require(_is_int(self.max_tokens), "max_tokens", self.max_tokens, "an integer")
        least_tokens = 0 if self.prompt_logprobs else 1
        _require(self.max_tokens >= least_tokens, "max_tokens", self.max_tokens, f">= {least_tokens}")
        _require(_is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature, ">= 0")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k, "an integer >= -1 (0 or -1: off)")
        _require(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _require(self.seed is None or (_is_int(self.seed) and self.seed >= 0), "seed", self.seed, "an integer >= 0")
        _require(all(isinstance(text, str) and text for text in self.stop), "stop", self.stop, "non-empty strings")
        _require(all(_is_int(token) and token >= 0 for token in self.stop_token_ids), "stop_token_ids",
                 self.stop_token_ids, "token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def max_stop_len(self) -> int:
        return max((len(text) for text in self.stop), default=0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise InvalidSamplingParams(f"invalid sampling parameter {name}={value!r}: must be {expected}")
