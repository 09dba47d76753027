"""What the lm-eval backend needs from a model, and the two things that provide it.

`EngineScorer` is the real path: adaq's engine (continuous batching, paged KV cache, NVFP4 weights).
`TransformersScorer` runs a transformers model the same way; it is the reference the tests compare against and
what `--runner transformers` uses to cross-check the engine.
"""

from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    """log p of tokens[start:] given their prefixes, and whether each was the model's argmax (None: unknown)."""

    logprobs: torch.Tensor
    greedy: torch.Tensor | None


NextToken = tuple[torch.Tensor, int]  # log p of each candidate id, and the argmax id there


class EngineScorer:
    """Scores and generates through `adaq.engine.LLM`: batched requests, the output layer only where scores are read."""

    def __init__(self, llm):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_length = int(llm.engine.config.max_model_len)

    def close(self) -> None:
        self.llm.close()

    def score(self, token_lists: list[list[int]], starts: list[int]) -> list[TokenScores]:
        outputs = self.llm.prompt_logprobs(token_lists, with_greedy=True, start=list(starts))
        return [TokenScores(logprobs[s - 1:], greedy[s - 1:]) for (logprobs, greedy), s in zip(outputs, starts)]

    def next_token_logprobs(self, token_lists: list[list[int]], candidates: list[list[int]]) -> list[NextToken]:
        outputs = self.llm.next_token_logprobs(token_lists, candidates)
        return [(logprobs, int(argmax)) for logprobs, argmax in outputs]

    def generate(self, token_lists: list[list[int]], until: list[str], max_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        from adaq.engine.api import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=until or None)
        outputs = self.llm.generate([list(tokens) for tokens in token_lists], params)
        return [output.text for output in outputs]


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

        from adaq.formats.safetensors_check import check_safetensors_folder

        check_safetensors_folder(path)  # transformers would torch.load a .bin: refuse pickles before it looks
        options = {}
        quantization = getattr(AutoConfig.from_pretrained(path), "quantization_config", None) or {}
        if quantization.get("quant_method") == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            options["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **options).to(dtype)
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
