// Shared device helpers for adaq's kernels. Every kernel is built for sm_89 (Ada) machine code plus compute_89 PTX;
// nothing here may use Hopper-only instructions (wgmma, TMA, setmaxnreg, clusters).
// The .cu files include no torch header: `nvcc -arch=sm_89` compiles them alone (adaq.kernels.build.compile_check).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

namespace adaq {

// Status codes returned by every host launcher; the torch binding turns them into messages naming the shapes.
enum Status : int { kOk = 0, kUnsupportedShape = 1, kBadAlignment = 2, kWorkspaceTooSmall = 3, kCudaError = 4 };

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// 16-byte global load that skips L1 (each weight byte is used by exactly one warp, once) and marks the line
// evict-first in L2, so the small activation/KV working set stays resident while weights stream past it.
__device__ __forceinline__ uint4 ld_stream_v4(const void* ptr) {
  uint4 r;
  asm volatile(
      "{\n .reg .b64 pol;\n createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
      " ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], pol;\n}\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(ptr));
  return r;
}

// 8-byte variant of ld_stream_v4 for the E4M3 block scales that travel with each 16-byte weight load.
__device__ __forceinline__ uint2 ld_stream_v2(const void* ptr) {
  uint2 r;
  asm volatile(
      "{\n .reg .b64 pol;\n createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
      " ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0,%1}, [%2], pol;\n}\n"
      : "=r"(r.x), "=r"(r.y)
      : "l"(ptr));
  return r;
}

// 16-byte asynchronous global->shared copy (Ampere+ cp.async, .cg: L2 only). src_bytes = 0 writes zeros, which
// pads the tile past K without a branch.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, int src_bytes) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

// Wait for every cp.async this thread issued.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

// Close the current group of cp.async copies; wait until at most N groups are still in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Load a 16x16 bf16 A-operand tile from shared memory straight into mma.sync fragment layout (4 regs/thread).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const void* smem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(s));
}

// The same four 8x8 matrices transposed: each thread receives elements (rows 2 (lane % 4), +1; column lane / 4), i.e.
// the B fragment of an MMA whose k runs down the shared rows (P.V with V stored [key][dim]).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&a)[4], const void* smem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(s));
}

// D += A(16x16 bf16, row) * B(16x8 bf16, col), fp32 accumulate: Ampere/Ada's bf16 tensor-core instruction.
// On Ada FP8 mma would be 2x faster, but decode is memory-bound and on the H100 FP8 mma.sync runs at 1/4 the
// bf16 rate (NOTES.md), so bf16 keeps both chips on the bandwidth roof.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two bf16 products in one instruction: sm_80/89 have no bf16 mul, so fma with -0.0 (keeps -0 * x = -0 exact).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// Two E4M3 bytes (low byte first) -> two floats, exact: sm_89's cvt.rn.f16x2.e4m3x2, then f16 -> f32.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t two) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  return __half22float2(*reinterpret_cast<__half2*>(&h));
}

// Two floats -> two E4M3 bytes (low byte = a), round-to-nearest-even, saturating to +-448 like the reference's clamp.
// Hardware cvt (sm_89 F2FP): measured on the H100 to differ from torch's fp32 -> float8_e4m3fn in a few values per
// million (it behaves like a rounding through f16 first), so the KV store uses float_to_e4m3_exact instead.
__device__ __forceinline__ uint16_t float2_to_e4m3x2(float a, float b) {
  return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// fp32 -> E4M3 byte with one round-to-nearest-even, bit-identical to torch's (c10) conversion after the reference's
// clamp to +-448: normals by integer rounding of the fp32 bits, subnormals (< 2^-6) by an fp32 add of 2^14 that
// leaves exactly the E4M3 subnormal step in the low mantissa bits.
__device__ __forceinline__ uint8_t float_to_e4m3_exact(float f) {
  f = fminf(fmaxf(f, -448.f), 448.f);
  uint32_t bits = __float_as_uint(f);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t out;
  if (bits < (121u << 23)) {
    const float t = __fadd_rn(__uint_as_float(bits), __uint_as_float(141u << 23));
    out = __float_as_uint(t) - (141u << 23);
  } else {
    bits += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + ((bits >> 20) & 1u);
    out = bits >> 20;
  }
  return static_cast<uint8_t>(out | (sign >> 24));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The gate's activation in fp32 (0: silu, 1: gelu tanh), as torch computes its bf16 silu / gelu before rounding:
// the elementwise gated kernel and the grouped MoE GEMM's gated epilogue share it, so the two round alike.
template <int KIND>
__device__ __forceinline__ float gate_act(float g) {
  if (KIND == 0) return g / (1.f + expf(-g));
  const float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  return 0.5f * g * (1.f + tanhf(kBeta * (g + kKappa * g * g * g)));
}

__device__ __forceinline__ float bf16_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace adaq
