"""The package's floors: data flows checkpoint -> model -> engine -> kernels, and no folder imports one above it.

formats < kernels < backends < layers < models < engine < {quant, validate, bench, eval, serve} < commands.
`adaq.errors` sits under every floor; `adaq.demo` (the embedded checkpoint's source) sits with formats;
`adaq.tables` (rich tables that fold to the terminal) with the tools that render.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adaq"
FLOORS = {
    "errors": -1,
    "formats": 0, "demo": 0,
    "kernels": 1,
    "backends": 2,
    "layers": 3,
    "models": 4,
    "engine": 5,
    "quant": 6, "validate": 6, "bench": 6, "eval": 6, "serve": 6, "tables": 6,
    "commands": 7, "cli": 7, "__main__": 7, "__init__": 7,
}
FLOOR_NAMES = {0: "formats", 1: "kernels", 2: "backends", 3: "layers", 4: "models", 5: "engine", 6: "tools",
               7: "commands"}
# Layers see the backends through their interface only, never a concrete backend or the kernel routing.
LAYER_FORBIDDEN = ("adaq.backends.reference", "adaq.backends.cuda", "adaq.backends.prefill_route",
                   "adaq.backends.prefill_moe")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "adaq":
        return None
    if len(parts) == 1:
        return FLOORS["__init__"]
    return FLOORS.get(parts[1])


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every adaq import in the file, function-local ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "adaq" or name.startswith("adaq.")]


def python_files() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "generated" not in path.parts)


def violations() -> list[str]:
    found = []
    for path in python_files():
        own = floor_of(module_name(path)) if path.name != "__init__.py" or path.parent != PACKAGE else 7
        if own is None:
            found.append(f"{path.relative_to(PACKAGE.parent)}: not on any floor (add its folder to FLOORS)")
            continue
        for line, name in imports_of(path):
            floor = floor_of(name)
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if floor is not None and floor > own:
                found.append(f"{where} imports {name} ({FLOOR_NAMES[floor]} is above {FLOOR_NAMES.get(own, 'errors')})")
            if module_name(path).startswith("adaq.layers") and name.startswith(LAYER_FORBIDDEN):
                found.append(f"{where} imports {name} (layers may use only the backend interface)")
    return found


def test_no_floor_imports_a_floor_above_it():
    assert violations() == []


def test_every_module_is_on_a_floor():
    assert all(floor_of(module_name(path)) is not None for path in python_files())


@pytest.mark.parametrize("source, expected", [
    ("from adaq.layers import linear\n", "adaq/kernels/leaf_probe.py:1 imports adaq.layers.linear (layers is above kernels)"),
    ("def f():\n    from adaq.engine.context import x\n", "adaq/kernels/leaf_probe.py:2 imports adaq.engine.context"),
])
def test_the_check_names_an_offending_import(source, expected, tmp_path, monkeypatch):
    probe = PACKAGE / "kernels" / "leaf_probe.py"
    monkeypatch.setattr(__import__(__name__), "python_files", lambda: [probe])
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == probe else original(self, *a, **k))
    assert any(line.startswith(expected) for line in violations())
