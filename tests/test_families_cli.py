"""The 2026 model families end to end through the real CLI (`adaq.cli.main` in this process; `adaq serve` in a child
process), on the CPU, as a user runs them (issues 15 and 16): a tiny random bf16 Hugging Face folder with a tokenizer
-> `adaq quantize` (rtn) -> `adaq validate` (+ --json) -> `adaq run` -> `adaq eval ppl` (beside the bf16 folder) ->
`adaq bench` -> `adaq serve`.

Families: Qwen3.5 dense (`Qwen3_5ForCausalLM`) and MoE (`Qwen3_5MoeForCausalLM`), Qwen3-Next, Qwen3.5 packaged as
`Qwen3_5ForConditionalGeneration` (nested text_config, `model.language_model.*`, a vision tower, an `mtp.*` head),
Gemma 4 dense and MoE (`Gemma4ForCausalLM`) and Gemma 4 packaged as `Gemma4ForConditionalGeneration`.

quantize, validate, run and eval ppl run on every family. bench and serve run on one hybrid and one Gemma 4 model
each: they load a checkpoint through the same engine (`LLMEngine`: model registry, state cache or window-sized KV,
scheduler, sampler) that `run` and `eval ppl` drive here on every family, and what they add (the bench runner and its
dequantized bf16 baseline, the HTTP server) does not depend on the family. serve runs on the two multimodal
packagings, whose one-line notices (towers ignored; prefix caching off for hybrids) must appear once in its log, as
they must in `run`'s output on every family. The numerics of each family against transformers are tested in
test_hybrid_models.py and test_gemma4.py; here, that each command works and says the right things.
"""

import io
import json
import math
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from helpers.tiny_models import multimodal_bf16_folder, random_model
from helpers.tiny_tokenizer import write_tokenizer

from adaq.cli import main
from adaq.formats.checkpoint import open_checkpoint

# family -> (tiny architecture in helpers.tiny_models, multimodal packaging, architecture in config.json)
FAMILIES = {
    "qwen3.5": ("qwen3_5", False, "Qwen3_5ForCausalLM"),
    "qwen3.5-moe": ("qwen3_5_moe", False, "Qwen3_5MoeForCausalLM"),
    "qwen3-next": ("qwen3_next", False, "Qwen3NextForCausalLM"),
    "qwen3.5-vl": ("qwen3_5", True, "Qwen3_5ForConditionalGeneration"),
    "gemma4": ("gemma4", False, "Gemma4ForCausalLM"),
    "gemma4-moe": ("gemma4_moe", False, "Gemma4ForCausalLM"),
    "gemma4-vl": ("gemma4_moe", True, "Gemma4ForConditionalGeneration"),
}
HYBRID_LAYERS = {"linear_attention": 3, "full_attention": 1}
GEMMA4_LAYERS = {"sliding_attention": 5, "full_attention": 1}
MOE_LAYERS = {"qwen3_5": 0, "qwen3_5_moe": 4, "qwen3_next": 3, "gemma4": 0, "gemma4_moe": 6}
CPU = ["--backend", "reference", "--device", "cpu"]
TOWERS_NOTICE = {"qwen3.5-vl": "notice: Qwen3_5ForConditionalGeneration: running its text model; the vision tower's "
                               "weights are ignored",
                 "gemma4-vl": "notice: Gemma4ForConditionalGeneration: running its text model; the vision and audio "
                              "towers are ignored"}
PREFIX_CACHING_NOTICE = "notice: prefix caching is off for hybrid (Gated DeltaNet) models"


def is_hybrid(family: str) -> bool:
    return family.startswith("qwen")


def cli(*args) -> tuple[int, str, str]:
    """adaq.cli.main in this process, as the console script runs it: (exit code, stdout, stderr), warnings on stderr
    as a console shows them. `adaq run` sets torch's thread count: it is restored after."""
    import torch

    threads, argv = torch.get_num_threads(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["adaq", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err), console_warnings(), pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    code = exit_info.value.code
    return code if isinstance(code, int) else int(code is not None), out.getvalue(), err.getvalue()


@contextmanager
def console_warnings():
    """Python's own warning output instead of pytest's record: each warning once per place, written to stderr in the
    format the CLI sets (adaq's as one line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)  # as Python's default filters do
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        yield


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """family -> a bf16 HF folder with the tiny tokenizer (built once per module)."""
    import torch

    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            arch, multimodal, _ = FAMILIES[family]
            folder = tmp_path_factory.mktemp(family) / family
            if multimodal:
                multimodal_bf16_folder(arch, folder)
            else:
                random_model(arch, seed=1).to(torch.bfloat16).save_pretrained(folder)
                write_tokenizer(folder)
            cache[family] = folder
        return cache[family]

    return make


@pytest.fixture(scope="module")
def quantized(bf16):
    """family -> (the folder `adaq quantize` wrote, its --json report), quantized once per module."""
    cache: dict[str, tuple[Path, dict]] = {}

    def make(family: str) -> tuple[Path, dict]:
        if family not in cache:
            out = bf16(family).parent / f"{family}-nvfp4"
            code, stdout, err = cli("quantize", bf16(family), "-o", out, "--device", "cpu", "--json")
            assert code == 0, err
            cache[family] = out, json.loads(stdout)
        return cache[family]

    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize(family, quantized):
    out, report = quantized(family)
    arch, multimodal, _ = FAMILIES[family]
    assert (report["method"], report["scheme"]) == ("rtn", "nvfp4a16") and report["quantized"] > 0
    assert Path(report["recipe"]).stem == ("nvfp4a16-hybrid" if is_hybrid(family) else "nvfp4a16-gemma4")
    checkpoint = open_checkpoint(out)
    assert (checkpoint.format, checkpoint.scheme) == ("compressed-tensors", "nvfp4a16")
    decoder = "model.language_model.layers." if multimodal else "model.layers."
    quantized_prefixes = checkpoint.quantized_prefixes()
    assert all(prefix.startswith(decoder) for prefix in quantized_prefixes)
    assert not any("linear_attn" in prefix for prefix in quantized_prefixes)
    assert (out / "tokenizer.json").is_file() and (out / "recipe.yaml").is_file()
    if multimodal:
        tower = "model.visual." if arch == "qwen3_5" else "model.vision_tower."
        assert any(name.startswith(tower) for name in checkpoint.tensor_names())
        ignored = set(checkpoint.config["quantization_config"]["ignore"])
        assert tower_linears(out) <= ignored  # kept in bf16 and said so, or a reader expects them quantized


def tower_linears(folder: Path) -> set[str]:
    """The nn.Linear modules outside the language model in transformers' own model of the folder: what
    llm-compressor lists in `ignore` for the towers."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])._from_config(config)
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and not name.startswith("model.language_model.") and name != "lm_head"}


def test_quantize_keeps_the_mtp_head_in_bf16(quantized):
    """Qwen3.5's multi-token-prediction head is copied as it is and listed in `ignore` (a reader loads it as bf16),
    as llm-compressor's Qwen3.5 examples and NVIDIA's NVFP4 Qwen3.5 keep it."""
    out, _ = quantized("qwen3.5-vl")
    checkpoint = open_checkpoint(out)
    assert not any(prefix.startswith("mtp.") for prefix in checkpoint.quantized_prefixes())
    assert "mtp.layers.0.mlp.down_proj.weight" in checkpoint.tensor_names()
    assert "mtp.layers.0.self_attn.q_proj" in checkpoint.config["quantization_config"]["ignore"]


@pytest.mark.parametrize("family", FAMILIES)
def test_validate(family, quantized):
    out, _ = quantized(family)
    arch, _, architecture = FAMILIES[family]
    code, stdout, err = cli("validate", out, "--json", "--batch", "2")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["valid"] and report["architecture"] == architecture and report["errors"] == 0
    assert report["layer_types"] == (HYBRID_LAYERS if is_hybrid(family) else GEMMA4_LAYERS)
    assert report["moe_layers"] == MOE_LAYERS[arch]
    budget = report["budget"]
    if is_hybrid(family):  # 3 GDN layers: conv 128 channels x 3 x 2 bytes + recurrent 4 x 16 x 16 x 4 bytes, 2 seqs
        assert budget["state_cache_bytes"] == 2 * 3 * (128 * 3 * 2 + 4 * 16 * 16 * 4)
    else:
        assert budget["state_cache_bytes"] == 0 and any("Gemma 4" in note for note in budget["notes"])
    code, stdout, err = cli("validate", out)
    assert code == 0, err
    kinds = "3 Gated DeltaNet, 1 full attention" if is_hybrid(family) else "5 sliding-window attention, 1 full"
    assert kinds in stdout and stdout.rstrip().splitlines()[-1].startswith("valid")


@pytest.mark.parametrize("family", FAMILIES)
def test_run(family, quantized):
    """A chat turn (the tokenizer's template) as one JSON object, then a plain completion streamed with its summary
    line and each notice (towers ignored, prefix caching off) once, on one line."""
    out, _ = quantized(family)
    code, stdout, err = cli("run", out, "Hello", "--json", "--temperature", "0", "--max-tokens", "4",
                            "--ignore-eos", "--max-model-len", "256", *CPU)
    assert code == 0, err
    chat = json.loads(stdout)
    assert chat["prompt_tokens"] > len("Hello") + 1  # the chat template's turn markers
    assert chat["output_tokens"] == len(chat["token_ids"]) == 4 and chat["finish_reason"] == "length"
    assert chat["device"] == "CPU" and chat["backend"] == "reference" and chat["fallbacks"] == []
    code, stdout, err = cli("run", out, "Hello", "--no-chat", "--temperature", "0", "--max-tokens", "4",
                            "--ignore-eos", "--max-model-len", "256", *CPU)
    assert code == 0, err
    assert "prompt: 6 tokens" in err and "decode: 4 tokens" in err
    assert_notices_once(family, err)


def test_run_sharded_prints_each_notice_once(quantized):
    """Tensor parallelism (two gloo ranks on the CPU): every rank builds the model, rank 0 alone says the notices."""
    out, _ = quantized("qwen3.5-vl")
    result = subprocess.run([sys.executable, "-m", "adaq", "run", str(out), "Hello", "--no-chat", "--temperature", "0",
                             "--max-tokens", "2", "--ignore-eos", "--max-model-len", "256", *CPU,
                             "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_notices_once("qwen3.5-vl", result.stderr)


def assert_notices_once(family: str, output: str) -> None:
    notices = [line for line in output.splitlines() if line.startswith("notice: ")]
    expected = ([TOWERS_NOTICE[family]] if family in TOWERS_NOTICE else []) + \
        ([PREFIX_CACHING_NOTICE] if is_hybrid(family) else [])
    assert len(notices) == len(expected), output
    for line in expected:
        assert sum(notice.startswith(line) for notice in notices) == 1, output
    assert "Traceback" not in output and "Warning:" not in output, output


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_ppl(family, quantized, bf16, calib_text, tmp_path):
    """Perplexity of the NVFP4 folder beside its bf16 source on a local text file (offline)."""
    out, _ = quantized(family)
    path = tmp_path / "ppl.json"
    code, stdout, err = cli("eval", "ppl", out, "--baseline", bf16(family), "--text", calib_text, "--window", "32",
                            "--max-windows", "2", "--kv-cache-dtype", "bf16", "--backend", "reference", "--json", path)
    assert code == 0, err
    models = json.loads(path.read_text())["models"]
    assert list(models) == ["baseline", "nvfp4a16"]
    for result in models.values():
        assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
        assert (result["windows"], result["scored_tokens"]) == (2, 62)
    assert "recovery" in stdout


@pytest.mark.parametrize("family", ["qwen3.5-moe", "gemma4"])
def test_bench(family, quantized, tmp_path):
    """`adaq bench CKPT` on the CPU: the NVFP4 checkpoint beside its dequantized bf16 weights, no fallbacks."""
    out, _ = quantized(family)
    path = tmp_path / "bench.json"
    code, stdout, err = cli("bench", out, "--batch", "1", "--input-len", "8", "--output-len", "4", "--repeats", "1",
                            "--baselines", "bf16", *CPU, "--json", path)
    assert code == 0, err
    report = json.loads(path.read_text())
    assert report["on_cpu"] and not report["model"]["synthetic"]
    assert [variant["variant"] for variant in report["variants"]] == ["nvfp4", "bf16"]
    for variant in report["variants"]:
        assert variant["skipped"] is None and not variant.get("error") and variant["fallbacks"] == []
        assert variant["results"][0]["decode_tokens_per_s"] > 0
    assert "CPU" in stdout


@pytest.mark.parametrize("family", ["qwen3.5-vl", "gemma4-vl"])
def test_serve(family, quantized, tmp_path):
    """`adaq serve` in a child process: one completion (the same greedy text as `adaq run`) and one chat completion,
    then SIGINT; its log holds each notice once."""
    from test_serve import API_KEY, start_server, stop_server

    out, _ = quantized(family)
    code, stdout, err = cli("run", out, "Hello", "--no-chat", "--json", "--temperature", "0", "--max-tokens", "4",
                            "--ignore-eos", "--max-model-len", "256", *CPU)
    assert code == 0, err
    expected = json.loads(stdout)["text"]
    log = tmp_path / "server.log"
    server = start_server(out, log, *CPU, "--max-model-len", "256", "--kv-cache-memory", "16MiB", "--api-key",
                          API_KEY)
    try:
        completion = server.post("/v1/completions", json={"model": out.name, "prompt": "Hello", "max_tokens": 4,
                                                          "temperature": 0, "ignore_eos": True})
        chat = server.post("/v1/chat/completions", json={"model": out.name, "max_tokens": 4, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        stop_server(server)
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == expected
    assert completion.json()["usage"]["completion_tokens"] == 4
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= chat.json()["usage"]["completion_tokens"] <= 4
    assert server.process.returncode == 0, log.read_text()
    assert_notices_once(family, log.read_text())


@pytest.mark.parametrize("family", ["qwen3.5-vl", "qwen3.5-moe"])
def test_modelopt_layout_validates_and_runs_the_same(family, quantized, tmp_path):
    """The same NVFP4 weights in ModelOpt's layout (hf_quant_config.json, weight / weight_scale / weight_scale_2),
    as NVIDIA publishes Qwen3.5: GDN projections excluded, the MTP head bf16 and not excluded. `adaq validate` and
    `adaq run` take it, and greedy decoding gives the compressed-tensors folder's tokens."""
    from adaq.formats.modelopt import save_modelopt

    out, _ = quantized(family)
    checkpoint = open_checkpoint(out)
    folder = tmp_path / f"{family}-modelopt"
    save_modelopt(folder, {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}, "nvfp4a16",
                  ["lm_head", "*linear_attn*", "*visual*"], {p: checkpoint.nvfp4(p) for p in
                                                              checkpoint.quantized_prefixes()},
                  {name: checkpoint.tensor(name) for name in checkpoint.tensor_names()})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(out / name, folder / name)
    code, stdout, err = cli("validate", folder, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["valid"] and report["format"] == "modelopt"
    assert report["quantized_linears"] == len(checkpoint.quantized_prefixes())
    runs = []
    for source in (out, folder):
        code, stdout, err = cli("run", source, "Hello", "--no-chat", "--json", "--temperature", "0", "--max-tokens",
                                "8", "--ignore-eos", "--max-model-len", "256", *CPU)
        assert code == 0, err
        runs.append(json.loads(stdout)["token_ids"])
    assert runs[0] == runs[1]
