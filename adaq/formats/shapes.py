"""The layer shapes of a model, read from its config.json: what the VRAM budget and shape checks work from."""

import re
from dataclasses import dataclass

from adaq.errors import CheckpointError

# Per-family defaults for keys a config may leave out (the transformers config classes' defaults).
TIED_BY_DEFAULT = {"Gemma3ForCausalLM": True, "Gemma3ForConditionalGeneration": True}
NORMS_PER_LAYER = {"Gemma3": 4}  # hidden-sized norms per layer: Gemma3 adds pre/post-feedforward norms
HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_next")  # Gated DeltaNet + gated attention (q_proj twice as wide)
DEFAULT_FULL_ATTENTION_INTERVAL = 4  # transformers' default when config.json leaves out layer_types


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (0 when every layer is MoE)
    vocab: int
    tied_embeddings: bool
    max_position: int | None = None
    dense_layers: int = 0
    moe_layers: int = 0
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    sliding_window: int | None = None
    sliding_layers: int = 0
    # Hybrid models: Gated DeltaNet ("linear attention") layers keep a per-sequence state instead of a KV cache.
    linear_layers: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv_kernel: int = 0
    linear_fused: bool = False  # Qwen3-Next: in_proj_qkvz / in_proj_ba
    attention_output_gate: bool = False  # q_proj twice as wide: its second half gates the attention output
    shared_expert_intermediate: int = 0
    # Gemma 4: its full-attention layers have their own head_dim and KV heads, and no v_proj when k_eq_v.
    global_layers: tuple[int, ...] = ()
    global_head_dim: int = 0
    global_kv_heads: int = 0
    k_eq_v: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        architecture = (config.get("architectures") or ["?"])[0]
        text = {**config, **config.get("text_config", {})}
        need = lambda key: required(text, key)  # noqa: E731
        heads, layers = need("num_attention_heads"), need("num_hidden_layers")
        moe = moe_layer_count(text, layers)
        sliding = sliding_layer_count(text, layers)
        gemma4 = gemma4_globals(text, layers)
        return cls(
            architecture=architecture,
            hidden=need("hidden_size"), layers=layers, heads=heads,
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or need("hidden_size") // heads,
            intermediate=text.get("intermediate_size") or 0, vocab=need("vocab_size"),
            tied_embeddings=text.get("tie_word_embeddings", config.get(
                "tie_word_embeddings", TIED_BY_DEFAULT.get(architecture, False))),
            max_position=text.get("max_position_embeddings"),
            dense_layers=layers if gemma4 else layers - moe, moe_layers=moe,  # Gemma 4: dense MLP beside experts
            experts=text.get("num_experts", 0) if moe else 0,
            experts_per_token=(text.get("num_experts_per_tok") or text.get("top_k_experts") or 0) if moe else 0,
            moe_intermediate=text.get("moe_intermediate_size", 0) if moe else 0,
            sliding_window=text.get("sliding_window") if sliding else None, sliding_layers=sliding,
            shared_expert_intermediate=text.get("shared_expert_intermediate_size", 0) if moe else 0,
            **hybrid_fields(text, layers),
            **gemma4,
        )

    def attention_shape(self, layer: int | None = None) -> tuple[int, int]:
        """(KV heads, head_dim) of a layer (None: a sliding / ordinary one)."""
        if layer in self.global_layers:
            return self.global_kv_heads, self.global_head_dim
        return self.kv_heads, self.head_dim

    @property
    def kv_slot(self) -> tuple[int, int]:
        """(KV heads, head_dim) of the engine's per-layer cache slot: as wide as the widest layer's K or V."""
        shapes = [self.attention_shape(None)] + [self.attention_shape(layer) for layer in self.global_layers]
        heads = max(h for h, _ in shapes)
        return heads, -(-max(h * d for h, d in shapes) // heads)

    def layer_types(self) -> dict[str, int]:
        """Decoder layers by kind, as config.json's layer_types names them (kinds with no layer left out)."""
        counts = {"linear_attention": self.linear_layers, "sliding_attention": self.sliding_layers,
                  "full_attention": self.layers - self.linear_layers - self.sliding_layers}
        return {kind: count for kind, count in counts.items() if count}

    @property
    def kv_layers(self) -> int:
        """Layers with a KV cache (all but the Gated DeltaNet ones)."""
        return self.layers - self.linear_layers

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_heads * self.linear_key_dim + self.linear_value_heads * self.linear_value_dim

    def linear_attention_linears(self) -> dict[str, tuple[int, int]]:
        """(N, K) of each Linear of a Gated DeltaNet layer."""
        value_dim, heads = self.linear_value_heads * self.linear_value_dim, self.linear_value_heads
        out = {"linear_attn.out_proj": (self.hidden, value_dim)}
        if self.linear_fused:
            return out | {"linear_attn.in_proj_qkvz": (self.linear_conv_dim + value_dim, self.hidden),
                          "linear_attn.in_proj_ba": (2 * heads, self.hidden)}
        return out | {"linear_attn.in_proj_qkv": (self.linear_conv_dim, self.hidden),
                      "linear_attn.in_proj_z": (value_dim, self.hidden),
                      "linear_attn.in_proj_b": (heads, self.hidden), "linear_attn.in_proj_a": (heads, self.hidden)}

    def shared_expert_linears(self) -> dict[str, tuple[int, int]]:
        width = self.shared_expert_intermediate
        if not width:
            return {}
        return {"mlp.shared_expert.gate_proj": (width, self.hidden), "mlp.shared_expert.up_proj": (width, self.hidden),
                "mlp.shared_expert.down_proj": (self.hidden, width)}

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def norms_per_layer(self) -> int:
        hidden_norms = NORMS_PER_LAYER.get(self.architecture[:6], 2)
        return hidden_norms * self.hidden + 2 * self.head_dim  # + q_norm, k_norm

    @property
    def dense_intermediate(self) -> int:
        """Dense MLP width, 0 when every layer is MoE (a MoE config may still carry intermediate_size)."""
        return self.intermediate if self.dense_layers else 0

    @property
    def mlp_width(self) -> int:
        """Widest MLP intermediate a token passes through in one layer (top-k experts for MoE)."""
        return max(self.dense_intermediate, self.experts_per_token * self.moe_intermediate)

    def layer_linears(self, layer: int | None = None) -> dict[str, tuple[int, int]]:
        """(N, K) of each Linear of a dense layer's attention and MLP (of `layer` where layers differ: Gemma 4);
        experts are in expert_linears()."""
        kv_heads, head_dim = self.attention_shape(layer)
        q_width, kv_width = self.heads * head_dim, kv_heads * head_dim
        q_rows = 2 * q_width if self.attention_output_gate else q_width
        linears = {
            "self_attn.q_proj": (q_rows, self.hidden), "self_attn.k_proj": (kv_width, self.hidden),
            "self_attn.v_proj": (kv_width, self.hidden), "self_attn.o_proj": (self.hidden, q_width),
        }
        if self.k_eq_v and layer in self.global_layers:
            del linears["self_attn.v_proj"]
        if self.intermediate:
            linears |= {"mlp.gate_proj": (self.intermediate, self.hidden),
                        "mlp.up_proj": (self.intermediate, self.hidden),
                        "mlp.down_proj": (self.hidden, self.intermediate)}
        return linears

    def expert_linears(self) -> dict[str, tuple[int, int]]:
        width = self.moe_intermediate
        return {"gate_proj": (width, self.hidden), "up_proj": (width, self.hidden), "down_proj": (self.hidden, width)}

    def expected_linear_shape(self, prefix: str) -> tuple[int, int] | None:
        """(N, K) this config gives the Linear named prefix, or None for a name it does not describe."""
        expert = re.search(r"\.(mlp\.)?experts\.\d+\.(gate_proj|up_proj|down_proj)$", prefix)
        if expert and self.moe_layers:
            return self.expert_linears()[expert.group(2)]
        hybrid = re.search(r"\.(linear_attn\.\w+|mlp\.shared_expert\.\w+)$", prefix)
        if hybrid:
            return (self.linear_attention_linears() | self.shared_expert_linears()).get(hybrid.group(1))
        attention_or_mlp = re.search(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$", prefix)
        layer = re.search(r"layers\.(\d+)\.", prefix)
        linears = self.layer_linears(int(layer.group(1)) if layer else None)
        return linears.get(attention_or_mlp.group(1)) if attention_or_mlp else None


def required(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"config.json: {key} is missing or not a positive integer (got {value!r})")
    return value


def moe_layer_count(config: dict, layers: int) -> int:
    if not config.get("num_experts"):
        return 0
    step = config.get("decoder_sparse_step") or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    return sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)


def gemma4_globals(config: dict, layers: int) -> dict:
    """Gemma 4's global layers and their (head_dim, KV heads), from `per_layer_config` as transformers saves it or
    from `global_head_dim` / `num_global_key_value_heads` (the latter only with attention_k_eq_v), as it reads them."""
    if not str(config.get("model_type", "")).startswith("gemma4"):
        return {}
    types = config.get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                          for i in range(layers)]
    global_layers = tuple(i for i, kind in enumerate(types) if kind == "full_attention")
    k_eq_v = bool(config.get("attention_k_eq_v"))
    overrides = (config.get("per_layer_config") or {}).get(str(global_layers[0]) if global_layers else "", {})
    head_dim = overrides.get("head_dim") or config.get("global_head_dim", 512)
    kv_heads = (overrides.get("num_key_value_heads") or (config.get("num_global_key_value_heads") if k_eq_v else None)
                or config.get("num_key_value_heads") or config["num_attention_heads"])
    return dict(global_layers=global_layers, global_head_dim=head_dim, global_kv_heads=kv_heads, k_eq_v=k_eq_v)


def sliding_layer_count(config: dict, layers: int) -> int:
    if not config.get("sliding_window") or config.get("use_sliding_window") is False:
        return 0
    if config.get("layer_types"):
        return sum(1 for kind in config["layer_types"] if kind == "sliding_attention")
    pattern = config.get("sliding_window_pattern")
    if pattern:
        return sum(1 for i in range(layers) if (i + 1) % pattern)
    return layers


def linear_attention_layer_count(config: dict, layers: int) -> int:
    if config.get("layer_types"):
        return sum(1 for kind in config["layer_types"] if kind == "linear_attention")
    if not (config.get("model_type") or "").startswith(HYBRID_MODEL_TYPES):
        return 0
    interval = config.get("full_attention_interval") or DEFAULT_FULL_ATTENTION_INTERVAL
    return sum(1 for i in range(layers) if (i + 1) % interval)


def hybrid_fields(config: dict, layers: int) -> dict:
    """ModelShape's Gated DeltaNet fields (transformers' defaults where config.json leaves them out)."""
    linear = linear_attention_layer_count(config, layers)
    if not linear and not (config.get("model_type") or "").startswith(HYBRID_MODEL_TYPES):
        return {}
    return dict(linear_layers=linear, linear_key_heads=config.get("linear_num_key_heads", 16),
                linear_value_heads=config.get("linear_num_value_heads", 32),
                linear_key_dim=config.get("linear_key_head_dim", 128),
                linear_value_dim=config.get("linear_value_head_dim", 128),
                linear_conv_kernel=config.get("linear_conv_kernel_dim", 4),
                linear_fused=config.get("model_type") == "qwen3_next", attention_output_gate=True)
