// Paged KV cache: the FP8 store kernel and paged decode attention (flash-decoding with a merge kernel).
//
// Cache per layer: [num_blocks, block_size, num_kv_heads, head_dim], E4M3 bytes or bf16; FP8 caches carry fp32
// scales [num_blocks, block_size, num_kv_heads]: s = max(amax(|x[token, head, :]|) / 448, 1e-12), stored
// e4m3(x / s) (docs/ARCHITECTURE.md). Slot = block * block_size + offset; slot -1 is skipped (padded rows of a
// CUDA-graph batch).
//
// Attention: each query token t attends to keys [start, ctx) of its sequence, ctx = its position + 1, start =
// ctx - window for sliding layers. One block serves one (query token, KV head, split): the G = H / Hkv query heads
// of the group share each K/V byte read (GQA), and long contexts are cut into `splits` ranges merged afterwards.
#include "common.cuh"

namespace adaq {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kAttnThreads = 128;

// ---- KV store ------------------------------------------------------------------------------------------------

// One warp per (token, kv head, K-or-V): amax by warp reduction, then e4m3(x / s) with IEEE division as the
// reference computes it (no reciprocal multiply: the stored bytes match the reference bit for bit).
template <int D, bool FP8>
__global__ void store_kv_kernel(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                long long k_tok_stride, long long v_tok_stride,  // elements between tokens
                                void* __restrict__ k_cache, void* __restrict__ v_cache,
                                float* __restrict__ k_scale, float* __restrict__ v_scale,
                                const long long* __restrict__ slots, int tokens, int kv_heads) {
  constexpr int kPerLane = D / 32;
  const int warp_global = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  const int which = warp_global & 1, pair = warp_global >> 1;  // which: 0 = K, 1 = V
  const int t = pair / kv_heads, h = pair % kv_heads;
  if (t >= tokens) return;
  const long long slot = slots[t];
  if (slot < 0) return;
  const __nv_bfloat16* src = (which ? v + t * v_tok_stride : k + t * k_tok_stride) + h * D + lane * kPerLane;
  float x[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) x[i] = __bfloat162float(src[i]);
  const long long row = (slot * kv_heads + h);
  if constexpr (FP8) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) amax = fmaxf(amax, fabsf(x[i]));
    amax = warp_max(amax);
    const float s = fmaxf(amax / 448.f, 1e-12f);
    uint8_t* dst = static_cast<uint8_t*>(which ? v_cache : k_cache) + row * D + lane * kPerLane;
#pragma unroll
    for (int i = 0; i < kPerLane; i += 2) {
      const uint16_t two = static_cast<uint16_t>(float_to_e4m3_exact(__fdiv_rn(x[i], s))) |
                           static_cast<uint16_t>(float_to_e4m3_exact(__fdiv_rn(x[i + 1], s)) << 8);
      *reinterpret_cast<uint16_t*>(dst + i) = two;
    }
    if (lane == 0) (which ? v_scale : k_scale)[row] = s;
  } else {
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(which ? v_cache : k_cache) + row * D + lane * kPerLane;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[i] = src[i];
  }
}

int store_kv(const __nv_bfloat16* k, const __nv_bfloat16* v, long long k_tok_stride, long long v_tok_stride,
             void* k_cache, void* v_cache, float* k_scale, float* v_scale, const long long* slots, int tokens,
             int kv_heads, int head_dim, bool fp8, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  const int warps = tokens * kv_heads * 2;
  const int blocks = ceil_div(warps * 32, 256);
#define ADAQ_STORE(DIM)                                                                                          \
  if (head_dim == DIM) {                                                                                        \
    if (fp8)                                                                                                    \
      store_kv_kernel<DIM, true><<<blocks, 256, 0, stream>>>(k, v, k_tok_stride, v_tok_stride, k_cache, v_cache, \
                                                             k_scale, v_scale, slots, tokens, kv_heads);        \
    else                                                                                                        \
      store_kv_kernel<DIM, false><<<blocks, 256, 0, stream>>>(k, v, k_tok_stride, v_tok_stride, k_cache,         \
                                                              v_cache, k_scale, v_scale, slots, tokens, kv_heads); \
    return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;                                                \
  }
  ADAQ_STORE(64)
  ADAQ_STORE(128)
  ADAQ_STORE(256)
#undef ADAQ_STORE
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
  __nv_bfloat16* out;            // [T, H, D] contiguous
  float* part_out;               // [T, H, splits, D] normalised partial outputs (splits > 1)
  float* part_lse;               // [T, H, splits] log2-sum-exp of each split (splits > 1)
  long long q_stride;
  int table_stride, block_size, kv_heads, heads, splits, window;
  float scale_log2;              // softmax scale (softcap off) or 1 (softcap on), times log2(e) when off
  float softcap;                 // 0 = off
  float scale;                   // softmax scale
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
      const long long elem = (cache_row * p.kv_heads + kvh) * D + sub * VPL;
      kr[u].load(p.k_cache, elem);
      vr[u].load(p.v_cache, elem);
      if constexpr (FP8) {
        ks[u] = __ldg(p.k_scale + cache_row * p.kv_heads + kvh);
        vs[u] = __ldg(p.v_scale + cache_row * p.kv_heads + kvh);
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

// Combine the splits of one (token, head): weights 2^(lse_s - max) over the normalised partial outputs.
template <int D>
__global__ void merge_splits_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                                    __nv_bfloat16* __restrict__ out, int splits) {
  const long long row = blockIdx.x;  // t * H + head
  const float* lse = part_lse + row * splits;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse[s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float w = lse[s] == -INFINITY ? 0.f : exp2f(lse[s] - mx);
      num += w * part_out[(row * splits + s) * D + d];
      den += w;
    }
    out[row * D + d] = __float2bfloat16_rn(den > 0.f ? num / den : 0.f);
  }
}

template <int D, int G, int VPL, bool FP8>
static int launch_attention(const AttnParams& p, int tokens, cudaStream_t stream) {
  dim3 grid(p.splits, p.kv_heads, tokens);
  paged_attention_kernel<D, G, VPL, (FP8 && G < 8 ? 8 : 4), FP8><<<grid, kAttnThreads, 0, stream>>>(p);
  if (cudaGetLastError() != cudaSuccess) return kCudaError;
  if (p.splits > 1) {
    merge_splits_kernel<D><<<tokens * p.heads, D < 128 ? D : 128, 0, stream>>>(p.part_out, p.part_lse, p.out, p.splits);
    if (cudaGetLastError() != cudaSuccess) return kCudaError;
  }
  return kOk;
}

// Instantiations: head_dim 64 / 128 / 256 x heads per KV head 1, 2, 4, 8 x (FP8, bf16). VPL keeps G * VPL <= 64
// registers of q and of the accumulator.
template <bool FP8>
static int dispatch_attention(const AttnParams& p, int tokens, int head_dim, int group, cudaStream_t stream) {
#define ADAQ_ATTN(DIM, GRP, VPL) \
  if (head_dim == DIM && group == GRP) return launch_attention<DIM, GRP, VPL, FP8>(p, tokens, stream);
  ADAQ_ATTN(64, 1, 16) ADAQ_ATTN(64, 2, 16) ADAQ_ATTN(64, 4, 16) ADAQ_ATTN(64, 8, 8)
  ADAQ_ATTN(128, 1, 16) ADAQ_ATTN(128, 2, 16) ADAQ_ATTN(128, 4, 16) ADAQ_ATTN(128, 8, 8)
  ADAQ_ATTN(256, 1, 16) ADAQ_ATTN(256, 2, 16) ADAQ_ATTN(256, 4, 16) ADAQ_ATTN(256, 8, 8)
#undef ADAQ_ATTN
  return kUnsupportedShape;
}

// Splits so that tokens x kv_heads x splits covers the GPU about twice, each split keeping >= 64 keys.
int attention_splits(int tokens, int kv_heads, int max_context) {
  int sms = 0, dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int want = ceil_div(2 * sms, tokens * kv_heads);
  const int cap = ceil_div(max_context, 64);
  int s = want < cap ? want : cap;
  return s < 1 ? 1 : s;
}

int paged_attention(const __nv_bfloat16* q, long long q_stride, const void* k_cache, const void* v_cache,
                    const float* k_scale, const float* v_scale, bool fp8, const int* block_tables, int table_stride,
                    const int* context_lens, const int* query_seq, const int* query_ctx, __nv_bfloat16* out,
                    float* part_out, float* part_lse, int tokens, int heads, int kv_heads, int head_dim,
                    int block_size, int splits, int window, float scale, float softcap, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (kv_heads < 1 || heads % kv_heads != 0 || splits < 1) return kUnsupportedShape;
  AttnParams p{};
  p.q = q; p.q_stride = q_stride; p.k_cache = k_cache; p.v_cache = v_cache; p.k_scale = k_scale; p.v_scale = v_scale;
  p.block_tables = block_tables; p.table_stride = table_stride; p.context_lens = context_lens;
  p.query_seq = query_seq; p.query_ctx = query_ctx; p.out = out; p.part_out = part_out; p.part_lse = part_lse;
  p.block_size = block_size; p.kv_heads = kv_heads; p.heads = heads; p.splits = splits; p.window = window;
  p.softcap = softcap; p.scale = scale;
  p.scale_log2 = softcap > 0.f ? 1.f : scale * kLog2e;
  const int group = heads / kv_heads;
  return fp8 ? dispatch_attention<true>(p, tokens, head_dim, group, stream)
             : dispatch_attention<false>(p, tokens, head_dim, group, stream);
}

}  // namespace adaq
