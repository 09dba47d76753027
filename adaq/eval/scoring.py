"""What the lm-eval backend needs from a model, and the two things that provide it.

`EngineScorer` is the real path: adaq's engine (continuous batching, paged KV cache, NVFP4 weights).
`TransformersScorer` runs a transformers model the same way; it is the reference the tests compare against and
what `--runner transformers` uses to cross-check the engine.
"""

import inspect
from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    """log p of tokens[start:] given their prefixes, and whether each was the model's argmax (None: unknown)."""

    logprobs: torch.Tensor
    greedy: torch.Tensor | None


NextToken = tuple[torch.Tensor, int]  # log p of each candidate id, and the argmax id (-1: not known)


class EngineScorer:
    """Scores and generates through `adaq.engine.LLM`, using its optional eval extensions when it has them."""

    def __init__(self, llm):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_length = int(llm.engine.config.max_model_len)
        parameters = inspect.signature(llm.prompt_logprobs).parameters
        self._has_start = "start" in parameters
        self._has_next_token = hasattr(llm, "next_token_logprobs")

    def score(self, token_lists: list[list[int]], starts: list[int]) -> list[TokenScores]:
        extra = {"start": list(starts)} if self._has_start else {}
        outputs = self.llm.prompt_logprobs(token_lists, with_greedy=True, **extra)
        return [TokenScores(logprobs[s - 1:], greedy[s - 1:]) for (logprobs, greedy), s in zip(outputs, starts)]

    def next_token_logprobs(self, token_lists: list[list[int]], candidates: list[list[int]]) -> list[NextToken]:
        if self._has_next_token:
            return [(lp, int(argmax)) for lp, argmax in self.llm.next_token_logprobs(token_lists, candidates)]
        if hasattr(getattr(self.llm.engine, "runner", None), "sampler"):
            return self._next_token_from_sampler(token_lists, candidates)
        return self._next_token_from_prompts(token_lists, candidates)

    def _next_token_from_sampler(self, token_lists, candidates) -> list[NextToken]:
        """One-token greedy generation, reading the logit row the engine hands its sampler: the context is
        prefilled once and the output layer runs on its last position only."""
        from adaq.engine.api import SamplingParams

        runner = self.llm.engine.runner
        capture = _LogitCapture(runner.sampler)
        runner.sampler = capture
        try:
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            outputs = self.llm.generate([list(tokens) for tokens in token_lists], params)
        finally:
            runner.sampler = capture.inner
        results = []
        for output, cands in zip(outputs, candidates):
            logprobs = capture.rows.pop(output.request_id)
            results.append((logprobs[cands], int(logprobs.argmax())))
        return results

    def _next_token_from_prompts(self, token_lists, candidates) -> list[NextToken]:
        """Fallback: one scored sequence per candidate (the argmax is known only if it is a candidate)."""
        extended = [tokens + [c] for tokens, cands in zip(token_lists, candidates) for c in cands]
        scores = iter(self.score(extended, [len(t) - 1 for t in extended]))
        results = []
        for cands in candidates:
            picked = [next(scores) for _ in cands]
            greedy = [c for c, s in zip(cands, picked) if s.greedy is not None and bool(s.greedy[0])]
            results.append((torch.cat([s.logprobs[:1] for s in picked]), greedy[0] if greedy else -1))
        return results

    def generate(self, token_lists: list[list[int]], until: list[str], max_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        from adaq.engine.api import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=until or None)
        outputs = self.llm.generate([list(tokens) for tokens in token_lists], params)
        return [output.text for output in outputs]


class _LogitCapture:
    """Stands in for the engine's sampler: keeps each sequence's log-softmax row, then samples as before."""

    def __init__(self, inner):
        self.inner = inner
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        logprobs = logits.float().log_softmax(dim=-1).cpu()
        for row, seq in enumerate(seqs):
            self.rows[seq.request_id] = logprobs[row]
        return self.inner(logits, seqs)


class TransformersScorer:
    """A transformers causal LM run one sequence at a time, the output layer applied only where scores are read."""

    def __init__(self, model, tokenizer, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config.get_text_config()
        self.max_length = max_length or int(getattr(config, "max_position_embeddings", 2048))
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "TransformersScorer":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        options = {}
        quantization = getattr(AutoConfig.from_pretrained(path), "quantization_config", None) or {}
        if quantization.get("quant_method") == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            options["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options).to(dtype)
        return cls(model, AutoTokenizer.from_pretrained(path))

    def _hidden(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens])
        return self.model.model(input_ids=ids).last_hidden_state[0]

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.log_softmax(dim=-1)

    @torch.inference_mode()
    def score(self, token_lists: list[list[int]], starts: list[int]) -> list[TokenScores]:
        results = []
        for tokens, start in zip(token_lists, starts):
            logprobs = self._logprobs(self._hidden(tokens)[start - 1:-1])
            targets = torch.tensor(tokens[start:])
            chosen = logprobs.gather(1, targets[:, None])[:, 0]
            results.append(TokenScores(chosen, logprobs.argmax(dim=-1) == targets))
        return results

    @torch.inference_mode()
    def next_token_logprobs(self, token_lists: list[list[int]], candidates: list[list[int]]) -> list[NextToken]:
        results = []
        for tokens, cands in zip(token_lists, candidates):
            logprobs = self._logprobs(self._hidden(tokens)[-1:])[0]
            results.append((logprobs[cands], int(logprobs.argmax())))
        return results

    @torch.inference_mode()
    def generate(self, token_lists: list[list[int]], until: list[str], max_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        texts = []
        for tokens in token_lists:
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            output = self.model.generate(torch.tensor([tokens]), max_new_tokens=max_tokens, **sampling,
                                         stop_strings=until or None, tokenizer=self.tokenizer)
            texts.append(self.tokenizer.decode(output[0, len(tokens):], skip_special_tokens=True))
        return texts
