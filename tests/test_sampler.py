"""Sampler: each filter's semantics, the exact distribution of plain sampling, seeds, and parameter validation."""

import pytest
import torch

from adaq.engine.sampler import Sampler, filtered_probs
from adaq.engine.sampling_params import InvalidSamplingParams, SamplingParams
from adaq.engine.sequence import Sequence

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def seqs_for(params: list[SamplingParams]) -> list[Sequence]:
    return [Sequence(f"s{i}", [1], p) for i, p in enumerate(params)]


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    return Sampler()(logits.clone(), seqs_for(params))


def test_greedy_takes_the_argmax():
    logits = torch.randn(5, 33)
    assert torch.equal(sample(logits, [SamplingParams(temperature=0)] * 5), logits.argmax(-1))


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)])
def test_filters_that_keep_one_token_are_greedy(params):
    logits = torch.randn(16, 50)
    assert torch.equal(sample(logits, [params] * 16), logits.argmax(-1))


def test_plain_sampling_follows_softmax():
    draws = sample(LOGITS.expand(40_000, -1), [SamplingParams(temperature=1.0)] * 40_000)
    frequency = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert (frequency - LOGITS.softmax(-1)).abs().max() < 0.01


def test_temperature_sharpens():
    probs = filtered_probs(LOGITS.unsqueeze(0), [SamplingParams(temperature=0.5)])[0]
    assert torch.allclose(probs, (LOGITS / 0.5).softmax(-1))


def test_top_k_top_p_and_min_p_keep_the_right_sets():
    top_k = filtered_probs(LOGITS.unsqueeze(0), [SamplingParams(top_k=2)])[0]
    assert torch.allclose(top_k[:2], LOGITS[:2].softmax(-1)) and not top_k[2:].any()
    p = LOGITS.softmax(-1)
    top_p = filtered_probs(LOGITS.unsqueeze(0), [SamplingParams(top_p=float(p[0] + p[1] / 2))])[0]
    assert (top_p > 0).tolist() == [True, True, False, False, False, False]
    min_p = filtered_probs(LOGITS.unsqueeze(0), [SamplingParams(min_p=float(p[2] / p[0]) - 1e-4)])[0]
    assert (min_p > 0).tolist() == [True, True, True, False, False, False]


def test_rows_keep_their_own_settings():
    logits = LOGITS.expand(3, -1)
    probs = filtered_probs(logits, [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_k=3)])
    assert (probs > 0).sum(-1).tolist() == [1, 6, 3]


def test_seeded_requests_do_not_depend_on_the_batch():
    logits = torch.randn(1, 1000)
    seqs = seqs_for([SamplingParams(seed=7)])
    sampler = Sampler()
    alone = [sampler(logits.clone(), seqs).item() for _ in range(20)]
    mixed_seqs = seqs_for([SamplingParams(), SamplingParams(seed=7), SamplingParams(seed=8)])
    mixed = [sampler(logits.expand(3, -1).clone(), mixed_seqs)[1].item() for _ in range(20)]
    other = [sampler(logits.expand(3, -1).clone(), mixed_seqs)[2].item() for _ in range(20)]
    assert alone == mixed
    assert alone != other


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -2), ("min_p", 1.2), ("max_tokens", 0),
                                         ("max_tokens", -5), ("seed", -1), ("stop", [""]),
                                         ("stop_token_ids", [-3]), ("max_tokens", 2.5)])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InvalidSamplingParams, match=field):
        SamplingParams(**{field: value})


def test_prompt_scoring_allows_zero_tokens_and_stop_becomes_a_list():
    assert SamplingParams(max_tokens=0, prompt_logprobs=True).max_tokens == 0
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
