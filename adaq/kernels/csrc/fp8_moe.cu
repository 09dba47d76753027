// MoE prefill on the FP8 path: the M-tile schedule of the grouped FP8 GEMM (generated/fp8_gemm_sm89.cu,
// csrc/fp8_grouped.cuh). The rows are grouped by expert beforehand (moe.cu's moe_align layout: group_offsets [G+1],
// group_expert [G], num_groups [1]); this kernel turns the group sizes into cumulative M-tile counts on the device,
// so nothing is read back to the host between the router and the GEMMs.
#include "common.cuh"

namespace adaq {

constexpr int kMaxGroups = 1024;

// One warp: lane l owns groups [l * per_lane, (l + 1) * per_lane), sums its tiles, and an exclusive warp scan gives
// each lane its starting tile. tile_offsets[g] for g <= num_groups; entries past num_groups are left alone.
__global__ void moe_tile_offsets_kernel(const int* __restrict__ group_offsets, const int* __restrict__ num_groups,
                                        int tile_m, int* __restrict__ tile_offsets) {
  const int lane = threadIdx.x;
  const int groups = *num_groups;
  const int per_lane = ceil_div(groups, 32);
  const int first = min(lane * per_lane, groups), last = min(first + per_lane, groups);
  int local = 0;
  for (int g = first; g < last; ++g) local += ceil_div(group_offsets[g + 1] - group_offsets[g], tile_m);
  int inclusive = local;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  int running = inclusive - local;
  for (int g = first; g < last; ++g) {
    tile_offsets[g] = running;
    running += ceil_div(group_offsets[g + 1] - group_offsets[g], tile_m);
  }
  if (lane == 31) tile_offsets[groups] = inclusive;
}

int moe_tile_offsets(const int* group_offsets, const int* num_groups, int max_groups, int tile_m, int* tile_offsets,
                     cudaStream_t stream) {
  if (max_groups > kMaxGroups || tile_m <= 0) return kUnsupportedShape;
  moe_tile_offsets_kernel<<<1, 32, 0, stream>>>(group_offsets, num_groups, tile_m, tile_offsets);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace adaq
