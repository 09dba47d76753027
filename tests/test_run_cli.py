"""`adaq run` through the real CLI entry point (adaq.cli.main): streaming, --json, chat, and one-line errors."""

import io
import json
import shutil
import sys

import pytest
from helpers.tiny_models import make_checkpoint
from helpers.tiny_tokenizer import write_tokenizer

from adaq.cli import main

FAST = ["--backend", "reference", "--device", "cpu", "--max-model-len", "256"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_checkpoint("qwen3", tmp_path_factory.mktemp("run"))
    write_tokenizer(root / "nvfp4")
    return root


def adaq(args: list[str], capsys, monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["adaq", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_run_streams_the_greedy_completion_and_reports_speed(tiny, capsys, monkeypatch):
    from adaq.engine.api import LLM, SamplingParams

    code, out, err = adaq(["run", tiny / "nvfp4", "Hello", "--no-chat", "--temperature", "0", "--max-tokens", "12",
                           "--kv-cache-dtype", "bf16", *FAST], capsys, monkeypatch)
    assert code == 0, err
    llm = LLM(tiny / "nvfp4", backend="reference", device="cpu", kv_cache_dtype="bf16", max_model_len=256)
    expected = llm.generate("Hello", SamplingParams(max_tokens=12, temperature=0))[0]
    assert out == expected.text + "\n"
    assert "prompt: 6 tokens" in err and "tok/s" in err and "CPU" in err and "peak RSS" in err


def test_run_fp8_prefill_path_on_the_reference_backend(tiny, capsys, monkeypatch):
    """`--prefill-path fp8` reaches the engine: the reference backend emulates the FP8 path (prompts of >= 64 tokens)."""
    monkeypatch.setenv("ADAQ_PREFILL_PATH", "auto")  # restored after the test, whatever the command sets
    code, out, err = adaq(["run", tiny / "nvfp4", "hello " * 20, *FAST, "--max-tokens", "3", "--json",
                           "--prefill-path", "fp8"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["finish_reason"] == "length", err
    import os

    assert os.environ.get("ADAQ_PREFILL_PATH") == "fp8"


def test_run_json(tiny, capsys, monkeypatch):
    code, out, err = adaq(["run", tiny / "nvfp4", "Hello", "--json", "--max-tokens", "5", "--seed", "3", *FAST],
                          capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["output_tokens"] <= 5 and result["device"] == "CPU" and result["kv_cache_dtype"] == "fp8"
    assert result["prompt_tok_s"] > 0 and result["peak_memory_bytes"] > 0


def test_interactive_chat_until_exit(tiny, capsys, monkeypatch):
    code, out, err = adaq(["run", tiny / "nvfp4", "--max-tokens", "4", "--temperature", "0", *FAST], capsys,
                          monkeypatch, stdin="hi\nhow are you\n/exit\n")
    assert code == 0, err
    assert err.count("prompt: ") == 2, "one stats line per reply"


def test_chat_survives_a_turn_that_outgrows_the_context(tiny, capsys, monkeypatch):
    code, out, err = adaq(["run", tiny / "nvfp4", "--max-tokens", "4", *FAST], capsys, monkeypatch,
                          stdin="x" * 300 + "\nhi\n/exit\n")
    assert code == 0, err
    assert "error: " in err and "--max-model-len" in err and err.count("prompt: ") == 1


def _one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["x" * 300], ["--max-model-len"]),
    (["hi", "--kv-cache-memory", "4KiB"], ["--kv-cache-memory", "--max-model-len"]),
    (["hi", "--temperature", "-1"], ["temperature"]),
    (["hi", "--top-p", "0"], ["top_p"]),
    (["hi", "--kv-cache-dtype", "int8"], ["--kv-cache-dtype"]),
    (["hi", "--backend", "tpu"], ["backend"]),
    (["hi", "--threads", "0"], ["--threads"]),
    (["hi", "--prefill-path", "int4"], ["--prefill-path", "auto, fp8, exact, nvfp4"]),
])
def test_bad_input_is_one_line(tiny, capsys, monkeypatch, args, fragments, restore_torch_threads):
    _one_line_error(*adaq(["run", tiny / "nvfp4", *FAST, "--max-tokens", "2", *args], capsys, monkeypatch),
                    *fragments)


def test_bad_checkpoints_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    _one_line_error(*adaq(["run", tiny / "decompressed", "hi", *FAST], capsys, monkeypatch), "tokenizer")
    _one_line_error(*adaq(["run", tmp_path / "nowhere", "hi", *FAST], capsys, monkeypatch), "nowhere")
    folder = shutil.copytree(tiny / "nvfp4", tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    _one_line_error(*adaq(["run", folder, "hi", *FAST], capsys, monkeypatch), "LlamaForCausalLM")


def test_chat_needs_a_template(tiny, tmp_path, capsys, monkeypatch):
    folder = shutil.copytree(tiny / "nvfp4", tmp_path / "plain")
    write_tokenizer(folder, chat_template=False)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    _one_line_error(*adaq(["run", folder, "hi", "--chat", *FAST], capsys, monkeypatch), "chat template")



@pytest.fixture(scope="module")
def no_template(tiny, tmp_path_factory):
    folder = shutil.copytree(tiny / "nvfp4", tmp_path_factory.mktemp("base") / "plain")
    write_tokenizer(folder, chat_template=False)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_interactive_without_a_template_continues_plain_text(no_template, capsys, monkeypatch):
    code, out, err = adaq(["run", no_template, "--max-tokens", "4", "--temperature", "0", *FAST], capsys,
                          monkeypatch, stdin="Hello\nhi there\n/exit\nnever read\n")
    assert code == 0, err
    assert "no chat template (a base model): plain completion" in err and err.count("prompt: ") == 2
    from adaq.engine.api import LLM, SamplingParams

    llm = LLM(no_template, backend="reference", device="cpu", max_model_len=256)
    expected = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.startswith(expected.text + "\n")


def test_no_chat_forces_plain_completion(tiny, capsys, monkeypatch):
    code, out, err = adaq(["run", tiny / "nvfp4", "--no-chat", "--max-tokens", "3", *FAST], capsys, monkeypatch,
                          stdin="Hello\n")
    assert code == 0, err
    assert "--no-chat: plain completion" in err and err.count("prompt: ") == 1


def test_interactive_chat_flag_needs_a_template(no_template, capsys, monkeypatch):
    _one_line_error(*adaq(["run", no_template, "--chat", *FAST], capsys, monkeypatch), "chat template")

@pytest.fixture(autouse=True)
def restore_torch_threads():
    """`adaq run` (--threads, default 1) runs in this process: give the next tests their thread count back."""
    import torch

    original = torch.get_num_threads()
    yield
    torch.set_num_threads(original)


REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.mark.slow
def test_real_gemma3_nvfp4_greedy_matches_transformers(tmp_path, capsys, monkeypatch, restore_torch_threads):
    """`adaq quantize` then `adaq run` on the real Gemma3-270M (CPU): 64 greedy tokens per prompt, each one the
    argmax of transformers' forward on the decompressed weights given the tokens before it."""
    pytest.importorskip("compressed_tensors")
    import torch

    from adaq.demo import gemma3_270m_folder

    nvfp4 = tmp_path / "gemma3-270m-nvfp4a16"
    code, _, err = adaq(["quantize", gemma3_270m_folder(), "-o", nvfp4, "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    runs = []
    for prompt in REAL_PROMPTS:
        code, out, err = adaq(["run", nvfp4, prompt, "--no-chat", "--temperature", "0", "--max-tokens", "64",
                               "--ignore-eos", "--kv-cache-dtype", "bf16", "--backend", "reference", "--device",
                               "cpu", "--max-model-len", "1024", "--threads", "1", "--json"], capsys, monkeypatch)
        assert code == 0, err
        runs.append(json.loads(out))
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    tokenizer = AutoTokenizer.from_pretrained(nvfp4)
    model = AutoModelForCausalLM.from_pretrained(nvfp4, quantization_config=CompressedTensorsConfig(dequantize=True))
    model = model.float().eval()
    for prompt, run in zip(REAL_PROMPTS, runs):
        prompt_ids = tokenizer(prompt).input_ids
        assert len(run["token_ids"]) == 64 and run["prompt_tokens"] == len(prompt_ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + run["token_ids"]])).logits[0, len(prompt_ids) - 1:-1]
        assert logits.argmax(-1).tolist() == run["token_ids"], prompt
    with capsys.disabled():
        for prompt, run in zip(REAL_PROMPTS, runs):
            print(f"\n{prompt!r}: prompt {run['prompt_tok_s']:.1f} tok/s, decode {run['decode_tok_s']:.2f} tok/s, "
                  f"peak RSS {run['peak_memory_bytes'] / 2**30:.2f} GiB: {run['text'][:60]!r}")


def test_threads_default_to_one(tiny, capsys, monkeypatch):
    import torch

    from adaq.commands.run import DEFAULT_THREADS

    torch.set_num_threads(2)
    code, _, err = adaq(["run", tiny / "nvfp4", "Hello", "--max-tokens", "1", "--json", *FAST], capsys, monkeypatch)
    assert code == 0, err
    assert torch.get_num_threads() == DEFAULT_THREADS == 1


def test_run_plans_one_sequence(tiny, capsys, monkeypatch):
    """run answers one prompt at a time: its engine holds one sequence (validate's batch-1 budget: a sliding-window
    model reserves one window, not four)."""
    from adaq.engine import api

    engines = []
    build = api.LLM.__init__

    def recording(self, *args, **kwargs):
        build(self, *args, **kwargs)
        engines.append(self.engine)

    monkeypatch.setattr(api.LLM, "__init__", recording)
    code, _, err = adaq(["run", tiny / "nvfp4", "Hello", "--max-tokens", "2", "--json", *FAST], capsys, monkeypatch)
    assert code == 0, err
    assert [engine.config.max_num_seqs for engine in engines] == [1]
