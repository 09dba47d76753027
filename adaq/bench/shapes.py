"""The tensors of a model as its checkpoint stores them, from config.json alone: names, shapes and roles.

The synthetic weight source makes exactly these tensors, and the roofline counts their bytes, so both agree with
what a real checkpoint of the same architecture holds (per-expert MoE weights, tied embeddings, Gemma's four norms).
"""

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from adaq.errors import AdaqError, UnsupportedArchitecture

# Roles: "linear" and "expert" are the Linear weights NVFP4 quantizes; the rest stay in the model dtype ("dense":
# Linear weights a recipe keeps in bf16, as llm-compressor's Qwen3.5 / Qwen3-Next examples keep `linear_attn`;
# "gdn": a Gated DeltaNet layer's small parameters, conv weight, A_log, dt_bias and its output norm).
QUANTIZABLE_ROLES = ("linear", "expert")
HYBRID_FAMILIES = ("qwen3_5_moe", "qwen3_5", "qwen3_next")
LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class TensorSpec:
    """One weight: `name` is the Linear's prefix for quantizable roles, the full tensor name otherwise."""

    name: str
    shape: tuple[int, ...]
    role: str  # linear | expert | embedding | lm_head | norm | router
    layer: int | None = None

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def quantizable(self) -> bool:
        return self.role in QUANTIZABLE_ROLES


def bundled_names() -> list[str]:
    folder = resources.files("adaq.bench") / "configs"
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def load_model_config(name_or_path: str) -> dict:
    """A bundled config by name (`qwen3-8b`) or any config.json path; `_adaq*` keys are documentation, dropped."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if name_or_path not in bundled_names():
            raise AdaqError(f"unknown synthetic model {name_or_path!r}: choose one of {', '.join(bundled_names())} "
                            "or give a config.json path")
        path = Path(str(resources.files("adaq.bench") / "configs" / f"{name_or_path}.json"))
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdaqError(f"{path}: not valid JSON ({error})") from None
    return {key: value for key, value in config.items() if not key.startswith("_adaq")}


def text_config(config: dict) -> dict:
    """The language model's config: multimodal configs (Gemma3ForConditionalGeneration) nest it in text_config."""
    if "text_config" not in config:
        return config
    merged = {key: value for key, value in config.items() if key != "text_config"}
    merged.update(config["text_config"])
    return merged


def model_family(config: dict) -> str:
    model_type = text_config(config).get("model_type", "")
    for family in (*HYBRID_FAMILIES, "qwen3_moe", "qwen3", "gemma3", "gemma4"):
        if model_type.startswith(family):
            return family
    raise UnsupportedArchitecture(f"bench knows Qwen3, Qwen3-MoE, Gemma3, Gemma4, Qwen3.5 and Qwen3-Next shapes, "
                                  f"not model_type {model_type!r}")


def hybrid_layer_types(config: dict) -> list[str] | None:
    """A hybrid model's `layer_types` (linear_attention / full_attention), None for other families: as the config
    lists them, else every `full_attention_interval`-th layer full (transformers' default: 4)."""
    if model_family(config) not in HYBRID_FAMILIES:
        return None
    text = text_config(config)
    if text.get("layer_types"):
        return list(text["layer_types"])
    interval = text.get("full_attention_interval", 4)
    return ["full_attention" if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(text["num_hidden_layers"])]


def is_linear_attention(config: dict, layer: int) -> bool:
    types = hybrid_layer_types(config)
    return types is not None and types[layer] == LINEAR_ATTENTION


def gdn_state_bytes(config: dict, conv_dtype_bytes: int = 2) -> int:
    """One sequence's Gated DeltaNet states over all layers: conv [C, Kc-1] in the model dtype, recurrent [Hv, Dk,
    Dv] in fp32 (adaq.engine.state_cache)."""
    layers = sum(is_linear_attention(config, i) for i in range(text_config(config)["num_hidden_layers"]))
    if not layers:
        return 0
    text = text_config(config)
    hk, hv = text["linear_num_key_heads"], text["linear_num_value_heads"]
    dk, dv = text["linear_key_head_dim"], text["linear_value_head_dim"]
    conv = (2 * hk * dk + hv * dv) * (text.get("linear_conv_kernel_dim", 4) - 1) * conv_dtype_bytes
    return layers * (conv + hv * dk * dv * 4)


def head_dim(config: dict) -> int:
    config = text_config(config)
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def is_global_gemma4(config: dict, layer: int) -> bool:
    return (model_family(config) == "gemma4"
            and text_config(config).get("layer_types", [])[layer:layer + 1] == ["full_attention"])


def layer_attention_shape(config: dict, layer: int) -> tuple[int, int, bool]:
    """(KV heads, head_dim, K used as V) of one layer: Gemma 4's global layers have their own (transformers'
    defaults: global_head_dim 512; num_global_key_value_heads only with attention_k_eq_v)."""
    text = text_config(config)
    if not is_global_gemma4(config, layer):
        return text["num_key_value_heads"], head_dim(config), False
    k_eq_v = bool(text.get("attention_k_eq_v"))
    heads = text.get("num_global_key_value_heads") if k_eq_v else None
    return heads or text["num_key_value_heads"], text.get("global_head_dim", 512), k_eq_v


def model_tensors(config: dict) -> list[TensorSpec]:
    """Every weight of the language model, in checkpoint order."""
    family = model_family(config)
    config = text_config(config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    if family in HYBRID_FAMILIES:
        return _hybrid_tensors(config, family, specs)
    for layer in range(config["num_hidden_layers"]):
        specs += _attention(config, layer)
        specs += _moe(config, layer) if family == "qwen3_moe" else _mlp(config, layer)
        specs += _gemma4_moe(config, layer) if family == "gemma4" and config.get("enable_moe_block") else []
        specs += _layer_norms(config, layer, family)
    specs.append(TensorSpec("model.norm.weight", (hidden,), "norm"))
    if not config.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), "lm_head"))
    return specs


def _hybrid_tensors(config: dict, family: str, specs: list[TensorSpec]) -> list[TensorSpec]:
    """Qwen3.5 / Qwen3.5-MoE / Qwen3-Next: Gated DeltaNet or gated attention, then a dense MLP or a MoE with a
    shared expert (Qwen3.5-MoE: every layer; Qwen3-Next: as decoder_sparse_step and mlp_only_layers say)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    for layer in range(config["num_hidden_layers"]):
        if is_linear_attention(config, layer):
            specs += _gated_delta_net(config, layer, fused=family == "qwen3_next")
        else:
            specs += _attention(config, layer, gated=True)
        if family == "qwen3_5" or (family == "qwen3_next" and not _sparse(config, layer)):
            specs += _mlp(config, layer)
        else:
            specs += _shared_expert_moe(config, layer)
        specs += _layer_norms(config, layer, family)
    specs.append(TensorSpec("model.norm.weight", (hidden,), "norm"))
    if not config.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), "lm_head"))
    return specs


def _sparse(config: dict, layer: int) -> bool:
    return layer not in config.get("mlp_only_layers", []) and (layer + 1) % config.get("decoder_sparse_step", 1) == 0


def _gated_delta_net(config: dict, layer: int, fused: bool) -> list[TensorSpec]:
    """Qwen3.5 stores q|k|v, z, b, a apart; Qwen3-Next as in_proj_qkvz and in_proj_ba (grouped per key head)."""
    hidden, hk, hv = config["hidden_size"], config["linear_num_key_heads"], config["linear_num_value_heads"]
    key, value = hk * config["linear_key_head_dim"], hv * config["linear_value_head_dim"]
    conv, prefix = 2 * key + value, f"model.layers.{layer}.linear_attn"
    projections = ({"in_proj_qkvz": conv + value, "in_proj_ba": 2 * hv} if fused else
                   {"in_proj_qkv": conv, "in_proj_z": value, "in_proj_b": hv, "in_proj_a": hv})
    specs = [TensorSpec(f"{prefix}.{name}.weight", (rows, hidden), "dense", layer)
             for name, rows in projections.items()]
    specs.append(TensorSpec(f"{prefix}.out_proj.weight", (hidden, value), "dense", layer))
    small = {"conv1d.weight": (conv, 1, config.get("linear_conv_kernel_dim", 4)), "A_log": (hv,), "dt_bias": (hv,),
             "norm.weight": (config["linear_value_head_dim"],)}
    return specs + [TensorSpec(f"{prefix}.{name}", shape, "gdn", layer) for name, shape in small.items()]


def _shared_expert_moe(config: dict, layer: int) -> list[TensorSpec]:
    hidden, experts, shared = config["hidden_size"], config["num_experts"], config["shared_expert_intermediate_size"]
    prefix = f"model.layers.{layer}.mlp"
    specs = [TensorSpec(f"{prefix}.gate.weight", (experts, hidden), "router", layer)]
    specs += _experts(config, prefix, layer)
    shapes = {"gate_proj": (shared, hidden), "up_proj": (shared, hidden), "down_proj": (hidden, shared)}
    specs += [TensorSpec(f"{prefix}.shared_expert.{name}", shape, "linear", layer) for name, shape in shapes.items()]
    return specs + [TensorSpec(f"{prefix}.shared_expert_gate.weight", (1, hidden), "router", layer)]


def _attention(config: dict, layer: int, gated: bool = False) -> list[TensorSpec]:
    kv_heads, dim, k_eq_v = layer_attention_shape(config, layer)
    hidden = config["hidden_size"]
    q_out, kv_out = config["num_attention_heads"] * dim, kv_heads * dim
    prefix = f"model.layers.{layer}.self_attn"
    # gated (Qwen3.5, Qwen3-Next): q_proj holds per head D query rows then D gate rows
    shapes = {"q_proj": (2 * q_out if gated else q_out, hidden), "k_proj": (kv_out, hidden),
              "v_proj": (kv_out, hidden), "o_proj": (hidden, q_out)}
    if k_eq_v:
        del shapes["v_proj"]
    specs = [TensorSpec(f"{prefix}.{name}", shape, "linear", layer) for name, shape in shapes.items()]
    specs += [TensorSpec(f"{prefix}.{name}.weight", (dim,), "norm", layer) for name in ("q_norm", "k_norm")]
    return specs


def _mlp(config: dict, layer: int) -> list[TensorSpec]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    prefix = f"model.layers.{layer}.mlp"
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [TensorSpec(f"{prefix}.{name}", shape, "linear", layer) for name, shape in shapes.items()]


def _moe(config: dict, layer: int) -> list[TensorSpec]:
    if layer in config.get("mlp_only_layers", []) or (layer + 1) % config.get("decoder_sparse_step", 1):
        return _mlp(config, layer)
    hidden, experts = config["hidden_size"], config["num_experts"]
    prefix = f"model.layers.{layer}.mlp"
    return [TensorSpec(f"{prefix}.gate.weight", (experts, hidden), "router", layer)] + _experts(config, prefix, layer)


def _experts(config: dict, prefix: str, layer: int) -> list[TensorSpec]:
    """`{prefix}.experts.{e}.{gate,up,down}_proj`, per expert as checkpoints (and llm-compressor) store them."""
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [TensorSpec(f"{prefix}.experts.{expert}.{name}", shape, "expert", layer)
            for expert in range(config["num_experts"]) for name, shape in shapes.items()]


def _gemma4_moe(config: dict, layer: int) -> list[TensorSpec]:
    """The router and experts beside Gemma 4's dense MLP."""
    hidden, experts = config["hidden_size"], config["num_experts"]
    prefix = f"model.layers.{layer}"
    router = [TensorSpec(f"{prefix}.router.proj.weight", (experts, hidden), "router", layer),
              TensorSpec(f"{prefix}.router.scale", (hidden,), "norm", layer),
              TensorSpec(f"{prefix}.router.per_expert_scale", (experts,), "norm", layer)]
    return router + _experts(config, prefix, layer)


def _layer_norms(config: dict, layer: int, family: str) -> list[TensorSpec]:
    names = ["input_layernorm", "post_attention_layernorm"]
    if family in ("gemma3", "gemma4"):
        names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if family == "gemma4" and config.get("enable_moe_block"):
        names += ["post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"]
    if family == "gemma4":
        return ([TensorSpec(f"model.layers.{layer}.{name}.weight", (config["hidden_size"],), "norm", layer)
                 for name in names] + [TensorSpec(f"model.layers.{layer}.layer_scalar", (1,), "norm", layer)])
    return [TensorSpec(f"model.layers.{layer}.{name}.weight", (config["hidden_size"],), "norm", layer)
            for name in names]


def layer_windows(config: dict) -> list[int | None]:
    """The attention window of each layer (None = full attention): what the KV bytes of a decode step depend on."""
    config = text_config(config)
    layers = config["num_hidden_layers"]
    if model_family(config) not in ("gemma3", "gemma4"):
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        return [window] * layers
    types = config.get("layer_types") or [
        "full_attention" if (i + 1) % config.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(layers)]
    return [config["sliding_window"] if kind == "sliding_attention" else None for kind in types]
