"""The model architectures adaq runs (and so quantizes for running), by the name in config.json `architectures`."""

from adaq.errors import UnsupportedArchitecture

SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",  # its text model only
    "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration",  # dense and MoE; the latter's text model only
)


def architecture_of(config: dict) -> str:
    """config['architectures'][0], checked against SUPPORTED_ARCHITECTURES."""
    names = config.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) if names else f"model_type {config.get('model_type')!r} without 'architectures'"
    raise UnsupportedArchitecture(f"unsupported architecture {found}; adaq supports "
                                  f"{', '.join(SUPPORTED_ARCHITECTURES)}")
