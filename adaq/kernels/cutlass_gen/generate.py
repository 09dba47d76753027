"""Emit the sm_89 FP8 prefill GEMMs: D[M,N] (bf16) = ((A[M,K] e4m3 @ B[N,K]^T e4m3, fp32) * row[m]) * col[n].

CUTLASS's Python package builds each kernel's C++ type (2.x GemmUniversal with an epilogue visitor tree); this
module wraps each in a namespace with a small launcher (dense, and grouped for MoE: csrc/fp8_grouped.cuh) and
writes three files into adaq/kernels/generated/:
`fp8_gemm_sm89.cu` (kernels + launchers, no torch header), `fp8_gemm_sm89.h` (the C entry point) and
`fp8_gemm_sm89.json` (the tile list Python selects from). Output is deterministic for a given package version.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GENERATED_DIR = Path(__file__).resolve().parent.parent / "generated"
BASENAME = "fp8_gemm_sm89"
ADA_SHARED_BYTES = 99 * 1024  # Ada: at most 99 KB of shared memory per block (opt-in above 48 KB)


@dataclass(frozen=True)
class Tile:
    """One generated instantiation: threadblock tile (bm x bn x bk), warps (wm x wn) and pipeline stages."""

    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    stages: int

    @property
    def name(self) -> str:
        return f"{self.bm}x{self.bn}_{self.bk}x{self.stages}"

    def operand_shared_bytes(self) -> int:
        return (self.bm + self.bn) * self.bk * self.stages  # one byte per E4M3 value


# Warp tiles of 64x32 / 32x64 (64 fp32 accumulators per thread): with the epilogue visitor tree, 64x64 warp tiles
# (128x128 or 256x128 blocks) need 255 registers and spill ~640 bytes under ptxas -O3 for sm_89; these do not
# (~206 registers). 4 stages = 48 KB of operands: two blocks per SM within Ada's 100 KB of shared memory per SM.
# The 6-stage variant (72 KB, one block per SM) is there for the microbenchmark to compare deeper pipelining.
# 64x64 (6 stages, 48 KB): 32x32 warp tiles, half the accumulators, for the H100's JIT of the same PTX, which needs
# more registers than ptxas for sm_89 (Hopper runs each e4m3 MMA as unpacks + two f16 MMAs) and spills at 64x32.
TILES = (Tile(128, 64, 64, 2, 2, 4), Tile(64, 128, 64, 2, 2, 4), Tile(128, 64, 64, 2, 2, 6), Tile(64, 64, 64, 2, 2, 6))


def _configure_cutlass():
    """Select Ada (cc 89) kernels without a GPU: cutlass_cppgen lists no generator for 89 and asks the driver for the
    device's capability and nvcc's version; set all three before the first Gemm()."""
    import cutlass_cppgen
    from cutlass_cppgen import library_defaults

    library_defaults._generator_ccs[:] = [89]  # only the sm_89 generator: the FP8 tensor-op kernels, in seconds
    cutlass_cppgen._nvcc_version = "13.0"
    cutlass_cppgen._option_registry = library_defaults.OptionRegistry(89)
    return cutlass_cppgen


def _epilogue_visitor(cutlass_cppgen):
    import torch

    def row_col_scale(accum, row_scale, col_scale):
        D = accum * row_scale * col_scale  # noqa: N806 (the visitor's output is named D)
        return D

    m, n = 256, 256
    examples = {"accum": torch.empty(m, n, dtype=torch.float32), "row_scale": torch.empty(m, 1, dtype=torch.float32),
                "col_scale": torch.empty(1, n, dtype=torch.float32), "D": torch.empty(m, n, dtype=torch.bfloat16)}
    # Traced for cc 80 (the sm_80 visitors serve sm_89; tracing with 89 fails in cutlass 4.2).
    return cutlass_cppgen.epilogue.trace(row_col_scale, examples, cc=80)


def _plan(cutlass_cppgen):
    from cutlass_library import DataType, LayoutType

    plan = cutlass_cppgen.op.Gemm(
        element_A=DataType.e4m3, element_B=DataType.e4m3, element_C=DataType.bf16, element_D=DataType.bf16,
        element_accumulator=DataType.f32, layout_A=LayoutType.RowMajor, layout_B=LayoutType.ColumnMajor,
        layout_C=LayoutType.RowMajor, cc=89)
    plan.epilogue_visitor = _epilogue_visitor(cutlass_cppgen)
    return plan


def _find(plan, tile: Tile):
    for description in plan.tile_descriptions():
        if (list(description.threadblock_shape) == [tile.bm, tile.bn, tile.bk]
                and list(description.warp_count) == [tile.wm, tile.wn, 1] and description.stages == tile.stages):
            return description
    raise RuntimeError(f"cutlass offers no sm_89 FP8 tile {tile.name}")


_LAUNCHER = """
using Kernel = {procedural}_type;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
static_assert(sizeof(typename Kernel::SharedStorage) <= {shared_limit},
              "tile {tile} does not fit Ada's 99 KB of shared memory per block");
constexpr int kSharedBytes = int(sizeof(typename Kernel::SharedStorage));
constexpr int kTileM = Kernel::Mma::Shape::kM;

// D = bf16(((A @ B^T) * row_scale[m]) * col_scale[n]); A [M,K] e4m3 row-major, B [N,K] e4m3 row-major (= K x N
// column-major, CUTLASS's TN), D [M,N] bf16 row-major. Launched on `stream`; the identity swizzle without split-K
// needs no workspace, so nothing is allocated.
int run(const void* a, const void* b, const float* row_scale, const float* col_scale, void* d, int m, int n, int k,
        cudaStream_t stream) {{
  typename EVTD::Arguments callbacks{{
      {{{{{{}}, {{row_scale, 0.f, {{}}}}, {{}}}},  // acc * row_scale[m]
       {{col_scale, 0.f, {{}}}},               // ... * col_scale[n]
       {{}}}},
      {{static_cast<cutlass::bfloat16_t*>(d), {{int64_t(n), cute::Int<1>{{}}, cute::Int<0>{{}}}}}}}};
  typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {{m, n, k}}, 1, callbacks, a, b, nullptr,
                                nullptr, int64_t(m) * k, int64_t(n) * k, 0, 0, k, k, 0, 0);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return adaq::kUnsupportedShape;
  if (Gemm::get_workspace_size(args) != 0) return adaq::kWorkspaceTooSmall;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return adaq::kCudaError;
  return gemm.run(stream) == cutlass::Status::kSuccess ? adaq::kOk : adaq::kCudaError;
}}

// The grouped (MoE) launch of the same kernel type (csrc/fp8_grouped.cuh): the epilogue's three pointers per group.
struct GroupedOutput {{
  static CUTLASS_DEVICE typename EVTD::Params params(const float* row_scale, const float* col_scale,
                                                     cutlass::bfloat16_t* d, int n) {{
    return {{{{{{{{}}, {{row_scale, 0.f, {{}}}}, {{}}}}, {{col_scale, 0.f, {{}}}}, {{}}}},
            {{d, {{int64_t(n), cute::Int<1>{{}}, cute::Int<0>{{}}}}}}}};
  }}
}};

int run_grouped(const void* a, const void* b, const float* row_scale, const float* col_scale, void* d,
                const int* group_offsets, const int* group_expert, const int* tile_offsets, const int* num_groups,
                int max_m_tiles, int n, int k, cudaStream_t stream) {{
  // Host-side parameters of a representative problem: only the operand iterators' strides (from K) are used.
  typename EVTD::Arguments callbacks{{
      {{{{{{}}, {{row_scale, 0.f, {{}}}}, {{}}}}, {{col_scale, 0.f, {{}}}}, {{}}}},
      {{static_cast<cutlass::bfloat16_t*>(d), {{int64_t(n), cute::Int<1>{{}}, cute::Int<0>{{}}}}}}}};
  typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {{kTileM, n, k}}, 1, callbacks, a, b,
                                nullptr, nullptr, 0, 0, 0, 0, k, k, 0, 0);
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return adaq::kUnsupportedShape;
  typename Kernel::Params params(args, 1, 1);
  return adaq::launch_fp8_grouped<Kernel, GroupedOutput>(
      params, {{a, b, row_scale, col_scale, d, group_offsets, group_expert, tile_offsets, num_groups, n, k}},
      max_m_tiles, stream);
}}
"""

_HEADER = """// GENERATED by `python -m adaq.kernels.cutlass_gen` from nvidia-cutlass {version}; do not edit.
// sm_89 (Ada) FP8 GEMMs: e4m3 x e4m3 -> fp32 accumulate (mma.sync m16n8k32) -> per-row x per-column scale -> bf16.
#pragma once
#include <cuda_runtime.h>

namespace adaq {{
// Tiles, in the order of fp8_gemm_sm89.json: {tiles}.
constexpr int kFp8GemmTiles = {count};
// Runs tile `tile` (0-based) on `stream`; returns an adaq::Status (0 = ok). M, N, K > 0, K and N multiples of 16,
// pointers 16-byte aligned.
int fp8_gemm_sm89(int tile, const void* a, const void* b, const float* row_scale, const float* col_scale, void* d,
                  int m, int n, int k, cudaStream_t stream);
// Shared memory per block of tile `tile` (bytes), for reports.
int fp8_gemm_sm89_shared_bytes(int tile);
// Rows per block (BM) of tile `tile`: the grouped launch's M tiles.
int fp8_gemm_sm89_tile_m(int tile);
// Grouped (MoE) GEMM with tile `tile`, one launch for every group (csrc/fp8_grouped.cuh): group g multiplies rows
// [group_offsets[g], group_offsets[g+1]) of a [R,K] by expert group_expert[g] of b [E,N,K] (col_scale [E,N]) into
// the same rows of d [R,N]; tile_offsets [G+1] = cumulative ceil(rows / BM); the grid has max_m_tiles M tiles.
int fp8_grouped_gemm_sm89(int tile, const void* a, const void* b, const float* row_scale, const float* col_scale,
                          void* d, const int* group_offsets, const int* group_expert, const int* tile_offsets,
                          const int* num_groups, int max_m_tiles, int n, int k, cudaStream_t stream);
}}  // namespace adaq
"""

_SOURCE_HEAD = """// GENERATED by `python -m adaq.kernels.cutlass_gen` from nvidia-cutlass {version}; do not edit.
// Kernel types come from cutlass_cppgen (GemmUniversal 2.x, OpClassTensorOp, Sm89, epilogue visitor tree);
// the launchers are adaq's. No torch header: plain nvcc compiles this file for sm_89.
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"

#include "../csrc/common.cuh"
#include "../csrc/fp8_grouped.cuh"
#include "fp8_gemm_sm89.h"
"""


def _cutlass_version() -> str:
    from importlib.metadata import version

    return version("nvidia-cutlass")


def generate_sources() -> dict[str, str]:
    """{file name: text} of the generated files (nothing written)."""
    cutlass_cppgen = _configure_cutlass()
    plan = _plan(cutlass_cppgen)
    version = _cutlass_version()
    parts, manifest = [_SOURCE_HEAD.format(version=version)], []
    for tile in TILES:
        operation = plan.construct(_find(plan, tile))
        namespace = f"tile_{tile.name}"
        launcher = _LAUNCHER.format(procedural=operation.procedural_name(), tile=tile.name,
                                    shared_limit=ADA_SHARED_BYTES)
        parts.append(f"namespace adaq::{namespace} {{\n{operation.rt_module.emit().strip()}\n{launcher}}}"
                     f"  // namespace adaq::{namespace}\n")
        manifest.append({**asdict(tile), "name": tile.name, "kernel": operation.procedural_name()})
    parts.append(_dispatch([f"tile_{tile.name}" for tile in TILES]))
    header = _HEADER.format(version=version, tiles=", ".join(t.name for t in TILES), count=len(TILES))
    table = {"cutlass": version, "arch": "sm_89", "tiles": manifest}
    return {f"{BASENAME}.cu": "\n".join(parts), f"{BASENAME}.h": header,
            f"{BASENAME}.json": json.dumps(table, indent=1) + "\n"}


def _dispatch(namespaces: list[str]) -> str:
    runs = "".join(f"    case {i}: return {ns}::run(a, b, row_scale, col_scale, d, m, n, k, stream);\n"
                   for i, ns in enumerate(namespaces))
    sizes = "".join(f"    case {i}: return {ns}::kSharedBytes;\n" for i, ns in enumerate(namespaces))
    tile_m = "".join(f"    case {i}: return {ns}::kTileM;\n" for i, ns in enumerate(namespaces))
    grouped = "".join(f"    case {i}: return {ns}::run_grouped(a, b, row_scale, col_scale, d, group_offsets, "
                      "group_expert, tile_offsets,\n"
                      "                                     num_groups, max_m_tiles, n, k, stream);\n"
                      for i, ns in enumerate(namespaces))
    return ("namespace adaq {\nint fp8_gemm_sm89(int tile, const void* a, const void* b, const float* row_scale,\n"
            "                  const float* col_scale, void* d, int m, int n, int k, cudaStream_t stream) {\n"
            "  if (m <= 0 || n <= 0 || k <= 0 || n % 16 || k % 16) return kUnsupportedShape;\n"
            f"  switch (tile) {{\n{runs}    default: return kUnsupportedShape;\n  }}\n}}\n\n"
            f"int fp8_gemm_sm89_shared_bytes(int tile) {{\n  switch (tile) {{\n{sizes}    default: return 0;\n  }}\n"
            "}\n\n"
            f"int fp8_gemm_sm89_tile_m(int tile) {{\n  switch (tile) {{\n{tile_m}    default: return 0;\n  }}\n}}\n\n"
            "int fp8_grouped_gemm_sm89(int tile, const void* a, const void* b, const float* row_scale,\n"
            "                          const float* col_scale, void* d, const int* group_offsets,\n"
            "                          const int* group_expert, const int* tile_offsets, const int* num_groups,\n"
            "                          int max_m_tiles, int n, int k, cudaStream_t stream) {\n"
            f"  switch (tile) {{\n{grouped}    default: return kUnsupportedShape;\n  }}\n}}\n"
            "}  // namespace adaq\n")


def write_sources(directory: Path = GENERATED_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate_sources().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale_files(directory: Path = GENERATED_DIR) -> list[str]:
    """Names of generated files that differ from what the generator emits now (or are missing)."""
    return [name for name, text in generate_sources().items()
            if not (directory / name).exists() or (directory / name).read_text() != text]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adaq.kernels.cutlass_gen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in sources are stale")
    parser.add_argument("--out", type=Path, default=GENERATED_DIR)
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        print("stale: " + ", ".join(stale) if stale else "generated sources are current")
        sys.exit(1 if stale else 0)
    for path in write_sources(args.out):
        print(path)
