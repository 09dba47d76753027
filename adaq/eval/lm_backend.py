"""adaq as an lm-eval model: `lm_eval --model adaq --model_args pretrained=PATH` (see adaq.eval.plugin).

Log-likelihoods, rolling log-likelihoods and greedy generation all go to a scorer in large batches, so the engine's
scheduler packs them; the output layer runs only where a score is read. Requests that share a context and ask for
a single continuation token each (the ten answer letters of a log-likelihood MMLU-Pro question) are scored from
one pass over the context. Encoding, truncation and stop handling follow lm-eval's HFLM, so the numbers agree
with `--model hf` on the same weights.
"""

from collections import defaultdict
from collections.abc import Callable

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from adaq.eval.scoring import TokenScores

Request = tuple[tuple[str, str], list[int], list[int]]


@register_model("adaq")
class AdaqLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, scorer=None, runner: str = "engine", backend: str = "auto",
                 kv_cache_dtype: str | None = None, dtype: str | None = None, device: str | None = None,
                 max_length: int | None = None, batch_size: int | str = 64, max_batch_size: int | None = None,
                 max_gen_toks: int = 256, progress: Callable[[int], None] | None = None, **engine_kwargs):
        super().__init__()
        if scorer is None:
            from adaq.eval.sources import load_scorer

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's CLI asks for cuda by default; like HFLM, fall back to what is there

            scorer = load_scorer(str(pretrained), runner=runner, backend=backend, kv_cache_dtype=kv_cache_dtype,
                                 dtype=dtype, device=device, max_model_len=_plus_one(max_length), **engine_kwargs)
        self.scorer = scorer
        self.tokenizer = scorer.tokenizer
        # HFLM's max_length counts the tokens fed to the model; a scorer also holds the last (scored) token.
        self._max_length = _int_or_none(max_length) or scorer.max_length - 1
        # lm-eval's batch size is how many requests go to the engine at once; "auto" leaves it to the engine.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else int(max_batch_size or 64)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress or (lambda done: None)

    # ---- tokens -------------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **options)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- log-likelihood -----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs):
        windows = [self._truncate(context + continuation, len(context)) for _, context, continuation in requests]
        scores = self._score_windows(windows)
        results = [(float(s.logprobs.sum()), bool(s.greedy.all()) if s.greedy is not None else False) for s in scores]
        for (cache_key, _, _), result in zip(requests, results):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def _truncate(self, tokens: list[int], context_len: int) -> tuple[list[int], int]:
        """Keep what HFLM feeds (the last max_length tokens) plus the last token; return them and the index of the
        first continuation token."""
        dropped = max(0, len(tokens) - self.max_length - 1)
        return tokens[dropped:], max(1, context_len - dropped)

    def _score_windows(self, windows: list[tuple[list[int], int]]) -> list[TokenScores]:
        """Score tokens[start:] of every window: shared-context single-token groups in one pass each, the rest
        longest first in batches."""
        results: list[TokenScores | None] = [None] * len(windows)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (tokens, start) in enumerate(windows):
            if start == len(tokens) - 1:
                groups[tuple(tokens[:-1])].append(index)
        shared = {context: members for context, members in groups.items() if len(members) > 1}
        grouped = {index for members in shared.values() for index in members}
        singles = [index for index in range(len(windows)) if index not in grouped]
        self._score_groups(windows, shared, results)
        self._score_singles(windows, singles, results)
        return results

    def _score_groups(self, windows, shared: dict[tuple[int, ...], list[int]], results: list) -> None:
        contexts = sorted(shared, key=len, reverse=True)
        for begin in range(0, len(contexts), self.batch_size):
            batch = contexts[begin:begin + self.batch_size]
            candidates = [[windows[i][0][-1] for i in shared[context]] for context in batch]
            outputs = self.scorer.next_token_logprobs([list(c) for c in batch], candidates)
            for context, cands, (logprobs, argmax) in zip(batch, candidates, outputs):
                for index, candidate, logprob in zip(shared[context], cands, logprobs):
                    results[index] = TokenScores(logprob.reshape(1), torch.tensor([candidate == argmax]))
                self.progress(len(shared[context]))

    def _score_singles(self, windows, indices: list[int], results: list) -> None:
        indices = sorted(indices, key=lambda i: len(windows[i][0]), reverse=True)
        for begin in range(0, len(indices), self.batch_size):
            batch = indices[begin:begin + self.batch_size]
            outputs = self.scorer.score([windows[i][0] for i in batch], [windows[i][1] for i in batch])
            for index, output in zip(batch, outputs):
                results[index] = output
            self.progress(len(batch))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for owner, (string,) in enumerate(request.args for request in requests):
            token_windows = get_rolling_token_windows(token_list=self.tok_encode(string),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for context, predicted in map(make_disjoint_window, token_windows):
                windows.append((context + predicted, len(context)))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, scores in zip(owners, self._score_windows(windows)):
            totals[owner] += float(scores.logprobs.sum())
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            by_kwargs[repr(sorted(request.args[1].items()))].append(index)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for indices in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_tokens = min(kwargs.pop("max_gen_toks"), self.max_length - 1)  # leave the prompt a token at least
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            for begin in range(0, len(indices), self.batch_size):
                batch = indices[begin:begin + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_tokens)
                           for i in batch]
                texts = self.scorer.generate(prompts, until, max_tokens, temperature=temperature)
                for index, text in zip(batch, texts):
                    results[index] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", requests[index].args, results[index])
                self.progress(len(batch))
        return results


def _plus_one(max_length) -> int | None:
    """The engine context for an lm-eval max_length: the fed tokens plus the last, scored one."""
    value = _int_or_none(max_length)
    return None if value is None else value + 1


def _int_or_none(value) -> int | None:
    return None if value in (None, "", "None") else int(value)
