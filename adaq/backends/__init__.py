"""Backends: the one object layers call for every op a GPU kernel may replace (interface: adaq.backends.interface).

`reference` (plain PyTorch, the numerical spec) and `cuda` (adaq's sm_89 kernels, a subclass of the reference that
overrides the ops it has kernels for). Layers import only the interface modules (interface, handles, context,
numerics); the engine picks a backend with `get_backend`.
"""

import torch

from adaq.errors import AdaqError

BACKENDS = ("reference", "cuda", "auto")


def cuda_backend_class():
    """The kernel backend's class, or None when CUDA or the compiled extension is missing."""
    if not torch.cuda.is_available():
        return None
    try:
        from adaq.backends.cuda import CudaBackend
        from adaq.kernels import available
    except ImportError:
        return None
    return CudaBackend if available() else None


def get_backend(name: str = "auto", device: torch.device | str | None = None, **options):
    """'reference', 'cuda' (error when it cannot run) or 'auto' (cuda when a GPU and the kernels are there).

    `device` None means "wherever adaq can run": 'auto' on a machine without a usable GPU then gives the reference
    backend and reports that as a fallback (into `options["fallbacks"]`, adaq.backends.fallbacks); an explicit CPU
    device gives the reference backend as asked."""
    from adaq.backends.fallbacks import BACKEND_SETTING
    from adaq.backends.reference import ReferenceBackend

    if name not in BACKENDS:
        raise AdaqError(f"unknown backend {name!r} (choose one of {', '.join(BACKENDS)})")
    if name == "reference" or (name == "auto" and device is not None and torch.device(device).type == "cpu"):
        return ReferenceBackend(device, **options)
    cuda_class = cuda_backend_class()
    if cuda_class is not None:
        return cuda_class(device or "cuda", **options)
    reason = "no CUDA GPU is visible" if not torch.cuda.is_available() else "adaq's CUDA kernels are not built"
    if name == "cuda":
        raise AdaqError(f"backend 'cuda' cannot run: {reason}; use --backend reference")
    backend = ReferenceBackend(device, **options)
    backend.fallbacks.report("backend auto -> reference", f"{reason}: the reference backend runs instead of the "
                             f"kernels", BACKEND_SETTING)
    return backend


__all__ = ["BACKENDS", "cuda_backend_class", "get_backend"]
