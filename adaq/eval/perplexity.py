"""Perplexity over fixed, non-overlapping windows, exactly as data/README.md measures its anchor figures:

tokenize the whole text once (no special tokens; `<unk>` and the like read as plain text), cut the ids into
consecutive chunks of window-1 (a short tail is dropped), prepend BOS to each, score tokens 2..window of every
window, perplexity = exp(mean negative log-likelihood over all scored tokens). `max_windows` keeps the first N
windows: the anchors of data/README.md are the first 64 windows of 512 tokens of wikitext-2's test.txt.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adaq.errors import AdaqError


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    stderr: float  # of the perplexity, from the spread of per-window mean NLLs (delta method)
    num_windows: int
    num_scored_tokens: int
    window: int
    window_nll: list[float] = field(default_factory=list, repr=False)


def make_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> list[list[int]]:
    if window < 2:
        raise AdaqError(f"invalid --window {window}: must be at least 2")
    if max_windows is not None and max_windows < 1:
        raise AdaqError(f"invalid --max-windows {max_windows}: must be at least 1")
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None:
        raise AdaqError("the tokenizer has no BOS token: the perplexity windows start with BOS")
    body = window - 1
    windows = [[bos] + ids[start:start + body] for start in range(0, len(ids) - body + 1, body)]
    if not windows:
        raise AdaqError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return windows[:max_windows]


def perplexity(scorer, text: str, window: int = 512, max_windows: int | None = None, batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    windows = make_windows(scorer.tokenizer, text, window, max_windows)
    window_nll = []
    for begin in range(0, len(windows), batch_size):
        batch = windows[begin:begin + batch_size]
        for scores in scorer.score(batch, [1] * len(batch)):
            window_nll.append(-float(scores.logprobs.double().sum()))
        if progress:
            progress(len(batch))
    return summarize(window_nll, window)


def summarize(window_nll: list[float], window: int) -> PerplexityResult:
    scored = window - 1
    per_window = torch.tensor(window_nll, dtype=torch.float64) / scored
    mean = float(per_window.mean())
    spread = float(per_window.std()) / math.sqrt(len(per_window)) if len(per_window) > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, mean, ppl * spread, len(window_nll), scored * len(window_nll), window, window_nll)
