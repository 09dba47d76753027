"""config.json -> our model class; weights from a checkpoint (or any source with the same methods)."""

import warnings
from collections.abc import Callable

import torch

from adaq.errors import AdaqError, AdaqNotice
from adaq.formats.architectures import SUPPORTED_ARCHITECTURES, architecture_of
from adaq.layers.embedding import LM_HEAD_FORMATS
from adaq.models.base import CausalLM, WeightReader
from adaq.models.gemma3 import Gemma3ForCausalLM
from adaq.models.gemma4 import Gemma4ForCausalLM, Gemma4ForConditionalGeneration
from adaq.models.qwen3 import Qwen3ForCausalLM
from adaq.models.qwen3_moe import Qwen3MoeForCausalLM
from adaq.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from adaq.models.qwen3_next import Qwen3NextForCausalLM

MODEL_CLASSES = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForCausalLM,
    "Qwen3_5MoeForCausalLM": Qwen3_5MoeForCausalLM,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5MoeForCausalLM,
    "Qwen3NextForCausalLM": Qwen3NextForCausalLM,
    "Gemma4ForCausalLM": Gemma4ForCausalLM, "Gemma4ForConditionalGeneration": Gemma4ForConditionalGeneration,
}
# Multimodal packagings whose text model runs alone, and what a one-line notice says is ignored.
TOWERS_IGNORED = {"Qwen3_5ForConditionalGeneration": "the vision tower's weights are ignored",
                  "Qwen3_5MoeForConditionalGeneration": "the vision tower's weights are ignored",
                  "Gemma4ForConditionalGeneration": "the vision and audio towers are ignored"}
assert set(MODEL_CLASSES) == set(SUPPORTED_ARCHITECTURES)


def text_config(config: dict):
    """The transformers config object of the text decoder; it normalises legacy fields (rope_theta,
    rope_local_base_freq, rope_scaling, sliding_window_pattern, num_local_experts) the way transformers does."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        parsed = AutoConfig.for_model(config.get("model_type"), **fields)
    except Exception as error:  # transformers' config classes raise many kinds (strict dataclass validators too)
        reason = " ".join(str(error).split())[:300]
        raise AdaqError(f"config.json cannot be read as model_type {config.get('model_type')!r}: {reason}") from None
    return getattr(parsed, "text_config", None) or parsed


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(config: dict, backend, dtype: torch.dtype | None = None, device=None,
                lm_head: str = "bf16") -> CausalLM:
    """An empty model (no weights yet) for config.json's architecture; compute dtype defaults to bf16 on a GPU
    and fp32 on the CPU. `device` must agree with the backend's (the backend places every tensor). `lm_head`
    (adaq.layers.embedding.LM_HEAD_FORMATS): how a dense output layer runs, quantized at load when not bf16."""
    if device is not None and torch.device(device).type != backend.device.type:
        raise AdaqError(f"device {device} differs from the backend's device {backend.device}")
    if lm_head not in LM_HEAD_FORMATS:
        raise AdaqError(f"invalid --lm-head {lm_head}: choose one of {', '.join(LM_HEAD_FORMATS)}")
    architecture = architecture_of(config)
    if architecture in TOWERS_IGNORED:
        warnings.warn(f"{architecture}: running its text model; {TOWERS_IGNORED[architecture]}", AdaqNotice,
                      stacklevel=2)
    model_class = MODEL_CLASSES[architecture]
    model = model_class(text_config(config), backend, dtype or default_dtype(backend.device))
    model.lm_head.weight_format = lm_head
    return model.eval()


def load_weights(model: CausalLM, source, progress: Callable[[int, int], None] | None = None) -> CausalLM:
    """Fill the model from a Checkpoint (adaq.formats.checkpoint) or anything with quantized_prefixes(),
    nvfp4(prefix), tensor_names(), tensor(name): NVFP4 linears stay NVFP4, other tensors load in the model dtype.
    `progress(done, total)` is called after each decoder layer (for a progress bar)."""
    with torch.no_grad():
        model.load(WeightReader(source, model.dtype, progress))
    return model
