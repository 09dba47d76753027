"""What a checkpoint's tensors must agree on with its config.json, and what every tensor adaq reads must hold.

One set of rules for every command: open_checkpoint raises on them (so the engine, bench, eval and quantize — its
source and its output — refuse the same checkpoints), and `adaq validate` reports them as findings. The structural
rules read only safetensors headers; the value rules run on each tensor as it is read anyway, or, in validate, on
each kept tensor streamed one at a time.
"""

import re
from dataclasses import dataclass

import torch

from adaq.errors import CheckpointError, UnsupportedArchitecture
from adaq.formats.architectures import DECODER_PREFIXES, architecture_of
from adaq.formats.shapes import ModelShape

LAYER = re.compile(r"^(?:" + "|".join(re.escape(prefix) for prefix in DECODER_PREFIXES) + r")layers\.(\d+)\.")
EMBEDDINGS = {f"{prefix}embed_tokens.weight" for prefix in DECODER_PREFIXES}  # the decoder's, not a tower's
LINEAR_WEIGHT = re.compile(r"^(?P<prefix>.+)\.(?P<suffix>weight|weight_packed)$")
# E4M3 (fn) as bytes: NaN is S.1111.111; a sign bit with any other bit set is negative (0x80 is -0.0).
E4M3_NAN_BITS, E4M3_SIGN = 0x7F, 0x80


@dataclass(frozen=True)
class Problem:
    rule: str  # a key of adaq.validate.rules.RULES
    tensor: str  # "" for the whole checkpoint
    message: str

    def line(self) -> str:
        return f"{self.tensor}: {self.message}" if self.tensor else self.message


def structure_problems(config: dict, specs: dict[str, tuple[str, list[int]]], quantized: set[str]) -> list[Problem]:
    """Layers and Linear shapes against config.json, from (dtype, shape) of each tensor; a size config.json gives as
    no positive integer (0, -1, "abc") is a problem of its own. Nothing to say (here) about a config whose
    architecture adaq does not run or that lacks the sizes: `architecture_of` and `ModelShape.from_config` report
    those where a model is built."""
    try:
        architecture_of(config)
    except UnsupportedArchitecture:
        return []
    if invalid := size_problems(config):
        return invalid
    try:
        shape = ModelShape.from_config(config)
    except CheckpointError:
        return []
    return (layer_problems(shape, specs) + linear_problems(shape, specs, quantized) + missing_linear_problems(shape, specs)
            + embedding_problems(shape, specs))


POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "vocab_size")
COUNTS = ("intermediate_size", "num_experts", "moe_intermediate_size", "num_experts_per_tok")  # 0: none (dense)


def size_problems(config: dict) -> list[Problem]:
    """Sizes config.json (or its text_config) gives that are not positive integers (counts: not >= 0)."""
    text = {**config, **(config.get("text_config") or {})}
    bad = [(key, "a positive integer") for key in POSITIVE_SIZES if key in text and not _integer_from(text[key], 1)]
    bad += [(key, "an integer >= 0") for key in COUNTS if key in text and not _integer_from(text[key], 0)]
    return [Problem("config", "", f"{key} is not {what} (got {text[key]!r})") for key, what in bad]


def _integer_from(value, least: int) -> bool:
    """None (unset, as transformers writes defaults) or an int >= least (not a bool)."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= least)


def layer_problems(shape: ModelShape, specs: dict) -> list[Problem]:
    present = {int(match.group(1)) for name in specs if (match := LAYER.match(name))}
    expected = set(range(shape.layers))
    missing, extra = sorted(expected - present), sorted(present - expected)
    problems = []
    if missing:
        problems.append(Problem("layers", "", f"config.json has num_hidden_layers {shape.layers} but the tensors hold "
                                              f"no layer {_ranges(missing)}"))
    if extra:
        problems.append(Problem("layers", "", f"the tensors hold layer {_ranges(extra)} beyond config.json's "
                                              f"num_hidden_layers {shape.layers}"))
    return problems


def missing_linear_problems(shape: ModelShape, specs: dict) -> list[Problem]:
    """A layer whose attention (or dense MLP) holds some of its Linears but not all that config.json gives it."""
    present: dict[int, set[str]] = {}
    for name in specs:
        layer, match = LAYER.match(name), LINEAR_WEIGHT.match(name)
        if layer and match:
            present.setdefault(int(layer.group(1)), set()).add(match.group("prefix")[layer.end():])
    problems = []
    for index, names in sorted(present.items()):
        for group in ("self_attn.", "mlp."):
            expected = {name for name in shape.layer_linears(index) if name.startswith(group)}
            found = names & expected
            if found and found != expected:
                missing = ", ".join(sorted(expected - found))
                problems.append(Problem("shape-vs-config", f"layers.{index}", f"{missing} missing beside "
                                                                              f"{', '.join(sorted(found))}"))
    return problems


def embedding_problems(shape: ModelShape, specs: dict) -> list[Problem]:
    expected = [shape.vocab, shape.hidden]
    return [Problem("shape-vs-config", name, f"embedding is {list(dims)} but config.json gives {expected}")
            for name, (_, dims) in specs.items()
            if name in EMBEDDINGS and list(dims) != expected]


def linear_problems(shape: ModelShape, specs: dict, quantized: set[str]) -> list[Problem]:
    return [shape_problem(prefix, found, expected) for prefix, found, expected in linear_shapes(shape, specs, quantized)
            if found != expected]


def linear_shapes(shape: ModelShape, specs: dict, quantized: set[str]) -> list[tuple[str, tuple, tuple]]:
    """(prefix, [N, K] found, [N, K] config.json gives) of every decoder Linear config.json describes, from its dense
    weight or its packed NVFP4 [N, K/2]."""
    shapes = []
    for name, (dtype, dims) in specs.items():
        match = LINEAR_WEIGHT.match(name)
        if match is None or len(dims) != 2:
            continue
        prefix, suffix = match.group("prefix"), match.group("suffix")
        if prefix in quantized and (suffix == "weight_packed" or dtype == "U8"):
            found = (dims[0], dims[1] * 2)  # two E2M1 values a byte
        elif prefix not in quantized and suffix == "weight":
            found = (dims[0], dims[1])
        else:
            continue
        expected = shape.expected_linear_shape(prefix)
        if expected is not None:
            shapes.append((prefix, found, expected))
    return shapes


def shape_problem(prefix: str, found: tuple[int, int], expected: tuple[int, int]) -> Problem:
    return Problem("shape-vs-config", prefix,
                   f"weight is [{found[0]}, {found[1]}] but config.json gives [{expected[0]}, {expected[1]}]")


def _ranges(indices: list[int]) -> str:
    return str(indices[0]) if len(indices) == 1 else f"{indices[0]}..{indices[-1]} ({len(indices)} layers)"


def raise_problems(path, problems: list[Problem]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more; `adaq validate {path}` lists them)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: {problems[0].line()}{more}")


# ---- values --------------------------------------------------------------------------------------------------------
def nonfinite(tensor: torch.Tensor) -> str | None:
    """None when every value of a floating tensor is finite (or it is not floating, or one-byte: the scale rules
    judge FP8), else how many NaN and inf it holds and where the first is."""
    if not tensor.is_floating_point() or tensor.element_size() == 1 or tensor.numel() == 0:
        return None
    low, high = torch.aminmax(tensor)  # NaN propagates, inf is an extreme: one vectorised pass, ~30x isfinite's
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return None
    flat = torch.isfinite(tensor).reshape(-1)
    nan = int(tensor.isnan().sum())
    inf = int(flat.numel() - int(flat.sum())) - nan
    first = int((~flat).nonzero()[0])
    return f"{nan} NaN and {inf} inf among {flat.numel()} values (first at flat index {first})"


def check_finite(path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    problem = nonfinite(tensor)
    if problem is not None:
        raise CheckpointError(f"{path}: tensor {name} holds NaN or inf ({problem}): the checkpoint is corrupt")
    return tensor


def bad_block_scales(scale: torch.Tensor) -> str | None:
    """None when every E4M3 block scale is finite and >= 0, else a count of the bad ones."""
    raw = scale.contiguous().view(torch.uint8)
    nan = (raw & E4M3_NAN_BITS) == E4M3_NAN_BITS
    negative = (raw > E4M3_SIGN) & ~nan
    if not bool((nan | negative).any()):
        return None
    return f"{int(nan.sum())} NaN and {int(negative.sum())} negative block scales"
