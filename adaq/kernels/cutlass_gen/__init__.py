"""Generates adaq's FP8 prefill GEMMs with CUTLASS's Python package (`nvidia-cutlass`, module `cutlass_cppgen`).

`python -m adaq.kernels.cutlass_gen` rewrites `adaq/kernels/generated/` reproducibly: the same package version
gives the same bytes (tests/test_prefill_fp8.py regenerates and compares). No GPU is needed.
"""

from adaq.kernels.cutlass_gen.generate import GENERATED_DIR, TILES, generate_sources, write_sources

__all__ = ["GENERATED_DIR", "TILES", "generate_sources", "write_sources"]
