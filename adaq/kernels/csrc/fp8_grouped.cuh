// Grouped (MoE) launch of a CUTLASS-generated sm_89 FP8 GEMM kernel type (generated/fp8_gemm_sm89.cu includes this
// and instantiates it once per tile): one launch runs every expert's GEMM over its rows of an expert-sorted
// activation matrix, with nothing read on the host (the group sizes live on the device, as moe_align writes them).
//
//   group g: rows [group_offsets[g], group_offsets[g+1]) of A [R,K] e4m3, row_scale [R] and D [R,N] bf16,
//            weight B[group_expert[g]] [N,K] e4m3 and col_scale[group_expert[g]] [N]
//   D[r, :] = bf16(((A[r] @ B_e^T) * row_scale[r]) * col_scale_e[:])   -- the dense kernel's numerics exactly
//
// Schedule: tile_offsets[g] = sum over earlier groups of ceil(rows / BM) (fp8_moe.cu writes it on the device).
// blockIdx.y is a global M tile, blockIdx.x the N tile; the grid is sized for the worst case (ceil(R/BM) + groups
// M tiles) and surplus blocks exit at once. Each block finds its group by binary search over tile_offsets, then
// runs the generated kernel's own main loop (Mma) and epilogue (visitor tree) on that group's pointers. Groups never
// share a tile: a tile's rows past its group's end are masked by the A iterator's and the epilogue's predicates,
// so the padding costs MMA work (at most BM-1 rows per group) but no memory and no copy. The epilogue's visitor
// parameters (three pointers that differ per group) live in shared memory: the visitors keep a pointer to them.
#pragma once

#include "cutlass/cutlass.h"
#include "cutlass/gemm/gemm.h"

#include "../csrc/common.cuh"

namespace adaq {

struct Fp8GroupedArgs {
  const void* a;             // [R, K] e4m3, rows sorted by group
  const void* b;             // [E, N, K] e4m3
  const float* row_scale;    // [R]
  const float* col_scale;    // [E, N]
  void* d;                   // [R, N] bf16
  const int* group_offsets;  // [G + 1]
  const int* group_expert;   // [G]
  const int* tile_offsets;   // [G + 1]
  const int* num_groups;     // [1]: groups in use (<= G)
  int n, k;
};

// `Output::params(row_scale, col_scale, d, n)` builds the kernel's epilogue visitor parameters (generated: it knows
// the visitor tree).
template <class Kernel, class Output>
__global__ void __launch_bounds__(Kernel::kThreadCount)
    fp8_grouped_gemm_kernel(typename Kernel::Params params, Fp8GroupedArgs g) {
  using Mma = typename Kernel::Mma;
  using Epilogue = typename Kernel::Epilogue;
  using ElementA = typename Kernel::ElementA;
  using ElementB = typename Kernel::ElementB;
  extern __shared__ int adaq_grouped_smem[];
  __shared__ typename Kernel::FusionCallbacks::Params output_params;
  auto& shared = *reinterpret_cast<typename Kernel::SharedStorage*>(adaq_grouped_smem);

  const int groups = *g.num_groups;
  const int tile = blockIdx.y;
  if (tile >= g.tile_offsets[groups]) return;  // surplus block of the worst-case grid (uniform per block)
  int lo = 0, hi = groups;  // invariant: tile_offsets[lo] <= tile < tile_offsets[hi]; empty groups are skipped
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (g.tile_offsets[mid] <= tile) lo = mid; else hi = mid;
  }
  const int row0 = g.group_offsets[lo];
  const int rows = g.group_offsets[lo + 1] - row0;
  const long long expert = g.group_expert[lo];
  const int m_tile = tile - g.tile_offsets[lo];
  const int n_tile = blockIdx.x;

  if (threadIdx.x == 0)
    output_params = Output::params(g.row_scale + row0, g.col_scale + expert * g.n,
                                   static_cast<cutlass::bfloat16_t*>(g.d) + static_cast<long long>(row0) * g.n, g.n);
  __syncthreads();

  auto* ptr_a = const_cast<ElementA*>(static_cast<const ElementA*>(g.a)) + static_cast<long long>(row0) * g.k;
  auto* ptr_b = const_cast<ElementB*>(static_cast<const ElementB*>(g.b)) + expert * g.n * g.k;
  const int thread_idx = threadIdx.x;
  typename Mma::IteratorA iterator_a(params.params_A, ptr_a, {rows, g.k}, thread_idx,
                                     cutlass::MatrixCoord{m_tile * Mma::Shape::kM, 0}, nullptr);
  typename Mma::IteratorB iterator_b(params.params_B, ptr_b, {g.k, g.n}, thread_idx,
                                     cutlass::MatrixCoord{0, n_tile * Mma::Shape::kN}, nullptr);
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int lane_idx = threadIdx.x % 32;

  Mma mma(shared.main_loop, thread_idx, warp_idx, lane_idx);
  typename Mma::FragmentC accumulators;
  accumulators.clear();
  mma((g.k + Mma::Shape::kK - 1) / Mma::Shape::kK, accumulators, iterator_a, iterator_b, accumulators);

  Epilogue epilogue(output_params, shared.epilogue, thread_idx, warp_idx, lane_idx);
  epilogue(accumulators, cutlass::gemm::GemmCoord(m_tile, n_tile, 0), cute::make_shape(rows, g.n, 1), thread_idx);
}

template <class Kernel, class Output>
int launch_fp8_grouped(typename Kernel::Params const& params, Fp8GroupedArgs const& g, int max_m_tiles,
                       cudaStream_t stream) {
  if (max_m_tiles <= 0) return kOk;
  if (max_m_tiles > 65535 || g.n <= 0 || g.k <= 0 || g.n % 16 || g.k % 16) return kUnsupportedShape;
  constexpr int kShared = int(sizeof(typename Kernel::SharedStorage));
  auto* kernel = fp8_grouped_gemm_kernel<Kernel, Output>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared) != cudaSuccess)
    return kCudaError;
  const dim3 grid(ceil_div(g.n, Kernel::Mma::Shape::kN), max_m_tiles);
  kernel<<<grid, Kernel::kThreadCount, kShared, stream>>>(params, g);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace adaq
