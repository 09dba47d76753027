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
    assert found == {"exact_min_tokens": 64, "fp8_min_tokens": 256, "moe_exact_min_tokens": 512,
                     "mid_min_tokens": None, "moe_mid_min_tokens": None}  # the mid-size kernel was not timed
    path = tmp_path / "thresholds.json"
    path.write_text((prefill_route.THRESHOLDS_FILE).read_text())
    data = prefill_sweep.write_thresholds({**found, "moe_exact_min_tokens": None}, path, "NVIDIA H100", "cmd")
    assert prefill_route.load_thresholds(path) == {"fp8_min_tokens": 256, "exact_min_tokens": 64,
                                                   "moe_exact_min_tokens": prefill_route.MOE_EXACT_MIN_TOKENS,
                                                   "mid_min_tokens": prefill_route.MID_MIN_TOKENS,
                                                   "moe_mid_min_tokens": prefill_route.MOE_MID_MIN_TOKENS}
    assert data["measured"] and "kept from before" in data["note"] and "moe_exact_min_tokens" in data["note"]


def test_thresholds_with_the_mid_size_kernel(tmp_path):
    """Each path against those the route would take instead; a path timed that never won lands past the sweep."""
    dense = {"rows": rows(decode=[1, 2, 4, 8, 16, 32, 64, 128, 256], mid=[2, 1.5, 2, 3, 5, 9, 17, 33, 65],
                          exact=[3, 3, 3, 4, 6, 9.5, 18, 34, 70], fp8=[5, 5, 5, 5, 5, 8, 12, 20, 40])}
    moe = {"rows": rows(decode=[1, 2, 4, 8, 16, 32, 64, 128, 256], mid=[3, 3, 3, 4, 5, 8, 14, 26, 50],
                        exact=[20, 20, 20, 20, 20, 20, 20, 25, 45])}
    found = prefill_sweep.thresholds(dense, moe)
    assert found == {"mid_min_tokens": 32, "exact_min_tokens": 8192, "fp8_min_tokens": 256,
                     "moe_mid_min_tokens": 64, "moe_exact_min_tokens": 2048}
    path = tmp_path / "thresholds.json"
    path.write_text((prefill_route.THRESHOLDS_FILE).read_text())
    prefill_sweep.write_thresholds(found, path, "NVIDIA H100", "cmd")
    assert prefill_route.load_thresholds(path) == found


def test_route_takes_the_mid_size_kernel_from_its_threshold(monkeypatch):
    cpu = torch.device("cpu")  # no FP8 path here: exact, mid or decode
    monkeypatch.setenv(prefill_route.EXACT_MIN_TOKENS_ENV, "512")
    monkeypatch.setenv(prefill_route.MOE_EXACT_MIN_TOKENS_ENV, "1024")
    monkeypatch.delenv(prefill_route.MID_MIN_TOKENS_ENV, raising=False)
    monkeypatch.delenv(prefill_route.MOE_MID_MIN_TOKENS_ENV, raising=False)
    monkeypatch.setattr(prefill_route, "MID_MIN_TOKENS", None)
    monkeypatch.setattr(prefill_route, "MOE_MID_MIN_TOKENS", None)
    assert [prefill_route.route(m, cpu, "auto") for m in (16, 100, 600)] == ["decode", "decode", "exact"]
    assert prefill_route.route(600, cpu, "nvfp4") == "decode"
    monkeypatch.setenv(prefill_route.MID_MIN_TOKENS_ENV, "64")
    monkeypatch.setenv(prefill_route.MOE_MID_MIN_TOKENS_ENV, "128")
    assert [prefill_route.route(m, cpu, "auto") for m in (16, 64, 511, 512)] == ["decode", "mid", "mid", "exact"]
    assert [prefill_route.route(m, cpu, "nvfp4") for m in (63, 64, 5000)] == ["decode", "mid", "mid"]
    assert [prefill_route.moe_route(m, cpu, "exact") for m in (127, 128, 1024)] == ["decode", "mid", "exact"]
    assert "mid-size kernel from M >= 64" in prefill_route.describe("nvfp4", cpu)


def test_shipped_file_is_a_measured_sweep():
    data = json.loads(prefill_route.THRESHOLDS_FILE.read_text())
    assert data["measured"] is True and data["device"] and "prefill_sweep" in data["note"]
    assert (prefill_route.MIN_TOKENS, prefill_route.EXACT_MIN_TOKENS, prefill_route.MOE_EXACT_MIN_TOKENS) == (
        data["fp8_min_tokens"], data["exact_min_tokens"], data["moe_exact_min_tokens"])
    assert (prefill_route.MID_MIN_TOKENS, prefill_route.MOE_MID_MIN_TOKENS) == (
        data.get("mid_min_tokens"), data.get("moe_mid_min_tokens"))
    overridden = prefill_route.MIN_TOKENS_ENV in __import__("os").environ
    assert prefill_route.min_tokens() == data["fp8_min_tokens"] or overridden


@pytest.mark.parametrize("content", ["{", '{"fp8_min_tokens": 64}', '{"fp8_min_tokens": 0, "exact_min_tokens": 9, '
                                     '"moe_exact_min_tokens": 9}', '[]', '{"fp8_min_tokens": 1, "exact_min_tokens": 9, '
                                     '"moe_exact_min_tokens": 9, "mid_min_tokens": "many"}'])
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


def test_the_moe_table_shows_the_grouped_bf16_column_where_it_was_timed():
    from pathlib import Path

    sweep = Path(__file__).parents[1] / "bench/results/session10/call1/prefill_sweep_main.json"  # an H100 sweep
    report = json.loads(sweep.read_text())
    report["moe"]["rows"][0]["bf16_grouped_ms"] = 0.25
    lines = prefill_sweep.summary_lines(report)
    header = next(i for i, line in enumerate(lines) if "bf16 grp" in line)
    assert " 0.250 " in lines[header + 1] and lines[header + 1].split()[0] == "16"
    assert lines[header + 2].split()[6] == "-"  # M = 32: not timed
