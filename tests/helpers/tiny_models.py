"""Tiny random Qwen3 / Qwen3-MoE / Gemma3 / Gemma4 (dense, MoE) / Qwen3.5 / Qwen3.5-MoE / Qwen3-Next checkpoints for
CPU tests.

`make_checkpoint(arch, folder, scheme)` writes three folders under `folder`:
- `dense/`: the random model as transformers saves it (fp32);
- `nvfp4/`: a compressed-tensors NVFP4 (scheme "nvfp4a16") or W4A4 (scheme "nvfp4") checkpoint of it, q/k/v and
  gate/up sharing their global scales as llm-compressor writes them (fused 3-D experts written per expert, as
  llm-compressor linearizes them);
- `decompressed/`: the dense model with every quantized Linear replaced by its exact dequantized weight, i.e. what
  transformers' forward on the decompressed weights should equal.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaq.formats import nvfp4
from adaq.formats.fused_experts import expert_slices, split_experts

VOCAB = 256

CONFIGS = {
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10000.0}),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], max_position_embeddings=512, tie_word_embeddings=False),
    "gemma3": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=8,
        query_pre_attn_scalar=24, max_position_embeddings=512, final_logit_softcapping=30.0,
        attn_logit_softcapping=2.0, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}}),
    # 5 sliding layers (head_dim 16, 2 KV heads) and 1 global (global_head_dim 32, proportional RoPE); the dense one
    # has k_eq_v global layers with 1 KV head, the MoE one a v_proj on every layer.
    "gemma4": dict(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB, final_logit_softcapping=30.0,
        max_position_embeddings=512),
    "gemma4_moe": dict(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        global_head_dim=32, attention_k_eq_v=False, sliding_window=8, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, final_logit_softcapping=30.0, max_position_embeddings=512),
}
HYBRID = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=512,
              tie_word_embeddings=False)
HYBRID_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
CONFIGS |= {
    "qwen3_5": dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", **HYBRID),
    "qwen3_5_moe": dict(architectures=["Qwen3_5MoeForCausalLM"], model_type="qwen3_5_moe_text", **HYBRID,
                        **HYBRID_MOE),
    "qwen3_next": dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", **HYBRID, **HYBRID_MOE,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[2]),
}
HYBRIDS = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
# What llm-compressor's Qwen3.5 / Qwen3-Next NVFP4 examples keep in bf16.
HYBRID_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$", "re:.*linear_attn.*"]
GEMMA = ("gemma3", "gemma4", "gemma4_moe")
GEMMA4 = ("gemma4", "gemma4_moe")
# Gemma 4 attends with scale 1.0 on unit-RMS q and k: q/k norm weights of 0.3 keep the scores' spread near what
# 1/sqrt(head_dim) gives, so a bf16 KV cache moves the logits by less than 1e-3 of their max.
GEMMA4_QK_NORM = 0.3

# Weight spread per architecture: large enough that attention, RoPE and routing matter, small enough that the
# logits are not chaotic (a bf16 KV cache moves them by less than 1e-3 of their max). Gemma's post-norms keep
# its activations at unit scale whatever the weights; a wide router keeps top-k choices away from near-ties.
LINEAR_STD = {"qwen3": 0.06, "qwen3_moe": 0.06, "gemma3": 0.15, "gemma4": 0.15, "gemma4_moe": 0.15, "qwen3_5": 0.06,
              "qwen3_5_moe": 0.06, "qwen3_next": 0.06}
# Gated DeltaNet parameters that are not Linear weights: (mean, std) of their random values.
GDN_PARAMS = {"conv1d.weight": (0.0, 0.4), "A_log": (0.0, 0.5), "dt_bias": (1.0, 0.3),
              "linear_attn.norm.weight": (1.0, 0.1)}
ROUTER_STD = 0.5

QUANTIZED = re.compile(r".*layers\.\d+\.(self_attn\.[qkvo]_proj|(mlp\.)?(experts\.\d+\.|shared_expert\.)?(gate|up|down)_proj)"
                       r"\.weight$")
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def hf_config(arch: str, **overrides):
    from transformers import AutoConfig

    fields = {**CONFIGS[arch], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_model(arch: str, seed: int = 0, **overrides):
    """A transformers model with weights large enough that attention and routing are not trivial."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            gdn = next((v for k, v in GDN_PARAMS.items() if name.endswith(k)), None)
            if gdn is not None:
                param.normal_(*gdn)
            elif "norm" in name and arch in HYBRIDS:  # (1 + w) norms
                param.normal_(0.0, 0.1)
            elif "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                offset = 0.0 if arch == "gemma3" else 1.0  # Gemma 3's norms are (1 + w)
                param.copy_(offset + 0.1 * torch.randn_like(param))
                if arch in GEMMA4 and name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.mul_(GEMMA4_QK_NORM)
            elif "embed_tokens" in name:
                param.normal_(0, 1.0 if arch not in GEMMA or arch in GEMMA4 else 0.5)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0, ROUTER_STD)
            elif name.endswith("router.proj.weight"):  # its input is scaled by hidden^-0.5
                param.normal_(0, 3 * ROUTER_STD * model.config.hidden_size ** 0.5)
            else:
                param.normal_(0, LINEAR_STD[arch])
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def quantize_group(weights: dict[str, torch.Tensor]) -> dict[str, nvfp4.NVFP4Weight]:
    """One global scale for the whole group (q/k/v or gate/up), as llm-compressor links them."""
    amax = max(w.abs().amax() for w in weights.values())
    shared = nvfp4.global_scale_from_amax(amax).to(torch.bfloat16).float()
    return {name: nvfp4.quantize(w, shared) for name, w in weights.items()}


def sibling_groups(names: list[str]) -> list[list[str]]:
    """Weight names grouped with the projections they fuse with."""
    groups, seen = [], set()
    for name in names:
        if name in seen:
            continue
        group = [name]
        for members in FUSED_GROUPS:
            member = next((m for m in members if f".{m}.weight" in name), None)
            if member:
                group = [name.replace(f".{member}.", f".{m}.") for m in members]
                break
        seen.update(group)
        groups.append(group)
    return groups


def input_global_scale(prefix: str) -> torch.Tensor:
    """A made-up but deterministic calibration: activations of amax 4 to 8 depending on the module."""
    amax = 4.0 + (sum(map(ord, prefix.split(".")[-1])) % 5)
    return torch.tensor([nvfp4.FP8_MAX * nvfp4.FP4_MAX / amax], dtype=torch.float32)


NVFP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
              "block_structure": None, "actorder": None, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None,
              "observer_kwargs": {}}


def quantization_config(scheme: str, ignore: list[str]) -> dict:
    """What compressed-tensors 0.19 writes for its NVFP4 / NVFP4A16 presets (written out: the GPU machine does not
    have compressed-tensors)."""
    weights = {**NVFP4_ARGS, "dynamic": False, "observer": None}
    inputs = {**NVFP4_ARGS, "dynamic": "local", "observer": "static_minmax"} if scheme == "nvfp4" else None
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "output_activations": None,
             "format": None}
    return {"config_groups": {"group_0": group}, "quant_method": "compressed-tensors", "kv_cache_scheme": None,
            "format": "nvfp4-pack-quantized", "quantization_status": "compressed", "global_compression_ratio": None,
            "ignore": ignore}


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_checkpoint(arch: str, folder: Path, scheme: str = "nvfp4a16", seed: int = 0, **overrides) -> Path:
    folder = Path(folder)
    model = random_model(arch, seed, **overrides)
    model.save_pretrained(folder / "dense")
    config = json.loads((folder / "dense" / "config.json").read_text())
    fused = load_file(folder / "dense" / "model.safetensors")
    state = {k: v for name, tensor in fused.items() for k, v in split_experts(name, tensor).items()}
    quantized_names = [n for n in state if QUANTIZED.match(n)]
    packed, decompressed = {}, dict(state)
    for group in sibling_groups(quantized_names):
        for name, weight in quantize_group({n: state[n] for n in group if n in state}).items():
            prefix = name.removesuffix(".weight")
            del decompressed[name]
            decompressed[name] = nvfp4.dequantize(weight, torch.float32)
            packed[f"{prefix}.weight_packed"] = weight.packed
            packed[f"{prefix}.weight_scale"] = weight.block_scale
            packed[f"{prefix}.weight_global_scale"] = weight.global_scale
            if scheme == "nvfp4":
                packed[f"{prefix}.input_global_scale"] = input_global_scale(prefix)
    kept = {n: t for n, t in state.items() if n not in quantized_names}
    ignore = HYBRID_IGNORE if arch in HYBRIDS else ["lm_head", "re:.*mlp.gate$"]
    write_folder(folder / "nvfp4", {**kept, **packed}, {**config, "quantization_config":
                                                        quantization_config(scheme, ignore)})
    write_folder(folder / "decompressed", fuse_experts(decompressed, fused), config)
    return folder


def fuse_experts(state: dict[str, torch.Tensor], fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert weights back into the fused tensors of `fused` (the layout transformers loads)."""
    out = dict(state)
    for name, tensor in fused.items():
        slices = expert_slices(name, tuple(tensor.shape))
        if slices:
            whole = tensor.clone()
            for part, (e, start, end) in slices.items():
                whole[e, start:end] = out.pop(part)
            out[name] = whole
    return out


def hybrid_bf16_folders(tmp_path_factory) -> dict[str, "Path"]:
    """A bf16 checkpoint folder (with the tiny tokenizer) per hybrid family, for quantize and validate tests."""
    from helpers.tiny_tokenizer import write_tokenizer

    folders = {}
    for arch in HYBRIDS:
        folder = tmp_path_factory.mktemp(f"bf16-{arch}")
        random_model(arch, seed=1).to(torch.bfloat16).save_pretrained(folder)
        write_tokenizer(folder)
        folders[arch] = folder
    return folders


def multimodal_bf16_folder(arch: str, folder: Path) -> Path:
    """The tiny text model of `arch` packaged as its vision-language checkpoint, in bf16 with the tiny tokenizer, as
    transformers saves it: nested text_config, the decoder under model.language_model.*, a one-layer vision tower
    (Gemma 4: plus embed_vision); Qwen3.5 also gets the multi-token-prediction head (mtp.*) that its real
    checkpoints carry and transformers drops (one layer, a copy of the first full-attention layer)."""
    from helpers.tiny_tokenizer import write_tokenizer
    from transformers import AutoConfig, Gemma4ForConditionalGeneration, Qwen3_5ForConditionalGeneration

    text = random_model(arch, seed=1)
    if arch == "qwen3_5":
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16,
                      temporal_patch_size=2, out_hidden_size=text.config.hidden_size)
        config = AutoConfig.for_model("qwen3_5", text_config=text.config.to_dict(), vision_config=vision,
                                      tie_word_embeddings=False)
        model = Qwen3_5ForConditionalGeneration(config)
    elif arch == "gemma4_moe":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16)
        config = AutoConfig.for_model("gemma4", text_config=text.config.to_dict(), vision_config=vision)
        model = Gemma4ForConditionalGeneration(config)
    else:
        raise ValueError(f"no multimodal packaging for {arch}")
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.to(torch.bfloat16).eval().save_pretrained(folder)
    if arch == "qwen3_5":
        add_mtp_head(folder / "model.safetensors", text.config)
    return write_tokenizer(folder)


def add_mtp_head(shard: Path, config) -> None:
    tensors = load_file(shard)
    layer = f"model.language_model.layers.{config.layer_types.index('full_attention')}."
    hidden = config.hidden_size
    mtp = {f"mtp.layers.0.{name.removeprefix(layer)}": tensor.clone() for name, tensor in tensors.items()
           if name.startswith(layer)}
    mtp["mtp.fc.weight"] = (torch.randn(hidden, 2 * hidden) * LINEAR_STD["qwen3_5"]).to(torch.bfloat16)
    for norm in ("mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"):
        mtp[norm] = torch.zeros(hidden, dtype=torch.bfloat16)
    save_file({**tensors, **mtp}, shard, metadata={"format": "pt"})
