// FP8 operands for the prefill GEMM (adaq.layers.fp8_prefill is the spec; results are bit-identical to it):
//  1. quantize_rows: bf16 activations [M,K] -> e4m3 [M,K] + fp32 row_scale [M] (amax/448 per token), optionally
//     after an RMSNorm fused into the same pass (the row is read once from DRAM, normalised in registers).
//  2. expand_nvfp4: NVFP4 weight [N,K/2] + e4m3 block scales [N,K/16] -> e4m3 [N,K] + fp32 col_scale [N], written
//     into a workspace the caller reuses layer after layer (never the whole model expanded at once).
// No torch header: `nvcc -arch=sm_89` compiles this file alone. No Hopper-only instructions.
#include "common.cuh"

namespace adaq {

constexpr int kQuantThreads = 256;      // one block per row; 8 warps share the amax / sum-of-squares reduction
constexpr float kE4M3Max = 448.f;
constexpr float kMinRowScale = 1e-12f;  // an all-zero row gets a tiny scale, never a division by zero
constexpr float kWeightHeadroom = 64.f; // 2^6: |e2m1 * ratio| <= 6 -> <= 384 < 448, small products leave subnormals

// Block-wide reduction through shared memory (max or sum), result broadcast to every thread.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? scratch[lane] : 0.f;  // amax >= 0 and sums start at 0
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const float r = scratch[0];
  __syncthreads();
  return r;
}

// Per-token E4M3 quantization of one row per block, optionally fused with RMSNorm.
// The normalised row is rounded to bf16 first (what the model would feed the GEMM), then amax, scale and the IEEE
// division x / scale are exactly the reference's; float_to_e4m3_exact matches torch's conversion bit for bit.
// V values per thread per step: 8 (16-byte loads, 8-byte stores) when K % 8 == 0 and x is 16-byte aligned, else 1.
// CH > 0 (V = 8, K <= CH * 2048): the row is read once into registers, CH chunks of 8 per thread; otherwise it is
// read once per pass (sum of squares, amax, quantization; the later reads hit L1/L2). Scalar 2-byte loads and 1-byte
// stores ran at ~530 GB/s on the H100 (device run 1, session 3), the re-reading vector version at ~1.4 TB/s (run 2).
template <int V, int CH>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(
    const __nv_bfloat16* __restrict__ x,     // [M, K] bf16 activations, row stride K
    const __nv_bfloat16* __restrict__ norm,  // [K] RMSNorm weight, or nullptr for no norm
    float eps,                               // RMSNorm epsilon
    int unit_offset,                         // 1: Gemma's (1 + w) norm weight
    uint8_t* __restrict__ out,               // [M, K] e4m3 bytes
    float* __restrict__ row_scale,           // [M] fp32 scales
    int k) {
  static_assert(CH == 0 || V == 8, "the register-cached row uses 16-byte loads");
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* xr = x + row * k;
  auto load = [&](const __nv_bfloat16* base, int i, float (&v)[V]) {
    if constexpr (V == 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(base + i);
      const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = bf16_to_float(h[j]);
    } else {
      v[0] = bf16_to_float(base[i]);
    }
  };
  // The two roundings adaq.layers.norm uses: Gemma (normed * (1 + w)) in fp32; Qwen3 w * bf16(normed) in bf16.
  auto normalise = [&](int i, float inv_rms, float (&v)[V]) {
    float w[V];
    load(norm, i, w);
#pragma unroll
    for (int j = 0; j < V; ++j)
      v[j] = unit_offset ? bf16_to_float(__float2bfloat16_rn(v[j] * inv_rms * (1.f + w[j])))
                         : bf16_to_float(__float2bfloat16_rn(w[j] * bf16_to_float(__float2bfloat16_rn(v[j] * inv_rms))));
  };
  auto inverse_rms = [&](float sq) {  // IEEE sqrt and division, not approx
    return 1.f / sqrtf(block_reduce<false>(sq, scratch) / k + eps);
  };
  auto store = [&](int i, const float (&v)[V], float scale) {
    if constexpr (V == 8) {
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        lo |= static_cast<uint32_t>(float_to_e4m3_exact(__fdiv_rn(v[j], scale))) << (8 * j);
        hi |= static_cast<uint32_t>(float_to_e4m3_exact(__fdiv_rn(v[j + 4], scale))) << (8 * j);
      }
      *reinterpret_cast<uint2*>(out + row * k + i) = make_uint2(lo, hi);
    } else {
      out[row * k + i] = float_to_e4m3_exact(__fdiv_rn(v[0], scale));
    }
  };
  float scale;
  if constexpr (CH > 0) {
    float cached[CH][V];
    float sq = 0.f, amax = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int i = (threadIdx.x + c * kQuantThreads) * V;
#pragma unroll
      for (int j = 0; j < V; ++j) cached[c][j] = 0.f;
      if (i < k) load(xr, i, cached[c]);
#pragma unroll
      for (int j = 0; j < V; ++j) sq = fmaf(cached[c][j], cached[c][j], sq);
    }
    const float inv_rms = norm != nullptr ? inverse_rms(sq) : 1.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int i = (threadIdx.x + c * kQuantThreads) * V;
      if (norm != nullptr && i < k) normalise(i, inv_rms, cached[c]);
#pragma unroll
      for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(cached[c][j]));
    }
    scale = fmaxf(__fdiv_rn(block_reduce<true>(amax, scratch), kE4M3Max), kMinRowScale);
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int i = (threadIdx.x + c * kQuantThreads) * V;
      if (i < k) store(i, cached[c], scale);
    }
  } else {
    float inv_rms = 1.f;
    if (norm != nullptr) {
      float sq = 0.f;
      for (int i = threadIdx.x * V; i < k; i += kQuantThreads * V) {
        float v[V];
        load(xr, i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) sq = fmaf(v[j], v[j], sq);
      }
      inv_rms = inverse_rms(sq);
    }
    auto values = [&](int i, float (&v)[V]) {
      load(xr, i, v);
      if (norm != nullptr) normalise(i, inv_rms, v);
    };
    float amax = 0.f;
    for (int i = threadIdx.x * V; i < k; i += kQuantThreads * V) {
      float v[V];
      values(i, v);
#pragma unroll
      for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(v[j]));
    }
    scale = fmaxf(__fdiv_rn(block_reduce<true>(amax, scratch), kE4M3Max), kMinRowScale);
    for (int i = threadIdx.x * V; i < k; i += kQuantThreads * V) {
      float v[V];
      values(i, v);
      store(i, v, scale);
    }
  }
  if (threadIdx.x == 0) row_scale[row] = scale;
}

// E2M1 magnitude index (0..7) -> float.
__device__ __forceinline__ float e2m1_magnitude(int index) {
  constexpr float kGrid[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  return kGrid[index];
}

// Four E2M1 codes (the nibbles of `codes16`, first value lowest) -> four E4M3 bytes through the block's table of
// the eight magnitudes (bytes 0..7 of lut_lo:lut_hi): one byte permute selects them, the sign bits (bit 3 of each
// nibble) move to bit 7 of each byte. RNE and the clamp are symmetric, so e4m3(-v) = 0x80 | e4m3(v), -0 included.
__device__ __forceinline__ uint32_t expand4(uint32_t codes16, uint32_t lut_lo, uint32_t lut_hi) {
  const uint32_t magnitudes = __byte_perm(lut_lo, lut_hi, codes16 & 0x7777u);
  const uint32_t signs = ((codes16 & 0x8u) << 4) | ((codes16 & 0x80u) << 8) | ((codes16 & 0x800u) << 12) |
                         ((codes16 & 0x8000u) << 16);
  return magnitudes | signs;
}

// NVFP4 -> E4M3 with one scale per output channel (one warp per row n), adaq.layers.fp8_prefill's spec:
//   c = max_k block_scale[n,k];  row_mul = 64 / c (IEEE division);  w8 = e4m3((e2m1 * block_scale) * row_mul);
//   col_scale[n] = (c / global_scale) * 2^-6.
// Per-16 block scales cannot be applied inside Ada's m16n8k32 FP8 MMA (one instruction spans two blocks), so they
// are folded into the E4M3 values; the only error is the E4M3 rounding of e2m1 * ratio (docs/KERNELS.md).
// A 16-value block has one factor, so only its 8 magnitudes are converted (exact fp32 product, exact RNE
// conversion) into an 8-byte table; the 16 values are then table lookups (byte permutes): the kernel stays
// bytes-bound instead of spending ~30 instructions per value on the conversion.
// One warp per row (8 rows per 256-thread block): the row max of the block scales is a warp reduction (no shared
// memory, no barrier), and lane l takes 16-value blocks l, l + 32, ... four at a time with every load issued before
// the first table is built, so a warp has 32 x 4 x 8 bytes of codes in flight and stores 2 KB per step contiguously.
// The first version (one 128-thread block per row, one 16-value block per thread per step) ran at ~2.0 TB/s on the
// H100 (device run 2, session 3).
constexpr int kExpandRowsPerBlock = 8;
constexpr int kExpandUnroll = 4;

__global__ void __launch_bounds__(kExpandRowsPerBlock * 32) expand_nvfp4_kernel(
    const uint8_t* __restrict__ packed,       // [N, K/2] two E2M1 codes per byte, element 2j in the low nibble
    const uint8_t* __restrict__ block_scale,  // [N, K/16] e4m3 block scales
    const float* __restrict__ global_scale,   // [1] the NVFP4 global scale (a divisor)
    uint8_t* __restrict__ out,                // [N, K] e4m3 workspace
    float* __restrict__ col_scale,            // [N] fp32 per-channel scales
    int n, int k) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kExpandRowsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;
  const int blocks = k / 16;
  const uint8_t* scales = block_scale + row * blocks;
  float cmax = 0.f;
  for (int b = lane; b < blocks; b += 32) cmax = fmaxf(cmax, e4m3x2_to_float2(__ldg(scales + b)).x);
  cmax = warp_max(cmax);
  const float row_mul = __fdiv_rn(kWeightHeadroom, cmax > 0.f ? cmax : 1.f);  // 64 / c, as the reference
  const uint2* codes_row = reinterpret_cast<const uint2*>(packed + row * (k / 2));
  uint4* out_row = reinterpret_cast<uint4*>(out + row * k);
  for (int b0 = lane; b0 < blocks; b0 += 32 * kExpandUnroll) {
    uint2 codes[kExpandUnroll];
    uint8_t scale[kExpandUnroll];
#pragma unroll
    for (int u = 0; u < kExpandUnroll; ++u) {
      const int b = b0 + 32 * u;
      codes[u] = b < blocks ? __ldg(codes_row + b) : make_uint2(0u, 0u);
      scale[u] = b < blocks ? __ldg(scales + b) : 0;
    }
#pragma unroll
    for (int u = 0; u < kExpandUnroll; ++u) {
      const int b = b0 + 32 * u;
      if (b >= blocks) break;
      // One block scale per 16 values: its 8 magnitudes become an 8-byte table, the 16 values byte permutes.
      // e4m3((magnitude x block_scale) x row_mul): the first product is exact (<= 6 significant bits).
      const float block = e4m3x2_to_float2(scale[u]).x;
      uint32_t lut_lo = 0, lut_hi = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        lut_lo |= static_cast<uint32_t>(float_to_e4m3_exact(__fmul_rn(__fmul_rn(e2m1_magnitude(i), block), row_mul)))
                  << (8 * i);
        lut_hi |= static_cast<uint32_t>(
                      float_to_e4m3_exact(__fmul_rn(__fmul_rn(e2m1_magnitude(4 + i), block), row_mul)))
                  << (8 * i);
      }
      out_row[b] = make_uint4(expand4(codes[u].x & 0xFFFFu, lut_lo, lut_hi), expand4(codes[u].x >> 16, lut_lo, lut_hi),
                              expand4(codes[u].y & 0xFFFFu, lut_lo, lut_hi), expand4(codes[u].y >> 16, lut_lo, lut_hi));
    }
  }
  if (lane == 0) col_scale[row] = __fmul_rn(__fdiv_rn(cmax, *global_scale), 1.f / kWeightHeadroom);
}

int quantize_rows(const void* x, const void* norm, float eps, int unit_offset, void* out, float* row_scale, int m,
                  int k, cudaStream_t stream) {
  if (m <= 0 || k <= 0) return kUnsupportedShape;
  const bool vector = k % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
                      (reinterpret_cast<uintptr_t>(out) & 7) == 0 &&
                      (norm == nullptr || (reinterpret_cast<uintptr_t>(norm) & 15) == 0);
  const int chunks = vector ? (k + kQuantThreads * 8 - 1) / (kQuantThreads * 8) : 0;
  auto* launch = !vector ? quantize_rows_kernel<1, 0>
                 : chunks <= 2 ? quantize_rows_kernel<8, 2>
                 : chunks <= 4 ? quantize_rows_kernel<8, 4>
                               : quantize_rows_kernel<8, 0>;
  launch<<<m, kQuantThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(norm),
                                          eps, unit_offset, static_cast<uint8_t*>(out), row_scale, k);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int expand_nvfp4(const void* packed, const void* block_scale, const float* global_scale, void* out, float* col_scale,
                 int n, int k, cudaStream_t stream) {
  if (n <= 0 || k <= 0 || k % 16) return kUnsupportedShape;
  const unsigned grid = static_cast<unsigned>((n + kExpandRowsPerBlock - 1) / kExpandRowsPerBlock);
  expand_nvfp4_kernel<<<grid, kExpandRowsPerBlock * 32, 0, stream>>>(static_cast<const uint8_t*>(packed),
                                                                      static_cast<const uint8_t*>(block_scale),
                                                                      global_scale, static_cast<uint8_t*>(out),
                                                                      col_scale, n, k);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace adaq
