"""The Python API: `adaq.LLM(path).generate(prompts, SamplingParams(...))`, as in vLLM."""

from collections.abc import Iterator, Sequence as SequenceOf
from pathlib import Path

import torch

from adaq.engine.chat import chat_token_ids
from adaq.engine.config import EngineConfig
from adaq.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from adaq.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """A checkpoint loaded for generation. Settings are EngineConfig's (see adaq/engine/config.py)."""

    def __init__(self, path: str | Path, backend: str = "auto", kv_cache_dtype: str = "fp8",
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1, lm_head: str = "bf16",
                 **settings):
        config = EngineConfig(path, backend=backend, kv_cache_dtype=kv_cache_dtype, lm_head=lm_head,
                              max_model_len=max_model_len,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, device=device,
                              enable_prefix_caching=enable_prefix_caching,
                              tensor_parallel_size=tensor_parallel_size, **settings)
        self.engine = LLMEngine(config)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (a no-op with one rank)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def generate(self, prompts: Prompt | SequenceOf[Prompt],
                 params: SamplingParams | SequenceOf[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched; outputs in the prompts' order."""
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params_list = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = [self.engine.add_request(prompt, p) for prompt, p in zip(prompts, params_list)]
        return self._run_to_completion(ids)

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | SequenceOf[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([chat_token_ids(self.tokenizer, conv) for conv in conversations], params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated (stop strings never appear, even in part)."""
        request_id = self.engine.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        finished = output.finished
                        if output.new_text:
                            yield output.new_text
        finally:
            if not finished:
                self.engine.abort_request(request_id)
                self.engine.step()

    def prompt_logprobs(self, token_lists: SequenceOf[list[int]], with_greedy: bool = False,
                        start: SequenceOf[int] | None = None):
        """log p(tokens[i + 1] | tokens[:i + 1]) for every i: one fp32 tensor of len(tokens) - 1 per list.

        Batched through prefill requests that sample nothing. `start[k]`: the first token of list k whose log p is
        wanted; the output layer runs from position start[k] - 1 only, earlier entries are NaN. with_greedy=True
        returns (logprobs, is_argmax) pairs, what lm-eval's loglikelihood needs."""
        starts = list(start) if start is not None else [1] * len(token_lists)
        ids = [self.engine.add_scoring_request(list(tokens), score_from=s) for tokens, s in zip(token_lists, starts)]
        outputs = self._run_to_completion(ids)
        if with_greedy:
            return [(out.prompt_logprobs, out.prompt_greedy) for out in outputs]
        return [out.prompt_logprobs for out in outputs]

    def next_token_logprobs(self, token_lists: SequenceOf[list[int]],
                            candidates: SequenceOf[list[int]]) -> list[tuple[torch.Tensor, int]]:
        """For each list: log p of each candidate id as the token after the whole list, and the argmax id there
        (one prefill per list, one output-layer row)."""
        ids = [self.engine.add_scoring_request(list(tokens), score_from=len(tokens), candidates=list(cands))
               for tokens, cands in zip(token_lists, candidates)]
        return [(out.candidate_logprobs, out.next_token_argmax) for out in self._run_to_completion(ids)]

    def _run_to_completion(self, request_ids: list[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        while pending:
            if not self.engine.has_unfinished():
                raise RuntimeError(f"requests {sorted(pending)} vanished from the engine")
            for output in self.engine.step():
                if output.finished and output.request_id in pending:
                    final[output.request_id] = output
                    pending.discard(output.request_id)
        return [final[request_id] for request_id in request_ids]


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int))


__all__ = ["LLM", "SamplingParams", "RequestOutput", "LLMEngine", "EngineConfig"]
