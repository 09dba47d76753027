"""Makes `lm_eval --model adaq` work in lm-eval's own command line.

lm-eval 0.4.13 finds models only in its registry, which its own modules fill as they are imported; it reads no
entry points and imports nothing from --include_path before it builds the model. So `install()` writes a one-line
`adaq-lm-eval.pth` into site-packages: Python runs it at start-up and it adds an import hook that registers "adaq"
(as the lazy target "adaq.eval.lm_backend:AdaqLM") the moment lm_eval.api.registry is imported. Nothing of adaq's
backend, torch or lm-eval is imported before lm-eval itself asks for the model.
"""

import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "adaq-lm-eval.pth"
REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_TARGET = "adaq.eval.lm_backend:AdaqLM"


def register(registry_module) -> None:
    if "adaq" not in registry_module.model_registry:
        registry_module.model_registry.register("adaq", target=MODEL_TARGET)


class _RegistryHook:
    """A meta-path finder that only wraps the loading of lm_eval.api.registry, then steps aside."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            register(module)

        spec.loader.exec_module = exec_module
        return spec


def activate() -> None:
    """Called by the .pth line at interpreter start-up."""
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
    elif not any(isinstance(finder, _RegistryHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())


def pth_path(site_dir: str | Path | None = None) -> Path:
    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def install(site_dir: str | Path | None = None) -> Path:
    path = pth_path(site_dir)
    path.write_text("import adaq.eval.plugin as _adaq_plugin; _adaq_plugin.activate()\n")
    return path


def uninstall(site_dir: str | Path | None = None) -> Path:
    path = pth_path(site_dir)
    path.unlink(missing_ok=True)
    return path
