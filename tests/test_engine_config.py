"""EngineConfig's defaults that depend on the device: the prefill chunk (max_num_batched_tokens) follows vLLM V1."""

import types

import pytest
import torch

from adaq.engine.config import EngineConfig, default_batched_tokens

GiB = 2**30


@pytest.mark.parametrize("memory,tokens", [(None, 2048), (16 * GiB, 2048), (24564 * 2**20, 2048),
                                           (70 * GiB - 1, 2048), (70 * GiB, 8192), (81559 * 2**20, 8192),
                                           (141 * GiB, 8192)])
def test_default_batched_tokens_is_2048_below_70_gib_and_on_the_cpu(memory, tokens):
    assert default_batched_tokens(memory) == tokens


def test_the_cpu_gets_2048_and_an_explicit_value_wins():
    assert EngineConfig(model="m", device="cpu").max_num_batched_tokens == 2048
    assert EngineConfig(model="m", device="cpu", max_num_batched_tokens=8192).max_num_batched_tokens == 8192


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible cuda:0 of a given total memory, so the config resolves without a GPU."""
    def install(total_memory: int) -> list[torch.device]:
        asked = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: asked.append(device) or types.SimpleNamespace(total_memory=total_memory))
        return asked
    return install


@pytest.mark.parametrize("memory,tokens", [(24564 * 2**20, 2048), (81559 * 2**20, 8192)])
def test_a_gpu_gets_the_default_of_its_memory(fake_gpu, memory, tokens):
    asked = fake_gpu(memory)
    config = EngineConfig(model="m", device="cuda:0")
    assert config.max_num_batched_tokens == tokens and asked == [torch.device("cuda:0")]
    assert EngineConfig(model="m", device="cuda:0", max_num_batched_tokens=4096).max_num_batched_tokens == 4096
