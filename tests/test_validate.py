"""`adaq validate`: layout rules, VRAM arithmetic (Qwen3-8B by hand) and every bad input through the CLI."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaq.cli import main
from adaq.formats import nvfp4
from adaq.validate import Gpu, ModelShape, estimate_weight_bytes, plan, validate_checkpoint
from adaq.validate.budget import activation_bytes, kv_bytes_per_token

FIXTURES = Path(__file__).parent / "fixtures"
GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu", "up_proj": "gu",
          "down_proj": "down"}
# Every K a multiple of 128 and N of 8: the decode kernel's tile, so no padding warnings.
TINY_QWEN3 = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256, hidden_size=128, intermediate_size=256,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
    tie_word_embeddings=False, torch_dtype="bfloat16")


def quantization_config(scheme: str) -> dict:
    """What llm-compressor writes for NVFP4A16 / NVFP4 (see NOTES.md)."""
    weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
               "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    inputs = {**weights, "dynamic": "local"} if scheme == "nvfp4" else None
    return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ["lm_head"],
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}}}


def layer_linears(config: dict, layer: int) -> dict[str, tuple[int, int]]:
    h, d = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    linears = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, q)}
    if config.get("num_experts") and layer not in config.get("mlp_only_layers", []):
        width = config["moe_intermediate_size"]
        for e in range(config["num_experts"]):
            linears |= {f"mlp.experts.{e}.gate_proj": (width, h), f"mlp.experts.{e}.up_proj": (width, h),
                        f"mlp.experts.{e}.down_proj": (h, width)}
    else:
        inter = config["intermediate_size"]
        linears |= {"mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    return linears


def tiny_tensors(config: dict, scheme: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random Qwen3 (or Qwen3-MoE) in compressed-tensors NVFP4, q/k/v and gate/up sharing their global scale."""
    generator = torch.Generator().manual_seed(seed)
    h, d = config["hidden_size"], config["head_dim"]
    bf16 = lambda *shape: torch.randn(*shape, generator=generator).to(torch.bfloat16)  # noqa: E731
    tensors = {"model.embed_tokens.weight": bf16(config["vocab_size"], h), "model.norm.weight": bf16(h),
               "lm_head.weight": bf16(config["vocab_size"], h)}
    for layer in range(config["num_hidden_layers"]):
        base = f"model.layers.{layer}"
        for norm, size in (("input_layernorm", h), ("post_attention_layernorm", h), ("self_attn.q_norm", d),
                           ("self_attn.k_norm", d)):
            tensors[f"{base}.{norm}.weight"] = bf16(size)
        linears = layer_linears(config, layer)
        if "mlp.gate_proj" not in linears:
            tensors[f"{base}.mlp.gate.weight"] = bf16(config["num_experts"], h)  # the router stays bf16
        weights = {name: 0.1 * torch.randn(*shape, generator=generator) for name, shape in linears.items()}
        groups = {}
        for name in weights:
            parent, _, leaf = name.rpartition(".")
            groups.setdefault((parent, GROUPS[leaf]), []).append(name)
        for members in groups.values():
            shared = nvfp4.global_scale_from_amax(max(weights[m].abs().amax() for m in members))
            for name in members:
                w = nvfp4.quantize(weights[name], shared.to(torch.bfloat16).float())
                tensors |= {f"{base}.{name}.weight_packed": w.packed, f"{base}.{name}.weight_scale": w.block_scale,
                            f"{base}.{name}.weight_global_scale": w.global_scale.clone()}
                if scheme == "nvfp4":
                    tensors[f"{base}.{name}.input_global_scale"] = torch.tensor([448 * 6 / 5.0])
    return tensors


def write_checkpoint(folder: Path, tensors: dict, config: dict) -> Path:
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    config = {**TINY_QWEN3, "quantization_config": quantization_config("nvfp4a16")}
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "nvfp4a16", tiny_tensors(TINY_QWEN3, "nvfp4a16"),
                            config)


def mutated(tiny: Path, tmp_path: Path, change_tensors=None, change_config=None) -> Path:
    """A copy of the tiny checkpoint with some tensors or config fields changed."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    if change_tensors:
        tensors = load_file(folder / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, folder / "model.safetensors")
    if change_config:
        config = json.loads((folder / "config.json").read_text())
        change_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """adaq's real entry point (adaq.cli.main, which turns AdaqError into one line), in-process."""
    old_argv = sys.argv
    sys.argv = ["adaq", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def json_report(capsys, folder: Path, *args: str) -> tuple[int, dict]:
    code, out, _ = run_cli(capsys, "validate", str(folder), "--json", *args)
    return code, json.loads(out)


# ---- a good checkpoint -----------------------------------------------------------------------------------------

def test_valid_checkpoint_exits_0_with_tables(tiny, capsys):
    code, out, _ = run_cli(capsys, "validate", str(tiny))
    assert code == 0, out
    for part in ("compressed-tensors (nvfp4a16)", "Qwen3ForCausalLM", "tile-k", "fused-group", "VRAM on rtx4090",
                 "largest batch at context 512", "valid"):
        assert part in out, part


def test_valid_checkpoint_json(tiny, capsys):
    code, report = json_report(capsys, tiny)
    assert code == 0 and report["valid"] and report["errors"] == 0
    assert report["format"] == "compressed-tensors" and report["scheme"] == "nvfp4a16"
    assert report["quantized_linears"] == 14
    assert report["rules"]["global-scale"] == {"checked": 14, "failed": 0}
    assert report["rules"]["block-scale"]["checked"] == 28  # values, then not all zero
    assert report["rules"]["fused-group"] == {"checked": 4, "failed": 0}
    budget = report["budget"]
    assert budget["fits"] and budget["context"] == 512 and budget["max_context_capped_by_model"]
    linears = [(128, 128), (64, 128), (64, 128), (128, 128), (256, 128), (256, 128), (128, 256)]  # q k v o gate up down
    assert budget["weights_quantized_bytes"] == 2 * sum(n * k // 2 + n * k // 16 + 4 * n for n, k in linears)
    assert budget["weights_kept_bytes"] == 2 * (2 * 256 * 128 + 128 + 2 * (2 * 128 + 2 * 32))


def test_w4a4_checkpoint_needs_its_input_scales(tmp_path, capsys):
    config = {**TINY_QWEN3, "quantization_config": quantization_config("nvfp4")}
    tensors = tiny_tensors(TINY_QWEN3, "nvfp4")
    good = write_checkpoint(tmp_path / "good", tensors, config)
    code, report = json_report(capsys, good)
    assert code == 0 and report["scheme"] == "nvfp4" and report["rules"]["input-scale"]["checked"] == 14
    del tensors["model.layers.1.self_attn.o_proj.input_global_scale"]
    bad = write_checkpoint(tmp_path / "bad", tensors, config)
    code, report = json_report(capsys, bad)
    assert code == 1
    assert [(f["rule"], f["tensor"]) for f in report["findings"]] == [
        ("input-scale", "model.layers.1.self_attn.o_proj")]


def test_scales_are_read_one_tensor_at_a_time(tiny, monkeypatch):
    """Validation never loads a packed weight: only scale tensors go through safetensors."""
    from safetensors import safe_open

    read = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def keys(self):
            return self.inner.keys()

    monkeypatch.setattr("adaq.validate.tensors.safe_open", Spy)
    assert validate_checkpoint(tiny).valid
    assert read and not any(name.endswith("weight_packed") for name in read)
    assert len(read) == len(set(read)) == 28


@pytest.mark.parametrize("arch, scheme", [("qwen3", "nvfp4a16"), ("qwen3_moe", "nvfp4a16"), ("gemma3", "nvfp4a16"),
                                          ("qwen3", "nvfp4")])
def test_what_adaq_quantize_writes_is_valid(tiny_nvfp4, capsys, arch, scheme):
    """The shared tiny checkpoints, quantized by adaq's own pipeline: valid; their 64-wide layers are off the
    decode kernel's tile, which may only warn (padding)."""
    folder = tiny_nvfp4(arch, scheme)
    code, report = json_report(capsys, folder)
    assert code == 0 and report["valid"] and report["scheme"] == scheme, report["findings"]
    assert report["quantized_linears"] > 0 and report["rules"]["shape-vs-config"]["failed"] == 0
    assert {f["rule"] for f in report["findings"]} <= {"tile-n", "tile-k"}


# ---- bad inputs, each through the CLI: one line, exit 1, no traceback -------------------------------------------

def expect_invalid(capsys, folder: Path, rule: str, tensor: str, *fragments: str) -> dict:
    code, out, _ = run_cli(capsys, "validate", str(folder))
    assert code == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("invalid:") and f"[{rule}]" in verdict and tensor in verdict, verdict
    code, report = json_report(capsys, folder)
    assert code == 1 and not report["valid"]
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert (errors[0]["rule"], errors[0]["tensor"]) == (rule, tensor), errors
    for fragment in fragments:
        assert fragment in errors[0]["message"], errors[0]["message"]
    return report


def expect_error_line(capsys, folder: Path, *fragments: str) -> str:
    code, out, err = run_cli(capsys, "validate", str(folder))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    code, out, _ = run_cli(capsys, "validate", str(folder), "--json")
    assert code == 1 and json.loads(out)["valid"] is False
    return lines[0]


def set_tensor(name, value):
    def change(tensors):
        tensors[name] = value(tensors[name]) if callable(value) else value
    return change


Q = "model.layers.0.self_attn.q_proj"


def test_truncated_safetensors(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_error_line(capsys, folder, "model.safetensors", "truncated")


def test_corrupt_header(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path)
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    expect_error_line(capsys, folder, "model.safetensors", "not valid UTF-8 JSON")


def test_header_lying_about_sizes(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path)
    shard = folder / "model.safetensors"
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header[f"{Q}.weight_packed"]["shape"] = [128, 128]  # the span holds [128, 64]
    body = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(body) == length
    shard.write_bytes(raw[:8] + body + raw[8 + length:])
    expect_error_line(capsys, folder, f"tensor {Q}.weight_packed", "needs 16384 bytes", "span 8192")


def test_pickle_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN3))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    expect_error_line(capsys, tmp_path, "pytorch_model.bin", "safetensors only")
    expect_error_line(capsys, tmp_path / "pytorch_model.bin", "never unpickles .bin")


def test_missing_config(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path)
    (folder / "config.json").unlink()
    expect_error_line(capsys, folder, "config.json")


def test_tokenizer_missing_or_broken(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path)
    (folder / "tokenizer.json").unlink()
    code, report = json_report(capsys, folder)
    assert code == 0 and [(f["severity"], f["rule"]) for f in report["findings"]] == [("warning", "tokenizer")]
    (folder / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    expect_invalid(capsys, folder, "tokenizer", "tokenizer.json", "cannot be loaded")


def test_missing_folder(tmp_path, capsys):
    expect_error_line(capsys, tmp_path / "nowhere", "no such checkpoint folder")


def test_config_without_model_shape(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, change_config=lambda c: c.pop("hidden_size"))
    expect_invalid(capsys, folder, "config", "", "hidden_size")


def test_unsupported_architecture_lists_the_supported(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, change_config=lambda c: c.update(architectures=["LlamaForCausalLM"]))
    expect_invalid(capsys, folder, "architecture", "", "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")


def test_wrong_dtype(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, set_tensor(f"{Q}.weight_scale", lambda t: t.to(torch.bfloat16)))
    expect_invalid(capsys, folder, "dtype", f"{Q}.weight_scale", "BF16", "F8_E4M3")


def test_wrong_block_scale_shape(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, set_tensor(f"{Q}.weight_scale", lambda t: t[:, :2].contiguous()))
    expect_invalid(capsys, folder, "shape", f"{Q}.weight_scale", "[128, 2]", "expected [128, 8]")


def test_shape_disagreeing_with_config(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, change_config=lambda c: c.update(num_key_value_heads=4))
    expect_invalid(capsys, folder, "shape-vs-config", "model.layers.0.self_attn.k_proj", "[64, 128]", "[128, 128]")


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (0.0, "zero"),
                                         (-2.0, "negative")])
def test_bad_global_scale(tiny, tmp_path, capsys, value, word):
    folder = mutated(tiny, tmp_path, set_tensor(f"{Q}.weight_global_scale", torch.tensor([value])))
    expect_invalid(capsys, folder, "global-scale", f"{Q}.weight_global_scale", word)


@pytest.mark.parametrize("value, word", [(float("nan"), "1 NaN"), (-1.0, "1 negative")])
def test_bad_block_scale(tiny, tmp_path, capsys, value, word):
    def poison(tensors):
        scale = tensors[f"{Q}.weight_scale"].float()
        scale[3, 2] = value
        tensors[f"{Q}.weight_scale"] = scale.to(torch.float8_e4m3fn)

    folder = mutated(tiny, tmp_path, poison)
    expect_invalid(capsys, folder, "block-scale", f"{Q}.weight_scale", word, "first at block [3, 2]")


def test_all_zero_block_scales_warn(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, set_tensor(f"{Q}.weight_scale", torch.zeros_like))
    code, report = json_report(capsys, folder)
    assert code == 0
    assert [(f["severity"], f["rule"], f["tensor"]) for f in report["findings"]] == [
        ("warning", "block-scale", f"{Q}.weight_scale")]


def test_k_not_a_multiple_of_16(tmp_path, capsys):
    config = {**TINY_QWEN3, "quantization_config": quantization_config("nvfp4a16")}
    tensors = tiny_tensors(TINY_QWEN3, "nvfp4a16")
    tensors[f"{Q}.weight_packed"] = tensors[f"{Q}.weight_packed"][:, :12].contiguous()  # K = 24
    tensors[f"{Q}.weight_scale"] = tensors[f"{Q}.weight_scale"][:, :1].contiguous()
    folder = write_checkpoint(tmp_path / "k24", tensors, config)
    expect_invalid(capsys, folder, "k-multiple-of-16", Q, "K = 24")


ODD_QWEN3 = dict(TINY_QWEN3, hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=128)


def test_off_tile_shapes_are_padded_by_the_kernel(tmp_path, capsys):
    """K = 96 is valid NVFP4; the decode kernel (adaq.kernels.layout) pads it to its 128-wide tile at load."""
    pytest.importorskip("adaq.kernels.layout")
    config = {**ODD_QWEN3, "quantization_config": quantization_config("nvfp4a16")}
    folder = write_checkpoint(tmp_path / "odd", tiny_tensors(ODD_QWEN3, "nvfp4a16"), config)
    code, report = json_report(capsys, folder)
    assert code == 0 and report["rules"]["tile-k"] == {"checked": 14, "failed": 12}  # all but down_proj
    finding = next(f for f in report["findings"] if f["rule"] == "tile-k")
    assert finding["severity"] == "warning" and "K = 96 is not a multiple of 128" in finding["message"]
    assert "zero-padded to 128 at load" in finding["message"]
    # padded shapes: q/o [96, 96] -> [96, 128], k/v [32, 96] -> [32, 128], gate/up [128, 96] -> [128, 128]
    padded = [(96, 128), (32, 128), (32, 128), (96, 128), (128, 128), (128, 128), (96, 128)]
    assert report["budget"]["weights_quantized_bytes"] == 2 * sum(n * k * 9 // 16 + 4 * n for n, k in padded)


def test_off_tile_shapes_without_padding_are_errors(tmp_path, capsys, monkeypatch):
    """A kernel tile that is not padded at load (N % 8, K % 64 here) makes off-tile shapes errors, not warnings."""
    from adaq.validate import rules

    unpadded = rules.TileRules(n_multiple=8, k_multiple=64, padded=False, why="an unpadded tile")
    monkeypatch.setattr(rules, "kernel_tiles", lambda: unpadded)
    monkeypatch.setattr("adaq.validate.budget.kernel_tiles", lambda: unpadded)
    config = {**ODD_QWEN3, "quantization_config": quantization_config("nvfp4a16")}
    tensors = tiny_tensors(ODD_QWEN3, "nvfp4a16")
    gate = "model.layers.1.mlp.gate_proj"
    narrow = nvfp4.quantize(torch.randn(36, 96), tensors[f"{gate}.weight_global_scale"])
    tensors |= {f"{gate}.weight_packed": narrow.packed, f"{gate}.weight_scale": narrow.block_scale}
    folder = write_checkpoint(tmp_path / "odd", tensors, config)
    report = expect_invalid(capsys, folder, "tile-k", "model.layers.0.mlp.gate_proj.weight_packed", "K = 96",
                            "multiple of 64", "the kernel cannot run it")
    found = [(f["severity"], f["rule"], f["tensor"]) for f in report["findings"]]
    assert ("error", "tile-n", f"{gate}.weight_packed") in found and ("error", "shape-vs-config", gate) in found
    code, report = json_report(capsys, folder, "--arch", "sm_90")  # the H100 runs the same Ada code: same rules
    assert code == 1 and report["rules"]["tile-k"]["failed"] == 12


def test_unfusable_qkv_is_a_warning(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, set_tensor("model.layers.1.self_attn.k_proj.weight_global_scale",
                                                lambda t: t * 2))
    code, report = json_report(capsys, folder)
    assert code == 0 and report["valid"]
    (finding,) = report["findings"]
    assert finding["severity"] == "warning" and finding["rule"] == "fused-group"
    assert finding["tensor"] == "model.layers.1.self_attn.{q_proj,k_proj,v_proj}"
    assert "separate GEMMs" in finding["message"]


def test_missing_tensor(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale"))
    expect_invalid(capsys, folder, "tensors-present", "model.layers.1.mlp.down_proj", "weight_scale")


def test_nvfp4_tensors_without_quantization_config(tiny, tmp_path, capsys):
    folder = mutated(tiny, tmp_path, change_config=lambda c: c.pop("quantization_config"))
    expect_invalid(capsys, folder, "config", "model.layers.0.mlp.down_proj.weight_packed", "no quantization_config")


def test_not_nvfp4_quantization(tiny, tmp_path, capsys):
    def int4(config):
        config["quantization_config"]["format"] = "pack-quantized"
        config["quantization_config"]["config_groups"]["group_0"]["weights"].update(type="int", group_size=128)

    folder = mutated(tiny, tmp_path, change_config=int4)
    expect_error_line(capsys, folder, "compressed-tensors format pack-quantized is not NVFP4")


def test_does_not_fit_names_the_largest_batch_and_context(tiny, capsys):
    # 0.8567 GiB × 0.9 = 827,887,158 B leaves the tiny model 3.3 MB past its weights, 768 MiB CUDA context and
    # 19 MB of activations (a step of 8192 tokens): 20 sequences of 512 tokens (158,208 B each), or 128 tokens for
    # 64 sequences.
    args = ["--gpu", "0.8567", "--batch", "64", "--context", "512", "--max-num-batched-tokens", "8192"]
    code, out, _ = run_cli(capsys, "validate", str(tiny), *args)
    assert code == 1 and "[fits]" in out.strip().splitlines()[-1]
    code, report = json_report(capsys, tiny, *args)
    budget = report["budget"]
    assert not budget["fits"] and budget["max_batch_at_context"] == 20
    assert budget["max_context_at_batch"] == 128  # 129..140 tokens would fit but for the 16-token KV blocks


def test_context_beyond_the_model(tiny, capsys):
    code, report = json_report(capsys, tiny, "--context", "1024")
    assert code == 1 and report["findings"][0]["rule"] == "context"


@pytest.mark.parametrize("args, fragment", [(["--gpu", "rtx9090"], "--gpu 'rtx9090'"),
                                            (["--arch", "sm_75"], "unknown --arch sm_75"),
                                            (["--kv-cache-dtype", "int8"], "--kv-cache-dtype int8"),
                                            (["--batch", "0"], "--batch and --context")])
def test_bad_options_are_one_line(tiny, capsys, args, fragment):
    code, out, err = run_cli(capsys, "validate", str(tiny), *args)
    assert code != 0 and len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.fixture
def fake_kernels(monkeypatch):
    """Stand-in for adaq.kernels.build (owned by the kernels): validate only relays its verdict."""
    module = types.ModuleType("adaq.kernels.build")
    monkeypatch.setitem(sys.modules, "adaq.kernels.build", module)
    monkeypatch.setattr("adaq.validate.validator.shutil.which", lambda name: f"/usr/bin/{name}")
    return module


def test_compile_relays_the_kernels_verdict(tiny, capsys, fake_kernels):
    fake_kernels.compile_check = lambda arch, progress: {"ok": True, "arch": arch,
                                                         "instructions": {"mma.sync.e4m3": 12}}
    code, report = json_report(capsys, tiny, "--compile")
    assert code == 0 and report["compile"]["arch"] == "sm_89" and report["rules"]["compile"]["failed"] == 0
    code, out, _ = run_cli(capsys, "validate", str(tiny), "--compile")
    assert code == 0 and "compile check" in out and "mma.sync.e4m3" in out
    fake_kernels.compile_check = lambda arch, progress: {"ok": False, "error": "no FP8 mma.sync in decode_gemm.cu"}
    code, report = json_report(capsys, tiny, "--compile")
    assert code == 1 and report["findings"][-1]["message"] == "no FP8 mma.sync in decode_gemm.cu"


def test_compile_shows_a_line_per_kernel_source_as_it_finishes(tiny, capsys, fake_kernels):
    def compile_check(arch, progress):
        sources = {"nvfp4_gemm.cu": {"ok": True, "kernels": {"a": {}, "b": {}}, "spills": 0},
                   "moe.cu": {"ok": False, "kernels": {}, "spills": 0}}
        for name, entry in sources.items():
            if progress:
                progress(name, None)
                progress(name, entry)
        return {"ok": False, "arch": arch, "sources": sources, "error": "moe.cu failed"}

    fake_kernels.compile_check = compile_check
    code, out, err = run_cli(capsys, "validate", str(tiny), "--compile")
    assert code == 1 and "compiling the CUDA kernels for sm_89" in err
    assert "nvfp4_gemm.cu: ok (2 kernels, 0 bytes spilled)" in err and "moe.cu: FAILED" in err
    assert err.count("compiling the CUDA kernels") == 1
    code, report = json_report(capsys, tiny, "--compile")  # --json: nothing but the JSON
    assert report["compile"]["error"] == "moe.cu failed"
    code, out, err = run_cli(capsys, "validate", str(tiny))
    assert "compiling" not in err


def test_compile_without_the_kernel_build_says_so(tiny, capsys, fake_kernels, monkeypatch):
    monkeypatch.setitem(sys.modules, "adaq.kernels.build", None)  # import fails as if the file were absent
    code, report = json_report(capsys, tiny, "--compile")
    assert code == 1 and report["compile"]["ok"] is False
    assert report["findings"][-1]["rule"] == "compile" and "no adaq.kernels.build" in report["findings"][-1]["message"]


def test_compile_without_nvcc_says_what_to_install(tiny, capsys, fake_kernels, monkeypatch):
    monkeypatch.setattr("adaq.validate.validator.shutil.which", lambda name: None)
    code, out, _ = run_cli(capsys, "validate", str(tiny), "--compile")
    assert code == 1 and "nvcc not found" in out.strip().splitlines()[-1] and "install the CUDA toolkit" in out


def test_installed_console_script(tiny):
    """The `adaq` entry point itself, as a user runs it."""
    adaq = shutil.which("adaq") or pytest.skip("adaq console script not installed")
    result = subprocess.run([adaq, "validate", str(tiny / "model.safetensors")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "not a checkpoint folder" in result.stderr


# ---- VRAM arithmetic, checked against figures computed by hand --------------------------------------------------

@pytest.fixture(scope="module")
def qwen3_8b() -> ModelShape:
    return ModelShape.from_config(json.loads((FIXTURES / "qwen3-8b" / "config.json").read_text()))


def test_qwen3_8b_shape(qwen3_8b):
    assert (qwen3_8b.hidden, qwen3_8b.layers, qwen3_8b.heads, qwen3_8b.kv_heads, qwen3_8b.head_dim,
            qwen3_8b.intermediate, qwen3_8b.vocab, qwen3_8b.tied_embeddings, qwen3_8b.sliding_layers) == (
        4096, 36, 32, 8, 128, 12288, 151936, False, 0)


def test_qwen3_8b_weights(qwen3_8b):
    # Linear parameters per layer: 4096·(4096 + 1024 + 1024 + 4096) + 3·12288·4096 = 192,937,984; × 36 layers
    # = 6,945,767,424 (NOTES: 6.95 B). NVFP4 in the decode kernel's layout: × (1/2 + 1/16) = 3,906,994,176 B, plus
    # an fp32 multiplier per output column: 36·(4096 + 1024 + 1024 + 4096 + 12288 + 12288 + 4096)·4 = 5,603,328 B
    # (every Qwen3-8B shape is a multiple of the kernel's tile: no padding).
    # Kept bf16: embed + untied lm_head 2·151936·4096·2 = 2,489,319,424 B; norms 36·(2·4096 + 2·128) + 4096 =
    # 308,224 values = 616,448 B.
    weights = estimate_weight_bytes(qwen3_8b)
    assert weights.quantized == 3_906_994_176 + 5_603_328 == 3_912_597_504
    assert weights.kept == 2_489_935_872
    assert estimate_weight_bytes(qwen3_8b, quantized=False).total == 2 * 6_945_767_424 + 2_489_935_872


def test_qwen3_8b_kv_cache(qwen3_8b):
    # per token: 36 layers · 2 (K, V) · 8 kv heads · (128 values + a 4-byte fp32 scale for fp8)
    assert kv_bytes_per_token(qwen3_8b, "fp8") == 36 * 2 * 8 * 132 == 76_032
    assert kv_bytes_per_token(qwen3_8b, "bf16") == 36 * 2 * 8 * 256 == 147_456



def test_qwen3_8b_nvfp4_kv_cache(qwen3_8b):
    # NVFP4 per (token, kv head): 128 / 2 bytes of E2M1 + 128 / 16 E4M3 block scales + 1 E8M0 exponent = 73
    assert kv_bytes_per_token(qwen3_8b, "nvfp4") == 36 * 2 * 8 * 73 == 42_048
    per_gib = {dtype: 2**30 / kv_bytes_per_token(qwen3_8b, dtype) for dtype in ("bf16", "fp8", "nvfp4")}
    assert round(per_gib["bf16"]) == 7_282 and round(per_gib["fp8"]) == 14_122 and round(per_gib["nvfp4"]) == 25_536
    assert per_gib["nvfp4"] / per_gib["fp8"] == 132 / 73 >= 1.8  # issue 18's goal


def test_qwen3_8b_nvfp4_kv_on_an_rtx4090(qwen3_8b):
    # A 24 GB card: the engine's default chunk is 2048 tokens, so the activations stay those of a 2048-token step
    # (334,192,640 B) whatever the context: fixed 6,402,533,376 (weights) + 334,192,640 + 805,306,368 (CUDA
    # context) = 7,542,032,384 B, leaving 15,639,466,393 of the usable 23,181,498,777 for KV 16 · ceil16(t) · 42,048
    # = 672,768 B per token: 23,246.4 tokens, in blocks of 16: 23,232. FP8 (1,216,512 B per token): 12,855.99 →
    # 12,848 (1.81x, the caches' ratio 132 / 73). Batch 1: both reach the model's 40,960 positions.
    weights = estimate_weight_bytes(qwen3_8b)
    fp8 = {b: plan(qwen3_8b, weights, Gpu.parse("rtx4090"), batch=b, context=4096) for b in (1, 16)}
    nvfp4 = {b: plan(qwen3_8b, weights, Gpu.parse("rtx4090"), batch=b, context=4096, kv_dtype="nvfp4")
             for b in (1, 16)}
    assert nvfp4[16].batched_tokens == fp8[16].batched_tokens == 2048
    assert nvfp4[16].max_context == 23_232 and fp8[16].max_context == 12_848
    assert nvfp4[1].max_context == fp8[1].max_context == 40_960 and nvfp4[1].max_context_capped
    # fixed 7,518,324,736 (as below) + b · (4096·42,048 + 1,481,728) ≤ usable → b ≤ 90.17
    assert nvfp4[16].max_batch == 90 and fp8[16].max_batch == 50  # at 4096 tokens each
    assert nvfp4[16].kv_cache == 16 * 4096 * 42_048

def test_qwen3_8b_activations(qwen3_8b):
    # batch 16 × 4096 with 8192-token chunks (a GPU of 70 GiB or more): the largest step holds T = 8192 tokens.
    parts = activation_bytes(qwen3_8b, 16, 4096, 8192)
    assert parts == {
        "residual stream": 2 * 8192 * 4096 * 2,  # 134,217,728
        "attention or MLP": 8192 * 3 * 12288 * 2,  # MLP 603,979,776 > attention 8192·10240·2
        "FP8 GEMM input": 8192 * 12288 + 8192 * 4,  # 100,696,064
        "weight workspace": 24576 * 4096 + 24576 * 4,  # fused gate/up in FP8: 100,761,600
        "logits": 2 * 16 * 151936 * 4,  # 19,447,808
        "decode partials": 16 * 32 * 16 * 130 * 4,  # 4,259,840
    }
    assert sum(parts.values()) == 963_362_816
    # With 2048-token chunks (a smaller GPU) the parts that scale with T shrink 4x; weights, logits, partials stay.
    small = activation_bytes(qwen3_8b, 16, 4096, 2048)
    assert small["residual stream"] == parts["residual stream"] // 4 == 33_554_432
    assert small["attention or MLP"] == 2048 * 3 * 12288 * 2 == 150_994_944
    assert small["FP8 GEMM input"] == 2048 * 12288 + 2048 * 4 == 25_174_016
    assert sum(small.values()) == 334_192_640


def test_qwen3_8b_on_an_rtx4090(qwen3_8b):
    # usable = 0.9 · 24564 MiB = 23,181,498,777 B; under 70 GiB, so the engine's chunk is 2048 tokens. Total at
    # batch 16 × 4096, fp8 KV: 3,912,597,504 + 2,489,935,872 (weights) + 16·4096·76,032 = 4,982,833,152 (KV)
    # + 334,192,640 (activations) + 768 MiB (CUDA context) = 12,524,865,536 B.
    # Every batch fills the 2048-token step, so each more sequence costs its KV (311,427,072) + logits (1,215,488)
    # + partials (266,240) = 312,908,800 B over a fixed 7,518,324,736 B:
    # (23,181,498,777 − 7,518,324,736) / 312,908,800 = 50.06 → 50 sequences.
    # At batch 16 a longer context costs only its KV, 16·76,032 = 1,216,512 B per token (the activations stay
    # 334,192,640 B) over a fixed 7,542,032,384 B: t ≤ 12,855.99; KV grows in blocks of 16 tokens, so 12,848
    # (23,171,778,560 B; 12,849 tokens hold 12,864 in KV: 23,191,242,752 B, too much).
    budget = plan(qwen3_8b, estimate_weight_bytes(qwen3_8b), Gpu.parse("rtx4090"), batch=16, context=4096)
    assert budget.usable == 23_181_498_777
    assert budget.batched_tokens == 2048
    assert budget.kv_cache == 4_982_833_152
    assert budget.total == 12_524_865_536 and budget.fits
    assert budget.max_batch == 50
    assert budget.max_context == 12_848 and not budget.max_context_capped
    assert budget.context_fit == {1: 40_960, 16: 12_848} and budget.capped(40_960)


def test_qwen3_8b_on_an_h100_keeps_8192_token_chunks(qwen3_8b):
    # 81,559 MiB ≥ 70 GiB: 8192-token chunks, the activations of test_qwen3_8b_activations (963,362,816 B).
    budget = plan(qwen3_8b, estimate_weight_bytes(qwen3_8b), Gpu.parse("h100"), batch=16, context=4096)
    assert budget.batched_tokens == 8192 and budget.step_tokens == 8192
    assert sum(budget.activations.values()) == 963_362_816
    assert budget.total == 6_402_533_376 + 4_982_833_152 + 963_362_816 + 805_306_368
    explicit = plan(qwen3_8b, estimate_weight_bytes(qwen3_8b), Gpu.parse("h100"), 16, 4096, batched_tokens=2048)
    assert explicit.batched_tokens == 2048 and sum(explicit.activations.values()) == 334_192_640


@pytest.mark.parametrize("args,chunk", [(("--gpu", "rtx4090"), 2048), (("--gpu", "h100"), 8192),
                                        (("--gpu", "rtx4090", "--max-num-batched-tokens", "8192"), 8192),
                                        (("--gpu", "h100", "--max-num-batched-tokens", "512"), 512)])
def test_the_cli_plans_with_the_engines_chunk_for_the_gpu(capsys, args, chunk):
    code, report = json_report(capsys, FIXTURES / "qwen3-8b" / "config.json", "--batch", "16", *args)
    budget = report["budget"]
    assert code == 0 and budget["max_num_batched_tokens"] == budget["activation_step_tokens"] == chunk
    assert any(f"max_num_batched_tokens {chunk} (default 2048 on GPUs under 70 GiB" in note for note in budget["notes"])


def test_qwen3_8b_bf16_kv_and_small_gpus(qwen3_8b):
    weights = estimate_weight_bytes(qwen3_8b)
    bf16 = plan(qwen3_8b, weights, Gpu.parse("rtx4090"), batch=16, context=4096, kv_dtype="bf16")
    assert bf16.kv_cache == 16 * 4096 * 147_456 == 9_663_676_416
    assert bf16.total == 12_524_865_536 - 4_982_833_152 + 9_663_676_416
    # fixed 7,518,324,736 + b · (4096·147,456 + 1,481,728) ≤ usable → b ≤ 25.87
    assert bf16.max_batch == 25
    one = plan(qwen3_8b, weights, Gpu.parse("rtx4090"), batch=1, context=4096)
    assert one.max_context == 40_960 and one.max_context_capped  # the model's max_position_embeddings
    # 9 GiB, 8,697,308,774 usable: fixed 7,518,324,736 (weights, CUDA context, a 2048-token step) + b · 312,908,800
    # (as above) → b ≤ 3.77: 3 sequences of 4096 (8,457,051,136 B), 4 take 8,769,959,936.
    small = plan(qwen3_8b, weights, Gpu.parse("9"), batch=1, context=4096)
    assert small.fits and small.max_batch == 3
    tiny_gpu = plan(qwen3_8b, weights, Gpu.parse("6"), batch=1, context=4096)
    assert not tiny_gpu.fits and tiny_gpu.max_batch == 0 and tiny_gpu.max_context == 0


def test_qwen3_30b_a3b_weights():
    # Per layer: attention 2048·(4096 + 512 + 512) + 4096·2048 = 18,874,368, experts 128·3·768·2048 = 603,979,776;
    # × 48 layers = 29,896,998,912 Linear parameters (+ 0.62 B embeddings = Qwen3-30B-A3B's 30.5 B).
    # NVFP4: × 9/16 = 16,817,061,888 B + fp32 column multipliers 48·(7,168 + 128·3,584)·4 = 89,456,640 B.
    # Kept bf16: embed + lm_head 2·151936·2048·2 = 1,244,659,712; routers 48·128·2048·2 = 25,165,824;
    # norms (48·(2·2048 + 2·128) + 2048)·2 = 421,888.
    config = dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, num_hidden_layers=48,
                  num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                  moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                  mlp_only_layers=[], vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960)
    shape = ModelShape.from_config(config)
    assert (shape.moe_layers, shape.dense_layers, shape.mlp_width) == (48, 0, 8 * 768)
    weights = estimate_weight_bytes(shape)
    assert weights.quantized == 16_817_061_888 + 89_456_640
    assert weights.kept == 1_244_659_712 + 25_165_824 + 421_888
    assert shape.expected_linear_shape("model.layers.7.mlp.experts.99.down_proj") == (2048, 768)
    assert shape.expected_linear_shape("model.layers.7.mlp.gate") is None


def test_gemma3_270m_shape_and_sliding_window_note():
    # NOTES.md: 18 layers (5 sliding then 1 global), window 512, hidden 640, 100 M Linear and 168 M embedding
    # parameters, tied. Linear per layer: 640·(1024 + 256 + 256) + 1024·640 + 3·2048·640 = 5,570,560.
    config = dict(architectures=["Gemma3ForCausalLM"], hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                  layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, max_position_embeddings=32768)
    shape = ModelShape.from_config(config)
    assert shape.tied_embeddings and shape.sliding_layers == 15
    weights = estimate_weight_bytes(shape, quantized=False)
    norms = 18 * (4 * 640 + 2 * 256) + 640
    assert weights.total == 2 * (18 * 5_570_560 + 262144 * 640 + norms)
    budget = plan(shape, estimate_weight_bytes(shape), Gpu.parse("rtx4090"), batch=1, context=4096)
    assert budget.kv_per_token == 18 * 2 * 1 * (256 + 4)
    assert any("15 sliding-window layers (window 512)" in note for note in budget.notes)


def test_moe_checkpoint(tmp_path, capsys):
    shape = dict(TINY_QWEN3, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[1])
    config = {**shape, "quantization_config": quantization_config("nvfp4")}
    tensors = tiny_tensors(shape, "nvfp4")
    folder = write_checkpoint(tmp_path / "moe", tensors, config)
    code, report = json_report(capsys, folder)
    assert code == 0, report["findings"]
    assert report["quantized_linears"] == (4 + 4 * 3) + (4 + 3)
    assert report["rules"]["shape-vs-config"] == {"checked": 23, "failed": 0}
    assert report["rules"]["fused-group"] == {"checked": 2 + 1, "failed": 0}  # q/k/v ×2, layer 1's gate/up
    # an expert's gate|up runs as one GEMM with per-column scales whatever its global scales: nothing to report
    expert = "model.layers.0.mlp.experts.2.up_proj.weight_global_scale"
    tensors[expert] = tensors[expert] * 3
    code, report = json_report(capsys, write_checkpoint(tmp_path / "unequal", tensors, config))
    assert code == 0 and report["findings"] == []


def test_modelopt_checkpoint(tiny, tmp_path, capsys):
    """The same weights in ModelOpt's naming (weight / weight_scale / weight_scale_2 = 1 / global scale)."""
    tensors = load_file(tiny / "model.safetensors")
    modelopt = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_packed"):
            modelopt[name.replace(".weight_packed", ".weight")] = tensor
        elif name.endswith(".weight_global_scale"):
            modelopt[name.replace(".weight_global_scale", ".weight_scale_2")] = (1.0 / tensor).reshape(())
        else:
            modelopt[name] = tensor
    folder = write_checkpoint(tmp_path / "modelopt", modelopt, {**TINY_QWEN3, "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}})
    (folder / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "W4A16_NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}))
    from adaq.formats.checkpoint import open_checkpoint

    if open_checkpoint(folder).format != "modelopt":
        pytest.skip("adaq.formats.checkpoint does not read ModelOpt folders yet")
    code, report = json_report(capsys, folder)
    assert code == 0 and report["format"] == "modelopt" and report["quantized_linears"] == 14
    assert report["rules"]["global-scale"] == {"checked": 14, "failed": 0}
    modelopt["model.layers.0.self_attn.q_proj.weight_scale_2"] = torch.tensor(float("inf"))
    folder = write_checkpoint(tmp_path / "bad", modelopt, json.loads((folder / "config.json").read_text()))
    (folder / "hf_quant_config.json").write_text((tmp_path / "modelopt" / "hf_quant_config.json").read_text())
    expect_invalid(capsys, folder, "global-scale", f"{Q}.weight_scale_2", "inf")


# ---- on a GPU: the budget against what the engine really allocates -----------------------------------------------

@pytest.mark.gpu
def test_budget_bounds_the_engine_on_a_gpu(qwen3_8b):
    """Qwen3-8B layer shapes (4 of its 36 layers, full embeddings), random NVFP4 weights, batch 4 × 1024 tokens:
    weights and KV as estimated, the activation peak and the memory outside torch no larger than estimated."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from adaq.kernels import available

    if not available():
        pytest.skip("adaq's CUDA kernels are not built")
    from adaq.bench.synthetic import SyntheticCheckpoint
    from adaq.engine.config import EngineConfig
    from adaq.engine.llm_engine import LLMEngine
    from adaq.engine.sampling_params import SamplingParams
    from adaq.backends import get_backend
    from adaq.models import build_model, load_weights
    from adaq.validate.budget import CUDA_CONTEXT_BYTES

    config = {**json.loads((FIXTURES / "qwen3-8b" / "config.json").read_text()), "num_hidden_layers": 4,
              "max_window_layers": 4}
    shape = ModelShape.from_config(config)
    batch, context, new_tokens = 4, 1024, 8
    device = torch.device("cuda")
    from adaq.kernels import fp8_gemm

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    workspaces = fp8_gemm.workspace_bytes(device)  # earlier tests may have grown the reused prefill workspaces
    source = SyntheticCheckpoint(config, quantized=True, device=device, name="qwen3-8b-4-layers")
    engine_config = EngineConfig(model="synthetic", backend="cuda", kv_cache_dtype="fp8", max_model_len=context,
                                 max_num_seqs=batch, num_kv_blocks=batch * context // 16, device=device,
                                 skip_tokenizer=True)
    model = build_model(source.config, get_backend("cuda", device), engine_config.dtype, device)
    load_weights(model, source)
    torch.cuda.synchronize(device)
    # The prefill workspaces are reserved at load but budgeted as activations ("weight workspace").
    grown = fp8_gemm.workspace_bytes(device) - workspaces
    weights = torch.cuda.memory_allocated(device) - base - grown
    engine = LLMEngine(engine_config, model=model, model_config=source.config)
    kv = torch.cuda.memory_allocated(device) - base - weights
    torch.cuda.reset_peak_memory_stats(device)
    prompts = torch.randint(0, shape.vocab, (batch, context - new_tokens), generator=torch.Generator().manual_seed(0))
    for prompt in prompts.tolist():
        engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - base - weights - kv  # includes `grown`
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    budget = plan(shape, estimate_weight_bytes(shape), Gpu("h100", total), batch, context)
    measured = {"weights": weights, "kv_cache": kv, "activations_peak": activations, "outside_torch": outside_torch}
    estimated = {"weights": budget.weights.total, "kv_cache": budget.kv_cache,
                 "activations_peak": sum(budget.activations.values()), "outside_torch": CUDA_CONTEXT_BYTES}
    print(json.dumps({"measured": measured, "estimated": estimated, "activation_parts": budget.activations}))
    assert abs(weights - budget.weights.total) <= 0.01 * budget.weights.total
    assert 0 <= kv - budget.kv_cache < 2**20  # the engine's block tables and counters come with the cache
    assert activations <= estimated["activations_peak"]
    # The driver's context grows by about a MiB with each kernel module loaded lazily (cuBLAS, the FP8 extension,
    # torch's own); the 768 MiB estimate is checked to 1 %.
    assert outside_torch <= 1.01 * CUDA_CONTEXT_BYTES
