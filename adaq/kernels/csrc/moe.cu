// MoE decode helpers: the fused router (softmax + top-k + renormalise), the grouping of (token, slot) rows by
// expert that the grouped NVFP4 GEMM reads, and the weighted combine. All device-side: no host sync, so a MoE
// decode step can be captured in a CUDA graph.
#include "common.cuh"

namespace adaq {

constexpr int kMaxExperts = 512;
// Grouping takes one more run of 32 experts than routing: the fused route appends a shared expert as expert E, so
// a 512-expert model with a shared expert (Qwen3-Next) groups 513.
constexpr int kMaxAlignExperts = kMaxExperts + 32;
constexpr int kMaxTopK = 16;

// One warp per token: softmax in fp32 over E logits, then top_k rounds of warp argmax (ties: lowest expert, as
// torch.topk returns them), renormalised in fp32 when asked, weights rounded to bf16 like the reference. ids_copy
// (optional) receives the token's expert ids too (the fused route kernel's shared-memory copy).
// PER_LANE = ceil(E / 32) rounded up to 4, 8 or 16: each top-k round scans PER_LANE registers per lane before its
// 5 shuffle steps, so a 128-expert router does 4 compares per round, not the 16 that 512 experts need (the decode
// step profile of Qwen3-30B-A3B had this kernel at 9.5 us, the largest non-GEMM launch of a MoE layer).
// topk_token: the selection alone (row: the token's logits); lane j < top_k gets round j's probability and expert
// and every lane the sum of the k probabilities.
template <int PER_LANE>
__device__ __forceinline__ void topk_token(const __nv_bfloat16* __restrict__ row, int experts, int top_k,
                                           float& my_w, int& my_e, float& total) {
  const int lane = threadIdx.x & 31;
  float p[PER_LANE];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < experts ? __bfloat162float(row[e]) : -INFINITY;
    mx = fmaxf(mx, p[i]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    p[i] = lane + 32 * i < experts ? expf(p[i] - mx) : -1.f;  // -1: never chosen (probabilities are >= 0)
    sum += fmaxf(p[i], 0.f);
  }
  sum = warp_sum(sum);
  // Lane j keeps round j's choice: registers indexed by a loop counter would live in local memory.
  my_w = 0.f;
  my_e = 0;
  total = 0.f;
  for (int j = 0; j < top_k; ++j) {
    float best = -1.f;
    int best_i = 0;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i)
      if (p[i] > best) { best = p[i]; best_i = i; }  // ascending i: ties keep the lowest expert of this lane
    int best_e = best >= 0.f ? lane + 32 * best_i : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) { best = ob; best_e = oe; }
    }
    if ((best_e & 31) == lane) {
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i)
        if (i == (best_e >> 5)) p[i] = -2.f;  // taken
    }
    const float w = best / sum;
    if (lane == j) { my_w = w; my_e = best_e; }
    total += w;
  }
}

template <int PER_LANE>
__device__ __forceinline__ void route_token(const __nv_bfloat16* __restrict__ logits, int t, int experts, int top_k,
                                            bool renormalize, __nv_bfloat16* __restrict__ weights,
                                            int* __restrict__ ids, int* ids_copy) {
  const int lane = threadIdx.x & 31;
  float my_w, total;
  int my_e;
  topk_token<PER_LANE>(logits + static_cast<long long>(t) * experts, experts, top_k, my_w, my_e, total);
  if (lane < top_k) {
    const float w = renormalize ? my_w / total : my_w;
    weights[static_cast<long long>(t) * top_k + lane] = __float2bfloat16_rn(w);
    ids[static_cast<long long>(t) * top_k + lane] = my_e;
    if (ids_copy != nullptr) ids_copy[t * top_k + lane] = my_e;
  }
}

// The route_token instantiation for `experts` (<= kMaxExperts, checked by the host functions).
__device__ __forceinline__ void route_token_any(const __nv_bfloat16* __restrict__ logits, int t, int experts,
                                                int top_k, bool renormalize, __nv_bfloat16* __restrict__ weights,
                                                int* __restrict__ ids, int* ids_copy) {
  if (experts <= 128) route_token<4>(logits, t, experts, top_k, renormalize, weights, ids, ids_copy);
  else if (experts <= 256) route_token<8>(logits, t, experts, top_k, renormalize, weights, ids, ids_copy);
  else route_token<16>(logits, t, experts, top_k, renormalize, weights, ids, ids_copy);
}

__global__ void router_topk_kernel(const __nv_bfloat16* __restrict__ logits, int tokens, int experts, int top_k,
                                   bool renormalize, __nv_bfloat16* __restrict__ weights, int* __restrict__ ids) {
  const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= tokens) return;
  route_token_any(logits, t, experts, top_k, renormalize, weights, ids, nullptr);
}

// One block: counts per expert, the list of experts in use (ascending), their row ranges, and the rows (t * k + j)
// sorted by expert, ascending row order within an expert (a stable order keeps runs reproducible).
// Whole block (at least 32 threads); ids may live in global or shared memory (visible to every thread of the block).
// The exclusive scan over experts is one warp's: each lane sums a run of kMaxAlignExperts / 32 consecutive counts, a warp
// scan of those sums, then each lane walks its run (a single thread walking 128-512 experts took microseconds).
__device__ __forceinline__ void align_rows(const int* ids, int rows, int experts, int* __restrict__ group_offsets,
                                           int* __restrict__ group_expert, int* __restrict__ row_ids,
                                           int* __restrict__ num_groups) {
  constexpr int kRun = kMaxAlignExperts / 32;
  __shared__ int count[kMaxAlignExperts], start[kMaxAlignExperts];
  for (int e = threadIdx.x; e < kMaxAlignExperts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int r = threadIdx.x; r < rows; r += blockDim.x) atomicAdd(&count[ids[r]], 1);
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x, e0 = lane * kRun;
    int rows_in_run = 0, used_in_run = 0;
#pragma unroll
    for (int i = 0; i < kRun; ++i) {
      rows_in_run += count[e0 + i];
      used_in_run += count[e0 + i] > 0;
    }
    int rows_before = rows_in_run, used_before = used_in_run;  // inclusive warp scans, made exclusive below
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int a = __shfl_up_sync(0xffffffffu, rows_before, o), b = __shfl_up_sync(0xffffffffu, used_before, o);
      if (lane >= o) { rows_before += a; used_before += b; }
    }
    int offset = rows_before - rows_in_run, group = used_before - used_in_run;
#pragma unroll
    for (int i = 0; i < kRun; ++i) {
      const int e = e0 + i;
      start[e] = offset;
      if (count[e] > 0 && e < experts) {
        group_offsets[group] = offset;
        group_expert[group] = e;
        ++group;
      }
      offset += count[e];
    }
    if (lane == 31) {
      group_offsets[group] = offset;
      *num_groups = group;
    }
  }
  __syncthreads();
  // Stable placement: row r's rank among earlier rows of its expert (rows <= a few thousand in decode).
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int e = ids[r];
    int rank = 0;
    for (int q = 0; q < r; ++q) rank += ids[q] == e;
    row_ids[start[e] + rank] = r;
  }
}

__global__ void moe_align_kernel(const int* __restrict__ ids, int rows, int experts, int* __restrict__ group_offsets,
                                 int* __restrict__ group_expert, int* __restrict__ row_ids, int* __restrict__ num_groups) {
  align_rows(ids, rows, experts, group_offsets, group_expert, row_ids, num_groups);
}

// Router + grouping in one launch for decode batches (tokens * top_k <= kMaxRouteRows): one warp per token routes
// into global memory and a shared copy of the ids, then the whole block groups the rows by expert. One launch
// instead of two in every MoE layer of a decode step. The block has one warp per token up to 32 warps: a batch-1
// step launches 32 threads, not 1024 that would mostly wait at the barriers.
constexpr int kRouteThreads = 1024;
constexpr int kMaxRouteRows = 64 * kMaxTopK;
__global__ void __launch_bounds__(kRouteThreads) moe_route_kernel(
    const __nv_bfloat16* __restrict__ logits, int tokens, int experts, int top_k, bool renormalize,
    __nv_bfloat16* __restrict__ weights, int* __restrict__ ids, int* __restrict__ group_offsets,
    int* __restrict__ group_expert, int* __restrict__ row_ids, int* __restrict__ num_groups) {
  __shared__ int ids_s[kMaxRouteRows];
  for (int t = threadIdx.x >> 5; t < tokens; t += blockDim.x / 32)
    route_token_any(logits, t, experts, top_k, renormalize, weights, ids, ids_s);
  __syncthreads();
  align_rows(ids_s, tokens * top_k, experts, group_offsets, group_expert, row_ids, num_groups);
}

// ---- The decode MoE in three launches (route, gated gate|up, down + combine; nvfp4_gemm.cu has the other two).
// Per token, slots 0..top_k-1 are the routed experts in the router's order and, with a shared expert (Qwen3.5 /
// Qwen3.6 / Qwen3-Next), slot top_k is expert E (its weights appended to the stacked experts) with weight
// bf16(sigmoid(logit E)): the router GEMM's weight carries shared_expert_gate as row E, so its logit is column E.
// Weights come out in fp32 as the combine multiplies them: bf16 values (the reference rounds routed weights to the
// logits' dtype), or fp32 times expert_scale[e] for Gemma 4 (whose reference keeps them fp32). order[t] lists the
// token's slots in ascending expert order (the combine's summation order): a slot's rank is the number of the
// token's experts below its own (distinct per token), one shuffle per slot.
template <int PER_LANE>
__device__ __forceinline__ void route_token_fused(const __nv_bfloat16* __restrict__ logits, int ld, int t,
                                                  int experts, int top_k, bool renormalize, bool shared,
                                                  const float* __restrict__ expert_scale, float* __restrict__ weights,
                                                  int* __restrict__ ids, int* __restrict__ order, int* ids_copy) {
  const int lane = threadIdx.x & 31, slots = top_k + (shared ? 1 : 0);
  const __nv_bfloat16* row = logits + static_cast<long long>(t) * ld;
  float my_w, total;
  int my_e;
  topk_token<PER_LANE>(row, experts, top_k, my_w, my_e, total);
  int rank = 0;
  for (int q = 0; q < top_k; ++q) rank += __shfl_sync(0xffffffffu, my_e, q) < my_e;
  float w = renormalize ? my_w / total : my_w;
  if (lane < top_k) w = expert_scale != nullptr ? w * expert_scale[my_e] : __bfloat162float(__float2bfloat16_rn(w));
  if (shared && lane == top_k) {
    const float logit = __bfloat162float(row[experts]);
    w = __bfloat162float(__float2bfloat16_rn(1.f / (1.f + expf(-logit))));
    my_e = experts;
    rank = top_k;
  }
  if (lane < slots) {
    const long long at = static_cast<long long>(t) * slots;
    weights[at + lane] = w;
    ids[at + lane] = my_e;
    order[at + rank] = lane;
    ids_copy[t * slots + lane] = my_e;
  }
}

__global__ void __launch_bounds__(kRouteThreads) moe_route_fused_kernel(
    const __nv_bfloat16* __restrict__ logits, int ld, int tokens, int experts, int top_k, bool renormalize,
    bool shared, const float* __restrict__ expert_scale, float* __restrict__ weights, int* __restrict__ ids,
    int* __restrict__ order, int* __restrict__ group_offsets, int* __restrict__ group_expert,
    int* __restrict__ row_ids, int* __restrict__ num_groups) {
  __shared__ int ids_s[kMaxRouteRows];
  for (int t = threadIdx.x >> 5; t < tokens; t += blockDim.x / 32) {
    if (experts <= 128)
      route_token_fused<4>(logits, ld, t, experts, top_k, renormalize, shared, expert_scale, weights, ids, order, ids_s);
    else if (experts <= 256)
      route_token_fused<8>(logits, ld, t, experts, top_k, renormalize, shared, expert_scale, weights, ids, order, ids_s);
    else
      route_token_fused<16>(logits, ld, t, experts, top_k, renormalize, shared, expert_scale, weights, ids, order,
                            ids_s);
  }
  __syncthreads();
  align_rows(ids_s, tokens * (top_k + (shared ? 1 : 0)), experts + (shared ? 1 : 0), group_offsets, group_expert,
             row_ids, num_groups);
}

// out[t] = sum over the token's k experts in ascending expert order of bf16(y[t*k+j] * w[t,j]), accumulated in
// bf16 as the reference's index_add_ into a bf16 tensor does.
__global__ void moe_combine_kernel(const __nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ w,
                                   const int* __restrict__ ids, __nv_bfloat16* __restrict__ out, int tokens, int top_k,
                                   int hidden) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long long>(tokens) * hidden) return;
  const int t = i / hidden, h = i % hidden;
  int order[kMaxTopK];
  for (int j = 0; j < top_k; ++j) order[j] = j;
  for (int a = 1; a < top_k; ++a)  // insertion sort by expert id (k <= 16)
    for (int b = a; b > 0 && ids[t * top_k + order[b]] < ids[t * top_k + order[b - 1]]; --b) {
      const int tmp = order[b]; order[b] = order[b - 1]; order[b - 1] = tmp;
    }
  float acc = 0.f;
  for (int j = 0; j < top_k; ++j) {
    const int slot = order[j];
    const float prod = __bfloat162float(__float2bfloat16_rn(
        __bfloat162float(y[(static_cast<long long>(t) * top_k + slot) * hidden + h]) *
        __bfloat162float(w[t * top_k + slot])));
    acc = __bfloat162float(__float2bfloat16_rn(acc + prod));
  }
  out[i] = __float2bfloat16_rn(acc);
}

// The grouped mid path's piece table straight from the expert-sorted slots (prefill_moe_mid): what
// ops.split_groups(align_rows_sorted(ids)) builds in ~35 small torch ops, whose host launches were most of the
// path's ~0.6 ms floor per MoE layer at 16-128 tokens (session 10's sweep: 0.58 ms where the three decode launches
// take 0.17). Piece j of expert e covers sorted rows [first_e + j * max_rows, min(first_e + (j + 1) * max_rows,
// first_{e+1})); pieces are numbered in ascending expert order; pieces past the count are empty at `rows` and
// belong to the last expert, exactly as the torch form leaves them, so both forms give the same tables.
// One block: each thread binary-searches its experts' first rows in the sorted ids (no atomics, so nothing to
// reorder), scans a contiguous run of experts' piece counts, the block scans the thread totals (warp shuffles,
// then the warp sums), and each expert writes its own pieces.
constexpr int kPieceThreads = 1024;
constexpr int kMaxPieceExperts = 2048;

__global__ void __launch_bounds__(kPieceThreads) moe_piece_table_kernel(
    const int* __restrict__ sorted_ids, int rows, int experts, int max_rows, int bound, int* __restrict__ offsets,
    int* __restrict__ group_expert, int* __restrict__ num_groups) {
  __shared__ int first_row[kMaxPieceExperts + 1];
  __shared__ int piece_end[kMaxPieceExperts];  // inclusive scan of the piece counts
  __shared__ int warp_sums[kPieceThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int e = tid; e <= experts; e += blockDim.x) {
    int lo = 0, hi = rows;  // the first row whose expert is >= e
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (sorted_ids[mid] < e) lo = mid + 1; else hi = mid;
    }
    first_row[e] = lo;
  }
  __syncthreads();
  const int per = (experts + blockDim.x - 1) / blockDim.x;
  const int begin = min(tid * per, experts), end = min(begin + per, experts);
  int local = 0;
  for (int e = begin; e < end; ++e) {
    local += (first_row[e + 1] - first_row[e] + max_rows - 1) / max_rows;
    piece_end[e] = local;
  }
  int inclusive = local;
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    int sum = lane < warps ? warp_sums[lane] : 0;
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, sum, d);
      if (lane >= d) sum += up;
    }
    if (lane < warps) warp_sums[lane] = sum;
  }
  __syncthreads();
  const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - local;
  for (int e = begin; e < end; ++e) piece_end[e] += before;
  __syncthreads();
  const int total = piece_end[experts - 1];
  for (int e = tid; e < experts; e += blockDim.x) {
    const int pieces = (first_row[e + 1] - first_row[e] + max_rows - 1) / max_rows;
    const int first_piece = piece_end[e] - pieces;
    for (int j = 0; j < pieces; ++j) {
      offsets[first_piece + j] = first_row[e] + j * max_rows;
      group_expert[first_piece + j] = e;
    }
  }
  for (int p = total + tid; p < bound; p += blockDim.x) {
    offsets[p] = rows;
    group_expert[p] = experts - 1;
  }
  if (tid == 0) {
    offsets[bound] = rows;
    num_groups[0] = total;
  }
}

int router_topk(const __nv_bfloat16* logits, int tokens, int experts, int top_k, bool renormalize,
                __nv_bfloat16* weights, int* ids, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (experts > kMaxExperts || top_k > kMaxTopK || top_k > experts) return kUnsupportedShape;
  router_topk_kernel<<<ceil_div(tokens, 4), 128, 0, stream>>>(logits, tokens, experts, top_k, renormalize, weights, ids);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int moe_align(const int* ids, int rows, int experts, int* group_offsets, int* group_expert, int* row_ids,
              int* num_groups, cudaStream_t stream) {
  if (experts > kMaxExperts) return kUnsupportedShape;
  moe_align_kernel<<<1, 512, 0, stream>>>(ids, rows, experts, group_offsets, group_expert, row_ids, num_groups);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int moe_piece_table(const int* sorted_ids, int rows, int experts, int max_rows, int* offsets, int* group_expert,
                    int* num_groups, cudaStream_t stream) {
  if (rows < 1 || experts < 1 || experts > kMaxPieceExperts || max_rows < 1) return kUnsupportedShape;
  const int bound = (rows + max_rows - 1) / max_rows + experts;
  moe_piece_table_kernel<<<1, kPieceThreads, 0, stream>>>(sorted_ids, rows, experts, max_rows, bound, offsets,
                                                          group_expert, num_groups);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int moe_route(const __nv_bfloat16* logits, int tokens, int experts, int top_k, bool renormalize,
              __nv_bfloat16* weights, int* ids, int* group_offsets, int* group_expert, int* row_ids, int* num_groups,
              cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (experts > kMaxExperts || top_k > kMaxTopK || top_k > experts || tokens * top_k > kMaxRouteRows)
    return kUnsupportedShape;
  const int threads = 32 * min(tokens, kRouteThreads / 32);
  moe_route_kernel<<<1, threads, 0, stream>>>(logits, tokens, experts, top_k, renormalize, weights, ids,
                                                    group_offsets, group_expert, row_ids, num_groups);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

// logits [tokens, ld] with ld >= experts (+ 1 with a shared expert: its gate logit at column `experts`).
int moe_route_fused(const __nv_bfloat16* logits, int ld, int tokens, int experts, int top_k, bool renormalize,
                    bool shared, const float* expert_scale, float* weights, int* ids, int* order, int* group_offsets,
                    int* group_expert, int* row_ids, int* num_groups, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  const int slots = top_k + (shared ? 1 : 0);
  if (experts > kMaxExperts || slots > 32 || top_k < 1 || top_k > kMaxTopK || top_k > experts ||
      tokens * slots > kMaxRouteRows || ld < experts + (shared ? 1 : 0))
    return kUnsupportedShape;
  const int threads = 32 * min(tokens, kRouteThreads / 32);
  moe_route_fused_kernel<<<1, threads, 0, stream>>>(logits, ld, tokens, experts, top_k, renormalize, shared,
                                                    expert_scale, weights, ids, order, group_offsets, group_expert,
                                                    row_ids, num_groups);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

int moe_combine(const __nv_bfloat16* y, const __nv_bfloat16* w, const int* ids, __nv_bfloat16* out, int tokens,
                int top_k, int hidden, cudaStream_t stream) {
  if (tokens == 0) return kOk;
  if (top_k > kMaxTopK) return kUnsupportedShape;
  const long long n = static_cast<long long>(tokens) * hidden;
  moe_combine_kernel<<<static_cast<int>((n + 255) / 256), 256, 0, stream>>>(y, w, ids, out, tokens, top_k, hidden);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

}  // namespace adaq
