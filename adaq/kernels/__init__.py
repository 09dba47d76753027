"""adaq's CUDA kernels for sm_89 (Ada), built as one torch extension on first use (see adaq.kernels.build).

Importing this package needs neither a GPU nor nvcc; `available()` says whether the kernels can run here.
"""


def available() -> bool:
    """True when a CUDA GPU is visible and the extension builds (first use) or loads from the cache."""
    from adaq.kernels.build import available as _available

    return _available()


__all__ = ["available"]
