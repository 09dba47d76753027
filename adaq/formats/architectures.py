"""The model architectures adaq runs (and so quantizes for running), by the name in config.json `architectures`,
with the `model_type` each one is read as (transformers builds the config from model_type, so a checkpoint whose
two fields disagree cannot run)."""

from adaq.errors import UnsupportedArchitecture

MODEL_TYPES = {
    "Qwen3ForCausalLM": ("qwen3",),
    "Qwen3MoeForCausalLM": ("qwen3_moe",),
    "Gemma3ForCausalLM": ("gemma3_text", "gemma3"),
    "Gemma3ForConditionalGeneration": ("gemma3",),  # its text model only
    "Qwen3_5ForCausalLM": ("qwen3_5_text", "qwen3_5"),
    "Qwen3_5ForConditionalGeneration": ("qwen3_5",),  # its text model only
    "Qwen3_5MoeForCausalLM": ("qwen3_5_moe_text", "qwen3_5_moe"),
    "Qwen3_5MoeForConditionalGeneration": ("qwen3_5_moe",),  # its text model only
    "Qwen3NextForCausalLM": ("qwen3_next",),
    "Gemma4ForCausalLM": ("gemma4_text", "gemma4"),
    "Gemma4ForConditionalGeneration": ("gemma4",),  # dense and MoE; its text model only
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)

# Where the decoder's weights sit: text-only checkpoints, and Gemma3's multimodal ones (transformers 5, then 4).
DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def architecture_of(config: dict) -> str:
    """config['architectures'][0], checked against SUPPORTED_ARCHITECTURES and against config['model_type']."""
    names = config.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return _with_model_type(name, config.get("model_type"))
    found = ", ".join(map(str, names)) if names else f"model_type {config.get('model_type')!r} without 'architectures'"
    raise UnsupportedArchitecture(f"unsupported architecture {found}; adaq supports "
                                  f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _with_model_type(name: str, model_type) -> str:
    if model_type not in MODEL_TYPES[name]:
        raise UnsupportedArchitecture(f"config.json: model_type {model_type!r} does not match architecture {name} "
                                      f"(expected {' or '.join(map(repr, MODEL_TYPES[name]))})")
    return name
