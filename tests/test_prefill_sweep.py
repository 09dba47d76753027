"""The prefill sweep's threshold arithmetic and the route's thresholds file (CPU); the sweep itself runs on a GPU."""

import json

import pytest
import torch

from adaq.backends import prefill_route
from adaq.bench import prefill_sweep
from adaq.errors import AdaqError


def rows(**columns):
    ms = list(zip(*columns.values()))
    return [{"M": m, **{f"{name}_ms": value for name, value in zip(columns, values)}}
            for m, values in zip(prefill_sweep.SWEEP_ROWS, ms)]


def test_crossover_needs_every_larger_m():
    entries = rows(decode=[1, 2, 3, 4, 5, 6, 7, 8, 9], exact=[0.5, 3, 4, 3.9, 5, 5, 6, 7, 8])
    assert prefill_sweep.crossover(entries, "exact", ("decode",)) == 128  # 16 wins alone: not a crossover
    assert prefill_sweep.crossover(rows(decode=[1] * 9, exact=[2] * 9), "exact", ("decode",)) is None
    assert prefill_sweep.crossover(rows(decode=[2] * 9), "fp8", ("decode",)) is None  # path not measured


def test_thresholds_and_the_file_they_go_to(tmp_path):
    dense = {"rows": rows(decode=[1, 2, 4, 8, 16, 32, 64, 128, 256], exact=[3, 3, 3, 4, 6, 9, 15, 30, 60],
                          fp8=[5, 5, 5, 5, 5, 8, 12, 20, 40])}
    moe = {"rows": rows(decode=[1, 2, 4, 8, 16, 32, 64, 128, 256], exact=[20] * 9)}
    found = prefill_sweep.thresholds(dense, moe)
    assert found == {"exact_min_tokens": 64, "fp8_min_tokens": 256, "moe_exact_min_tokens": 512}
    path = tmp_path / "thresholds.json"
    path.write_text((prefill_route.THRESHOLDS_FILE).read_text())
    data = prefill_sweep.write_thresholds({**found, "moe_exact_min_tokens": None}, path, "NVIDIA H100", "cmd")
    assert prefill_route.load_thresholds(path) == {"fp8_min_tokens": 256, "exact_min_tokens": 64,
                                                   "moe_exact_min_tokens": prefill_route.MOE_EXACT_MIN_TOKENS}
    assert data["measured"] and "kept from before" in data["note"] and "moe_exact_min_tokens" in data["note"]


def test_shipped_file_is_a_measured_sweep():
    data = json.loads(prefill_route.THRESHOLDS_FILE.read_text())
    assert data["measured"] is True and data["device"] and "prefill_sweep" in data["note"]
    assert (prefill_route.MIN_TOKENS, prefill_route.EXACT_MIN_TOKENS, prefill_route.MOE_EXACT_MIN_TOKENS) == (
        data["fp8_min_tokens"], data["exact_min_tokens"], data["moe_exact_min_tokens"])
    assert prefill_route.min_tokens() == 64 or "ADAQ_PREFILL_FP8_MIN_TOKENS" in __import__("os").environ


@pytest.mark.parametrize("content", ["{", '{"fp8_min_tokens": 64}', '{"fp8_min_tokens": 0, "exact_min_tokens": 9, '
                                     '"moe_exact_min_tokens": 9}'])
def test_bad_thresholds_file_is_one_line(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(AdaqError, match="t.json"):
        prefill_route.load_thresholds(path)


def test_sweep_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        prefill_sweep.main(["--rows", "16"])
