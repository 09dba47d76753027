"""adaq eval: the lm-eval backend against HFLM, generation stops, CoT answer extraction, data errors, resume,
perplexity windows, and a small end-to-end MMLU-Pro run on the real Gemma3-270M."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from adaq.errors import AdaqError
from adaq.eval import data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CORPUS = ["The quick brown fox jumps over the lazy dog. Question: what is 2 + 2? Answer: 4.",
          "Options:\nA. one\nB. two\nC. three\nD. four\nthe answer is (B)",
          "<unk> = Valkyria Chronicles = <unk> , the game began development in 2010 ."] * 20


# ---- tiny models ----------------------------------------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _write_nvfp4a16(dense: Path, folder: Path) -> None:
    """The dense tiny model as an NVFP4A16 compressed-tensors folder (round to nearest, adaq's reference codec)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adaq.formats.nvfp4 import quantize

    folder.mkdir(parents=True)
    tensors = {}
    for name, tensor in load_file(dense / "model.safetensors").items():
        if "layers." in name and name.endswith("_proj.weight"):
            weight, prefix = quantize(tensor.float()), name.removesuffix(".weight")
            tensors |= {f"{prefix}.weight_packed": weight.packed, f"{prefix}.weight_scale": weight.block_scale,
                        f"{prefix}.weight_global_scale": weight.global_scale}
        else:
            tensors[name] = tensor
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for item in dense.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy(item, folder / item.name)
    config = json.loads((dense / "config.json").read_text())
    weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
               "dynamic": False, "observer": "minmax", "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "nvfp4-pack-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("eval-tiny")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    for parameter in model.parameters():  # larger weights than the default init: peaked, varied distributions
        parameter.data.normal_(0, 0.2)
    dense = root / "dense"
    model.to(torch.bfloat16).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    _write_nvfp4a16(dense, root / "nvfp4a16")
    return {"dense": dense, "nvfp4a16": root / "nvfp4a16"}


def _decompressed_hf_model(folder: Path):
    """transformers' model of an NVFP4 folder with adaq's exact fp32 dequantization in every quantized Linear."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from adaq.formats.checkpoint import open_checkpoint
    from adaq.formats.nvfp4 import dequantize

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
    model = model.float().eval()
    checkpoint = open_checkpoint(folder)
    for prefix in checkpoint.quantized_prefixes():
        model.get_submodule(prefix).weight.data = dequantize(checkpoint.nvfp4(prefix))
    return model


def _engine_lm(folder: Path, **kwargs):
    from adaq.engine.api import LLM
    from adaq.eval.lm_backend import AdaqLM
    from adaq.eval.scoring import EngineScorer

    llm = LLM(str(folder), backend="reference", kv_cache_dtype="bf16", dtype="fp32", max_model_len=129,
              max_num_batched_tokens=256)
    return AdaqLM(scorer=EngineScorer(llm), **kwargs)


def _instances(kind: str, args_list: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


# ---- the backend against HFLM -----------------------------------------------------------------------------------
LOGLIKELIHOOD_REQUESTS = [
    ("Question: what is 2 + 2? Answer:", " A"), ("Question: what is 2 + 2? Answer:", " B"),
    ("Question: what is 2 + 2? Answer:", " C"), ("Question: what is 2 + 2? Answer:", " D"),
    ("The quick brown fox", " jumps over the lazy dog."), ("Options:\nA. one\n", "B. two\nC. three"),
    ("", "the answer is (B)"),
]


def test_loglikelihoods_equal_hflm(tiny):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=_decompressed_hf_model(tiny["nvfp4a16"]), tokenizer=str(tiny["nvfp4a16"]), device="cpu",
              batch_size=4, max_length=128)
    ours = _engine_lm(tiny["nvfp4a16"])
    assert ours.max_length == 128
    expected = hf.loglikelihood(_instances("loglikelihood", LOGLIKELIHOOD_REQUESTS))
    got = ours.loglikelihood(_instances("loglikelihood", LOGLIKELIHOOD_REQUESTS))
    for (context, continuation), (ll_hf, greedy_hf), (ll, greedy) in zip(LOGLIKELIHOOD_REQUESTS, expected, got):
        tokens = max(1, len(ours.tok_encode(context + continuation)) - len(ours.tok_encode(context or "")))
        assert abs(ll - ll_hf) <= 1e-3 * tokens, (context, continuation, ll, ll_hf)
        assert greedy == greedy_hf
    long_text = " ".join(CORPUS[:6])  # > max_length tokens: several rolling windows
    assert len(ours.tok_encode(long_text)) > 128
    rolling_hf = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", [(long_text,)]))
    rolling = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", [(long_text,)]))
    assert abs(rolling[0] - rolling_hf[0]) <= 1e-3 * len(ours.tok_encode(long_text))


def test_generate_until_honours_stop_and_max_tokens(tiny):
    from lm_eval.models.huggingface import HFLM

    ours = _engine_lm(tiny["dense"])
    prompt = "Question: what is 2 + 2? Answer:"
    free = ours.generate_until(_instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 24})]))[0]
    tokens = ours.scorer.generate([ours.tok_encode(prompt)], [], 24)  # the same request, seen as tokens below
    assert free == tokens[0]
    capped = ours.generate_until(_instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 3})]))[0]
    assert free.startswith(capped) and 0 < len(capped) < len(free)
    assert len(ours.tok_encode(capped, add_special_tokens=False)) <= 3 + 1  # re-encoding may split one token
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop.strip() and free.index(stop) > 0
    short = ours.generate_until(_instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 24})]))[0]
    assert short == free[:free.index(stop)]
    hf = HFLM(pretrained=str(tiny["dense"]), device="cpu", dtype="float32", batch_size=2, max_length=128)
    both = [(prompt, {"until": [stop], "max_gen_toks": 24}), ("The quick brown", {"until": ["."], "max_gen_toks": 8})]
    assert ours.generate_until(_instances("generate_until", both)) == hf.generate_until(
        _instances("generate_until", both))


# ---- MMLU-Pro pipeline with a scripted model ------------------------------------------------------------------
class ScriptedLM:
    """An lm-eval LM whose answers are fixed: CoT text from a list, letter log-likelihoods favouring `favourite`."""

    def __new__(cls, responses=None, favourite="C", fail_after_calls=None):
        from lm_eval.api.model import LM

        class _Scripted(LM):
            def __init__(self):
                super().__init__()
                self.responses, self.calls, self.asked = list(responses or []), 0, []

            def _count(self):
                self.calls += 1
                if fail_after_calls is not None and self.calls > fail_after_calls:
                    raise KeyboardInterrupt

            def loglikelihood(self, requests, disable_tqdm=False):
                self._count()
                self.asked += [r.doc["question_id"] for r in requests]
                return [(0.0 if r.args[1].strip() == favourite else -5.0, False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                self._count()
                return [self.responses.pop(0) for _ in requests]

        return _Scripted()


def test_cot_answer_extraction_on_crafted_outputs():
    from adaq.eval.mmlu_pro import MMLUProRun, ModelUnderTest, run_mmlu_pro

    crafted = {"Let's think. 2 + 2 = 4, so the answer is (C).": "C", "Hence the answer is D": "D",
               "the answer is (J) because": "J", "I cannot tell.": "[invalid]",
               "the answer is (B). Wait, the answer is (C).": "B", "The Answer is (A)": "[invalid]"}
    lm = ScriptedLM(responses=list(crafted))
    qids, (scores,) = run_mmlu_pro([ModelUnderTest("m", "scripted", lambda progress: lm)],
                                   MMLUProRun(variant="cot", limit=6, categories=["biology"], chunk_size=6))
    predictions = [r["prediction"] for r in scores.records]
    assert predictions == list(crafted.values())
    assert [r["correct"] for r in scores.records] == [p == r["target"] for p, r in zip(predictions, scores.records)]


def test_interrupted_run_resumes_from_samples(tmp_path):
    from adaq.eval.mmlu_pro import MMLUProRun, ModelUnderTest, read_samples, run_mmlu_pro

    samples = tmp_path / "samples.jsonl"
    run = MMLUProRun(variant="loglikelihood", limit=6, chunk_size=2, samples_path=samples)
    first = ScriptedLM(fail_after_calls=1)
    with pytest.raises(KeyboardInterrupt):
        run_mmlu_pro([ModelUnderTest("m", "scripted", lambda progress: first)], run)
    assert len(read_samples(samples)) == 2
    second = ScriptedLM()
    qids, (scores,) = run_mmlu_pro([ModelUnderTest("m", "scripted", lambda progress: second)], run)
    assert len(set(second.asked)) == 4 and not set(second.asked) & {r["question_id"] for r in read_samples(samples)[:2]}
    assert [r["question_id"] for r in scores.records] == qids and len(qids) == 6
    assert all(r["prediction"] == "C" for r in scores.records)
    assert scores.accuracy == pytest.approx(sum(r["target"] == "C" for r in scores.records) / 6)


def test_question_selection_is_balanced_and_stable():
    folder = data.resolve_mmlu_pro_dir(None)
    qids = data.select_questions(folder, 28, None)
    table = data.read_mmlu_pro(folder, "test").select(["question_id", "category"]).to_pydict()
    category = dict(zip(table["question_id"], table["category"]))
    counts = {name: sum(category[q] == name for q in qids) for name in data.MMLU_PRO_CATEGORIES}
    assert set(counts.values()) == {2}
    assert qids == data.select_questions(folder, 28, None)
    assert {category[q] for q in data.select_questions(folder, 5, ["law", "computer_science"])} == {
        "law", "computer science"}


def test_missing_data_error_names_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(AdaqError) as error:
        data.resolve_mmlu_pro_dir(tmp_path / "nowhere")
    message = str(error.value)
    assert all(name in message for name in data.MMLU_PRO_FILES.values())
    assert str(tmp_path / "nowhere") in message and "\n" not in message
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env-dir"))
    with pytest.raises(AdaqError, match="env-dir"):
        data.resolve_mmlu_pro_dir(None)
    with pytest.raises(AdaqError, match="unknown MMLU-Pro categories"):
        data.check_categories(["astrology"])


def test_shipped_cot_task_matches_lm_eval_stock():
    import yaml

    from adaq.eval.mmlu_pro import TASKS_DIR

    stock_dir = Path(__import__("lm_eval").__file__).parent / "tasks" / "mmlu_pro"
    ours = (TASKS_DIR / "_adaq_mmlu_pro_cot_template_yaml").read_text()
    stock = (stock_dir / "_default_template_yaml").read_text()
    strip = lambda text: yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)  # noqa: E731
    mine, theirs = strip(ours), strip(stock)
    for key in ("filter_list", "generation_kwargs", "metric_list", "num_fewshot", "output_type", "doc_to_target"):
        assert mine[key] == theirs[key], key


# ---- perplexity -----------------------------------------------------------------------------------------------------
def test_perplexity_windows_and_value(tiny):
    from transformers import AutoTokenizer

    from adaq.engine.api import LLM
    from adaq.eval.perplexity import make_windows, perplexity
    from adaq.eval.scoring import EngineScorer

    tokenizer = AutoTokenizer.from_pretrained(tiny["dense"])
    text = " ".join(CORPUS[:9])
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    windows = make_windows(tokenizer, text, 32)
    assert len(windows) == len(ids) // 31 and all(len(w) == 32 and w[0] == tokenizer.bos_token_id for w in windows)
    assert sum((w[1:] for w in windows), []) == ids[:31 * len(windows)]
    assert tokenizer.convert_tokens_to_ids("<unk>") not in ids  # "<unk>" in the text is plain text
    model = _decompressed_hf_model(tiny["nvfp4a16"])
    with torch.no_grad():
        logits = model(torch.tensor(windows)).logits.float()
    nll = -logits[:, :-1].log_softmax(-1).gather(2, torch.tensor(windows)[:, 1:, None]).mean()
    llm = LLM(str(tiny["nvfp4a16"]), backend="reference", kv_cache_dtype="bf16", dtype="fp32")
    result = perplexity(EngineScorer(llm), text, 32, batch_size=3)
    assert len(make_windows(tokenizer, text, 32, max_windows=2)) == 2
    assert result.num_scored_tokens == 31 * len(windows)
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)


# ---- the command end to end on the real model ---------------------------------------------------------------------
@pytest.mark.slow
def test_cli_mmlu_pro_end_to_end_on_real_model(tmp_path):
    from typer.testing import CliRunner

    from adaq.cli import app
    from adaq.demo import gemma3_270m_folder

    folder = str(gemma3_270m_folder())
    out, samples = tmp_path / "mmlu.json", tmp_path / "samples.jsonl"
    args = ["eval", "mmlu-pro", folder, "--baseline", folder, "--limit", "2", "--num-fewshot", "1",
            "--backend", "reference", "--kv-cache-dtype", "bf16", "--samples", str(samples), "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["questions"] == 2 and set(report["models"]) == {"baseline", "model"}
    assert report["comparisons"]["model_vs_baseline"]["delta"] == 0.0  # same weights, same questions
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 4 and all(len(r["loglikelihoods"]) == 10 or r["loglikelihoods"] for r in records)
    assert "MMLU-Pro" in result.output


def test_lm_eval_finds_adaq_through_the_startup_hook(tmp_path):
    import subprocess
    import sys

    from adaq.eval import plugin

    pth = plugin.install(tmp_path)
    assert pth.parent == tmp_path and "activate()" in pth.read_text()
    script = (f"import site, sys; site.addsitedir({str(tmp_path)!r}); "
              "assert 'adaq.eval.lm_backend' not in sys.modules and 'lm_eval' not in sys.modules; "
              "from lm_eval.api.registry import get_model; print(get_model('adaq').__module__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "adaq.eval.lm_backend"
    plugin.uninstall(tmp_path)
    assert not pth.exists()


def test_cli_ppl_side_by_side(tiny, tmp_path):
    from typer.testing import CliRunner

    from adaq.cli import app

    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS[:9]))
    out = tmp_path / "ppl.json"
    args = ["eval", "ppl", str(tiny["nvfp4a16"]), "--baseline", str(tiny["dense"]), "--text", str(text),
            "--window", "32", "--backend", "reference", "--kv-cache-dtype", "bf16", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["baseline", "nvfp4a16"] and report["command"].startswith("adaq")
    base, quant = report["models"]["baseline"], report["models"]["nvfp4a16"]
    comparison = report["comparisons"]["nvfp4a16_vs_baseline"]
    assert comparison["delta"] == pytest.approx(quant["perplexity"] - base["perplexity"])
    assert comparison["recovery_percent"] == pytest.approx(100 * base["perplexity"] / quant["perplexity"])
    assert base["scored_tokens"] == 31 * base["windows"] and base["stderr"] > 0
    assert "recovery" in result.output and f"{base['perplexity']:.3f}" in result.output


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from adaq.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["eval", "ppl", str(tmp_path), "--text", str(tmp_path / "none.txt")])
    assert missing.exit_code != 0 and isinstance(missing.exception, AdaqError)
    bad = runner.invoke(app, ["eval", "mmlu-pro", str(tmp_path), "--variant", "maybe"])
    assert isinstance(bad.exception, AdaqError) and "--variant" in str(bad.exception)
    nodata = runner.invoke(app, ["eval", "mmlu-pro", str(tmp_path), "--data-dir", str(tmp_path / "d")])
    assert isinstance(nodata.exception, AdaqError) and "test-00000-of-00001.parquet" in str(nodata.exception)


def test_defaults_are_the_repositorys_data(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_mmlu_pro_dir(None) == (data.PROJECT_ROOT / "data" / "mmlu_pro").resolve()
    assert data.repo_data(data.WIKITEXT_TEST).is_file()
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "site-packages" / "data")  # an install without the clone
    with pytest.raises(AdaqError) as error:
        data.repo_data(data.WIKITEXT_TEST)
    assert str(tmp_path / "site-packages" / "data" / data.WIKITEXT_TEST) in str(error.value)
    assert "\n" not in str(error.value)


def _ppl_report(*labels: str) -> dict:
    from adaq.eval.perplexity import PerplexityResult
    from adaq.eval.report import perplexity_json

    def result(ppl: float):
        import math

        return PerplexityResult(perplexity=ppl, mean_nll=math.log(ppl), stderr=0.1, num_windows=2,
                                num_scored_tokens=1022, window=512, window_nll=[511 * math.log(ppl)] * 2)

    return perplexity_json({label: ("/a/rather/long/path/to/" + label, result(20.0 + i))
                            for i, label in enumerate(labels)}, "data/wikitext-2/test.txt", 1.0)


def _rendered(table) -> str:
    from rich.console import Console

    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text()


def test_perplexity_table_compares_only_with_a_baseline():
    from adaq.eval.report import perplexity_table

    alone = _rendered(perplexity_table(_ppl_report("nvfp4a16")))
    assert "Δ vs" not in alone and "recovery" not in alone and "20.000" in alone
    both = _rendered(perplexity_table(_ppl_report("baseline", "nvfp4a16")))
    assert "Δ vs baseline" in both and "+1.000 (+5.0%)" in both and "95.2%" in both
    assert all(len(line) <= 80 for line in both.splitlines())
