"""No silent fallbacks (issue 23): every fallback is recorded once, warned about with its cause and the setting, shown
by `adaq run`, `adaq bench` (a column) and /metrics, and `--strict` (or ADAQ_STRICT=1) makes it a one-line error.
CPU only: the decode-graph fallback is forced with a capture that fails (the real captures: test_decode_graphs_gpu.py).
"""

import json
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers.tiny_models import make_checkpoint
from helpers.tiny_tokenizer import write_tokenizer

from adaq.backends.fallbacks import Fallback, FallbackError, Fallbacks, FallbackWarning
from adaq.cli import main

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where no CUDA GPU is visible")
CPU = ["--backend", "reference", "--device", "cpu", "--max-model-len", "256"]
TINY_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": 512, "tie_word_embeddings": False, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-6, "initializer_range": 0.02}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_checkpoint("qwen3", tmp_path_factory.mktemp("fallbacks"))
    write_tokenizer(root / "nvfp4")
    return root / "nvfp4"


def adaq(args: list, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["adaq", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """stderr without the warnings Python prints (a warning is two lines: where, then the source line)."""
    return [line for line in err.strip().splitlines() if line.startswith("error:")]


# ---- the record ------------------------------------------------------------------------------------------------
def test_a_fallback_is_recorded_and_warned_once_with_its_cause_and_setting():
    record = Fallbacks()
    with pytest.warns(FallbackWarning, match=r"attention kernel -> reference: head_dim 96 .*\(--backend reference"):
        record.report("attention kernel -> reference", "head_dim 96\nsecond line dropped", "--backend reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same (what, cause) again: no second warning
        record.report("attention kernel -> reference", "head_dim 96\nsecond line dropped", "--backend reference")
    assert list(record) == [Fallback("attention kernel -> reference", "head_dim 96", "--backend reference")]
    assert record.names() == ["attention kernel -> reference"] and len(record) == 1
    assert record.summary() == "FALLBACKS: attention kernel -> reference (head_dim 96)"
    assert Fallbacks().summary() == "no fallbacks" and not Fallbacks()


def test_strict_turns_a_fallback_into_a_one_line_adaq_error():
    from adaq.errors import AdaqError

    with pytest.raises(FallbackError) as error:
        Fallbacks(strict=True).report("decode CUDA graphs -> eager", "capture failed: boom\ntrace",
                                      "ADAQ_CUDA_GRAPHS=0")
    assert isinstance(error.value, AdaqError) and "\n" not in str(error.value)
    assert str(error.value) == "--strict: decode CUDA graphs -> eager: capture failed: boom (ADAQ_CUDA_GRAPHS=0)"
    earlier = Fallbacks()
    with pytest.warns(FallbackWarning):
        earlier.report("a", "b", "c")
    with pytest.raises(FallbackError, match="--strict: a: b"):
        earlier.make_strict()  # one seen before the engine knew it was strict is an error then


# ---- where fallbacks come from ----------------------------------------------------------------------------------
@no_gpu
def test_auto_without_a_gpu_is_a_fallback_but_an_explicit_cpu_is_not():
    from adaq.backends import get_backend

    with pytest.warns(FallbackWarning, match="no CUDA GPU is visible"):
        chosen = get_backend("auto")
    assert chosen.name == "reference" and chosen.fallbacks.names() == ["backend auto -> reference"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(get_backend("auto", "cpu").fallbacks) == 0 and len(get_backend("reference").fallbacks) == 0
    with pytest.raises(FallbackError, match="--strict: backend auto -> reference: no CUDA GPU is visible"):
        get_backend("auto", fallbacks=Fallbacks(strict=True))


def _runner_on_a_pretend_gpu(record: Fallbacks, head_dim: int = 128):
    """What maybe_decode_graphs reads of a runner: a model on the cuda backend, on a 'cuda' device (never used)."""
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_kv_heads, self.head_dim, self.k_cache = 32, 8, head_dim, None

    model = torch.nn.Sequential(Attention())
    model.backend = SimpleNamespace(name="cuda", fallbacks=record)
    config = SimpleNamespace(max_num_seqs=4, enforce_eager=False)
    return SimpleNamespace(model=model, device=torch.device("cuda"), config=config, max_model_len=64,
                           geometry=SimpleNamespace(block_size=16), fallbacks=record)


def test_a_failing_capture_is_a_fallback_and_strict_makes_it_an_error(monkeypatch):
    from adaq.engine import cuda_graph

    def failing_capture(*args, **kwargs):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture\nmore")

    monkeypatch.setenv(cuda_graph.DISABLE_ENV, "1")
    monkeypatch.setattr(cuda_graph, "DecodeGraphs", failing_capture)
    record = Fallbacks()
    with pytest.warns(FallbackWarning, match="capture failed: Cannot copy between CPU and CUDA.*ADAQ_CUDA_GRAPHS=0"):
        assert cuda_graph.maybe_decode_graphs(_runner_on_a_pretend_gpu(record)) is None
    assert record.names() == ["decode CUDA graphs -> eager"]
    with pytest.raises(FallbackError, match="--strict: decode CUDA graphs -> eager: capture failed: Cannot copy"):
        cuda_graph.maybe_decode_graphs(_runner_on_a_pretend_gpu(Fallbacks(strict=True)))
    asked = _runner_on_a_pretend_gpu(Fallbacks(strict=True))
    asked.config.enforce_eager = True  # eager on purpose: no fallback, even under --strict
    assert cuda_graph.maybe_decode_graphs(asked) is None and len(asked.fallbacks) == 0


def test_a_model_that_cannot_be_captured_says_why():
    from adaq.engine import cuda_graph

    record = Fallbacks()
    with pytest.warns(FallbackWarning, match="head_dim 96 has no attention kernel"):
        assert cuda_graph.maybe_decode_graphs(_runner_on_a_pretend_gpu(record, head_dim=96)) is None
    with pytest.raises(FallbackError, match="head_dim 96"):
        cuda_graph.maybe_decode_graphs(_runner_on_a_pretend_gpu(Fallbacks(strict=True), head_dim=96))


def test_every_bench_config_has_attention_shapes_the_kernels_capture():
    """graph_blocker's attention rules against every synthetic config `adaq bench --synthetic` knows (the MoE rule
    needs the kernel backend: test_decode_graphs_gpu.py builds each one on the GPU)."""
    from adaq.backends.cuda import attention_covers
    from adaq.bench.shapes import bundled_names, load_model_config, text_config

    for name in bundled_names():
        if name.startswith("gemma4"):  # no head_dim-512 kernel yet: test_decode_graphs_gpu.NO_GRAPHS_YET
            continue
        text = text_config(load_model_config(name))
        heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        assert attention_covers(head_dim, heads, kv_heads), name


# ---- visible: adaq run, bench, /metrics --------------------------------------------------------------------------
def test_run_names_its_fallbacks_and_strict_run_has_none(tiny, capsys, monkeypatch):
    monkeypatch.delenv("ADAQ_STRICT", raising=False)
    code, out, err = adaq(["run", tiny, "Hello", "--max-tokens", "3", "--strict", *CPU], capsys, monkeypatch)
    assert code == 0, err
    assert "no fallbacks" in err
    code, out, err = adaq(["run", tiny, "Hello", "--max-tokens", "3", "--json", *CPU], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["fallbacks"] == [] and json.loads(out)["cuda_graphs"] is False


@no_gpu
@pytest.mark.parametrize("how", ["flag", "env"])
def test_strict_run_on_a_machine_without_a_gpu_is_a_one_line_error(tiny, capsys, monkeypatch, how):
    args = ["run", tiny, "Hello", "--max-tokens", "3", "--max-model-len", "256"]
    if how == "flag":
        monkeypatch.delenv("ADAQ_STRICT", raising=False)
        args.append("--strict")
    else:
        monkeypatch.setenv("ADAQ_STRICT", "1")
    code, out, err = adaq(args, capsys, monkeypatch)
    lines = error_lines(err)
    assert code != 0 and out == "" and "Traceback" not in err, err
    assert len(lines) == 1 and "--strict: backend auto -> reference: no CUDA GPU is visible" in lines[0], err
    assert "--backend reference --device cpu" in lines[0]


@no_gpu
def test_run_without_strict_warns_and_shows_the_fallback_in_its_summary(tiny, capsys, monkeypatch):
    monkeypatch.delenv("ADAQ_STRICT", raising=False)
    with pytest.warns(FallbackWarning, match="no CUDA GPU is visible"):
        code, out, err = adaq(["run", tiny, "Hello", "--max-tokens", "3", "--max-model-len", "256"], capsys,
                              monkeypatch)
    assert code == 0, err
    summary = [line for line in err.splitlines() if line.startswith("prompt: ")]
    assert summary and "FALLBACKS: backend auto -> reference (no CUDA GPU is visible" in summary[-1], err


@no_gpu
def test_bench_rows_have_a_fallback_column_and_strict_bench_fails(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from adaq import cli
    from adaq.errors import AdaqError

    monkeypatch.delenv("ADAQ_STRICT", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # rich folds cells to the terminal's width (80 when none)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_QWEN3))
    args = ["bench", "--synthetic", str(config), "--batch", "1,2", "--input-len", "4", "--output-len", "2",
            "--repeats", "1", "--baselines", "none", "--json", str(tmp_path / "out.json")]
    with pytest.warns(FallbackWarning):
        result = CliRunner().invoke(cli.app, args, terminal_width=250)
    assert result.exit_code == 0, result.output
    variant = json.loads((tmp_path / "out.json").read_text())["variants"][0]
    assert [row["fallbacks"] for row in variant["results"]] == [["backend auto -> reference"]] * 2
    assert variant["fallbacks"][0]["what"] == "backend auto -> reference"
    assert "no CUDA GPU is visible" in variant["fallbacks"][0]["cause"]
    assert "fallbacks" in result.output and "backend auto -> reference" in result.output

    explicit = CliRunner().invoke(cli.app, [*args, "--backend", "reference", "--device", "cpu", "--strict"])
    assert explicit.exit_code == 0, explicit.output
    rows = json.loads((tmp_path / "out.json").read_text())["variants"][0]["results"]
    assert [row["fallbacks"] for row in rows] == [[], []] and [row["graph_replays"] for row in rows] == [None] * 2

    strict = CliRunner().invoke(cli.app, [*args, "--strict"])
    assert isinstance(strict.exception, AdaqError) and strict.exception.exit_code == 1
    assert "FallbackError: --strict: backend auto -> reference: no CUDA GPU is visible" in str(strict.exception)
    assert "\n" not in str(strict.exception)


def test_bench_table_shows_the_fallback_column():
    from rich.console import Console

    from adaq.bench.report import fallback_cell, main_table

    rows = [{"batch": 1, "ttft_s": 0.1, "prefill_tokens_per_s": 10.0, "itl_p50_s": 0.01, "itl_p99_s": 0.02,
             "decode_tokens_per_s": 100.0, "speedup": {}, "fallbacks": fallbacks} for fallbacks in
            (["decode CUDA graphs -> eager"], [], None)]
    report = {"on_cpu": True, "variants": [{"variant": "nvfp4", "results": rows}]}
    console = Console(record=True, width=200)
    console.print(main_table(report))
    text = console.export_text()
    assert "fallbacks" in text and "decode CUDA graphs -> eager" in text
    assert [fallback_cell(row) for row in rows] == ["decode CUDA graphs -> eager", "none", "-"]


@no_gpu
def test_metrics_expose_each_fallback(tiny):
    pytest.importorskip("prometheus_client")
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine
    from adaq.serve.metrics import ServerMetrics

    with pytest.warns(FallbackWarning):
        engine = LLMEngine(EngineConfig(tiny, max_model_len=64, kv_cache_memory="8MiB"))
    text = ServerMetrics(engine, "tiny").render().decode()
    assert 'adaq_fallbacks{model_name="tiny"} 1.0' in text
    assert 'adaq_cuda_graphs{model_name="tiny"} 0.0' in text
    sample = next(line for line in text.splitlines() if line.startswith("adaq_fallback{"))
    assert 'what="backend auto -> reference"' in sample and "no CUDA GPU is visible" in sample
    assert 'setting="--backend reference --device cpu' in sample and sample.endswith(" 1.0")

    quiet = LLMEngine(EngineConfig(tiny, backend="reference", device="cpu", max_model_len=64,
                                   kv_cache_memory="8MiB", strict=True))
    text = ServerMetrics(quiet, "tiny").render().decode()
    assert 'adaq_fallbacks{model_name="tiny"} 0.0' in text and "adaq_fallback{" not in text


def test_serve_ready_line_names_the_fallbacks():
    pytest.importorskip("uvicorn")
    from adaq.serve.server import Listening

    base = ("http://127.0.0.1:8000", "127.0.0.1", 8000, "m", 1024, 64, 100, 16, "cuda", "cuda")
    fallback = Fallback("decode CUDA graphs -> eager", "capture failed: boom", "ADAQ_CUDA_GRAPHS=0")
    line = Listening(*base, False, [vars(fallback)]).line()
    assert line.endswith("cuda on cuda · FALLBACKS: decode CUDA graphs -> eager (capture failed: boom)")
    assert Listening(*base, True, []).line().endswith("cuda on cuda, CUDA graphs · no fallbacks")
