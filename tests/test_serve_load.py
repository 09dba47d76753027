"""`python -m adaq.bench.serve_load` end to end on the CPU, at a tiny scale: `adaq serve --synthetic` (a tiny Gemma3
config, random NVFP4 weights) with a real tokenizer folder (tests/helpers/tiny_tokenizer.py), 4 clients x 8 requests,
agreement with solo runs, the JSON report. The same script at 64 x 500 on the GPU: scripts/serve_load_gpu.sh."""

import json
import os
import subprocess
import sys

import pytest
from helpers.tiny_models import CONFIGS
from helpers.tiny_tokenizer import write_tokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SERVE_ARGS = ["--backend", "reference", "--device", "cpu", "--dtype", "fp32", "--kv-cache-dtype", "bf16",
              "--max-model-len", "128", "--max-num-seqs", "4", "--kv-cache-memory", "16MiB"]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-load")
    config = {**CONFIGS["gemma3"], "rms_norm_eps": 1e-6, "initializer_range": 0.2, "eos_token_id": 1,
              "bos_token_id": 2, "hidden_activation": "gelu_pytorch_tanh"}
    (root / "tiny-gemma3.json").write_text(json.dumps(config))
    write_tokenizer(root / "tokenizer")
    return root


def serve_load(root, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "adaq.bench.serve_load", "--synthetic", str(root / "tiny-gemma3.json"),
               "--tokenizer", str(root / "tokenizer"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the server's GEMMs as the solo runs'
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_load_script_on_a_tiny_synthetic_gemma3(tiny_gemma3, tmp_path):
    out = tmp_path / "serve_load.json"
    done = serve_load(tiny_gemma3, "--clients", "4", "--requests", "8", "--solo", "4", "--max-tokens", "2", "6",
                      "--start-timeout-s", "300", "--out", str(out), "--", *SERVE_ARGS, "--strict")
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "serve_load.server.log").read_text()
    report = json.loads(out.read_text())
    assert report["report"] == "adaq serve load" and report["ok"] and "8 requests from 4 clients" in done.stdout
    load = report["load"]
    assert (load["requests"], load["clients"], load["errors"], load["errors_by_status"]) == (8, 4, 0, {})
    assert load["output_tokens"] > 0 and load["output_tokens_per_s"] > 0 and load["latency_s"]["p50"] > 0
    assert load["ttft_s"] and load["tpot_s"] and set(load["mix"]) == {"completions", "completions streamed", "chat",
                                                                      "chat streamed"}
    assert report["agreement"] == {"checked": 4, "equal": 4, "mismatches": []}
    server = report["server"]
    assert server["model"] == "synthetic-tiny-gemma3" and server["backend"] == "reference"
    assert server["fallbacks"] == [] and server["cuda_graphs"] is False
    assert report["engine"]["fallbacks"] == 0 and report["engine"]["steps"] > 0
    assert report["engine"]["generation_tokens"] >= load["output_tokens"]
    assert report["tokenizer"]["chat_template_added"] is False  # the tiny tokenizer has its own template
    assert report["server_exit"] == 0


def test_serve_load_reports_a_server_that_cannot_start(tiny_gemma3, tmp_path):
    done = serve_load(tiny_gemma3, "--requests", "2", "--out", str(tmp_path / "x.json"), "--", *SERVE_ARGS,
                      "--gpu-memory-utilization", "2", timeout=300)
    assert done.returncode == 2 and "the server did not start" in done.stderr
    assert "gpu-memory-utilization" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_export_tokenizer_adds_a_chat_template_where_there_is_none(tiny_gemma3, tmp_path):
    from adaq.bench.serve_load import GEMMA3_CHAT_TEMPLATE, tokenizer_folder

    source = write_tokenizer(tmp_path / "plain", chat_template=False)
    done = tokenizer_folder(source, tmp_path / "exported")
    assert done["chat_template_added"] and "tokenizer.json" in done["files"]
    exported = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
    assert exported["chat_template"] == GEMMA3_CHAT_TEMPLATE


def test_served_throughput_against_the_engines_own_figure(tmp_path):
    from adaq.bench.serve_load import against_bench

    bench = {"variants": [{"variant": "nvfp4", "results": [{"batch": 1, "decode_tokens_per_s": 100.0},
                                                           {"batch": 64, "decode_tokens_per_s": 2000.0}]}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert against_bench(tmp_path / "bench.json", 64, 1700.0)["ratio"] == pytest.approx(0.85)
    assert "no nvfp4 row at batch 16" in against_bench(tmp_path / "bench.json", 16, 1.0)["error"]
