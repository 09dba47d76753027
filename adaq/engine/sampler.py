"""Next-token choice for a batch of logit rows, each with its own settings.

Order, as in vLLM: temperature, then top-k, top-p and min-p filters, then a draw. The draw is the exponential
race (argmax of p / E with E ~ Exp(1)), which samples exactly from p; a request with a seed draws its E from its
own torch.Generator, so its tokens do not depend on what else is in the batch. Greedy rows take the argmax of
the raw logits.
"""

import torch

from adaq.engine.sequence import Sequence


class Sampler:
    """Unseeded rows draw from the sampler's own generator, never torch's global one (which CUDA-graph capture
    touches), seeded once from the OS."""

    def __init__(self):
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
            self._generators[device].seed()
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [S, V] fp32, one row per sequence -> token ids [S] (int64, on logits' device)."""
        tokens = logits.argmax(dim=-1)
        sampled_rows = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs = filtered_probs(logits[rows], [seqs[row].params for row in sampled_rows])
            noise = exponential_noise(probs, [seqs[row] for row in sampled_rows], self.generator(logits.device))
            tokens[rows] = (probs / noise).argmax(dim=-1)
        return tokens


def filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    logits = logits / temperature.unsqueeze(1)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[1] for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
    if bool((top_k < logits.shape[1]).any() or (top_p < 1).any()):
        logits = apply_top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype)
    if bool((min_p > 0).any()):
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the k most likely tokens, then the smallest set whose probability reaches top_p (always >= 1 token)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def exponential_noise(probs: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, seq in enumerate(seqs):
        if seq.params.seed is not None:
            noise[row].exponential_(generator=seq_generator(seq, probs.device))
    return noise


def seq_generator(seq: Sequence, device: torch.device) -> torch.Generator:
    if seq.generator is None:
        seq.generator = torch.Generator(device=device)
        seq.generator.manual_seed(seq.params.seed)
    return seq.generator
