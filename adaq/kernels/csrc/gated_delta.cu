// Gated DeltaNet decode (Qwen3.5 / Qwen3.6 / Qwen3-Next linear attention): one token of each of B sequences, their
// states living in slots of the engine's state cache (adaq/engine/state_cache.py). Three kernels, and the conv's
// prefill form:
//   gdn_conv_update   the depthwise causal conv1d over q|k|v with its per-slot conv state, then SiLU;
//   gdn_conv_prefill  the same over a packed prefill step (two launches: outputs, then the new states);
//   gdn_decode        the gates (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)), the q/k L2 norms and
//                     the recurrent delta-rule update of the fp32 state S [Hv, Dk, Dv], with o = S^T q;
//   gated_rms_norm    the output norm: w * rms_norm(x) * silu(z).
// Numerics follow adaq/backends/numerics/gated_delta.py step by step (fp32 inside, roundings where the reference
// rounds). Decode is memory-bound: per sequence and layer S is Hv * 64 KB (Dk = Dv = 128), read once and written
// once here; everything else a step touches is a few KB.
// Graph-safe: slots and context lengths are read on the device (a decode graph's static buffers); padded rows carry
// slot -1 and neither read nor write a state; nothing allocates.
#include "common.cuh"

namespace adaq {

// The reference's elementwise steps are separate torch ops, each rounded on its own: keep nvcc from contracting
// a multiply and an add into one fma where the reference does two roundings.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// torch's softplus (beta 1, threshold 20) and sigmoid / silu in fp32, as its CUDA kernels compute them.
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// A sequence continues a cached state when it has one (slot >= 0) and tokens before this step's one (the step
// context's rule: context_len - q_len > 0, q_len 1 in decode). Otherwise it starts from zeros, whatever the slot
// holds (a fresh slot may hold anything, NaN included: never multiplied, never read).
__device__ __forceinline__ bool continues(const long long* slots, const int* context_lens, int row) {
  return slots != nullptr && slots[row] >= 0 && context_lens[row] > 1;
}

// ---- causal conv1d update -------------------------------------------------------------------------------------
// One thread per (row, channel): the window is the slot's last KC-1 inputs then this token's input; the output is
// silu(sum_j window[j] * w[j]) in fp32 rounded to bf16, and the window's last KC-1 values become the new state.
// Channels are contiguous across a warp, so x, out and the [C, KC-1] state rows are read as one contiguous run.
template <int KC>  // conv kernel width (Qwen3.5 / Qwen3-Next: 4)
__global__ void gdn_conv_update_kernel(const __nv_bfloat16* __restrict__ x,  // [B, C], row stride ldx
                                       long long ldx,
                                       const __nv_bfloat16* __restrict__ weight,  // [C, KC]
                                       __nv_bfloat16* __restrict__ state,         // [slots, C, KC-1] or null
                                       const long long* __restrict__ slots,       // [B], -1: padded row; or null
                                       const int* __restrict__ context_lens,      // [B]
                                       __nv_bfloat16* __restrict__ out,           // [B, C]
                                       int rows, int channels) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long long>(rows) * channels) return;
  const int row = i / channels, c = i % channels;
  const bool cached = state != nullptr && continues(slots, context_lens, row);
  __nv_bfloat16* slot_state = cached ? state + (slots[row] * channels + c) * (KC - 1) : nullptr;
  __nv_bfloat16 window[KC];
#pragma unroll
  for (int j = 0; j < KC - 1; ++j) window[j] = cached ? slot_state[j] : __float2bfloat16_rn(0.f);
  window[KC - 1] = x[row * ldx + c];
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < KC; ++j) acc = add_rn(acc, mul_rn(__bfloat162float(window[j]), __bfloat162float(weight[c * KC + j])));
  out[static_cast<long long>(row) * channels + c] = __float2bfloat16_rn(silu(acc));
  if (state != nullptr && slots != nullptr && slots[row] >= 0) {  // a fresh sequence's slot gets its first state
    __nv_bfloat16* dst = state + (slots[row] * channels + c) * (KC - 1);
#pragma unroll
    for (int j = 0; j < KC - 1; ++j) dst[j] = window[j + 1];
  }
}

// ---- causal conv1d over a packed prefill step --------------------------------------------------------------------
// The prefill form of the conv (numerics.gated_delta.conv_packed, which is ~60 small torch ops per layer: on a short
// prompt their host launches, not the GPU, set the layer's time). Tokens of B sequences packed back to back
// (offsets [B+1]); a tap before a sequence's first token reads the slot's conv state when the sequence continues a
// cached one (context_len > q_len), else zero (a fresh slot may hold NaN: never read). Same fp32 order as the
// reference: acc = (((0 + t0 w0) + t1 w1) + ...), each product and sum rounded on its own, silu, bf16.
// Two launches, because the state is updated in place: every output of the step reads the old state, so the new
// one (each sequence's last KC-1 inputs, or old state values when the sequence is shorter than that) is written
// only after. One thread per (token, channel), then one per (sequence, channel); channels contiguous in a warp.
__device__ __forceinline__ int sequence_of(const int* __restrict__ offsets, int seqs, int token) {
  int lo = 0, hi = seqs - 1;  // the last s with offsets[s] <= token
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ const __nv_bfloat16* previous_state(const __nv_bfloat16* state, const long long* slots,
                                                               const int* context_lens, int seq, int q_len,
                                                               int channels, int c, int history) {
  const bool cached = state != nullptr && slots != nullptr && slots[seq] >= 0 && context_lens[seq] > q_len;
  return cached ? state + (slots[seq] * channels + c) * history : nullptr;
}

template <int KC>
__global__ void gdn_conv_prefill_kernel(const __nv_bfloat16* __restrict__ x, long long ldx,
                                        const __nv_bfloat16* __restrict__ weight,  // [C, KC]
                                        const __nv_bfloat16* __restrict__ state,   // [slots, C, KC-1] or null
                                        const long long* __restrict__ slots, const int* __restrict__ context_lens,
                                        const int* __restrict__ offsets, int seqs,
                                        __nv_bfloat16* __restrict__ out, int tokens, int channels) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long long>(tokens) * channels) return;
  const int t = i / channels, c = i % channels;
  const int s = sequence_of(offsets, seqs, t);
  const int local = t - offsets[s], q_len = offsets[s + 1] - offsets[s];
  const __nv_bfloat16* previous = previous_state(state, slots, context_lens, s, q_len, channels, c, KC - 1);
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < KC; ++j) {
    const int back = KC - 1 - j;  // this tap reads the input `back` tokens before the current one
    float tap = 0.f;
    if (local >= back) tap = __bfloat162float(x[static_cast<long long>(t - back) * ldx + c]);
    else if (previous != nullptr) tap = __bfloat162float(previous[local - back + KC - 1]);
    acc = add_rn(acc, mul_rn(tap, __bfloat162float(weight[c * KC + j])));
  }
  out[static_cast<long long>(t) * channels + c] = __float2bfloat16_rn(silu(acc));
}

template <int KC>
__global__ void gdn_conv_prefill_state_kernel(const __nv_bfloat16* __restrict__ x, long long ldx,
                                              __nv_bfloat16* __restrict__ state, const long long* __restrict__ slots,
                                              const int* __restrict__ context_lens, const int* __restrict__ offsets,
                                              int seqs, int channels) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long long>(seqs) * channels) return;
  const int s = i / channels, c = i % channels;
  if (slots[s] < 0) return;
  const int q_len = offsets[s + 1] - offsets[s];
  const __nv_bfloat16* previous = previous_state(state, slots, context_lens, s, q_len, channels, c, KC - 1);
  __nv_bfloat16 window[KC - 1];  // read it all before writing: a short sequence keeps part of its old state
#pragma unroll
  for (int m = 0; m < KC - 1; ++m) {
    const int source = q_len - (KC - 1) + m;  // the window value's index within the sequence's tokens
    if (source >= 0) window[m] = x[static_cast<long long>(offsets[s] + source) * ldx + c];
    else window[m] = previous != nullptr ? previous[q_len + m] : __float2bfloat16_rn(0.f);
  }
  __nv_bfloat16* dst = state + (slots[s] * channels + c) * (KC - 1);
#pragma unroll
  for (int m = 0; m < KC - 1; ++m) dst[m] = window[m];
}

// ---- the recurrent gated delta rule, one token --------------------------------------------------------------------
// Block = (32 value columns, value head h, row b); 4 warps. Column j of S only ever meets column j (S^T k, the
// rank-1 update k delta^T and S^T q all act per column), so a block owns 32 whole columns: lane = column, warp w
// holds rows [w DK/4, (w+1) DK/4) of them in registers. Each warp-wide row access is 128 contiguous bytes of the
// row-major [Dk, Dv] state (coalesced); the state is read with a streaming hint (evict-first: it is not read again
// this step, and the weights that follow want L2) and written back once. The two column sums over Dk (S^T k and
// S^T q) are a per-thread sum over its rows, then across the 4 warps through shared memory.
constexpr int kColumns = 32;
constexpr int kWarps = 4;

// Sum of the 4 warps' partials of this lane's column; every thread gets the total.
__device__ __forceinline__ float column_sum(float partial, float (*scratch)[kColumns]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  scratch[warp][lane] = partial;
  __syncthreads();
  const float total = (scratch[0][lane] + scratch[1][lane]) + (scratch[2][lane] + scratch[3][lane]);
  __syncthreads();  // scratch is reused by the next sum
  return total;
}

// Block-wide sum of one value per thread (the L2 norms' squares).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  const float total = (scratch[0] + scratch[1]) + (scratch[2] + scratch[3]);
  __syncthreads();
  return total;
}

// q or k of one key head into shared memory, L2-normalised in fp32 (x * rsqrt(sum x^2 + 1e-6)), times `scale`.
template <int DK>
__device__ __forceinline__ void load_normalized(const __nv_bfloat16* src, float scale, float* dst, float* scratch) {
  float squares = 0.f;
  for (int i = threadIdx.x; i < DK; i += kWarps * 32) {
    const float v = __bfloat162float(src[i]);
    dst[i] = v;
    squares += v * v;
  }
  const float inv = rsqrtf(block_sum(squares, scratch) + 1e-6f);
  for (int i = threadIdx.x; i < DK; i += kWarps * 32) dst[i] = scale == 1.f ? dst[i] * inv : (dst[i] * inv) * scale;
  __syncthreads();
}

template <int DK>  // key head dim (Qwen3.5 / Qwen3-Next: 128); the value head dim is a multiple of 32
__global__ void __launch_bounds__(kWarps * 32)
gdn_decode_kernel(const __nv_bfloat16* __restrict__ q,  // [B, Hk, DK], token stride q_stride, heads dense
                  const __nv_bfloat16* __restrict__ k,  // [B, Hk, DK], token stride k_stride
                  const __nv_bfloat16* __restrict__ v,  // [B, Hv, Dv], token stride v_stride
                  long long q_stride, long long k_stride, long long v_stride,
                  const __nv_bfloat16* __restrict__ a,        // [B, Hv] decay input, token stride a_stride
                  const __nv_bfloat16* __restrict__ b,        // [B, Hv] beta logit, token stride b_stride
                  long long a_stride, long long b_stride,
                  const __nv_bfloat16* __restrict__ a_log,    // [Hv]
                  const __nv_bfloat16* __restrict__ dt_bias,  // [Hv]
                  float* __restrict__ state,                  // [slots, Hv, DK, Dv] fp32, or null (warm-up)
                  const long long* __restrict__ slots,        // [B], -1: padded row; or null
                  const int* __restrict__ context_lens,       // [B]
                  __nv_bfloat16* __restrict__ out,            // [B, Hv, Dv]
                  int k_heads, int v_heads, int dv) {
  constexpr int kRows = DK / kWarps;
  __shared__ float qs[DK], ks[DK];
  __shared__ float scratch[kWarps][kColumns];
  const int row = blockIdx.z, h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = blockIdx.x * kColumns + lane, kh = h / (v_heads / k_heads);

  // Step 1: q, k of this value head's key head, normalised; q scaled by DK^-0.5.
  load_normalized<DK>(q + row * q_stride + kh * DK, rsqrtf(static_cast<float>(DK)), qs, &scratch[0][0]);
  load_normalized<DK>(k + row * k_stride + kh * DK, 1.f, ks, &scratch[0][0]);

  // Step 2: the gates (gdn_gates): g fp32, beta = sigmoid(b) rounded to bf16 as the reference keeps it.
  const float g = mul_rn(-expf(__bfloat162float(a_log[h])),
                         softplus(add_rn(__bfloat162float(a[row * a_stride + h]), __bfloat162float(dt_bias[h]))));
  const float beta = round_bf16(sigmoid(__bfloat162float(b[row * b_stride + h])));
  const float decay = expf(g);

  // Step 3: fetch this block's columns of S (zeros for a fresh sequence), decayed.
  const bool cached = state != nullptr && continues(slots, context_lens, row);
  float* columns = state == nullptr || slots == nullptr || slots[row] < 0 ? nullptr
      : state + ((slots[row] * v_heads + h) * static_cast<long long>(DK) + warp * kRows) * dv + col;
  float s[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) s[r] = cached ? mul_rn(__ldcs(columns + r * dv), decay) : 0.f;

  // Step 4: delta = beta (v - S^T k); S += k delta^T; o = S^T q.
  float remembered = 0.f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) remembered = fmaf(s[r], ks[warp * kRows + r], remembered);
  remembered = column_sum(remembered, scratch);
  const float value = __bfloat162float(v[row * v_stride + h * dv + col]);
  const float delta = mul_rn(add_rn(value, -remembered), beta);
  float o = 0.f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    s[r] = add_rn(s[r], mul_rn(ks[warp * kRows + r], delta));
    o = fmaf(s[r], qs[warp * kRows + r], o);
  }
  o = column_sum(o, scratch);

  // Step 5: write the output and, for a real row, the state (a padded row's slot -1 is skipped).
  if (warp == 0) out[(static_cast<long long>(row) * v_heads + h) * dv + col] = __float2bfloat16_rn(o);
  if (columns != nullptr) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) __stcs(columns + r * dv, s[r]);
  }
}

// ---- gated RMSNorm: w * bf16(rms_norm(x)) rounded to bf16, times silu(z) in fp32, rounded once -----------------
// One warp per row of D values (D = Dv, 128 in the real models): the row is read once into registers' worth of
// strided lanes, its sum of squares reduced with shuffles.
__global__ void gated_rms_norm_kernel(const __nv_bfloat16* __restrict__ x,  // [N, D] contiguous
                                      const __nv_bfloat16* __restrict__ z,  // [N, D], row stride ldz
                                      long long ldz,
                                      const __nv_bfloat16* __restrict__ w,  // [D]
                                      __nv_bfloat16* __restrict__ y,        // [N, D]
                                      int rows, int dim, float eps) {
  const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const __nv_bfloat16* src = x + static_cast<long long>(row) * dim;
  float squares = 0.f;
  for (int i = lane; i < dim; i += 32) {
    const float v = __bfloat162float(src[i]);
    squares += v * v;
  }
  const float inv = rsqrtf(warp_sum(squares) / dim + eps);
  for (int i = lane; i < dim; i += 32) {
    const float normed = round_bf16(__bfloat162float(src[i]) * inv);
    const float weighted = round_bf16(__bfloat162float(w[i]) * normed);
    const float gate = silu(__bfloat162float(z[row * ldz + i]));
    y[static_cast<long long>(row) * dim + i] = __float2bfloat16_rn(weighted * gate);
  }
}

// ---- host launchers -------------------------------------------------------------------------------------------
// Instantiations: conv widths 2, 3, 4; key head dims 32, 64, 128, 256 (value head dims: any multiple of 32).
int gdn_conv_update(const __nv_bfloat16* x, long long ldx, const __nv_bfloat16* weight, __nv_bfloat16* state,
                    const long long* slots, const int* context_lens, __nv_bfloat16* out, int rows, int channels,
                    int kernel_width, cudaStream_t stream) {
  if (rows == 0) return kOk;
  const long long threads = static_cast<long long>(rows) * channels;
  const int blocks = static_cast<int>((threads + 255) / 256);
  switch (kernel_width) {
    case 2: gdn_conv_update_kernel<2><<<blocks, 256, 0, stream>>>(x, ldx, weight, state, slots, context_lens, out, rows, channels); break;
    case 3: gdn_conv_update_kernel<3><<<blocks, 256, 0, stream>>>(x, ldx, weight, state, slots, context_lens, out, rows, channels); break;
    case 4: gdn_conv_update_kernel<4><<<blocks, 256, 0, stream>>>(x, ldx, weight, state, slots, context_lens, out, rows, channels); break;
    default: return kUnsupportedShape;
  }
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

// Prefill conv: outputs, then (with a state cache and slots) the new states.
int gdn_conv_prefill(const __nv_bfloat16* x, long long ldx, const __nv_bfloat16* weight, __nv_bfloat16* state,
                     const long long* slots, const int* context_lens, const int* offsets, int seqs,
                     __nv_bfloat16* out, int tokens, int channels, int kernel_width, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (seqs < 1 || (state != nullptr && (slots == nullptr || context_lens == nullptr))) return kUnsupportedShape;
  const int blocks = static_cast<int>((static_cast<long long>(tokens) * channels + 255) / 256);
  const int state_blocks = static_cast<int>((static_cast<long long>(seqs) * channels + 255) / 256);
  const bool update = state != nullptr && slots != nullptr;
#define ADAQ_GDN_CONV_PREFILL(KC)                                                                                 \
  gdn_conv_prefill_kernel<KC><<<blocks, 256, 0, stream>>>(x, ldx, weight, state, slots, context_lens, offsets,    \
                                                          seqs, out, tokens, channels);                          \
  if (update)                                                                                                     \
    gdn_conv_prefill_state_kernel<KC><<<state_blocks, 256, 0, stream>>>(x, ldx, state, slots, context_lens,       \
                                                                        offsets, seqs, channels);                 \
  break;
  switch (kernel_width) {
    case 2: ADAQ_GDN_CONV_PREFILL(2)
    case 3: ADAQ_GDN_CONV_PREFILL(3)
    case 4: ADAQ_GDN_CONV_PREFILL(4)
    default: return kUnsupportedShape;
  }
#undef ADAQ_GDN_CONV_PREFILL
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int gdn_decode(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, long long q_stride,
               long long k_stride, long long v_stride, const __nv_bfloat16* a, const __nv_bfloat16* b,
               long long a_stride, long long b_stride, const __nv_bfloat16* a_log, const __nv_bfloat16* dt_bias,
               float* state, const long long* slots, const int* context_lens, __nv_bfloat16* out, int rows,
               int k_heads, int v_heads, int dk, int dv, cudaStream_t stream) {
  if (rows == 0) return kOk;
  if (dv % kColumns != 0 || k_heads <= 0 || v_heads % k_heads != 0) return kUnsupportedShape;
  const dim3 grid(dv / kColumns, v_heads, rows);
#define ADAQ_GDN_DECODE(DK)                                                                                      \
  case DK:                                                                                                       \
    gdn_decode_kernel<DK><<<grid, kWarps * 32, 0, stream>>>(q, k, v, q_stride, k_stride, v_stride, a, b,        \
                                                            a_stride, b_stride, a_log, dt_bias, state, slots,   \
                                                            context_lens, out, k_heads, v_heads, dv);           \
    break;
  switch (dk) {
    ADAQ_GDN_DECODE(32) ADAQ_GDN_DECODE(64) ADAQ_GDN_DECODE(128) ADAQ_GDN_DECODE(256)
    default: return kUnsupportedShape;
  }
#undef ADAQ_GDN_DECODE
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int gated_rms_norm(const __nv_bfloat16* x, const __nv_bfloat16* z, long long ldz, const __nv_bfloat16* w,
                   __nv_bfloat16* y, int rows, int dim, float eps, cudaStream_t stream) {
  if (rows == 0) return kOk;
  gated_rms_norm_kernel<<<ceil_div(rows, 4), 128, 0, stream>>>(x, z, ldz, w, y, rows, dim, eps);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace adaq
