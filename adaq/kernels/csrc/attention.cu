// Paged KV cache: the FP8 store kernel and paged attention over it (flash-decoding with a merge kernel): v3 on
// tensor cores (decode, and prefill with several queries per block), v2 on CUDA cores for what v3 does not cover
// (bf16 head_dim 256, pages not a multiple of 16 keys) and for comparison (attention_set_variant).
//
// Cache per layer: [num_blocks, block_size, num_kv_heads, head_dim], E4M3 bytes or bf16; FP8 caches carry fp32
// scales [num_blocks, block_size, num_kv_heads]: s = max(amax(|x[token, head, :]|) / 448, 1e-12), stored
// e4m3(x / s) (docs/ARCHITECTURE.md). NVFP4 caches: rows of D/2 bytes of E2M1 pairs + D/16 E4M3 block scales, and
// a uint8 E8M0 exponent per (token, head) where FP8 keeps its fp32 scale (store_kv_nvfp4_kernel; the decode kernel's
// NV4 path dequantizes in registers to f16 for the same tensor-core loop). Slot = block * block_size + offset; slot -1 is skipped (padded rows of a
// CUDA-graph batch).
//
// Attention: each query token t attends to keys [start, ctx) of its sequence, ctx = its position + 1, start =
// ctx - window for sliding layers. No kernel reads a key before its first query's window start, nor the block-table
// entry of a block that lies wholly before it: the engine's window-sized KV gives those blocks back to other
// sequences and leaves a null block id in their entries (adaq/engine/block_manager.py). One block serves one (query
// token or block of queries, KV head, split): the G = H / Hkv query heads of the group share each K/V byte read
// (GQA), and long contexts are cut into `splits` ranges merged afterwards. Design, numerics and measurements:
// docs/KERNELS.md ("Attention v3").
#include "common.cuh"

namespace adaq {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kAttnThreads = 128;

// ---- KV store ------------------------------------------------------------------------------------------------
//
// One warp per (token, KV head, K-or-V) row of D values, D/32 per lane (lane L holds values L*D/32 ..), in fp32
// registers; `store_row_*` write the bytes the reference writes (adaq.backends.numerics.attention), bit for bit:
// the store kernels below and the fused decode prologue (qk_norm_rope_store_kernel) share them.

// bf16 cache: the values as they are (each x[i] is a bf16 value widened, so the rounding is exact).
template <int D>
__device__ __forceinline__ void store_row_bf16(const float (&x)[D / 32], __nv_bfloat16* __restrict__ cache,
                                               long long row, int lane) {
  __nv_bfloat16* dst = cache + row * D + lane * (D / 32);
#pragma unroll
  for (int i = 0; i < D / 32; ++i) dst[i] = __float2bfloat16_rn(x[i]);
}

// FP8 cache: amax by warp reduction, then e4m3(x / s) with IEEE division as the reference computes it (no
// reciprocal multiply: the stored bytes match the reference bit for bit); s to the fp32 scale tensor.
template <int D>
__device__ __forceinline__ void store_row_fp8(const float (&x)[D / 32], uint8_t* __restrict__ cache,
                                              float* __restrict__ scale, long long row, long long scale_at,
                                              int lane) {
  constexpr int kPerLane = D / 32;
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) amax = fmaxf(amax, fabsf(x[i]));
  amax = warp_max(amax);
  const float s = fmaxf(amax / 448.f, 1e-12f);
  uint8_t* dst = cache + row * D + lane * kPerLane;
#pragma unroll
  for (int i = 0; i < kPerLane; i += 2) {
    const uint16_t two = static_cast<uint16_t>(float_to_e4m3_exact(__fdiv_rn(x[i], s))) |
                         static_cast<uint16_t>(float_to_e4m3_exact(__fdiv_rn(x[i + 1], s)) << 8);
    *reinterpret_cast<uint16_t*>(dst + i) = two;
  }
  if (lane == 0) scale[scale_at] = s;
}

// The store kernels' warp: one (token, KV head, K or V) row per warp, D / 32 consecutive values per lane read as
// fp32 into x. False for warps past the last row and for tokens whose slot is -1 (padding): nothing to store.
struct StoreRow {
  int which, h, lane;  // which: 0 = K, 1 = V
  long long slot;
};
template <int D>
__device__ __forceinline__ bool load_store_row(const __nv_bfloat16* __restrict__ k,
                                               const __nv_bfloat16* __restrict__ v, long long k_tok_stride,
                                               long long v_tok_stride, const long long* __restrict__ slots,
                                               int tokens, int kv_heads, float (&x)[D / 32], StoreRow& row) {
  const int warp_global = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  row.lane = threadIdx.x & 31;
  row.which = warp_global & 1;
  const int pair = warp_global >> 1, t = pair / kv_heads;
  row.h = pair % kv_heads;
  if (t >= tokens) return false;
  row.slot = slots[t];
  if (row.slot < 0) return false;
  const __nv_bfloat16* src =
      (row.which ? v + t * v_tok_stride : k + t * k_tok_stride) + row.h * D + row.lane * (D / 32);
#pragma unroll
  for (int i = 0; i < D / 32; ++i) x[i] = __bfloat162float(src[i]);
  return true;
}

template <int D, bool FP8>
__global__ void store_kv_kernel(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                long long k_tok_stride, long long v_tok_stride,  // elements between tokens
                                void* __restrict__ k_cache, void* __restrict__ v_cache,
                                float* __restrict__ k_scale, float* __restrict__ v_scale,
                                const long long* __restrict__ slots, int tokens, int kv_heads,
                                int slot_rows, int scale_stride) {  // rows / scales from one cache slot to the next
  float x[D / 32];
  StoreRow r;
  if (!load_store_row<D>(k, v, k_tok_stride, v_tok_stride, slots, tokens, kv_heads, x, r)) return;
  const int which = r.which, h = r.h, lane = r.lane;
  const long long slot = r.slot;
  const long long row = slot * slot_rows + h;  // this (token, head)'s row; slots may be wider than kv_heads rows
  if constexpr (FP8)
    store_row_fp8<D>(x, static_cast<uint8_t*>(which ? v_cache : k_cache), which ? v_scale : k_scale, row,
                     slot * scale_stride + h, lane);
  else
    store_row_bf16<D>(x, static_cast<__nv_bfloat16*>(which ? v_cache : k_cache), row, lane);
}

int store_kv(const __nv_bfloat16* k, const __nv_bfloat16* v, long long k_tok_stride, long long v_tok_stride,
             void* k_cache, void* v_cache, float* k_scale, float* v_scale, const long long* slots, int tokens,
             int kv_heads, int head_dim, int slot_rows, int scale_stride, bool fp8, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  const int warps = tokens * kv_heads * 2;
  const int blocks = ceil_div(warps * 32, 256);
#define ADAQ_STORE(DIM)                                                                                          \
  if (head_dim == DIM) {                                                                                        \
    if (fp8)                                                                                                    \
      store_kv_kernel<DIM, true><<<blocks, 256, 0, stream>>>(k, v, k_tok_stride, v_tok_stride, k_cache, v_cache, \
                                                             k_scale, v_scale, slots, tokens, kv_heads,         \
                                                             slot_rows, scale_stride);                          \
    else                                                                                                        \
      store_kv_kernel<DIM, false><<<blocks, 256, 0, stream>>>(k, v, k_tok_stride, v_tok_stride, k_cache,         \
                                                              v_cache, k_scale, v_scale, slots, tokens, kv_heads, \
                                                              slot_rows, scale_stride);                         \
    return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;                                                \
  }
  ADAQ_STORE(64)
  ADAQ_STORE(128)
  ADAQ_STORE(256)
  ADAQ_STORE(512)
#undef ADAQ_STORE
  return kUnsupportedShape;
}

// ---- NVFP4 KV store (docs/ARCHITECTURE.md "NVFP4 KV cache scheme") ---------------------------------------------
//
// Row of one (token, head): D/2 bytes of E2M1 pairs (dim 2j in the low nibble), then D/16 E4M3 block scales; the
// E8M0 exponent e + 127 goes to the scale tensor (uint8 [blocks, block_size, Hkv]). One warp per (token, KV head,
// K-or-V), D/32 values per lane, so a block of 16 values is 512/D consecutive lanes (D 512: one lane, 8 bytes). Every operation is the
// reference's, rounding for rounding (adaq.backends.numerics.attention.quantize_kv_nvfp4): amax / 2688 and
// amax(block) / 6 and x / step with IEEE division, products with powers of two (exact), E4M3 by
// float_to_e4m3_exact; the stored bytes match the reference bit for bit.

// E2M1 code of q (round to nearest, ties to the even code, saturating at 6), the sign in bit 3 for q < 0: the
// reference's bucketize over the midpoints 0.25 0.75 1.25 1.75 2.5 3.5 5 (a tie goes to the even neighbour: down at
// 0.25, 1.25, 2.5, 5; up at 0.75, 1.75, 3.5).
__device__ __forceinline__ uint32_t e2m1_encode(float q) {
  const float a = fabsf(q);
  const uint32_t code = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.f);
  return code | (q < 0.f ? 8u : 0u);
}

// The smallest e with amax / 2^e <= 6 * 448, clamped to [-100, 100] (0 or an fp32 subnormal ratio: -100).
__device__ __forceinline__ int nvfp4_kv_exponent(float amax) {
  const uint32_t bits = __float_as_uint(__fdiv_rn(amax, 2688.f));
  const int biased = static_cast<int>(bits >> 23);
  if (biased == 0) return -100;  // 0 or below 2^-126: far under the clamp anyway
  const int e = biased - 127 + ((bits & 0x007FFFFFu) != 0u);  // ceil(log2(ratio)) from the exponent field
  return min(100, max(-100, e));
}

template <int D>
__device__ __forceinline__ void store_row_nvfp4(const float (&x)[D / 32], uint8_t* __restrict__ cache,
                                                uint8_t* __restrict__ exps, long long row, long long exp_at,
                                                int lane) {
  constexpr int kPerLane = D / 32;          // 2, 4, 8, 16 values: 1, 2, 4, 8 packed bytes
  constexpr int kBlockLanes = 16 / kPerLane;  // lanes of one 16-value block: 8, 4, 2, 1
  constexpr int kRow = D / 2 + D / 16;
  float bmax = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) bmax = fmaxf(bmax, fabsf(x[i]));
  const int e = nvfp4_kv_exponent(warp_max(bmax));
#pragma unroll
  for (int o = 1; o < kBlockLanes; o <<= 1) bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, o));
  const float inv_pow2 = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);  // 2^-e, exact
  uint8_t sbyte = float_to_e4m3_exact(fminf(__fdiv_rn(bmax, 6.f) * inv_pow2, 448.f));
  if ((sbyte & 0x7Fu) == 0u) sbyte = 0x20u;  // a zero scale becomes 0.125 (as for weights): no 0 / 0
  const float step = e4m3x2_to_float2(sbyte).x * __uint_as_float(static_cast<uint32_t>(127 + e) << 23);
  unsigned long long packed = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    packed |= static_cast<unsigned long long>(e2m1_encode(__fdiv_rn(x[i], step))) << (4 * i);
  uint8_t* dst = cache + row * kRow;
  if constexpr (kPerLane == 2) {
    dst[lane] = static_cast<uint8_t>(packed);
  } else if constexpr (kPerLane == 4) {
    reinterpret_cast<uint16_t*>(dst)[lane] = static_cast<uint16_t>(packed);  // row offsets: multiples of 8
  } else if constexpr (kPerLane == 8) {
    reinterpret_cast<uint32_t*>(dst)[lane] = static_cast<uint32_t>(packed);  // rows of 144 bytes: 16-byte aligned
  } else {
    reinterpret_cast<uint2*>(dst)[lane] =  // rows of 288 bytes: 16-byte aligned
        make_uint2(static_cast<uint32_t>(packed), static_cast<uint32_t>(packed >> 32));
  }
  if (lane % kBlockLanes == 0) dst[D / 2 + lane / kBlockLanes] = sbyte;
  if (lane == 0) exps[exp_at] = static_cast<uint8_t>(e + 127);
}

template <int D>
__global__ void store_kv_nvfp4_kernel(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                      long long k_tok_stride, long long v_tok_stride,  // elements between tokens
                                      uint8_t* __restrict__ k_cache, uint8_t* __restrict__ v_cache,  // rows
                                      uint8_t* __restrict__ k_exp, uint8_t* __restrict__ v_exp,  // [slot, Hkv]
                                      const long long* __restrict__ slots, int tokens, int kv_heads,
                                      int slot_rows, int scale_stride) {  // rows / exponents between slots
  float x[D / 32];
  StoreRow r;
  if (!load_store_row<D>(k, v, k_tok_stride, v_tok_stride, slots, tokens, kv_heads, x, r)) return;
  const int which = r.which, h = r.h, lane = r.lane;
  const long long slot = r.slot;
  store_row_nvfp4<D>(x, which ? v_cache : k_cache, which ? v_exp : k_exp, slot * slot_rows + h,
                     slot * scale_stride + h, lane);
}

int store_kv_nvfp4(const __nv_bfloat16* k, const __nv_bfloat16* v, long long k_tok_stride, long long v_tok_stride,
                   void* k_cache, void* v_cache, void* k_exp, void* v_exp, const long long* slots, int tokens,
                   int kv_heads, int head_dim, int slot_rows, int scale_stride, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  const int blocks = ceil_div(tokens * kv_heads * 2 * 32, 256);
#define ADAQ_STORE_NV4(DIM)                                                                                       \
  if (head_dim == DIM) {                                                                                         \
    store_kv_nvfp4_kernel<DIM><<<blocks, 256, 0, stream>>>(                                                      \
        k, v, k_tok_stride, v_tok_stride, static_cast<uint8_t*>(k_cache), static_cast<uint8_t*>(v_cache),         \
        static_cast<uint8_t*>(k_exp), static_cast<uint8_t*>(v_exp), slots, tokens, kv_heads, slot_rows,         \
        scale_stride);                                                                                           \
    return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;                                                 \
  }
  ADAQ_STORE_NV4(64)
  ADAQ_STORE_NV4(128)
  ADAQ_STORE_NV4(256)
  ADAQ_STORE_NV4(512)
#undef ADAQ_STORE_NV4
  return kUnsupportedShape;
}

// ---- Fused decode prologue: q/k RMSNorm + RoPE + KV store in one launch -----------------------------------------
//
// A decode step's attention prologue was four launches per layer (q norm, k norm, RoPE, KV store), each a few us of
// fixed cost on a few KB of data. Here one warp per (token, head slot): slots [0, H) are query heads (norm with
// q_weight, RoPE, written to q_out), [H, H + Hkv) key heads (norm with k_weight, RoPE, stored to the K cache),
// [H + Hkv, H + 2 Hkv) value heads (stored as they are). Lane L holds values [L * D/32, (L + 1) * D/32) in fp32
// registers; the RoPE partner of value j (j + D/2, rotate-half) sits in lane L + 16 at the same offset, one shuffle
// away, so a row is read once and never goes through memory between the three steps. Rounding is the reference
// composition's, op after op: rms_norm (fp32, bf16 rounding in the model's order: elementwise.cu normalize8), RoPE
// (cos/sin of the fp32 angle rounded to bf16, each product and the sum rounded to bf16: elementwise.cu
// rotary_kernel), then the cache format's store (store_row_*). Only the order of the sum of squares differs from
// torch's mean (fp32), as for the RMSNorm kernels. Padded rows (slot -1) store nothing; their queries are computed.

// The warp's row (D/32 values per lane) RMS-normalised and weighted, rounded to bf16 as the reference rounds it.
template <int D, bool UNIT_OFFSET>
__device__ __forceinline__ void rms_norm_row(float (&x)[D / 32], const __nv_bfloat16* __restrict__ w, float eps,
                                             int lane) {
  constexpr int kPerLane = D / 32;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sq = fmaf(x[i], x[i], sq);
  const float inv = rsqrtf(warp_sum(sq) / D + eps);
  auto bf16 = [](float v) { return __bfloat162float(__float2bfloat16_rn(v)); };
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float normed = x[i] * inv, weight = __bfloat162float(w[lane * kPerLane + i]);
    x[i] = UNIT_OFFSET ? bf16(normed * (1.f + weight)) : bf16(weight * bf16(normed));
  }
}

// Rotate-half RoPE of the warp's row at `position`: lanes 0-15 hold the first half (x1), lanes 16-31 the second (x2).
template <int D>
__device__ __forceinline__ void rope_row(float (&x)[D / 32], long long position, const float* __restrict__ inv_freq,
                                         int lane) {
  constexpr int kPerLane = D / 32;
  auto bf16 = [](float v) { return __bfloat162float(__float2bfloat16_rn(v)); };
  const bool second = lane >= 16;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float partner = __shfl_xor_sync(0xffffffffu, x[i], 16);
    const float angle = static_cast<float>(position) * inv_freq[(lane & 15) * kPerLane + i];
    const float c = bf16(cosf(angle)), s = bf16(sinf(angle));
    x[i] = second ? bf16(bf16(x[i] * c) + bf16(partner * s))     // x2 c + x1 s
                  : bf16(bf16(x[i] * c) + bf16(-partner * s));   // x1 c - x2 s
  }
}

template <int D, int FORMAT, bool UNIT_OFFSET>  // FORMAT: the cache's KvFormat (0 bf16, 1 FP8, 2 NVFP4)
__global__ void qk_norm_rope_store_kernel(
    const __nv_bfloat16* __restrict__ q, long long q_tok_stride,  // [T, H, D], dense heads; elements between tokens
    const __nv_bfloat16* __restrict__ k, long long k_tok_stride,  // [T, Hkv, D]
    const __nv_bfloat16* __restrict__ v, long long v_tok_stride,  // [T, Hkv, D]
    const __nv_bfloat16* __restrict__ q_weight,                   // [D] q_norm weight
    const __nv_bfloat16* __restrict__ k_weight,                   // [D] k_norm weight
    float eps,                                                    // RMSNorm epsilon
    const long long* __restrict__ positions,                      // [T] token positions
    const float* __restrict__ inv_freq,                           // [D/2] RoPE inverse frequencies
    __nv_bfloat16* __restrict__ q_out,                            // [T, H, D] contiguous: normed, rotated queries
    void* __restrict__ k_cache, void* __restrict__ v_cache,       // this layer's cache rows (FORMAT)
    void* __restrict__ k_scale, void* __restrict__ v_scale,       // fp32 scales (FP8) or uint8 exponents (NVFP4)
    const long long* __restrict__ slots,                          // [T] cache slot per token, -1 = skip
    int tokens, int heads, int kv_heads) {
  constexpr int kPerLane = D / 32;
  const int warp_global = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  const int per_token = heads + 2 * kv_heads;
  const int t = warp_global / per_token, head_slot = warp_global % per_token;
  if (t >= tokens) return;
  const int kind = head_slot < heads ? 0 : (head_slot < heads + kv_heads ? 1 : 2);  // q, k, v (warp-uniform)
  const int h = head_slot - (kind == 0 ? 0 : (kind == 1 ? heads : heads + kv_heads));
  const long long slot = slots[t];
  if (kind != 0 && slot < 0) return;
  const __nv_bfloat16* src = (kind == 0 ? q + t * q_tok_stride : kind == 1 ? k + t * k_tok_stride
                                                                           : v + t * v_tok_stride) + h * D;
  float x[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) x[i] = __bfloat162float(src[lane * kPerLane + i]);
  if (kind != 2) {
    rms_norm_row<D, UNIT_OFFSET>(x, kind == 0 ? q_weight : k_weight, eps, lane);
    rope_row<D>(x, positions[t], inv_freq, lane);
  }
  if (kind == 0) {
    __nv_bfloat16* dst = q_out + (static_cast<long long>(t) * heads + h) * D + lane * kPerLane;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[i] = __float2bfloat16_rn(x[i]);
    return;
  }
  const long long row = slot * kv_heads + h;
  void* cache = kind == 1 ? k_cache : v_cache;
  void* scale = kind == 1 ? k_scale : v_scale;
  if constexpr (FORMAT == 0) store_row_bf16<D>(x, static_cast<__nv_bfloat16*>(cache), row, lane);
  if constexpr (FORMAT == 1)
    store_row_fp8<D>(x, static_cast<uint8_t*>(cache), static_cast<float*>(scale), row, row, lane);
  if constexpr (FORMAT == 2)
    store_row_nvfp4<D>(x, static_cast<uint8_t*>(cache), static_cast<uint8_t*>(scale), row, row, lane);
}

// Instantiations: D in {64, 128, 256} x format {bf16, FP8, NVFP4} x norm {w * x, (1 + w) * x}; anything else is
// kUnsupportedShape (the binding names head_dim).
int qk_norm_rope_store(const __nv_bfloat16* q, long long q_tok_stride, const __nv_bfloat16* k, long long k_tok_stride,
                       const __nv_bfloat16* v, long long v_tok_stride, const __nv_bfloat16* q_weight,
                       const __nv_bfloat16* k_weight, float eps, bool unit_offset, const long long* positions,
                       const float* inv_freq, __nv_bfloat16* q_out, void* k_cache, void* v_cache, void* k_scale,
                       void* v_scale, const long long* slots, int tokens, int heads, int kv_heads, int head_dim,
                       int kv_format, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (kv_format < 0 || kv_format > 2) return kUnsupportedShape;
  const int blocks = ceil_div(tokens * (heads + 2 * kv_heads) * 32, 256);
#define ADAQ_PROLOGUE(DIM, FORMAT, UNIT)                                                                          \
  if (head_dim == DIM && kv_format == FORMAT && unit_offset == UNIT) {                                           \
    qk_norm_rope_store_kernel<DIM, FORMAT, UNIT><<<blocks, 256, 0, stream>>>(                                     \
        q, q_tok_stride, k, k_tok_stride, v, v_tok_stride, q_weight, k_weight, eps, positions, inv_freq, q_out,   \
        k_cache, v_cache, k_scale, v_scale, slots, tokens, heads, kv_heads);                                      \
    return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;                                                 \
  }
#define ADAQ_PROLOGUE_DIM(DIM)                                                                                    \
  ADAQ_PROLOGUE(DIM, 0, false) ADAQ_PROLOGUE(DIM, 1, false) ADAQ_PROLOGUE(DIM, 2, false)                          \
  ADAQ_PROLOGUE(DIM, 0, true) ADAQ_PROLOGUE(DIM, 1, true) ADAQ_PROLOGUE(DIM, 2, true)
  ADAQ_PROLOGUE_DIM(64)
  ADAQ_PROLOGUE_DIM(128)
  ADAQ_PROLOGUE_DIM(256)
#undef ADAQ_PROLOGUE_DIM
#undef ADAQ_PROLOGUE
  return kUnsupportedShape;
}

// ---- Decode attention ----------------------------------------------------------------------------------------

struct AttnParams {
  const __nv_bfloat16* q;        // [T, H, D], token stride q_stride
  const void* k_cache;           // [blocks, block_size, Hkv, D] e4m3 bytes or bf16
  const void* v_cache;
  const float* k_scale;          // [blocks, block_size, Hkv] (FP8 only)
  const float* v_scale;
  const int* block_tables;       // [B, table_stride]
  const int* context_lens;       // [B] keys in cache per sequence (decode: the query sits at context_len - 1)
  const int* query_seq;          // [T] sequence of each query, or nullptr: query t is sequence t (decode)
  const int* query_ctx;          // [T] keys visible to each query (its position + 1), or nullptr: context_lens
  const int* query_blocks;       // prefill kernel: [blocks, 3] (sequence, first query token, count), count <= 0: none
  __nv_bfloat16* out;            // [T, H, D] contiguous
  float* part_out;               // [T, H, splits, D] normalised partial outputs (splits > 1)
  float* part_lse;               // [T, H, splits] log2-sum-exp of each split (splits > 1)
  long long q_stride;
  int slot_rows;                 // (head_dim or NVFP4) rows from one cache slot (token) to the next: Hkv when the
                                 // layer owns its cache, more when it is a view into a wider slot (Gemma 4)
  int scale_stride;              // scales (NVFP4: exponents) from one slot to the next
  int table_stride, block_size, kv_heads, heads, splits, window;
  float scale_log2;              // softmax scale (softcap off) or 1 (softcap on), times log2(e) when off
  float softcap;                 // 0 = off
  float scale;                   // softmax scale
  float softcap_in, softcap_out;  // scale / softcap and softcap * log2(e) (softcap on): no division per score
  int tokens_total;              // query tokens of the step (rows of out)
  int* counters;                 // tensor-core kernel, splits > 1: arrival counters per (token, KV head), zero
                                 // between launches (the last block resets its own): that block merges the splits
                                 // itself, no merge kernel. nullptr: merge_splits_kernel.
};

// One lane's VPL consecutive cache values of one token as raw 32-bit words (16 bytes per load): kept raw in
// registers until used, so that many tokens' loads can be in flight per thread (a decoded fp32 copy would cost 4x
// the registers for FP8). FP8: 4 values per word; bf16: 2.
template <int VPL, bool FP8>
struct RawRow {
  static constexpr int kWords = FP8 ? VPL / 4 : VPL / 2;
  uint32_t w[kWords];
  __device__ __forceinline__ void load(const void* base, long long elem_offset) {
    const uint8_t* ptr = static_cast<const uint8_t*>(base) + elem_offset * (FP8 ? 1 : 2);
#pragma unroll
    for (int i = 0; i < kWords; i += 4) {
      if (kWords - i >= 4) {
        const uint4 r = __ldg(reinterpret_cast<const uint4*>(ptr) + i / 4);
        w[i] = r.x; w[i + 1] = r.y; w[i + 2] = r.z; w[i + 3] = r.w;
      } else {
        const uint2 r = __ldg(reinterpret_cast<const uint2*>(ptr) + i / 2);
        w[i] = r.x; w[i + 1] = r.y;
      }
    }
  }
  // Value i (compile-time index after unrolling) as fp32: E4M3 pairs via cvt.rn.f16x2.e4m3x2, bf16 by a shift.
  __device__ __forceinline__ float2 pair(int i) const {  // values 2i, 2i+1
    if constexpr (FP8) {
      return e4m3x2_to_float2(static_cast<uint16_t>(w[i / 2] >> (16 * (i & 1))));
    } else {
      return make_float2(__uint_as_float(w[i] << 16), __uint_as_float(w[i] & 0xFFFF0000u));
    }
  }
};

// D: head dim; G: query heads per KV head; VPL: values per lane (a token's row is spread over D / VPL lanes, 16-byte
// loads); UT: tokens per lane group per step, all their K/V loads issued before the first is used (raw, so UT can
// be large: the kernel is bound by the bytes in flight per SM, not by arithmetic), one softmax rescale per step.
template <int D, int G, int VPL, int UT, bool FP8>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_kernel(const AttnParams p) {
  constexpr int kLanesPerToken = D / VPL;
  constexpr int kSlots = kAttnThreads / kLanesPerToken;  // tokens per block per unrolled position
  __shared__ float red_m[kSlots][G], red_l[kSlots][G];
  __shared__ float red_acc[kSlots][G * D];  // <= 32 KB for the instantiated (D, G, VPL)

  const int tid = threadIdx.x, slot = tid / kLanesPerToken, sub = tid % kLanesPerToken;
  const int split = blockIdx.x, kvh = blockIdx.y, t = blockIdx.z;
  const int seq = p.query_seq ? p.query_seq[t] : t;
  const int ctx = p.query_ctx ? p.query_ctx[t] : p.context_lens[seq];
  const int start = p.window > 0 ? max(0, ctx - p.window) : 0;
  const int per_split = ceil_div(max(ctx - start, 0), p.splits);
  const int t0 = start + split * per_split, t1 = min(ctx, t0 + per_split);
  const int* table = p.block_tables + static_cast<long long>(seq) * p.table_stride;

  // q for this lane's dims, pre-scaled so the dot product is already in log2 units (softcap off).
  float q[G][VPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const __nv_bfloat16* qp = p.q + t * p.q_stride + (kvh * G + g) * D + sub * VPL;
#pragma unroll
    for (int i = 0; i < VPL; ++i) q[g][i] = __bfloat162float(qp[i]) * p.scale_log2;
  }

  float m[G], l[G], acc[G][VPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -1e30f;  // finite: exp2(m_old - m_new) stays 0 or 1, never NaN, before the first real score
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) acc[g][i] = 0.f;
  }

  // The trip count is the same for every lane (the xor shuffles below need the whole warp); lanes past t1 mask.
  for (int base = t0; base < t1; base += kSlots * UT) {
    // ---- Fetch: UT tokens' raw K and V rows and scales, all requested before any is used.
    RawRow<VPL, FP8> kr[UT], vr[UT];
    float ks[UT], vs[UT];
    bool valid[UT];
#pragma unroll
    for (int u = 0; u < UT; ++u) {
      const int tok = base + slot + u * kSlots;
      valid[u] = tok < t1;
      const int tk = valid[u] ? tok : t0;
      const long long cache_row = static_cast<long long>(table[tk / p.block_size]) * p.block_size + tk % p.block_size;
      const long long elem = (cache_row * p.slot_rows + kvh) * D + sub * VPL;
      kr[u].load(p.k_cache, elem);
      vr[u].load(p.v_cache, elem);
      if constexpr (FP8) {
        ks[u] = __ldg(p.k_scale + cache_row * p.scale_stride + kvh);
        vs[u] = __ldg(p.v_scale + cache_row * p.scale_stride + kvh);
      } else {
        ks[u] = 1.f;
        vs[u] = 1.f;
      }
    }
    // ---- Scores: partial dot over this lane's dims, summed across the token's lanes by xor shuffles.
    float s[UT][G];
#pragma unroll
    for (int u = 0; u < UT; ++u) {
      float d[G];
#pragma unroll
      for (int g = 0; g < G; ++g) d[g] = 0.f;
#pragma unroll
      for (int i = 0; i < VPL / 2; ++i) {
        const float2 kv = kr[u].pair(i);
#pragma unroll
        for (int g = 0; g < G; ++g) d[g] = fmaf(q[g][2 * i + 1], kv.y, fmaf(q[g][2 * i], kv.x, d[g]));
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float x = d[g];
#pragma unroll
        for (int o = kLanesPerToken / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        x *= ks[u];
        if (p.softcap > 0.f) x = p.softcap * tanhf(x * p.scale / p.softcap) * kLog2e;
        s[u][g] = valid[u] ? x : -INFINITY;
      }
    }
    // ---- Online softmax (base 2) and P.V, one rescale per step.
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < UT; ++u) m_new = fmaxf(m_new, s[u][g]);
      const float alpha = exp2f(m[g] - m_new);
      m[g] = m_new;
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < VPL; ++i) acc[g][i] *= alpha;
    }
#pragma unroll
    for (int u = 0; u < UT; ++u) {
      float pv[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float pr = exp2f(s[u][g] - m[g]);
        l[g] += pr;
        pv[g] = pr * vs[u];
      }
#pragma unroll
      for (int i = 0; i < VPL / 2; ++i) {
        const float2 vv = vr[u].pair(i);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          acc[g][2 * i] = fmaf(pv[g], vv.x, acc[g][2 * i]);
          acc[g][2 * i + 1] = fmaf(pv[g], vv.y, acc[g][2 * i + 1]);
        }
      }
    }
  }

  // ---- Merge the kSlots lane groups of the block: common max, rescaled sums.
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) red_m[slot][g] = m[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float mx = -1e30f;
    for (int r = 0; r < kSlots; ++r) mx = fmaxf(mx, red_m[r][g]);
    const float f = exp2f(m[g] - mx);
    if (sub == 0) red_l[slot][g] = l[g] * f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) red_acc[slot][g * D + sub * VPL + i] = acc[g][i] * f;
    m[g] = mx;
  }
  __syncthreads();
  for (int i = tid; i < G * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    float a = 0.f, lsum = 0.f;
    for (int r = 0; r < kSlots; ++r) {
      a += red_acc[r][i];
      lsum += red_l[r][g];
    }
    const int head = kvh * G + g;
    const float o = lsum > 0.f ? a / lsum : 0.f;
    if (p.splits == 1) {
      p.out[(static_cast<long long>(t) * p.heads + head) * D + d] = __float2bfloat16_rn(o);
    } else {
      const long long row = (static_cast<long long>(t) * p.heads + head) * p.splits + split;
      p.part_out[row * D + d] = o;
      if (d == 0) p.part_lse[row] = lsum > 0.f ? m[g] + log2f(lsum) : -INFINITY;
    }
  }
}

// ---- Decode attention v3: QK^T and PV on tensor cores (mma.sync m16n8k16) --------------------------------------
//
// One block per (query token, KV head, split), 4 warps; the keys of the split are cut into 16-token chunks (aligned
// to absolute positions, so that with block_size % 16 == 0 a chunk lies in one cache page: one table lookup per
// chunk), each warp taking TILES consecutive chunks per step with every K/V byte of the step requested up front.
// Per chunk, with the G query heads of the KV head as the MMA's N dimension (padded to 8; prefill: QT queries x G
// heads, see the kernel):
//   S^T [16 tokens x 8 heads]  = K [16 x D] . Q^T [D x 8]       A = K rows (tokens r, r+8), B = Q (one fragment)
//   O^T [D x 8 heads]         += V^T [D x 16] . P^T [16 x 8]    A = V columns, B = P (C fragment of S^T, transposed
//                                                               in registers by movmatrix)
// so no shared memory is touched inside the loop and half the MMA's M rows are not wasted on padding as they would
// be with heads as M. Each thread holds K bytes [c*D/4, +D/4) of tokens r and r+8, and V bytes [r*D/8, +D/8) of
// tokens 2c, 2c+1, 2c+8, 2c+9 (r = lane / 4, c = lane % 4); the order of the dims inside a thread's slice is
// permuted consistently in Q and K (a dot product does not care) and in V and O (written back in place).
// FP8: E4M3 bytes become f16 pairs with one cvt.rn.f16x2.e4m3x2 per pair (exact), f16 MMA. Q goes to f16 times a
// power of two that puts max|q| of the group in [2^14, 2^15): exact for every q above 2^-28 max|q|, no overflow
// whatever the model's q range. The K scale multiplies the fp32 scores per token; the V scale multiplies P before
// its f16 rounding, relative to a running power of two cv >= every V scale seen (rescaled like the softmax max), so
// P * vs / cv is in [0, 1] and keeps f16's 11 bits whatever the cache's scales: the only roundings beyond fp32
// accumulation are P's (relative 2^-11) and the bf16 output's. bf16 KV: bf16 MMA, P in bf16 (2^-8).
// Softmax in fp32, base 2, online per warp; warps merged through shared memory at the end, splits by
// merge_splits_kernel.

template <bool F16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (F16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Transpose of an 8x8 matrix of 16-bit values held as MMA C/A fragments (row lane / 4, columns 2 (lane % 4) + 0, 1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two) {  // low 16 bits
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xFFFFu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// FP8 KV: Q goes to f16 times 2^e with max|q| * 2^e in [2^14, 2^15) (exact for every q above 2^-28 max|q|, no
// overflow); exponent field arithmetic, clamped far from the f16 / fp32 limits. The scores carry 2^-e back.
__device__ __forceinline__ int q_exponent(float qmax) {
  return qmax > 0.f ? min(100, max(-100, 14 - (static_cast<int>(__float_as_uint(qmax) >> 23) - 127))) : 0;
}

__device__ __forceinline__ float power_of_two(int e) {  // e in [-126, 127]
  return __uint_as_float(static_cast<uint32_t>(127 + e) << 23);
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// N consecutive 32-bit words of the cache, 16 (or 8) bytes per load, not kept in L1 (each byte is used once).
template <int N>
__device__ __forceinline__ void load_words(uint32_t (&w)[N], const uint8_t* ptr) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
          : "=r"(w[i]), "=r"(w[i + 1]), "=r"(w[i + 2]), "=r"(w[i + 3])
          : "l"(ptr + 4 * i));
  } else {
    static_assert(N == 2, "rows of 8 or a multiple of 16 bytes");
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(w[0]), "=r"(w[1]) : "l"(ptr));
  }
}

__device__ __forceinline__ float ld_scale(const float* ptr) {
  float v;
  asm("ld.global.nc.L1::no_allocate.f32 %0, [%1];\n" : "=f"(v) : "l"(ptr));
  return v;
}

// NVFP4 KV: E2M1 codes I and I + 4 of a word of 8 (bits [4I, 4I + 4) and [16 + 4I, 20 + 4I)) -> f16x2 of
// e2m1 * 2^-14 (low half: code I), exact, by placing each code's 3 magnitude bits as the f16's low 2 exponent bits
// and top mantissa bit (exponent field e = 1..3 gives 2^(e-15) * (1 + m/2) = 2^-14 * e2m1; e = 0 is the f16
// subnormal m * 2^-15 = 2^-14 * (m / 2)) and its sign bit as the f16's. The two codes of the pair lie 16 bits apart,
// as the two halves of an f16x2 do, so one shift places both magnitudes (bits 9-11 and 25-27) and one both signs
// (bits 15 and 31): 2 shifts and 2 logic ops (1 for I = 3) for two values, where one byte's two adjacent codes
// would need a shift, a mask and an OR per code. The kernel lays its dims out so that it only ever needs such
// pairs (paged_attention_mma_kernel: K's dims permuted with Q's, V's bytes of two keys merged by one prmt).
__device__ __forceinline__ uint32_t e2m1_pair_f16x2(uint32_t w, int i) {  // i: compile-time after unrolling
  const uint32_t magnitude = i < 3 ? w << (9 - 4 * i) : w >> 3;
  return (magnitude & 0x0E000E00u) | ((w << (12 - 4 * i)) & 0x80008000u);
}

// f16x2 product (round to nearest; every product the NVFP4 path forms is exact: see paged_attention_mma_kernel).
__device__ __forceinline__ uint32_t hmul2_u32(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// Two E4M3 block scales (bytes 0 and 1 of two) -> f16x2 of s * 2^7: exact (s * 2^7 <= 448 * 128 = 57344 < 65504);
// the 2^7 brings e2m1 * 2^-14 * s * 2^7 = e2m1 * s * 2^-7 into f16 with every product exact, the kernel's per-token
// power of two carries 2^7 back.
__device__ __forceinline__ uint32_t nv4_scales_f16x2(uint32_t two) {
  return hmul2_u32(e4m3x2_to_f16x2(two), 0x58005800u);  // 0x5800 = f16 128
}

// 1, 2 or 4 bytes of the cache (aligned to their size), not kept in L1.
template <int N>
__device__ __forceinline__ uint32_t ld_nc_bytes(const uint8_t* ptr) {
  uint32_t v;
  if constexpr (N == 1) {
    asm("ld.global.nc.L1::no_allocate.u8 %0, [%1];\n" : "=r"(v) : "l"(ptr));
  } else if constexpr (N == 2) {
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];\n" : "=r"(v) : "l"(ptr));
    v &= 0xFFFFu;
  } else {
    static_assert(N == 4, "1, 2 or 4 bytes");
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(ptr));
  }
  return v;
}

// N words of an NVFP4 row at a pointer aligned to A bytes (rows are 9D/16 bytes: 36, 72, 144 -> A = 4, 8, 16).
template <int N, int A>
__device__ __forceinline__ void load_words_aligned(uint32_t (&w)[N], const uint8_t* ptr) {
  if constexpr (A == 16 && N % 4 == 0) {
    load_words<N>(w, ptr);
  } else if constexpr (A >= 8 && N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2)
      asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(w[i]), "=r"(w[i + 1]) : "l"(ptr + 4 * i));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = ld_nc_bytes<4>(ptr + 4 * i);
  }
}

// E8M0 exponent byte b (e + 127) -> 2^(e + 7) in fp32: the per-token factor of an NVFP4 row whose values the kernel
// holds as e2m1 * s * 2^-7. b in [27, 227]: always a normal fp32.
__device__ __forceinline__ float nv4_token_scale(uint32_t b) { return __uint_as_float((b + 7u) << 23); }

// Split-K epilogue without a second kernel (the threadFenceReduction pattern): every block publishes its partial
// rows, the last of the `splits` blocks of a (token, KV head) to arrive merges them (fixed split order: deterministic)
// and resets the counter for the next launch (graph replays need no memset). Saves the merge kernel's launch and its
// dependent round trips, which at batch 1 are a sizeable part of a ~10 µs call.
template <int D, int G>
__device__ __forceinline__ void merge_splits_in_last_block(const AttnParams& p, int t, int kvh) {
  __shared__ int is_last;
  __threadfence();  // this block's partial rows are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = p.counters + static_cast<long long>(t) * p.kv_heads + kvh;
    const int arrived = atomicAdd(counter, 1) + 1;
    is_last = arrived == p.splits;
    if (is_last) *counter = 0;  // every other block of this (token, KV head) has counted already
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // One thread per (head, 4 dims): the splits' weights 2^(lse - max), float4 partial rows read from L2 (ld.cg: other
  // blocks wrote them; this SM's L1 holds no copy).
  for (int i = threadIdx.x; i < G * D / 4; i += kAttnThreads) {
    const int g = i / (D / 4), d4 = i % (D / 4);
    const long long row = (static_cast<long long>(t) * p.heads + kvh * G + g) * p.splits;
    const float* lse = p.part_lse + row;
    float mx = -INFINITY;
    for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, __ldcg(lse + s));
    float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
    float den = 0.f;
#pragma unroll 8
    for (int s = 0; s < p.splits; ++s) {
      const float ls = __ldcg(lse + s);
      const float w = ls == -INFINITY ? 0.f : exp2f(ls - mx);
      const float4 v = __ldcg(reinterpret_cast<const float4*>(p.part_out + (row + s) * D) + d4);
      num.x += w * v.x;
      num.y += w * v.y;
      num.z += w * v.z;
      num.w += w * v.w;
      den += w;
    }
    const float inv = den > 0.f ? 1.f / den : 0.f;
    __nv_bfloat16* dst = p.out + (static_cast<long long>(t) * p.heads + kvh * G + g) * D + 4 * d4;
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(num.x * inv, num.y * inv), pack_bf16x2(num.z * inv, num.w * inv));
  }
}

// QT: query tokens per block. Decode: 1 (the G heads of one token are the N columns, padded to 8). Prefill over the
// cache: QT consecutive queries of one sequence (a `query_blocks` entry), their G * QT (token, head) pairs being the
// columns of NT = G * QT / 8 n-tiles: each K/V chunk is loaded and converted once for QT queries, each column keeps its
// own causal/window range and softmax state.
//
// NV4 (with FP8 = true: the same scaled-f16 path): the NVFP4 cache (docs/ARCHITECTURE.md). A thread loads the
// packed bytes of the same dims as for FP8 (D/8 bytes of K for its D/4 dims, D/16 bytes of V for its D/8 dims: half
// the registers), the E4M3 scales of the 16-dim blocks those dims lie in, and each token's E8M0 exponent. Values
// become f16 as e2m1_pair_f16x2 (e2m1 * 2^-14) times the block scale as f16 s * 2^7 (one mul.f16x2 per pair):
// e2m1 * s * 2^-7, exact (|e2m1| <= 6 has 2 significant bits, s 4; the smallest nonzero product 0.5 * 2^-9 * 2^-7
// = 2^-17 is a multiple of f16's subnormal step 2^-24 and the largest, 21, is far from f16's max). The per-token
// factor 2^(e + 7) then takes the FP8 scale's place exactly: on the fp32 scores for K, on P (relative to the running
// power of two cv) for V. So the kernel computes on exactly the reference's dequantized values, as for FP8.
// Why the dims are permuted: the kernel is bound by these conversions, not by its bytes (at 32k keys x batch 16 on
// the H100, 3 chunks per warp step instead of 2 ran 11 % slower). Codes 16 bits apart in a word convert as a pair
// in 4 integer ops (e2m1_pair_f16x2), adjacent codes of one byte would take ~11 (a shift to select the byte, then
// a shift, a mask and an OR per code), and V's pairs run along keys, across two tokens' bytes, which cost 4 more
// to regroup. So K's dims 8w + {0..7} of the slice (one word) enter the k16 steps as pairs (0, 4), (1, 5) | (2, 6),
// (3, 7), with Q's B fragments built in the same order (a dot product does not care); V's bytes of two keys are
// merged by one prmt per 2 m-tiles into a word whose 16-bit-apart codes are exactly (key x, key y) of one dim.
//
// Head dim 512 (Gemma 4's global layers; kSplitD): the warps split D instead of the keys. Kept whole per warp, a
// 512-dim row would need 64 registers of Q, 128 of the O accumulator and 128 of raw FP8 K/V for a single chunk (320
// > Ada's 255 per thread), and the end-of-block merge 64 KB of shared memory at G = 8 (static shared memory stops at
// 48 KB). So all 4 warps take the same chunks, each warp running the 128-dim path on its quarter of every row (Q, K,
// V and O dims [128 w, 128 w + 128)): its registers are the D = 128 kernel's, and so are the bytes in flight per
// block (TILES chunks of 16 whole rows). QK^T needs the other quarters: each warp writes its partial S^T fragments
// to shared memory (double-buffered: one barrier per step) and every warp sums the 4 partials in the same fixed
// order, so every warp holds the same scores, hence the same softmax state (m, l, cv) with no further exchange, and
// writes its own quarter of O at the end (no merge of warps). Q's power of two is taken over the whole row (the
// partials are summed before scaling). Cost: one barrier and 16 bytes of shared traffic per score per step.
template <int D, int G, int TILES, bool FP8, int QT = 1, bool NV4 = false>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_mma_kernel(const AttnParams p) {
  static_assert(!NV4 || FP8, "NVFP4 runs the scaled f16 path");
  constexpr int kWarps = kAttnThreads / 32;
  constexpr bool kSplitD = D > 256;            // the warps split each row's dims (above)
  constexpr int DW = kSplitD ? D / kWarps : D;  // dims of a row this warp computes on
  constexpr int kSteps = DW / 16;              // k16 steps of QK^T = m16 tiles of PV
  constexpr int kKW = NV4 ? DW / 32 : FP8 ? DW / 16 : DW / 8;   // words of one K row held by a thread (DW/4 dims)
  constexpr int kVW = NV4 ? DW / 64 : FP8 ? DW / 32 : DW / 16;  // words of one V row held by a thread (DW/8 dims)
  constexpr int kElem = FP8 ? 1 : 2;
  constexpr int kRowNV4 = D / 2 + D / 16;      // NVFP4: bytes of one (token, head) row
  constexpr int kAlignNV4 = D == 64 ? 4 : D == 128 ? 8 : 16;  // of every thread's slice of a row
  constexpr int kKSB = DW / 64;                // NVFP4: K block scales of a thread's DW/4 dims (1, 2, 4 bytes)
  constexpr int kVSB = DW < 128 ? 1 : DW / 128;  // NVFP4: V block scales of a thread's DW/8 dims (1, 1, 2 bytes)
  constexpr int kCols = G * QT;                // (query token, head) columns; column = token * G + head
  constexpr int NT = (kCols + 7) / 8;          // n-tiles of 8 columns
  constexpr int kScores = TILES * NT * 4;      // S^T fragment values per thread per step
  static_assert(G >= 1 && G <= 8 && (QT == 1 || kCols % 8 == 0), "columns fill whole n-tiles in prefill");
  static_assert(!kSplitD || DW == 128, "split rows: 128 dims per warp");
  __shared__ float red_m[kWarps][kCols], red_l[kWarps][kCols];
  // The warps' merge (keys split) or their partial scores (dims split: [buffer][warp][value][lane]); the other is
  // one float.
  __shared__ __align__(16) float red_acc[kSplitD ? 1 : kWarps][kSplitD ? 1 : kCols][kSplitD ? 1 : D];
  __shared__ float s_part[kSplitD ? 2 : 1][kSplitD ? kWarps : 1][kSplitD ? kScores : 1][32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, c = lane & 3;
  const int split = blockIdx.x, kvh = blockIdx.y;
  const int wd0 = kSplitD ? warp * DW : 0;  // first dim of this warp's part of every row
  int t0 = blockIdx.z, nq = 1, seq;
  if constexpr (QT > 1) {
    const int* blk = p.query_blocks + 3 * blockIdx.z;  // (sequence, first query token, query count)
    seq = blk[0];
    t0 = blk[1];
    nq = min(blk[2], QT);
    if (nq <= 0) return;  // past the last block of the step (the grid is an upper bound)
  } else {
    seq = p.query_seq ? p.query_seq[t0] : t0;
  }
  // Query j of the block sees keys [start_j, ctx0 + j): consecutive queries of one sequence.
  const int ctx0 = p.query_ctx ? p.query_ctx[t0] : p.context_lens[seq];
  const int start = p.window > 0 ? max(0, ctx0 - p.window) : 0;  // query 0's window start: the smallest
  const int end = ctx0 + nq - 1;                                  // the last query's context: the largest
  const int first = start >> 4, chunks = max(((end + 15) >> 4) - first, 0);
  const int per_split = ceil_div(chunks, p.splits);
  const int ch0 = first + split * per_split, ch1 = min(first + chunks, ch0 + per_split);
  const int lo = max(start, ch0 * 16), hi = min(end, ch1 * 16);  // the keys of this block
  const int* table = p.block_tables + static_cast<long long>(seq) * p.table_stride;
  // Masked keys read the row of key `lo` instead (written, finite), so no NaN of an unwritten slot can reach the
  // MMA (0 * NaN in P.V); their scores are -inf, their P 0.
  const long long safe_row =
      lo < hi ? static_cast<long long>(table[lo / p.block_size]) * p.block_size + lo % p.block_size : 0;
  const uint8_t* k_base =
      static_cast<const uint8_t*>(p.k_cache) +
      (NV4 ? kvh * kRowNV4 + (wd0 + c * (DW / 4)) / 2 : (static_cast<long long>(kvh) * D + wd0 + c * (DW / 4)) * kElem);
  const uint8_t* v_base =
      static_cast<const uint8_t*>(p.v_cache) +
      (NV4 ? kvh * kRowNV4 + (wd0 + r * (DW / 8)) / 2 : (static_cast<long long>(kvh) * D + wd0 + r * (DW / 8)) * kElem);
  const long long row_bytes = NV4 ? static_cast<long long>(p.slot_rows) * kRowNV4  // from one cache slot to the next
                                  : static_cast<long long>(p.slot_rows) * D * kElem;
  // NVFP4 block scales of this thread's dims: K blocks (wd0 + c * DW/4) / 16 .., V block (wd0 + r * DW/8) / 16 ..
  const uint8_t* ks_base = static_cast<const uint8_t*>(p.k_cache) + kvh * kRowNV4 + D / 2 + (wd0 + c * (DW / 4)) / 16;
  const uint8_t* vs_base = static_cast<const uint8_t*>(p.v_cache) + kvh * kRowNV4 + D / 2 + (wd0 + r * (DW / 8)) / 16;
  const uint8_t* k_exp = reinterpret_cast<const uint8_t*>(p.k_scale);  // NVFP4: E8M0 bytes [slot, Hkv]
  const uint8_t* v_exp = reinterpret_cast<const uint8_t*>(p.v_scale);

  // Keys each of this thread's columns (2c, 2c+1 of every n-tile) attends to: [col_lo, col_hi), empty for padding.
  int col_lo[NT][2], col_hi[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = nt * 8 + 2 * c + h, j = col / G;
      const bool used = col < kCols && j < nq;
      col_lo[nt][h] = p.window > 0 ? max(lo, ctx0 + j - p.window) : lo;
      col_hi[nt][h] = used ? min(hi, ctx0 + j) : lo;
    }
  }

  // ---- Q^T as the B fragment of every k16 step: column r of each n-tile (zero where unused), dims of the thread's
  // slice c*D/4 + 4kk + {0,1} | {2,3}; NVFP4: 8w + {p, p + 4} | {p + 1, p + 5} with w = kk / 2, p = 2 (kk % 2), the
  // order in which its K fragments come out of the packed words (see QK^T below).
  uint32_t qf[NT][kSteps][2];
  float score_mul = p.scale_log2;  // raw MMA score -> log2 units (softcap off) or true q.k (softcap on)
  {
    uint32_t qw[NT][2 * kSteps];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int col = nt * 8 + r, j = col / G;
      const bool used = col < kCols && j < nq;
      const uint32_t* qp = reinterpret_cast<const uint32_t*>(
          p.q + static_cast<long long>(used ? t0 + j : t0) * p.q_stride +
          static_cast<long long>(kvh * G + (used ? col % G : 0)) * D + wd0 + c * (DW / 4));
#pragma unroll
      for (int i = 0; i < 2 * kSteps; ++i) qw[nt][i] = used ? __ldg(qp + i) : 0u;
    }
    if constexpr (FP8) {
      float qmax = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 2 * kSteps; ++i)
          qmax = fmaxf(qmax, fmaxf(fabsf(__uint_as_float(qw[nt][i] << 16)),
                                   fabsf(__uint_as_float(qw[nt][i] & 0xFFFF0000u))));
      qmax = warp_max(qmax);
      if constexpr (kSplitD) {  // one power of two for the whole row: the warps' partial scores are summed
        __shared__ float q_red[kWarps];
        if (lane == 0) q_red[warp] = qmax;
        __syncthreads();
#pragma unroll
        for (int w = 0; w < kWarps; ++w) qmax = fmaxf(qmax, q_red[w]);
      }
      const int e = q_exponent(qmax);
      const float qmul = power_of_two(e);
      score_mul *= power_of_two(-e);
      if constexpr (NV4) {  // words 4w + {0, 1, 2, 3} hold dims 8w + {0,1}, {2,3}, {4,5}, {6,7}
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int kk = 0; kk < kSteps; ++kk) {
            const uint32_t lo = qw[nt][4 * (kk / 2) + (kk & 1)], hi = qw[nt][4 * (kk / 2) + 2 + (kk & 1)];
            qf[nt][kk][0] = pack_f16x2(__uint_as_float(lo << 16) * qmul, __uint_as_float(hi << 16) * qmul);
            qf[nt][kk][1] = pack_f16x2(__uint_as_float(lo & 0xFFFF0000u) * qmul,
                                       __uint_as_float(hi & 0xFFFF0000u) * qmul);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 2 * kSteps; ++i)
            qf[nt][i / 2][i % 2] = pack_f16x2(__uint_as_float(qw[nt][i] << 16) * qmul,
                                              __uint_as_float(qw[nt][i] & 0xFFFF0000u) * qmul);
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 2 * kSteps; ++i) qf[nt][i / 2][i % 2] = qw[nt][i];
    }
  }

  float m[NT][2], l[NT][2];  // columns 2c, 2c+1 of each n-tile; m finite: exp2(m_old - m_new) never NaN
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) m[nt][0] = m[nt][1] = -1e30f, l[nt][0] = l[nt][1] = 0.f;
  int cv_exp = -1000;  // FP8: 2^cv_exp >= every V scale of this warp (-1000: none yet)
  float o[NT][kSteps][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < kSteps; ++i) o[nt][i][0] = o[nt][i][1] = o[nt][i][2] = o[nt][i][3] = 0.f;

  int buf = 0;  // split rows: the s_part buffer of this step
  // Split rows: every warp takes every step (the same trip count: each reaches the barrier below).
  for (int ch = ch0 + (kSplitD ? 0 : warp * TILES); ch < ch1; ch += (kSplitD ? 1 : kWarps) * TILES) {
    // ---- Fetch every K/V byte and scale of the step before any is used.
    uint32_t kw[TILES][2][kKW], vw[TILES][4][kVW];
    float ksc[TILES][2], vsc[TILES][2];
    uint32_t kbs[TILES][2], vbs[TILES][4];  // NVFP4: raw E4M3 block-scale bytes of the K rows / V columns
#pragma unroll
    for (int u = 0; u < TILES; ++u) {
      const int tok0 = (ch + u) * 16;
      const int page_tok = min(ch + u, ch1 - 1) * 16;  // a chunk past the split: any valid page, all masked
      const long long row0 = static_cast<long long>(table[page_tok / p.block_size]) * p.block_size +
                             page_tok % p.block_size;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int off = r + 8 * j, tok = tok0 + off;
        const long long row = tok >= lo && tok < hi ? row0 + off : safe_row;
        if constexpr (NV4) {
          load_words_aligned<kKW, kAlignNV4>(kw[u][j], k_base + row * row_bytes);
          kbs[u][j] = ld_nc_bytes<kKSB>(ks_base + row * row_bytes);
          ksc[u][j] = nv4_token_scale(ld_nc_bytes<1>(k_exp + row * p.scale_stride + kvh));
          vsc[u][j] = nv4_token_scale(ld_nc_bytes<1>(v_exp + row * p.scale_stride + kvh));
        } else {
          load_words(kw[u][j], k_base + row * row_bytes);
        }
        if constexpr (FP8 && !NV4) {
          ksc[u][j] = ld_scale(p.k_scale + row * p.scale_stride + kvh);
          vsc[u][j] = ld_scale(p.v_scale + row * p.scale_stride + kvh);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int off = 2 * c + (j & 1) + 8 * (j >> 1), tok = tok0 + off;
        const long long row = tok >= lo && tok < hi ? row0 + off : safe_row;
        if constexpr (NV4) {
          load_words_aligned<kVW, kAlignNV4>(vw[u][j], v_base + row * row_bytes);
          vbs[u][j] = ld_nc_bytes<kVSB>(vs_base + row * row_bytes);
        } else {
          load_words(vw[u][j], v_base + row * row_bytes);
        }
      }
    }
    // ---- S^T = K Q^T per chunk: each K fragment converted once, used by every n-tile.
    float s[TILES][NT][4];
#pragma unroll
    for (int u = 0; u < TILES; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[u][nt][0] = s[u][nt][1] = s[u][nt][2] = s[u][nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
        uint32_t a[4];
        if constexpr (NV4) {
          // Word kk / 2 holds the slice's dims 8 (kk / 2) + 0..7 as codes 0..7: even kk takes the pairs of codes
          // (0, 4) and (1, 5), odd kk (2, 6) and (3, 7), in Q's order above. All 8 dims lie in one 16-dim block
          // (slices start at multiples of 16), block kk / 4 of the slice: one scale for the whole word.
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const uint32_t w = kw[u][j][kk / 2];
            const uint32_t sc = nv4_scales_f16x2(__byte_perm(kbs[u][j], 0u, (kk / 4) * 0x11u));  // (s, s)
            a[j] = hmul2_u32(e2m1_pair_f16x2(w, 2 * (kk & 1)), sc);
            a[2 + j] = hmul2_u32(e2m1_pair_f16x2(w, 2 * (kk & 1) + 1), sc);
          }
        } else if constexpr (FP8) {
          a[0] = e4m3x2_to_f16x2(kw[u][0][kk]);
          a[1] = e4m3x2_to_f16x2(kw[u][1][kk]);
          a[2] = e4m3x2_to_f16x2(kw[u][0][kk] >> 16);
          a[3] = e4m3x2_to_f16x2(kw[u][1][kk] >> 16);
        } else {
          a[0] = kw[u][0][2 * kk];
          a[1] = kw[u][1][2 * kk];
          a[2] = kw[u][0][2 * kk + 1];
          a[3] = kw[u][1][2 * kk + 1];
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_16816<FP8>(s[u][nt], a, qf[nt][kk][0], qf[nt][kk][1]);
      }
    }
    if constexpr (kSplitD) {  // ---- Sum the warps' partial scores (128 dims each) in a fixed order.
#pragma unroll
      for (int u = 0; u < TILES; ++u)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) s_part[buf][warp][(u * NT + nt) * 4 + j][lane] = s[u][nt][j];
      __syncthreads();  // `buf` is written again two steps on, after every warp has passed the next step's barrier
#pragma unroll
      for (int u = 0; u < TILES; ++u)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int i = (u * NT + nt) * 4 + j;
            float total = s_part[buf][0][i][lane];
#pragma unroll
            for (int w = 1; w < kWarps; ++w) total += s_part[buf][w][i][lane];
            s[u][nt][j] = total;
          }
      buf ^= 1;
    }
    // ---- Scores in log2 units, masked per column; fragment j: key r + 8 (j / 2), column 2c + (j % 2).
    float mx[NT][2], vmax = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx[nt][0] = mx[nt][1] = -INFINITY;
#pragma unroll
    for (int u = 0; u < TILES; ++u) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = (ch + u) * 16 + r + 8 * (j >> 1);
        if constexpr (FP8) {
          if (j & 1) vmax = fmaxf(vmax, tok >= lo && tok < hi ? vsc[u][j >> 1] : 0.f);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          float x = s[u][nt][j] * score_mul;
          if constexpr (FP8) x *= ksc[u][j >> 1];
          if (p.softcap > 0.f) x = p.softcap_out * tanhf(x * p.softcap_in);
          s[u][nt][j] = tok >= col_lo[nt][j & 1] && tok < col_hi[nt][j & 1] ? x : -INFINITY;
          mx[nt][j & 1] = fmaxf(mx[nt][j & 1], s[u][nt][j]);
        }
      }
    }
#pragma unroll
    for (int o_ = 4; o_ < 32; o_ <<= 1) {  // over the 8 lanes of a column (keys r); lanes of one r agree
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mx[nt][0] = fmaxf(mx[nt][0], __shfl_xor_sync(0xffffffffu, mx[nt][0], o_));
        mx[nt][1] = fmaxf(mx[nt][1], __shfl_xor_sync(0xffffffffu, mx[nt][1], o_));
      }
      if constexpr (FP8) vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, o_));
    }
    float alpha[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = fmaxf(m[nt][h], mx[nt][h]);
        alpha[nt][h] = exp2f(m[nt][h] - m_new);
        m[nt][h] = m_new;
        l[nt][h] *= alpha[nt][h];
      }
    }
    float inv_cv = 1.f;
    if constexpr (FP8) {
      // Warp-uniform: a larger V scale moves cv to the next power of two above it, an exact rescale of O.
      const uint32_t vbits = __float_as_uint(vmax);
      const int next_exp = static_cast<int>(vbits >> 23) - 127 + ((vbits & 0x007FFFFFu) != 0u);
      if (vmax > 0.f && next_exp > cv_exp) {
        const int d = cv_exp - next_exp;
        const float beta = d < -126 ? 0.f : __uint_as_float(static_cast<uint32_t>(127 + d) << 23);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) alpha[nt][0] *= beta, alpha[nt][1] *= beta;
        cv_exp = next_exp;
      }
      inv_cv = cv_exp > -200 ? __uint_as_float(static_cast<uint32_t>(127 - cv_exp) << 23) : 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < kSteps; ++i) {
        o[nt][i][0] *= alpha[nt][0];
        o[nt][i][1] *= alpha[nt][1];
        o[nt][i][2] *= alpha[nt][0];
        o[nt][i][3] *= alpha[nt][1];
      }
    }
    // ---- P (times vs / cv), transposed into B fragments, and O^T += V^T P^T per chunk: each V fragment converted
    // once, used by every n-tile.
#pragma unroll
    for (int u = 0; u < TILES; ++u) {
      uint32_t b0[NT], b1[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float pr[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          pr[j] = exp2f(s[u][nt][j] - m[nt][j & 1]);
          l[nt][j & 1] += pr[j];
          if constexpr (FP8) pr[j] *= vsc[u][j >> 1] * inv_cv;
        }
        if constexpr (FP8) {
          b0[nt] = transpose8x8(pack_f16x2(pr[0], pr[1]));
          b1[nt] = transpose8x8(pack_f16x2(pr[2], pr[3]));
        } else {
          b0[nt] = transpose8x8(pack_bf16x2(pr[0], pr[1]));
          b1[nt] = transpose8x8(pack_bf16x2(pr[2], pr[3]));
        }
      }
      if constexpr (NV4) {
        // Byte b of the slice holds dims r*D/8 + 2b (low code: m-tile b, row r) and + 1 (high: row r + 8). One prmt
        // takes bytes b, b + 1 (b even) of keys x = 2c (+8) and y = 2c + 1 (+9) into one word (x's at codes 0-3,
        // y's at codes 4-7), whose code pairs (0, 4), (1, 5), (2, 6), (3, 7) are then exactly the A fragments'
        // (key x, key y) pairs of m-tiles b (rows r, r + 8) and b + 1. The scale pair (x's, y's block scale) of
        // block b / 8 multiplies them: the 4 dims lie in one block.
#pragma unroll
        for (int i = 0; i < kSteps; i += 2) {
          uint32_t z[2], sc[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int b = i / 8;
            z[h] = __byte_perm(vw[u][2 * h][i / 4], vw[u][2 * h + 1][i / 4], (i & 2) ? 0x7632u : 0x5410u);
            sc[h] = nv4_scales_f16x2(__byte_perm(vbs[u][2 * h], vbs[u][2 * h + 1], b | ((b + 4) << 4)));
          }
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            uint32_t a[4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              a[2 * h] = hmul2_u32(e2m1_pair_f16x2(z[h], 2 * t), sc[h]);
              a[2 * h + 1] = hmul2_u32(e2m1_pair_f16x2(z[h], 2 * t + 1), sc[h]);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_16816<FP8>(o[nt][i + t], a, b0[nt], b1[nt]);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < kSteps; ++i) {
          uint32_t a[4];
          if constexpr (FP8) {  // dims r*D/8 + 2i (row r) and + 1 (row r + 8) of keys (2c, 2c+1), (2c+8, 2c+9)
            const uint32_t sel = (i & 1) ? 0x7362u : 0x5140u;
            const uint32_t z01 = __byte_perm(vw[u][0][i / 2], vw[u][1][i / 2], sel);
            const uint32_t z23 = __byte_perm(vw[u][2][i / 2], vw[u][3][i / 2], sel);
            a[0] = e4m3x2_to_f16x2(z01);
            a[1] = e4m3x2_to_f16x2(z01 >> 16);
            a[2] = e4m3x2_to_f16x2(z23);
            a[3] = e4m3x2_to_f16x2(z23 >> 16);
          } else {
            a[0] = __byte_perm(vw[u][0][i], vw[u][1][i], 0x5410u);
            a[1] = __byte_perm(vw[u][0][i], vw[u][1][i], 0x7632u);
            a[2] = __byte_perm(vw[u][2][i], vw[u][3][i], 0x5410u);
            a[3] = __byte_perm(vw[u][2][i], vw[u][3][i], 0x7632u);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816<FP8>(o[nt][i], a, b0[nt], b1[nt]);
        }
      }
    }
  }

  // ---- Merge the warps: l summed over the lanes of a column, common max through shared memory.
#pragma unroll
  for (int o_ = 4; o_ < 32; o_ <<= 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      l[nt][0] += __shfl_xor_sync(0xffffffffu, l[nt][0], o_);
      l[nt][1] += __shfl_xor_sync(0xffffffffu, l[nt][1], o_);
    }
  }
  if constexpr (kSplitD) {
    const float cv = FP8 && cv_exp > -200 ? __uint_as_float(static_cast<uint32_t>(127 + cv_exp) << 23) : (FP8 ? 0.f : 1.f);
    // Every warp holds the whole softmax state of its columns and its own quarter of O: rows written directly.
    // Thread (r, c) holds dims wd0 + r * DW/8 + 2i, +1 of columns 2c, 2c + 1 of each n-tile.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = nt * 8 + 2 * c + h, j = col / G;
        if (col >= kCols || j >= nq) continue;
        const long long t = t0 + j;
        const int head = kvh * G + col % G;
        const float mul = l[nt][h] > 0.f ? cv / l[nt][h] : 0.f;
        const int d0 = wd0 + r * (DW / 8);
        if (p.splits == 1) {
          __nv_bfloat16* dst = p.out + (t * p.heads + head) * D + d0;
#pragma unroll
          for (int i = 0; i < kSteps; ++i)
            *reinterpret_cast<uint32_t*>(dst + 2 * i) = pack_bf16x2(o[nt][i][h] * mul, o[nt][i][2 + h] * mul);
        } else {
          const long long row = (t * p.heads + head) * p.splits + split;
          float* dst = p.part_out + row * D + d0;
#pragma unroll
          for (int i = 0; i < kSteps; ++i)
            *reinterpret_cast<float2*>(dst + 2 * i) = make_float2(o[nt][i][h] * mul, o[nt][i][2 + h] * mul);
          if (d0 == 0) p.part_lse[row] = l[nt][h] > 0.f ? m[nt][h] + log2f(l[nt][h]) : -INFINITY;
        }
      }
    }
    if constexpr (QT == 1) {
      if (p.splits > 1 && p.counters != nullptr) merge_splits_in_last_block<D, G>(p, t0, kvh);
    }
    return;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (r == 0 && nt * 8 + 2 * c + h < kCols) red_m[warp][nt * 8 + 2 * c + h] = m[nt][h];
  __syncthreads();
  const float cv = FP8 && cv_exp > -200 ? __uint_as_float(static_cast<uint32_t>(127 + cv_exp) << 23) : (FP8 ? 0.f : 1.f);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = nt * 8 + 2 * c + h;
      if (col < kCols) {
        float mx = -1e30f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_m[w][col]);
        const float f = exp2f(m[nt][h] - mx);
        if (r == 0) red_l[warp][col] = l[nt][h] * f;
        const float fo = f * cv;
#pragma unroll
        for (int i = 0; i < kSteps; ++i)
          *reinterpret_cast<float2*>(&red_acc[warp][col][r * (D / 8) + 2 * i]) =
              make_float2(o[nt][i][h] * fo, o[nt][i][2 + h] * fo);
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kCols * D; i += kAttnThreads) {
    const int col = i / D, d = i % D, j = col / G;
    if (j >= nq) continue;
    float a = 0.f, lsum = 0.f, mx = -1e30f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      a += red_acc[w][col][d];
      lsum += red_l[w][col];
      mx = fmaxf(mx, red_m[w][col]);
    }
    const long long t = t0 + j;
    const int head = kvh * G + col % G;
    const float out = lsum > 0.f ? a / lsum : 0.f;
    if (p.splits == 1) {
      p.out[(t * p.heads + head) * D + d] = __float2bfloat16_rn(out);
    } else {
      const long long row = (t * p.heads + head) * p.splits + split;
      p.part_out[row * D + d] = out;
      if (d == 0) p.part_lse[row] = lsum > 0.f ? mx + log2f(lsum) : -INFINITY;
    }
  }
  if constexpr (QT == 1) {
    if (p.splits > 1 && p.counters != nullptr) merge_splits_in_last_block<D, G>(p, t0, kvh);
  }
}

// ---- Prefill attention v4 (session 3): flash-style, the queries as the MMA's M -------------------------------
//
// Why: v3's prefill (several queries per block as the N columns, K as the A operand) converts each K/V chunk once
// per 16 / G queries and keeps one or two 8-column n-tiles per warp: at 1 x 2048 tokens it ran at ~90 TFLOP/s (FP8)
// and ~55 (bf16) on the H100, 4.6x / 7.6x torch SDPA (device run 1, session 3).
// Here one block is 128 consecutive queries of one sequence and one query head (8 warps x 16 rows: the MMA's M; 4
// warps as variant 5); the keys come in tiles of KEYS (64), each loaded once per block into shared memory as f16 (FP8:
// converted once per block, exactly, by cvt.rn.f16x2.e4m3x2) or bf16, and read by every warp through ldmatrix:
//   S [16 q x KEYS]  = Q [16 x D] . K^T         A = Q (registers, loaded once), B = K rows (ldmatrix)
//   O [16 q x D]    += P [16 x KEYS] . V         A = P (S's C fragments re-packed), B = V (ldmatrix.trans)
// The next tile's cache bytes (and scales) are loaded into registers while the warps compute on the current one,
// then written to shared memory between two barriers: no cp.async ring, 35 KB of shared memory (D 128).
// Numerics (as v3, docs/KERNELS.md "Attention v3"): FP8 K/V bytes are exact in f16; Q is exact in f16 after a
// power of two per row that puts max|q| in [2^14, 2^15); the K scale multiplies the fp32 score per key; the V scale
// multiplies P before its f16 rounding, relative to a running power of two 2^cv >= every V scale the ROW has seen
// (rescaled like the softmax max; per row, not per warp as in v3, so a row whose keys all have small V scales is not
// pushed into f16's subnormals by a neighbour's), so P * vs / 2^cv lies in [0, 1] and keeps f16's 11 bits.
// bf16 KV: bf16 MMA, P rounded to bf16.
// Softmax in fp32, base 2, online per row. Masks per row: causal (key < ctx) and sliding window (key >= ctx - W).
// Keys outside the block's range are zero-filled (an unwritten page's NaN bytes never reach 0 * NaN in P.V).
// W warps per block, 16 queries each: 8 (one block per SM, each K/V tile converted and stored by twice the threads
// and shared by twice the queries; bf16 tiles of 64 keys) or 4 (two blocks per SM); attention_set_variant(5) runs
// the other one. 8 measured faster on the H100 (device run 11, 1 x 2048 / 4 x 2048: FP8 300 / 999 us against
// 309 / 1065, bf16 275 / 909 against 317 / 1062); both hold 8 warps per SM on Ada and the H100 (registers).
constexpr int kFlashDefaultWarps = 8;

template <int D, bool FP8, int W>
struct FlashShape {
  static constexpr int kThreads = W * 32;
  static constexpr int kQueries = W * 16;                         // queries of one head per block
  static constexpr int kKeys = FP8 || W == 8 ? 64 : 32;           // keys per tile (bf16 with 4 warps: 32, so that
                                                                  // the prefetch registers stay at 32 per thread)
  static constexpr int kStride = D + 8;                           // halves per shared row: ldmatrix's 8 rows land
                                                                  // on 8 distinct 16-byte bank groups
  static constexpr int kChunks = D * (FP8 ? 1 : 2) / 16;          // 16-byte chunks of one cache row
  static constexpr int kLoads = kKeys * kChunks / kThreads;       // chunks of K (and of V) per thread per tile
  static_assert(kLoads * kThreads == kKeys * kChunks, "whole chunks per thread");
};

// Smallest e with 2^e >= s (s > 0, finite), from the exponent field; s == 0: -1000 (no constraint).
__device__ __forceinline__ int ceil_exponent(float s) {
  if (!(s > 0.f)) return -1000;
  const uint32_t bits = __float_as_uint(s);
  return static_cast<int>(bits >> 23) - 127 + ((bits & 0x7FFFFFu) != 0);
}

template <int D, bool FP8, int W>
__global__ void __launch_bounds__(W * 32, 8 / W) prefill_flash_kernel(const AttnParams p) {
  using Shape = FlashShape<D, FP8, W>;
  constexpr int KEYS = Shape::kKeys, STRIDE = Shape::kStride, CHUNKS = Shape::kChunks, LOADS = Shape::kLoads;
  constexpr int kFlashThreads = Shape::kThreads, kFlashQueries = Shape::kQueries;
  constexpr int kSteps = D / 16;   // k16 steps of Q.K^T; n-tile pairs of P.V
  constexpr int kNT = KEYS / 8;    // n-tiles of S
  __shared__ __align__(16) uint16_t k_tile[KEYS][STRIDE];
  __shared__ __align__(16) uint16_t v_tile[KEYS][STRIDE];
  __shared__ __align__(8) float k_scale_tile[FP8 ? KEYS : 2];
  __shared__ __align__(8) float v_scale_tile[FP8 ? KEYS : 2];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, r = lane >> 2, c = lane & 3;
  const int head = blockIdx.y, G = p.heads / p.kv_heads, kvh = head / G;
  const int* blk = p.query_blocks + 3 * (gridDim.x - 1 - blockIdx.x);  // the longest (last) blocks first
  const int seq = blk[0], t0 = blk[1], nq = min(blk[2], kFlashQueries);
  if (nq <= 0) return;  // past the last block of the step (the grid is an upper bound)
  // Query j of the block (position ctx0 + j - 1) sees keys [max(0, ctx0 + j - W), ctx0 + j).
  const int ctx0 = p.query_ctx ? p.query_ctx[t0] : p.context_lens[seq];
  const int lo = p.window > 0 ? max(0, ctx0 - p.window) : 0, hi = ctx0 + nq - 1;
  const int* table = p.block_tables + static_cast<long long>(seq) * p.table_stride;
  const long long row_bytes = static_cast<long long>(p.slot_rows) * D * (FP8 ? 1 : 2);
  const uint8_t* k_cache = static_cast<const uint8_t*>(p.k_cache) + static_cast<long long>(kvh) * D * (FP8 ? 1 : 2);
  const uint8_t* v_cache = static_cast<const uint8_t*>(p.v_cache) + static_cast<long long>(kvh) * D * (FP8 ? 1 : 2);

  // ---- This thread's two rows (r, r + 8 of the warp): context, window start; Q as A fragments.
  int row_ctx[2], row_start[2];
  float row_mul[2];
  uint32_t qa[kSteps][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = warp * 16 + r + 8 * h;
    row_ctx[h] = j < nq ? ctx0 + j : 0;  // 0: a padding row, every key masked, never written
    row_start[h] = p.window > 0 ? row_ctx[h] - p.window : -1;
    const uint32_t* qp = reinterpret_cast<const uint32_t*>(
        p.q + static_cast<long long>(t0 + (j < nq ? j : 0)) * p.q_stride + static_cast<long long>(head) * D + 2 * c);
    float qmax = 0.f;
    uint32_t words[kSteps][2];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      words[s][0] = j < nq ? __ldg(qp + 8 * s) : 0u;      // dims 16s + 2c, +1
      words[s][1] = j < nq ? __ldg(qp + 8 * s + 4) : 0u;  // dims 16s + 8 + 2c, +1
      qmax = fmaxf(qmax, fmaxf(fmaxf(fabsf(__uint_as_float(words[s][0] << 16)),
                                     fabsf(__uint_as_float(words[s][0] & 0xFFFF0000u))),
                               fmaxf(fabsf(__uint_as_float(words[s][1] << 16)),
                                     fabsf(__uint_as_float(words[s][1] & 0xFFFF0000u)))));
    }
    float mul = p.scale_log2;  // raw MMA score -> log2 units (softcap off) or the true q.k (softcap on)
    if constexpr (FP8) {
      qmax = fmaxf(qmax, __shfl_xor_sync(0xFFFFFFFFu, qmax, 1));
      qmax = fmaxf(qmax, __shfl_xor_sync(0xFFFFFFFFu, qmax, 2));  // the row's 4 lanes hold all its dims
      const int e = q_exponent(qmax);
      const float qmul = power_of_two(e);
      mul *= power_of_two(-e);
#pragma unroll
      for (int s = 0; s < kSteps; ++s)
#pragma unroll
        for (int w = 0; w < 2; ++w)
          words[s][w] = pack_f16x2(__uint_as_float(words[s][w] << 16) * qmul,
                                   __uint_as_float(words[s][w] & 0xFFFF0000u) * qmul);
    }
    row_mul[h] = mul;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      qa[s][h] = words[s][0];      // a0 (row r) / a1 (row r + 8): dims 16s + 2c, +1
      qa[s][2 + h] = words[s][1];  // a2 / a3: dims 16s + 8 + 2c, +1
    }
  }
  // Keys this warp needs at all (its first row's window start, its last valid row's context).
  const int warp_rows = min(16, nq - warp * 16);
  const int warp_lo = warp_rows > 0 ? (p.window > 0 ? max(lo, ctx0 + warp * 16 - p.window) : lo) : 0;
  const int warp_hi = warp_rows > 0 ? ctx0 + warp * 16 + warp_rows - 1 : 0;

  float m[2] = {-1e30f, -1e30f}, l[2] = {0.f, 0.f};  // finite m: exp2(m_old - m_new) is never NaN
  int cv_exp[2] = {-1000, -1000};                     // FP8, per row: 2^cv_exp >= every V scale it has seen
  float o[2 * kSteps][4];
#pragma unroll
  for (int i = 0; i < 2 * kSteps; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  // ---- Tile loads: raw cache chunks into registers (zero outside [lo, hi)), scales for FP8.
  uint4 k_raw[LOADS], v_raw[LOADS];
  float scale_raw = 0.f;
  auto load_tile = [&](int key0) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int chunk = tid + kFlashThreads * i, key = key0 + chunk / CHUNKS, col = chunk % CHUNKS;
      k_raw[i] = v_raw[i] = make_uint4(0u, 0u, 0u, 0u);
      if (key >= lo && key < hi) {
        const long long slot = static_cast<long long>(table[key / p.block_size]) * p.block_size + key % p.block_size;
        k_raw[i] = __ldg(reinterpret_cast<const uint4*>(k_cache + slot * row_bytes) + col);
        v_raw[i] = __ldg(reinterpret_cast<const uint4*>(v_cache + slot * row_bytes) + col);
      }
    }
    if constexpr (FP8) {
      scale_raw = 0.f;
      const int key = key0 + tid % KEYS;
      if (tid < 2 * KEYS && key >= lo && key < hi) {
        const long long slot = static_cast<long long>(table[key / p.block_size]) * p.block_size + key % p.block_size;
        scale_raw = __ldg((tid < KEYS ? p.k_scale : p.v_scale) + slot * p.scale_stride + kvh);
      }
    }
  };
  auto store_tile = [&]() {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int chunk = tid + kFlashThreads * i, key = chunk / CHUNKS, col = chunk % CHUNKS;
      if constexpr (FP8) {  // 16 E4M3 bytes -> 16 f16 (two 16-byte stores)
        const uint32_t kw[4] = {k_raw[i].x, k_raw[i].y, k_raw[i].z, k_raw[i].w};
        const uint32_t vw[4] = {v_raw[i].x, v_raw[i].y, v_raw[i].z, v_raw[i].w};
        uint32_t kh[8], vh[8];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          kh[2 * w] = e4m3x2_to_f16x2(kw[w]);
          kh[2 * w + 1] = e4m3x2_to_f16x2(kw[w] >> 16);
          vh[2 * w] = e4m3x2_to_f16x2(vw[w]);
          vh[2 * w + 1] = e4m3x2_to_f16x2(vw[w] >> 16);
        }
        uint4* kd = reinterpret_cast<uint4*>(&k_tile[key][col * 16]);
        uint4* vd = reinterpret_cast<uint4*>(&v_tile[key][col * 16]);
        kd[0] = make_uint4(kh[0], kh[1], kh[2], kh[3]);
        kd[1] = make_uint4(kh[4], kh[5], kh[6], kh[7]);
        vd[0] = make_uint4(vh[0], vh[1], vh[2], vh[3]);
        vd[1] = make_uint4(vh[4], vh[5], vh[6], vh[7]);
      } else {
        *reinterpret_cast<uint4*>(&k_tile[key][col * 8]) = k_raw[i];
        *reinterpret_cast<uint4*>(&v_tile[key][col * 8]) = v_raw[i];
      }
    }
    if constexpr (FP8) {
      if (tid < KEYS) k_scale_tile[tid] = scale_raw;
      else if (tid < 2 * KEYS) v_scale_tile[tid - KEYS] = scale_raw;
    }
  };

  const int first_tile = lo - lo % KEYS;
  load_tile(first_tile);
  for (int key0 = first_tile; key0 < hi; key0 += KEYS) {
    __syncthreads();  // every warp is done with the previous tile
    store_tile();
    __syncthreads();
    if (key0 + KEYS < hi) load_tile(key0 + KEYS);  // in flight while this tile is computed
    if (key0 >= warp_hi || key0 + KEYS <= warp_lo) continue;  // nothing of this tile is visible to this warp

    // ---- S = Q . K^T
    float s[kNT][4];
#pragma unroll
    for (int t = 0; t < kNT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ks += 2) {
#pragma unroll
      for (int t = 0; t < kNT; ++t) {
        uint32_t b[4];  // matrices: keys 8t.., dims 16 ks + 8 (lane / 8): b0, b1 of step ks, then of ks + 1
        ldmatrix_x4(b, &k_tile[8 * t + (lane & 7)][16 * ks + 8 * (lane >> 3)]);
        mma_16816<FP8>(s[t], qa[ks], b[0], b[1]);
        mma_16816<FP8>(s[t], qa[ks + 1], b[2], b[3]);
      }
    }
    // ---- Scale, mask, online softmax (rows r and r + 8: elements 0, 1 and 2, 3 of each n-tile).
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
      // keys 8t + 2c, +1: one 8-byte shared load for both rows
      const float2 ks = FP8 ? *reinterpret_cast<const float2*>(&k_scale_tile[8 * t + 2 * c]) : make_float2(1.f, 1.f);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, local = 8 * t + 2 * c + (e & 1), key = key0 + local;
        float x = s[t][e] * row_mul[h];
        if constexpr (FP8) x *= (e & 1) ? ks.y : ks.x;
        if (p.softcap > 0.f) x = p.softcap_out * tanhf(x * p.softcap_in);
        x = (key < row_ctx[h] && key >= row_start[h]) ? x : -INFINITY;
        s[t][e] = x;
        row_max[h] = fmaxf(row_max[h], x);
      }
    }
    int row_exp[2] = {-1000, -1000};
    if constexpr (FP8) {  // per row: the largest V scale among the keys it sees, as a power of two (its 4 lanes)
#pragma unroll
      for (int t = 0; t < kNT; ++t) {
        const float2 vs = *reinterpret_cast<const float2*>(&v_scale_tile[8 * t + 2 * c]);
        const int e0 = ceil_exponent(vs.x), e1 = ceil_exponent(vs.y);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (s[t][2 * h] != -INFINITY) row_exp[h] = max(row_exp[h], e0);
          if (s[t][2 * h + 1] != -INFINITY) row_exp[h] = max(row_exp[h], e1);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_exp[h] = max(row_exp[h], __shfl_xor_sync(0xFFFFFFFFu, row_exp[h], 1));
        row_exp[h] = max(row_exp[h], __shfl_xor_sync(0xFFFFFFFFu, row_exp[h], 2));
        row_exp[h] = max(cv_exp[h], row_exp[h]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xFFFFFFFFu, row_max[h], 1));
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xFFFFFFFFu, row_max[h], 2));
      const float m_new = fmaxf(m[h], row_max[h]);
      alpha[h] = exp2f(m[h] - m_new);
      m[h] = m_new;
      l[h] *= alpha[h];
    }
    float p_mul[2] = {1.f, 1.f};
    if constexpr (FP8) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (cv_exp[h] != -1000)  // O and l so far were relative to 2^cv_exp: rescale to the new power of two
          alpha[h] *= power_of_two(max(-126, cv_exp[h] - row_exp[h]));
        cv_exp[h] = row_exp[h];
        p_mul[h] = power_of_two(-max(-126, min(126, cv_exp[h])));
      }
    }
#pragma unroll
    for (int i = 0; i < 2 * kSteps; ++i) {
      o[i][0] *= alpha[0]; o[i][1] *= alpha[0];
      o[i][2] *= alpha[1]; o[i][3] *= alpha[1];
    }
    uint32_t pa[kNT / 2][4];  // P as the A fragment of each k16 step of P.V
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
      float pv[4];
      const float2 vs = FP8 ? *reinterpret_cast<const float2*>(&v_scale_tile[8 * t + 2 * c]) : make_float2(1.f, 1.f);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[t][e] - m[e >> 1]);
        l[e >> 1] += pe;
        // (P * vs) first: a key this row does not see has P = 0 and a V scale the row's 2^cv need not cover, so
        // vs * 2^-cv alone may overflow (0 * inf); the power-of-two factor after it is exact either way.
        pv[e] = FP8 ? (pe * ((e & 1) ? vs.y : vs.x)) * p_mul[e >> 1] : pe;
      }
      const uint32_t top = FP8 ? pack_f16x2(pv[0], pv[1]) : pack_bf16x2(pv[0], pv[1]);
      const uint32_t bottom = FP8 ? pack_f16x2(pv[2], pv[3]) : pack_bf16x2(pv[2], pv[3]);
      pa[t / 2][(t & 1) * 2] = top;         // a0 (keys 16kk + 2c) / a2 (keys 16kk + 8 + 2c), row r
      pa[t / 2][(t & 1) * 2 + 1] = bottom;  // a1 / a3, row r + 8
    }
    // ---- O += P . V
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
#pragma unroll
      for (int np = 0; np < kSteps; ++np) {
        uint32_t b[4];  // keys 16kk + 8 (mi & 1), dims 16np + 8 (mi >> 1), transposed: b0, b1 of n-tiles 2np, 2np+1
        const int mi = lane >> 3;
        ldmatrix_x4_trans(b, &v_tile[16 * kk + 8 * (mi & 1) + (lane & 7)][16 * np + 8 * (mi >> 1)]);
        mma_16816<FP8>(o[2 * np], pa[kk], b[0], b[1]);
        mma_16816<FP8>(o[2 * np + 1], pa[kk], b[2], b[3]);
      }
    }
  }

  // ---- Normalise and write rows r, r + 8 (dims 8i + 2c, +1).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xFFFFFFFFu, l[h], 1);
    l[h] += __shfl_xor_sync(0xFFFFFFFFu, l[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = warp * 16 + r + 8 * h;
    if (j >= nq) continue;
    const float cv = FP8 ? power_of_two(max(-126, min(127, cv_exp[h]))) : 1.f;
    const float inv = l[h] > 0.f ? cv / l[h] : 0.f;
    __nv_bfloat16* dst = p.out + (static_cast<long long>(t0 + j) * p.heads + head) * D + 2 * c;
#pragma unroll
    for (int i = 0; i < 2 * kSteps; ++i)
      *reinterpret_cast<uint32_t*>(dst + 8 * i) = pack_bf16x2(o[i][2 * h] * inv, o[i][2 * h + 1] * inv);
  }
}

// Combine the splits of one (token, head): weights 2^(lse_s - max) over the normalised partial outputs. 512 threads:
// each split's weight computed once (shared memory), the sum over splits cut into 512 / D interleaved groups of
// threads so that many partial rows are in flight at once (a serial loop over 64 splits would be 64 L2 round trips);
// every reduction in a fixed order (deterministic).
constexpr int kMergeThreads = 512;

template <int D>
__global__ void __launch_bounds__(kMergeThreads) merge_splits_kernel(const float* __restrict__ part_out,
                                                                     const float* __restrict__ part_lse,
                                                                     __nv_bfloat16* __restrict__ out, int splits) {
  constexpr int kGroups = kMergeThreads / D, kWarps = kMergeThreads / 32;
  extern __shared__ float weight[];  // [splits]
  __shared__ float red_max[kWarps], red_sum[kWarps];
  __shared__ float partial[kGroups][D];
  const long long row = blockIdx.x;  // t * H + head
  const float* lse = part_lse + row * splits;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float mx = -INFINITY;
  for (int s = tid; s < splits; s += kMergeThreads) mx = fmaxf(mx, lse[s]);
  mx = warp_max(mx);
  if (lane == 0) red_max[warp] = mx;
  __syncthreads();
  mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_max[w]);
  float den = 0.f;
  for (int s = tid; s < splits; s += kMergeThreads) {
    const float w = lse[s] == -INFINITY ? 0.f : exp2f(lse[s] - mx);
    weight[s] = w;
    den += w;
  }
  den = warp_sum(den);
  if (lane == 0) red_sum[warp] = den;
  __syncthreads();
  const int d = tid % D, g = tid / D;
  const float* src = part_out + row * splits * D + d;
  float num = 0.f;
#pragma unroll 8
  for (int s = g; s < splits; s += kGroups) num += weight[s] * src[static_cast<long long>(s) * D];
  partial[g][d] = num;
  __syncthreads();
  if (g == 0) {
    den = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) den += red_sum[w];
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kGroups; ++k) total += partial[k][d];
    out[row * D + d] = __float2bfloat16_rn(den > 0.f ? total / den : 0.f);
  }
}

static int merge_splits(const AttnParams& p, int tokens, int head_dim, cudaStream_t stream) {
  if (p.splits == 1) return kOk;
  const int rows = tokens * p.heads;
  const size_t smem = static_cast<size_t>(p.splits) * sizeof(float);
  if (head_dim == 64) merge_splits_kernel<64><<<rows, kMergeThreads, smem, stream>>>(p.part_out, p.part_lse, p.out, p.splits);
  if (head_dim == 128) merge_splits_kernel<128><<<rows, kMergeThreads, smem, stream>>>(p.part_out, p.part_lse, p.out, p.splits);
  if (head_dim == 256) merge_splits_kernel<256><<<rows, kMergeThreads, smem, stream>>>(p.part_out, p.part_lse, p.out, p.splits);
  if (head_dim == 512) merge_splits_kernel<512><<<rows, kMergeThreads, smem, stream>>>(p.part_out, p.part_lse, p.out, p.splits);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

// Which decode-attention kernel runs (attention_set_variant, for measurements): 0 = the default per shape (tensor
// cores wherever instantiated and block_size % 16 == 0, else v2), 1 = v2 (CUDA cores), 2 = tensor cores with the
// other chunks per warp step (head_dim 128: 2 for FP8, 1 for bf16, instead of 4 and 2; measured slower in device
// run 2; NVFP4: see visit_attention_nv4), 3 = the default with the splits merged by the last block (in-kernel,
// counters) instead of a merge kernel.
static int g_attention_variant = 0;

bool attention_fused_merge() { return g_attention_variant == 3; }

void attention_set_variant(int variant) { g_attention_variant = variant; }

// The kernel a shape runs, as a visit: `op.template mma<D, G, TILES, FP8>()` or `op.template v2<D, G, VPL, FP8>()`.
// Tensor cores: chunks of 16 keys per warp step so that about 256 bytes of raw K/V per thread are in flight
// (64 registers); bf16 head_dim 256 would need ~300 registers and stays on v2. Head dim 512: the warps split the
// dims (paged_attention_mma_kernel), so each warp's registers are head dim 128's and its chunks per step too (FP8 4,
// bf16 2); no v2 kernel (pages must hold a multiple of 16 keys, the engine's 16 do).
template <bool FP8, class Op>
static int visit_attention(int head_dim, int group, int block_size, Op&& op) {
  const int variant = g_attention_variant;
  if (variant != 1 && block_size % 16 == 0) {
#define ADAQ_ATTN_MMA(DIM, GRP, TILES) \
  if (head_dim == DIM && group == GRP) return op.template mma<DIM, GRP, TILES, FP8>();
#define ADAQ_ATTN_MMA_G(DIM, TILES) \
  ADAQ_ATTN_MMA(DIM, 1, TILES) ADAQ_ATTN_MMA(DIM, 2, TILES) ADAQ_ATTN_MMA(DIM, 4, TILES) ADAQ_ATTN_MMA(DIM, 8, TILES)
    if (variant == 2) {
      ADAQ_ATTN_MMA_G(128, FP8 ? 2 : 1)
    }
    ADAQ_ATTN_MMA_G(64, FP8 ? 4 : 1)
    ADAQ_ATTN_MMA_G(128, FP8 ? 4 : 2)
    if constexpr (FP8) {
      ADAQ_ATTN_MMA_G(256, 1)
      ADAQ_ATTN_MMA(256, 6, 1)  // Qwen3.5-27B: 24 query heads over 4 KV heads; 6 of the n-tile's 8 columns used
    }
    ADAQ_ATTN_MMA_G(512, FP8 ? 4 : 2)
#undef ADAQ_ATTN_MMA_G
#undef ADAQ_ATTN_MMA
  }
  // v2: head_dim 64 / 128 / 256 x heads per KV head 1, 2, 4, 8 (and 256 x 6); VPL keeps G * VPL <= 64 registers of q and of the
  // accumulator.
#define ADAQ_ATTN(DIM, GRP, VPL) \
  if (head_dim == DIM && group == GRP) return op.template v2<DIM, GRP, VPL, FP8>();
  ADAQ_ATTN(64, 1, 16) ADAQ_ATTN(64, 2, 16) ADAQ_ATTN(64, 4, 16) ADAQ_ATTN(64, 8, 8)
  ADAQ_ATTN(128, 1, 16) ADAQ_ATTN(128, 2, 16) ADAQ_ATTN(128, 4, 16) ADAQ_ATTN(128, 8, 8)
  ADAQ_ATTN(256, 1, 16) ADAQ_ATTN(256, 2, 16) ADAQ_ATTN(256, 4, 16) ADAQ_ATTN(256, 8, 8)
  ADAQ_ATTN(256, 6, 8)  // Qwen3.5-27B's bf16 baseline (bf16 KV): G * VPL = 48
#undef ADAQ_ATTN
  return kUnsupportedShape;
}

template <int G, bool FP8>
constexpr int v2_tokens_per_step() { return FP8 && G < 8 ? 8 : 4; }

// KV cache formats as the host functions take them (binding.cpp picks one from the cache's dtype).
enum KvFormat : int { kKvBf16 = 0, kKvFp8 = 1, kKvNvfp4 = 2 };

// NVFP4 KV, decode: the tensor-core kernel only (no v2: pages must hold a multiple of 16 keys, the engine's 16 do),
// every head dim and group. TILES: head_dim 64 / 128 keep FP8's 4 chunks per warp step (half the raw bytes in
// flight, and room for the scale registers), but 128 with 4 heads per KV head takes 2 and 256 takes 1: with more,
// ptxas spilled (sm_89, nvcc 13: 8 bytes at 168 registers for 128 x 4, 28-40 bytes at 255 for 256 x 2 tiles).
// 128 x 4 with 3 tiles (no spill) ran 11 % slower than with 2 at 32k keys x batch 16 on the H100 (456 against
// 411 us, bench/results/session5): the kernel is bound by its dequantizing instructions there, not by the bytes
// in flight; 2 tiles also take 128 registers, 4 blocks per SM (3 tiles: 168, 3 blocks).
// Since the codes convert as 16-bit-apart pairs (27 % fewer instructions in 128 x 4's loop), ptxas fits more
// tiles without spills: 128 x 4 with 4 tiles (184 registers, 2 blocks per SM: the same chunks in flight per SM as
// 2 tiles x 4 blocks, half the warps) and 256 with 2 (221-229 registers, 2 blocks; 1 tile: 168, 3 blocks). Which
// wins is a measurement: variant 2 runs them (head_dim 128: 4 tiles at 4 heads per KV head, 2 at 1, 2, 8; head dim
// 256: 2), so that one device run compares both tilings without a rebuild.
template <class Op>
static int visit_attention_nv4(int head_dim, int group, int block_size, Op&& op) {
  if (block_size % 16 != 0) return kUnsupportedShape;
#define ADAQ_ATTN_NV4(DIM, GRP, TILES) \
  if (head_dim == DIM && group == GRP) return op.template mma<DIM, GRP, TILES, true, true>();
#define ADAQ_ATTN_NV4_G(DIM, TILES) \
  ADAQ_ATTN_NV4(DIM, 1, TILES) ADAQ_ATTN_NV4(DIM, 2, TILES) ADAQ_ATTN_NV4(DIM, 4, TILES) ADAQ_ATTN_NV4(DIM, 8, TILES)
  if (g_attention_variant == 2) {
    ADAQ_ATTN_NV4(128, 1, 2) ADAQ_ATTN_NV4(128, 2, 2) ADAQ_ATTN_NV4(128, 4, 4) ADAQ_ATTN_NV4(128, 8, 2)
    ADAQ_ATTN_NV4_G(256, 2)
    ADAQ_ATTN_NV4(256, 6, 2)
  }
  ADAQ_ATTN_NV4_G(64, 4)
  ADAQ_ATTN_NV4(128, 1, 4) ADAQ_ATTN_NV4(128, 2, 4) ADAQ_ATTN_NV4(128, 4, 2) ADAQ_ATTN_NV4(128, 8, 4)
  ADAQ_ATTN_NV4_G(256, 1)
  ADAQ_ATTN_NV4(256, 6, 1)
  ADAQ_ATTN_NV4(512, 1, 4) ADAQ_ATTN_NV4(512, 2, 4) ADAQ_ATTN_NV4(512, 4, 2) ADAQ_ATTN_NV4(512, 8, 4)
#undef ADAQ_ATTN_NV4_G
#undef ADAQ_ATTN_NV4
  return kUnsupportedShape;
}

// NVFP4 KV, prefill over the cache: v3's prefill (QT consecutive queries per block, as FP8 head_dim 256 runs), for
// every head dim; the flash kernel (v4) stages K/V tiles in shared memory as FP8/bf16 and has no NVFP4 loader yet.
// Head dim 256 with 8 heads per KV head has no whole n-tile pair: the per-query decode kernel serves it. Head dim
// 512 splits the dims over the warps: head dim 128's tiling (two n-tiles, 16 / G queries).
template <class Op>
static int visit_prefill_nv4(int head_dim, int group, int block_size, Op&& op) {
  if (block_size % 16 != 0 || group < 1 || group > 8) return kUnsupportedShape;
#define ADAQ_ATTN_PF_NV4(DIM, GRP, TILES, QT) \
  if (head_dim == DIM && group == GRP) return op.template prefill<DIM, GRP, TILES, true, QT, true>();
  ADAQ_ATTN_PF_NV4(64, 1, 2, 16) ADAQ_ATTN_PF_NV4(64, 2, 2, 8) ADAQ_ATTN_PF_NV4(64, 4, 2, 4)
  ADAQ_ATTN_PF_NV4(64, 8, 2, 2)
  ADAQ_ATTN_PF_NV4(128, 1, 2, 16) ADAQ_ATTN_PF_NV4(128, 2, 2, 8) ADAQ_ATTN_PF_NV4(128, 4, 2, 4)
  ADAQ_ATTN_PF_NV4(128, 8, 2, 2)
  ADAQ_ATTN_PF_NV4(256, 1, 1, 8) ADAQ_ATTN_PF_NV4(256, 2, 1, 4) ADAQ_ATTN_PF_NV4(256, 4, 1, 2)
  ADAQ_ATTN_PF_NV4(512, 1, 2, 16) ADAQ_ATTN_PF_NV4(512, 2, 2, 8) ADAQ_ATTN_PF_NV4(512, 4, 2, 4)
  ADAQ_ATTN_PF_NV4(512, 8, 2, 2)
#undef ADAQ_ATTN_PF_NV4
  return kUnsupportedShape;
}

// One visit per cache format.
template <class Op>
static int visit_attention_kv(int kv_format, int head_dim, int group, int block_size, Op&& op) {
  if (kv_format == kKvNvfp4) return visit_attention_nv4(head_dim, group, block_size, op);
  return kv_format == kKvFp8 ? visit_attention<true>(head_dim, group, block_size, op)
                             : visit_attention<false>(head_dim, group, block_size, op);
}

struct LaunchAttention {
  const AttnParams& p;
  int tokens;
  cudaStream_t stream;
  template <int D, int G, int TILES, bool FP8, bool NV4 = false>
  int mma() const {
    paged_attention_mma_kernel<D, G, TILES, FP8, 1, NV4>
        <<<dim3(p.splits, p.kv_heads, tokens), kAttnThreads, 0, stream>>>(p);
    if (cudaGetLastError() != cudaSuccess) return kCudaError;
    return p.counters != nullptr ? kOk : merge_splits(p, tokens, D, stream);
  }
  template <int D, int G, int VPL, bool FP8>
  int v2() const {
    AttnParams q = p;
    q.counters = nullptr;  // v2 has no in-kernel merge
    paged_attention_kernel<D, G, VPL, v2_tokens_per_step<G, FP8>(), FP8>
        <<<dim3(q.splits, q.kv_heads, tokens), kAttnThreads, 0, stream>>>(q);
    return cudaGetLastError() == cudaSuccess ? merge_splits(q, tokens, D, stream) : kCudaError;
  }
};

// What the split planner needs of a kernel: its function (for the occupancy query) and the keys one block
// consumes per round of its warps.
struct AttentionKernelInfo {
  const void* fn = nullptr;
  int round_keys = 0;
  bool tensor_cores = false;
  template <int D, int G, int TILES, bool FP8, bool NV4 = false>
  int mma() {
    fn = reinterpret_cast<const void*>(paged_attention_mma_kernel<D, G, TILES, FP8, 1, NV4>);
    round_keys = (D > 256 ? 1 : kAttnThreads / 32) * TILES * 16;  // head dim 512: the warps share the chunks
    tensor_cores = true;
    return kOk;
  }
  template <int D, int G, int VPL, bool FP8>
  int v2() {
    fn = reinterpret_cast<const void*>(paged_attention_kernel<D, G, VPL, v2_tokens_per_step<G, FP8>(), FP8>);
    round_keys = 64;
    return kOk;
  }
};

static int flash_warps() { return g_attention_variant == 5 ? 12 - kFlashDefaultWarps : kFlashDefaultWarps; }

// Prefill over the cache. Head dims 64 and 128: the flash kernel (v4, 64 queries of one head per block). Otherwise
// (and with attention_set_variant(4), for comparison) v3's prefill: QT consecutive queries of a sequence per block
// (16 / G for head_dim <= 128: two n-tiles of 8 columns; 8 / G for 256: one; 16 / G for 512, whose warps split the
// dims: head dim 128's registers), so each K/V chunk is read and converted once per QT queries. bf16 head_dim 256 is
// not instantiated (per-query decode kernel instead). No flash kernel for 512: its two f16 tiles of 64 keys would
// take 133 KB of shared memory (Ada: 100 KB per SM).
template <bool FP8, class Op>
static int visit_prefill(int head_dim, int group, int block_size, Op&& op) {
  if (g_attention_variant == 1 || block_size % 16 != 0 || group < 1 || group > 8) return kUnsupportedShape;
  if (g_attention_variant != 4) {  // 5: the flash kernel with the other block size
    if (head_dim == 64) return op.template flash<64, FP8>();
    if (head_dim == 128) return op.template flash<128, FP8>();
  }
#define ADAQ_ATTN_PF(DIM, GRP, TILES, QT) \
  if (head_dim == DIM && group == GRP) return op.template prefill<DIM, GRP, TILES, FP8, QT>();
  ADAQ_ATTN_PF(64, 1, FP8 ? 2 : 1, 16) ADAQ_ATTN_PF(64, 2, FP8 ? 2 : 1, 8)
  ADAQ_ATTN_PF(64, 4, FP8 ? 2 : 1, 4) ADAQ_ATTN_PF(64, 8, FP8 ? 2 : 1, 2)
  ADAQ_ATTN_PF(128, 1, FP8 ? 2 : 1, 16) ADAQ_ATTN_PF(128, 2, FP8 ? 2 : 1, 8)
  ADAQ_ATTN_PF(128, 4, FP8 ? 2 : 1, 4) ADAQ_ATTN_PF(128, 8, FP8 ? 2 : 1, 2)
  if constexpr (FP8) {
    ADAQ_ATTN_PF(256, 1, 1, 8) ADAQ_ATTN_PF(256, 2, 1, 4) ADAQ_ATTN_PF(256, 4, 1, 2)
  }
  ADAQ_ATTN_PF(512, 1, FP8 ? 2 : 1, 16) ADAQ_ATTN_PF(512, 2, FP8 ? 2 : 1, 8)
  ADAQ_ATTN_PF(512, 4, FP8 ? 2 : 1, 4) ADAQ_ATTN_PF(512, 8, FP8 ? 2 : 1, 2)
#undef ADAQ_ATTN_PF
  return kUnsupportedShape;
}

struct LaunchPrefill {
  const AttnParams& p;
  int blocks;
  cudaStream_t stream;
  template <int D, int G, int TILES, bool FP8, int QT, bool NV4 = false>
  int prefill() const {
    AttnParams q = p;
    q.counters = nullptr;
    paged_attention_mma_kernel<D, G, TILES, FP8, QT, NV4>
        <<<dim3(q.splits, q.kv_heads, blocks), kAttnThreads, 0, stream>>>(q);
    return cudaGetLastError() == cudaSuccess ? merge_splits(q, p.tokens_total, D, stream) : kCudaError;
  }
  template <int D, bool FP8>
  int flash() const {  // writes the output itself: no splits, no merge
    if (flash_warps() == 8)
      prefill_flash_kernel<D, FP8, 8><<<dim3(blocks, p.heads), 256, 0, stream>>>(p);
    else
      prefill_flash_kernel<D, FP8, 4><<<dim3(blocks, p.heads), 128, 0, stream>>>(p);
    return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
  }
};

struct PrefillBlockTokens {
  template <int D, int G, int TILES, bool FP8, int QT, bool NV4 = false>
  int prefill() const { return QT; }
  template <int D, bool FP8>
  int flash() const { return flash_warps() * 16; }
};

template <class Op>
static int visit_prefill_kv(int kv_format, int head_dim, int group, int block_size, Op&& op) {
  if (kv_format == kKvNvfp4) return visit_prefill_nv4(head_dim, group, block_size, op);
  return kv_format == kKvFp8 ? visit_prefill<true>(head_dim, group, block_size, op)
                             : visit_prefill<false>(head_dim, group, block_size, op);
}

int attention_prefill_block_tokens(int head_dim, int group, int kv_format, int block_size) {
  const int qt = visit_prefill_kv(kv_format, head_dim, group, block_size, PrefillBlockTokens{});
  return qt == kUnsupportedShape ? 0 : qt;
}

// Resident blocks per SM of a kernel, asked once per kernel (host-side cache: no CUDA call per decode step).
static int blocks_per_sm(const void* fn) {
  static const void* keys[64];
  static int values[64];
  static int used = 0;
  for (int i = 0; i < used; ++i)
    if (keys[i] == fn) return values[i];
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, kAttnThreads, 0) != cudaSuccess || n < 1) n = 1;
  if (used < 64) {
    keys[used] = fn;
    values[used++] = n;
  }
  return n;
}

// Splits of the context per (query token, KV head). Tensor-core kernel: at most one wave of resident blocks (slots
// from the occupancy API), the fewest splits with the fewest rounds of chunks per block, so that at batch 1 every
// K/V byte is requested at the start; v2: about two blocks per SM, >= 64 keys each.
int attention_splits(int tokens, int kv_heads, int max_context, int head_dim, int group, int kv_format,
                     int block_size) {
  int sms = 0, dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  AttentionKernelInfo info;
  const int status = visit_attention_kv(kv_format, head_dim, group, block_size, info);
  const int work = tokens * kv_heads;
  int s;
  if (status != kOk || !info.tensor_cores) {
    s = min(ceil_div(2 * sms, work), ceil_div(max_context, 64));
  } else {
    // Up to one wave of resident blocks (more splits than that only add partial rows to merge), the fewest splits
    // that reach the fewest rounds of chunks per block: batch 1 gets one round (every byte requested at once),
    // batches that fill the GPU alone get one split.
    const int slots = sms * blocks_per_sm(info.fn);
    const int cap = max(1, min(ceil_div(max_context, info.round_keys), slots / work));
    const int rounds = ceil_div(max_context, cap * info.round_keys);
    const int best = ceil_div(max_context, rounds * info.round_keys);
    s = best;
  }
  return s < 1 ? 1 : s;
}

int paged_attention(const __nv_bfloat16* q, long long q_stride, const void* k_cache, const void* v_cache,
                    int slot_rows, const float* k_scale, const float* v_scale, int scale_stride, int kv_format,
                    const int* block_tables, int table_stride,
                    const int* context_lens, const int* query_seq, const int* query_ctx, __nv_bfloat16* out,
                    float* part_out, float* part_lse, int tokens, int heads, int kv_heads, int head_dim,
                    int block_size, int splits, int window, float scale, float softcap, int* counters,
                    int num_counters, const int* query_blocks, int num_query_blocks, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (kv_heads < 1 || heads % kv_heads != 0 || splits < 1) return kUnsupportedShape;
  AttnParams p{};
  p.q = q; p.q_stride = q_stride; p.k_cache = k_cache; p.v_cache = v_cache; p.k_scale = k_scale; p.v_scale = v_scale;
  p.slot_rows = slot_rows; p.scale_stride = scale_stride;
  p.block_tables = block_tables; p.table_stride = table_stride; p.context_lens = context_lens;
  p.query_seq = query_seq; p.query_ctx = query_ctx; p.out = out; p.part_out = part_out; p.part_lse = part_lse;
  p.block_size = block_size; p.kv_heads = kv_heads; p.heads = heads; p.splits = splits; p.window = window;
  p.softcap = softcap; p.scale = scale;
  p.softcap_in = softcap > 0.f ? scale / softcap : 0.f;
  p.softcap_out = softcap * kLog2e;
  p.counters = attention_fused_merge() && counters != nullptr && tokens * kv_heads <= num_counters ? counters : nullptr;
  p.scale_log2 = softcap > 0.f ? 1.f : scale * kLog2e;
  p.tokens_total = tokens;
  p.query_blocks = query_blocks;
  const int group = heads / kv_heads;
  if (query_blocks != nullptr) {
    if (num_query_blocks < 1) return kOk;
    const LaunchPrefill launch{p, num_query_blocks, stream};
    return visit_prefill_kv(kv_format, head_dim, group, block_size, launch);
  }
  const LaunchAttention launch{p, tokens, stream};
  return visit_attention_kv(kv_format, head_dim, group, block_size, launch);
}

}  // namespace adaq
