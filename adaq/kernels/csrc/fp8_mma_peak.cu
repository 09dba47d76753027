// The FP8 mma.sync ceiling of the GPU at hand: every warp issues independent m16n8k32 e4m3 MMAs from registers, no
// memory traffic, so the rate measured is what the tensor cores give Ada's FP8 instruction (on a 4090 ~2x bf16, on
// an H100 ~1/4 of bf16 mma.sync: NOTES.md). The prefill GEMM's efficiency is stated against this number.
#include "common.cuh"

namespace adaq {

// D += A(16x32 e4m3, row) * B(32x8 e4m3, col), fp32 accumulate: Ada's FP8 tensor-core instruction.
__device__ __forceinline__ void mma_e4m3_16832(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

constexpr int kChains = 8;  // independent accumulators per warp: enough to hide the MMA latency

__global__ void fp8_mma_peak_kernel(float* __restrict__ sink,  // [grid] written only to keep the work alive
                                    int iterations) {          // MMAs per chain
  uint32_t a[4] = {threadIdx.x * 0x01010101u, 0x38383838u, 0x30303030u, threadIdx.x};
  const uint32_t b0 = 0x38383838u ^ blockIdx.x, b1 = 0x30303030u;
  float d[kChains][4] = {};
  for (int i = 0; i < iterations; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) mma_e4m3_16832(d[c], a, b0, b1);
  }
  float total = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) total += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  if (total == 1234.5f) sink[blockIdx.x] = total;  // practically never true; the compiler cannot know
}

// FLOP issued = blocks * warps_per_block * iterations * kChains * 2*16*8*32.
int fp8_mma_peak(float* sink, int blocks, int threads, int iterations, cudaStream_t stream) {
  fp8_mma_peak_kernel<<<blocks, threads, 0, stream>>>(sink, iterations);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace adaq
