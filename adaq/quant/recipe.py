"""Quantization recipes in llm-compressor's YAML shape (stage -> modifiers -> QuantizationModifier arguments).

adaq's own methods read `targets`, `ignore` and `scheme` from the QuantizationModifier; `--method llmcompressor`
hands the whole recipe to `oneshot`. Names match as compressed-tensors matches them: an exact module name,
`re:<pattern>` (re.match on the full module name) or a module class name (`Linear`).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adaq.errors import AdaqError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SCHEME_PRESETS = {"nvfp4a16": "NVFP4A16", "nvfp4": "NVFP4"}
MODIFIER = "QuantizationModifier"
HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_next")  # layer_types may be absent from config.json: then the default mix


@dataclass
class Recipe:
    scheme: str  # "nvfp4a16" | "nvfp4"
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    source: str = "built-in"
    document: dict = field(default_factory=dict)  # the full YAML, for llm-compressor and for the output folder

    def __post_init__(self):
        if self.scheme not in SCHEME_PRESETS:
            raise AdaqError(f"recipe {self.source}: scheme {self.scheme!r} is not NVFP4 "
                            f"(adaq supports {', '.join(SCHEME_PRESETS.values())})")
        if not self.targets:
            raise AdaqError(f"recipe {self.source}: QuantizationModifier.targets is empty")

    def with_scheme(self, scheme: str) -> "Recipe":
        """The same recipe with another scheme (the --scheme flag wins over the file)."""
        document = _replace_scheme(self.document, SCHEME_PRESETS.get(scheme, scheme))
        return Recipe(scheme, list(self.targets), list(self.ignore), self.source, document)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.document, sort_keys=False)

    def is_ignored(self, name: str, class_name: str = "Linear") -> bool:
        return matches(name, class_name, self.ignore)

    def is_target(self, name: str, class_name: str = "Linear") -> bool:
        return matches(name, class_name, self.targets)


def matches(name: str, class_name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern in (name, class_name):
            return True
    return False


def _find_modifier(document: dict, source: str) -> dict:
    """The QuantizationModifier arguments, wherever the stage/modifier nesting puts them."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == MODIFIER and isinstance(value, dict):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    if len(found) != 1:
        raise AdaqError(f"recipe {source}: expected one {MODIFIER}, found {len(found)}")
    return found[0]


def _replace_scheme(document: dict, preset: str) -> dict:
    if not document:
        return document
    import copy

    document = copy.deepcopy(document)
    _find_modifier(document, "recipe")["scheme"] = preset
    return document


def _scheme_name(modifier: dict, source: str) -> str:
    scheme = modifier.get("scheme")
    if not isinstance(scheme, str):
        raise AdaqError(f"recipe {source}: {MODIFIER}.scheme must be a preset name (NVFP4A16 or NVFP4), "
                        f"got {scheme!r}")
    by_preset = {preset.lower(): name for name, preset in SCHEME_PRESETS.items()}
    if scheme.lower() not in by_preset:
        raise AdaqError(f"recipe {source}: scheme {scheme!r} is not NVFP4 (adaq supports NVFP4A16, NVFP4)")
    return by_preset[scheme.lower()]


def parse_recipe(text: str, source: str) -> Recipe:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise AdaqError(f"recipe {source}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise AdaqError(f"recipe {source}: expected a mapping of stages")
    modifier = _find_modifier(document, source)
    targets = modifier.get("targets", ["Linear"])
    ignore = modifier.get("ignore", [])
    targets, ignore = ([t] if isinstance(t, str) else list(t or []) for t in (targets, ignore))
    return Recipe(_scheme_name(modifier, source), targets, ignore, source, document)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        shipped = RECIPES_DIR / path.name
        if not shipped.is_file():
            names = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
            raise AdaqError(f"recipe {path}: no such file (shipped recipes: {names})")
        path = shipped
    return parse_recipe(path.read_text(), str(path))


def is_moe(config: dict) -> bool:
    text_config = config.get("text_config") or config
    return bool(text_config.get("num_experts") or text_config.get("num_local_experts"))


def is_hybrid(config: dict) -> bool:
    """A model with Gated DeltaNet layers (Qwen3.5, Qwen3-Next)."""
    text_config = config.get("text_config") or config
    model_type = text_config.get("model_type") or ""
    return "linear_attention" in (text_config.get("layer_types") or []) or model_type.startswith(HYBRID_MODEL_TYPES)


def is_gemma4(config: dict) -> bool:
    return config.get("model_type") in ("gemma4", "gemma4_text")


def default_recipe(config: dict, scheme: str) -> Recipe:
    """The shipped recipe for this model: routers kept in bf16 for MoE models; for hybrid models what
    llm-compressor's Qwen3.5 / Qwen3-Next examples keep (routers, shared-expert gates, linear attention); Gemma 4 as
    llm-compressor's example (embeddings, routers, vision and audio towers kept)."""
    kind = "hybrid" if is_hybrid(config) else "gemma4" if is_gemma4(config) else "moe" if is_moe(config) else "dense"
    return load_recipe(RECIPES_DIR / f"{scheme}-{kind}.yaml")
