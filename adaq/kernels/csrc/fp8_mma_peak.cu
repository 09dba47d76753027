// The FP8 mma.sync ceiling of the GPU at hand: what its tensor cores give Ada's m16n8k32 e4m3 instruction when
// nothing else limits it (no memory traffic, no shared memory). The prefill GEMM's efficiency is stated against it.
//
// Why the loop looks like this (the first version measured 1576 TFLOP/s on an H100, above its dense FP16 peak):
// PTX `asm volatile` only binds the front end; ptxas optimises the mma.sync like any instruction. sm_89 runs it
// natively (QMMA.16832.F32.E4M3.E4M3), but a compute_89 PTX JIT-compiled for sm_90 becomes F2FP unpacks to f16 +
// two HMMA.16816 with a zero accumulator + four FADDs into the accumulator. With loop-invariant operands ptxas
// hoisted the unpacks and both HMMAs out of the loop, and the 8 chains (same operands, same zero start) were one
// value: the loop timed FADDs, not MMAs. So here every iteration feeds new operand bits (one LOP3 per fragment
// register, like a GEMM's main loop loading new fragments each k-step), every accumulator starts distinct, and the
// operand reuse is the generated GEMM's warp tile (64x32: 4 A fragments x 4 B fragments = 16 MMAs per k-step, 16
// independent accumulator chains per warp), so on the H100 the unpack/FADD overhead per MMA is the GEMM's own.
// tests/test_prefill_fp8.py checks the SASS of both targets: 16 QMMA per iteration on sm_89, and 32 HMMA inside
// the loop (none hoisted) for the PTX compiled for sm_90.
#include "common.cuh"

namespace adaq {

// D += A(16x32 e4m3, row) * B(32x8 e4m3, col), fp32 accumulate: Ada's FP8 tensor-core instruction.
__device__ __forceinline__ void mma_e4m3_16832(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

constexpr int kFragA = 4;  // m16 fragments per warp (64 rows)
constexpr int kFragB = 4;  // n8 fragments per warp (32 columns): the generated GEMM's 64x32 warp tile
constexpr int kMmasPerIteration = kFragA * kFragB;

__global__ void fp8_mma_peak_kernel(float* __restrict__ sink,  // [grid] written only to keep the work alive
                                    int iterations) {          // k-steps; each issues kMmasPerIteration MMAs
  // Operand bytes = base ^ delta with base in [0x08, 0x37] and delta in [0, 0x1f]: bit 6 is never set, so no byte
  // is ever an E4M3 NaN (0x7f/0xff) and the data stay finite, as a GEMM's do.
  const uint32_t seed = (threadIdx.x * 0x01030507u + blockIdx.x * 0x0b0d1113u) & 0x1f1f1f1fu;
  uint32_t a[kFragA][4], b[kFragB][2];
#pragma unroll
  for (int i = 0; i < kFragA; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) a[i][r] = 0x08080808u + ((seed + (i * 4 + r) * 0x01010101u) & 0x1f1f1f1fu);
#pragma unroll
  for (int j = 0; j < kFragB; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) b[j][r] = 0x08080808u + ((seed ^ (j * 2 + r) * 0x02020202u) & 0x1f1f1f1fu);
  float d[kFragA][kFragB][4];
#pragma unroll
  for (int i = 0; i < kFragA; ++i)
#pragma unroll
    for (int j = 0; j < kFragB; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) d[i][j][r] = float(i * 16 + j * 4 + r);  // distinct chains: no CSE across them

  uint32_t delta = 0;
  for (int it = 0; it < iterations; ++it) {
    // New operand bits every k-step (one LOP3 per fragment register, off the tensor pipe), as a GEMM's main loop
    // loads new fragments: nothing can be hoisted out of the loop.
    uint32_t fa[kFragA][4], fb[kFragB][2];
#pragma unroll
    for (int i = 0; i < kFragA; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r) fa[i][r] = a[i][r] ^ delta;
#pragma unroll
    for (int j = 0; j < kFragB; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) fb[j][r] = b[j][r] ^ delta;
#pragma unroll
    for (int i = 0; i < kFragA; ++i)
#pragma unroll
      for (int j = 0; j < kFragB; ++j) mma_e4m3_16832(d[i][j], fa[i], fb[j][0], fb[j][1]);
    delta = (delta + 0x01010101u) & 0x1f1f1f1fu;
  }
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kFragA; ++i)
#pragma unroll
    for (int j = 0; j < kFragB; ++j) total += d[i][j][0] + d[i][j][1] + d[i][j][2] + d[i][j][3];
  if (total == 1234.5f) sink[blockIdx.x] = total;  // practically never true; the compiler cannot know
}

// FLOP issued = blocks * (threads / 32) * iterations * fp8_mma_peak_mmas_per_iteration() * 2*16*8*32.
int fp8_mma_peak(float* sink, int blocks, int threads, int iterations, cudaStream_t stream) {
  if (threads % 32 || threads <= 0 || iterations <= 0) return kUnsupportedShape;
  fp8_mma_peak_kernel<<<blocks, threads, 0, stream>>>(sink, iterations);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int fp8_mma_peak_mmas_per_iteration() { return kMmasPerIteration; }

// Resident blocks per SM of `threads` threads: the harness launches exactly full waves (no tail).
int fp8_mma_peak_blocks_per_sm(int threads) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fp8_mma_peak_kernel, threads, 0) != cudaSuccess) return 0;
  return blocks;
}

}  // namespace adaq
