// Small fused kernels: RMSNorm, gated activations (SiLU * up, gelu-tanh * up) and RoPE. Each reproduces the
// reference backend's rounding order (adaq/layers/{norm,activation,rotary}.py), so greedy decoding matches it.
#include "common.cuh"

namespace adaq {

// ---- RMSNorm: loop kernel, one warp per row, 16-byte loads; rows addressed as [outer][inner] with two strides so that the
// per-head q/k norms run on strided views of the fused qkv output without a copy.
// Qwen3: w * bf16(normed). Gemma3 (unit_offset): bf16(normed * (1 + w)) in fp32.
// Eight bf16 values (one 16-byte vector): their squares added to `sq` in fp32, in order.
__device__ __forceinline__ float add_squares8(uint4 r, float sq) {
  const uint32_t v[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float a = __uint_as_float(v[j] << 16), b = __uint_as_float(v[j] & 0xFFFF0000u);
    sq = fmaf(a, a, sq);
    sq = fmaf(b, b, sq);
  }
  return sq;
}

// Eight values times 1/rms, then the weight in the model's rounding order (see the comment above).
template <bool UNIT_OFFSET>
__device__ __forceinline__ uint4 normalize8(uint4 r, uint4 wr, float inv) {
  const uint32_t v[4] = {r.x, r.y, r.z, r.w}, wv[4] = {wr.x, wr.y, wr.z, wr.w};
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float a = __uint_as_float(v[j] << 16) * inv, b = __uint_as_float(v[j] & 0xFFFF0000u) * inv;
    const float wa = __uint_as_float(wv[j] << 16), wb = __uint_as_float(wv[j] & 0xFFFF0000u);
    if (UNIT_OFFSET) {
      o[j] = pack_bf16x2(a * (1.f + wa), b * (1.f + wb));
    } else {
      const float ra = __bfloat162float(__float2bfloat16_rn(a)), rb = __bfloat162float(__float2bfloat16_rn(b));
      o[j] = pack_bf16x2(wa * ra, wb * rb);
    }
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

template <bool UNIT_OFFSET>
__global__ void rms_norm_kernel(const __nv_bfloat16* __restrict__ x, long long outer_stride, long long inner_stride,
                                int inner, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
                                int rows, int dim, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const __nv_bfloat16* src = x + (row / inner) * outer_stride + (row % inner) * inner_stride;
  __nv_bfloat16* dst = y + static_cast<long long>(row) * dim;
  float sq = 0.f;
  for (int i = lane * 8; i < dim; i += 256) sq = add_squares8(*reinterpret_cast<const uint4*>(src + i), sq);
  sq = warp_sum(sq);
  const float inv = rsqrtf(sq / dim + eps);
  for (int i = lane * 8; i < dim; i += 256)
    *reinterpret_cast<uint4*>(dst + i) = normalize8<UNIT_OFFSET>(*reinterpret_cast<const uint4*>(src + i),
                                                                 *reinterpret_cast<const uint4*>(w + i), inv);
}

// Register-cached variant: TPR threads per row, each holding VPT 16-byte vectors of it, so the row is read once
// (the loop kernel above reads it twice and runs one warp's loads in a dependent chain: ~4 us for a 4096 row at
// batch 1, most of the norms' share of a decode step). A row wider than TPR * VPT * 8 takes the loop kernel.
template <int TPR, int VPT>
__device__ __forceinline__ float row_sum(float v, float* shared) {
#pragma unroll
  for (int o = (TPR < 32 ? TPR : 32) / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (TPR <= 32) {
    return v;
  } else {
    const int warp = threadIdx.x >> 5, first = (warp / (TPR / 32)) * (TPR / 32);
    if ((threadIdx.x & 31) == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < TPR / 32; ++i) total += shared[first + i];
    return total;
  }
}

// ADD: the residual form, norm(x + delta) with the bf16 sum (rounded once, as torch's bf16 add) also written out:
// one pass instead of an add kernel and a norm kernel (rows contiguous then).
__device__ __forceinline__ uint32_t add_bf16x2(uint32_t a, uint32_t b) {
  return pack_bf16x2(__uint_as_float(a << 16) + __uint_as_float(b << 16),
                     __uint_as_float(a & 0xFFFF0000u) + __uint_as_float(b & 0xFFFF0000u));
}

template <int TPR, int VPT, bool UNIT_OFFSET, bool ADD = false>
__global__ void rms_norm_cached_kernel(const __nv_bfloat16* __restrict__ x, long long outer_stride,
                                       long long inner_stride, int inner, const __nv_bfloat16* __restrict__ w,
                                       __nv_bfloat16* __restrict__ y, int rows, int dim, float eps,
                                       const __nv_bfloat16* __restrict__ delta = nullptr,
                                       __nv_bfloat16* __restrict__ sum = nullptr) {
  __shared__ float shared[32];
  const int row = blockIdx.x * (blockDim.x / TPR) + threadIdx.x / TPR, part = threadIdx.x % TPR;
  const bool live = row < rows;  // dead threads still take part in the block's barrier
  const __nv_bfloat16* src = x + (live ? (row / inner) * outer_stride + (row % inner) * inner_stride : 0);
  uint4 r[VPT];
  float sq = 0.f;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int i = (v * TPR + part) * 8;
    r[v] = live && i < dim ? *reinterpret_cast<const uint4*>(src + i) : make_uint4(0, 0, 0, 0);
    if (ADD && live && i < dim) {
      const long long at = static_cast<long long>(row) * dim + i;
      const uint4 d = *reinterpret_cast<const uint4*>(delta + at);
      r[v] = make_uint4(add_bf16x2(r[v].x, d.x), add_bf16x2(r[v].y, d.y), add_bf16x2(r[v].z, d.z),
                        add_bf16x2(r[v].w, d.w));
      *reinterpret_cast<uint4*>(sum + at) = r[v];
    }
    sq = add_squares8(r[v], sq);
  }
  sq = row_sum<TPR, VPT>(sq, shared);
  if (!live) return;
  const float inv = rsqrtf(sq / dim + eps);
  __nv_bfloat16* dst = y + static_cast<long long>(row) * dim;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int i = (v * TPR + part) * 8;
    if (i >= dim) break;
    *reinterpret_cast<uint4*>(dst + i) = normalize8<UNIT_OFFSET>(r[v], *reinterpret_cast<const uint4*>(w + i), inv);
  }
}

template <int TPR, int VPT>
void launch_rms_norm_cached(const __nv_bfloat16* x, long long outer_stride, long long inner_stride, int inner,
                            const __nv_bfloat16* w, __nv_bfloat16* y, int rows, int dim, float eps, bool unit_offset,
                            cudaStream_t stream) {
  constexpr int kThreads = TPR < 128 ? 128 : TPR;
  const int blocks = ceil_div(rows, kThreads / TPR);
  if (unit_offset)
    rms_norm_cached_kernel<TPR, VPT, true><<<blocks, kThreads, 0, stream>>>(x, outer_stride, inner_stride, inner, w,
                                                                            y, rows, dim, eps);
  else
    rms_norm_cached_kernel<TPR, VPT, false><<<blocks, kThreads, 0, stream>>>(x, outer_stride, inner_stride, inner,
                                                                             w, y, rows, dim, eps);
}

template <int TPR, int VPT>
void launch_add_rms_norm(const __nv_bfloat16* x, const __nv_bfloat16* delta, const __nv_bfloat16* w,
                         __nv_bfloat16* sum, __nv_bfloat16* y, int rows, int dim, float eps, bool unit_offset,
                         cudaStream_t stream) {
  constexpr int kThreads = TPR < 128 ? 128 : TPR;
  const int blocks = ceil_div(rows, kThreads / TPR);
  if (unit_offset)
    rms_norm_cached_kernel<TPR, VPT, true, true><<<blocks, kThreads, 0, stream>>>(x, dim, dim, 1, w, y, rows, dim,
                                                                                  eps, delta, sum);
  else
    rms_norm_cached_kernel<TPR, VPT, false, true><<<blocks, kThreads, 0, stream>>>(x, dim, dim, 1, w, y, rows, dim,
                                                                                   eps, delta, sum);
}

int add_rms_norm(const __nv_bfloat16* x, const __nv_bfloat16* delta, const __nv_bfloat16* w, __nv_bfloat16* sum,
                 __nv_bfloat16* y, int rows, int dim, float eps, bool unit_offset, cudaStream_t stream) {
  if (rows == 0) return kOk;
  if (dim % 8 != 0) return kBadAlignment;
  const int vectors = dim / 8;
#define ADAQ_ADD_RMS(TPR, VPT)                                                                                    \
  if (vectors <= TPR * VPT) {                                                                                   \
    launch_add_rms_norm<TPR, VPT>(x, delta, w, sum, y, rows, dim, eps, unit_offset, stream);                    \
    return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;                                                \
  }
  ADAQ_ADD_RMS(16, 1) ADAQ_ADD_RMS(32, 1) ADAQ_ADD_RMS(64, 1) ADAQ_ADD_RMS(128, 1) ADAQ_ADD_RMS(256, 1)
  ADAQ_ADD_RMS(512, 1) ADAQ_ADD_RMS(512, 2) ADAQ_ADD_RMS(512, 4)
#undef ADAQ_ADD_RMS
  return kUnsupportedShape;
}

// Threads per row: the smallest power of two (16..512) that holds the row in at most 4 vectors per thread.
bool rms_norm_cached(const __nv_bfloat16* x, long long outer_stride, long long inner_stride, int inner,
                     const __nv_bfloat16* w, __nv_bfloat16* y, int rows, int dim, float eps, bool unit_offset,
                     cudaStream_t stream) {
  const int vectors = dim / 8;
#define ADAQ_RMS(TPR, VPT)                                                                                        \
  if (vectors <= TPR * VPT) {                                                                                   \
    launch_rms_norm_cached<TPR, VPT>(x, outer_stride, inner_stride, inner, w, y, rows, dim, eps, unit_offset,   \
                                     stream);                                                                   \
    return true;                                                                                                \
  }
  ADAQ_RMS(16, 1) ADAQ_RMS(32, 1) ADAQ_RMS(64, 1) ADAQ_RMS(128, 1) ADAQ_RMS(256, 1) ADAQ_RMS(512, 1)
  ADAQ_RMS(512, 2) ADAQ_RMS(512, 4)
#undef ADAQ_RMS
  return false;
}

int rms_norm(const __nv_bfloat16* x, long long outer_stride, long long inner_stride, int inner,
             const __nv_bfloat16* w, __nv_bfloat16* y, int rows, int dim, float eps, bool unit_offset,
             cudaStream_t stream) {
  if (rows == 0) return kOk;
  if (dim % 8 != 0 || outer_stride % 8 != 0 || inner_stride % 8 != 0 || (reinterpret_cast<uintptr_t>(x) & 15))
    return kBadAlignment;
  if (!rms_norm_cached(x, outer_stride, inner_stride, inner, w, y, rows, dim, eps, unit_offset, stream)) {
    const int blocks = ceil_div(rows, 4);
    if (unit_offset)
      rms_norm_kernel<true><<<blocks, 128, 0, stream>>>(x, outer_stride, inner_stride, inner, w, y, rows, dim, eps);
    else
      rms_norm_kernel<false><<<blocks, 128, 0, stream>>>(x, outer_stride, inner_stride, inner, w, y, rows, dim, eps);
  }
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

// ---- Gated activations on x [T, 2I] (gate | up) -> [T, I]: act computed in fp32 and rounded to bf16 (as torch's
// bf16 silu / gelu do), then the bf16 product rounded once more. 8 outputs per thread, 16-byte accesses.
// (gate_act, the activation itself, lives in common.cuh: the grouped MoE GEMM applies it in its epilogue too.)
template <int KIND>
__global__ void gated_act_kernel(const __nv_bfloat16* __restrict__ x, long long ldx, __nv_bfloat16* __restrict__ y,
                                 int rows, int inter) {
  const int per_row = inter / 8;
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long long>(rows) * per_row) return;
  const int r = i / per_row, c = (i % per_row) * 8;
  const uint4 gr = *reinterpret_cast<const uint4*>(x + r * ldx + c);
  const uint4 ur = *reinterpret_cast<const uint4*>(x + r * ldx + inter + c);
  const uint32_t g[4] = {gr.x, gr.y, gr.z, gr.w}, u[4] = {ur.x, ur.y, ur.z, ur.w};
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float a = __bfloat162float(__float2bfloat16_rn(gate_act<KIND>(__uint_as_float(g[j] << 16))));
    const float b = __bfloat162float(__float2bfloat16_rn(gate_act<KIND>(__uint_as_float(g[j] & 0xFFFF0000u))));
    o[j] = pack_bf16x2(a * __uint_as_float(u[j] << 16), b * __uint_as_float(u[j] & 0xFFFF0000u));
  }
  *reinterpret_cast<uint4*>(y + static_cast<long long>(r) * inter + c) = make_uint4(o[0], o[1], o[2], o[3]);
}

int gated_activation(const __nv_bfloat16* x, long long ldx, __nv_bfloat16* y, int rows, int inter, int kind,
                     cudaStream_t stream) {
  if (rows == 0) return kOk;
  if (inter % 8 != 0 || ldx % 8 != 0 || (reinterpret_cast<uintptr_t>(x) & 15)) return kBadAlignment;
  const long long threads = static_cast<long long>(rows) * (inter / 8);
  const int blocks = static_cast<int>((threads + 255) / 256);
  if (kind == 0)
    gated_act_kernel<0><<<blocks, 256, 0, stream>>>(x, ldx, y, rows, inter);
  else
    gated_act_kernel<1><<<blocks, 256, 0, stream>>>(x, ldx, y, rows, inter);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

// ---- RoPE (rotate-half) on q [T, H, D] and k [T, Hkv, D] (contiguous), out of place. cos/sin of the fp32 angle
// are rounded to bf16 and each product and the sum rounded to bf16, as the reference's bf16 tensor ops do.
__global__ void rotary_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                              __nv_bfloat16* __restrict__ q_out, __nv_bfloat16* __restrict__ k_out,
                              const long long* __restrict__ positions, const float* __restrict__ inv_freq, int tokens,
                              int heads, int kv_heads, int dim) {
  const int half = dim / 2;
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long per_token = static_cast<long long>(heads + kv_heads) * half;
  if (i >= tokens * per_token) return;
  const int t = i / per_token, rem = i % per_token, head = rem / half, d = rem % half;
  const float angle = static_cast<float>(positions[t]) * inv_freq[d];
  const float c = __bfloat162float(__float2bfloat16_rn(cosf(angle)));
  const float s = __bfloat162float(__float2bfloat16_rn(sinf(angle)));
  const bool is_q = head < heads;
  const long long base = is_q ? (static_cast<long long>(t) * heads + head) * dim
                              : (static_cast<long long>(t) * kv_heads + head - heads) * dim;
  const __nv_bfloat16* src = is_q ? q : k;
  __nv_bfloat16* dst = is_q ? q_out : k_out;
  const float x1 = __bfloat162float(src[base + d]), x2 = __bfloat162float(src[base + d + half]);
  auto r = [](float v) { return __bfloat162float(__float2bfloat16_rn(v)); };
  dst[base + d] = __float2bfloat16_rn(r(x1 * c) + r(-x2 * s));
  dst[base + d + half] = __float2bfloat16_rn(r(x2 * c) + r(x1 * s));
}

int rotary(const __nv_bfloat16* q, const __nv_bfloat16* k, __nv_bfloat16* q_out, __nv_bfloat16* k_out,
           const long long* positions, const float* inv_freq, int tokens, int heads, int kv_heads, int dim,
           cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (dim % 2 != 0) return kUnsupportedShape;
  const long long threads = static_cast<long long>(tokens) * (heads + kv_heads) * (dim / 2);
  rotary_kernel<<<static_cast<int>((threads + 255) / 256), 256, 0, stream>>>(q, k, q_out, k_out, positions, inv_freq,
                                                                             tokens, heads, kv_heads, dim);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace adaq
