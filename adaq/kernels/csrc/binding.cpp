// Thin torch binding: checks tensors, allocates outputs/workspaces from torch's allocator (graph-capturable),
// launches on torch's current stream, and turns launcher status codes into errors that name the shapes.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/extension.h>

namespace adaq {
void nvfp4_gemm_set_variant(int variant);
int nvfp4_gemm_workspace(int rows, int out_rows, int N, int K, int groups, int splits_override,
                         long long* partial_floats, int* counters, int epilogue);
int nvfp4_gemm(const __nv_bfloat16* x, int ldx, const void* wq, const void* ws, const float* colscale,
               const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, float* partial, long long partial_floats,
               int* counters, int num_counters, int M, int N, int K, int splits_override, cudaStream_t stream);
int nvfp4_gemm_grouped(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                       const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                       __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                       int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                       const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                       int splits_override, cudaStream_t stream);
int nvfp4_moe_gate_up_act(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                          const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                          __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                          int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                          const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                          int act, int splits_override, cudaStream_t stream);
int nvfp4_moe_down_combine(const __nv_bfloat16* x, int ldx, const void* wq, long long expert_wq_bytes, const void* ws,
                           long long expert_ws_bytes, const float* colscale, int expert_colscale, __nv_bfloat16* y,
                           float* partial, long long partial_floats, int* counters, int num_counters,
                           const int* group_offsets, const int* group_expert, const int* row_ids,
                           const int* num_groups, int max_groups, int max_rows_per_group, int tokens, int top_k,
                           const float* weights, const int* order, __nv_bfloat16* out, int N, int K,
                           int splits_override, cudaStream_t stream);
void nvfp4_gemm_mid_set_override(int rows, int tw);
int nvfp4_gemm_mid_workspace(int rows, int out_rows, int N, int K, int groups, int splits_override,
                             long long* partial_floats, int* counters);
int nvfp4_gemm_mid(const __nv_bfloat16* x, int ldx, const void* wq, const void* ws, const float* colscale,
                   const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, float* partial, long long partial_floats,
                   int* counters, int num_counters, int M, int N, int K, int splits_override, cudaStream_t stream);
int nvfp4_gemm_mid_grouped(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                           const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                           __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                           int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                           const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                           int splits_override, cudaStream_t stream);
int nvfp4_dequantize(const void* wq, const void* ws, void* out, int n, int k, cudaStream_t stream);
int nvfp4_expand_e4m3(const void* wq, const void* ws, const float* row_mul, void* out, int n, int k,
                      cudaStream_t stream);
int store_kv(const __nv_bfloat16* k, const __nv_bfloat16* v, long long k_tok_stride, long long v_tok_stride,
             void* k_cache, void* v_cache, float* k_scale, float* v_scale, const long long* slots, int tokens,
             int kv_heads, int head_dim, int slot_rows, int scale_stride, bool fp8, cudaStream_t stream);
int store_kv_nvfp4(const __nv_bfloat16* k, const __nv_bfloat16* v, long long k_tok_stride, long long v_tok_stride,
                   void* k_cache, void* v_cache, void* k_exp, void* v_exp, const long long* slots, int tokens,
                   int kv_heads, int head_dim, int slot_rows, int scale_stride, cudaStream_t stream);
int qk_norm_rope_store(const __nv_bfloat16* q, long long q_tok_stride, const __nv_bfloat16* k, long long k_tok_stride,
                       const __nv_bfloat16* v, long long v_tok_stride, const __nv_bfloat16* q_weight,
                       const __nv_bfloat16* k_weight, float eps, bool unit_offset, const long long* positions,
                       const float* inv_freq, __nv_bfloat16* q_out, void* k_cache, void* v_cache, void* k_scale,
                       void* v_scale, const long long* slots, int tokens, int heads, int kv_heads, int head_dim,
                       int kv_format, cudaStream_t stream);
int attention_splits(int tokens, int kv_heads, int max_context, int head_dim, int group, int kv_format,
                     int block_size);
void attention_set_variant(int variant);
int paged_attention(const __nv_bfloat16* q, long long q_stride, const void* k_cache, const void* v_cache,
                    int slot_rows, const float* k_scale, const float* v_scale, int scale_stride, int kv_format,
                    const int* block_tables, int table_stride,
                    const int* context_lens, const int* query_seq, const int* query_ctx, __nv_bfloat16* out,
                    float* part_out, float* part_lse, int tokens, int heads, int kv_heads, int head_dim,
                    int block_size, int splits, int window, float scale, float softcap, int* counters,
                    int num_counters, const int* query_blocks, int num_query_blocks, cudaStream_t stream);
int attention_prefill_block_tokens(int head_dim, int group, int kv_format, int block_size);
int rms_norm(const __nv_bfloat16* x, long long outer_stride, long long inner_stride, int inner,
             const __nv_bfloat16* w, __nv_bfloat16* y, int rows, int dim, float eps, bool unit_offset,
             cudaStream_t stream);
int add_rms_norm(const __nv_bfloat16* x, const __nv_bfloat16* delta, const __nv_bfloat16* w, __nv_bfloat16* sum,
                 __nv_bfloat16* y, int rows, int dim, float eps, bool unit_offset, cudaStream_t stream);
int gated_activation(const __nv_bfloat16* x, long long ldx, __nv_bfloat16* y, int rows, int inter, int kind,
                     cudaStream_t stream);
int rotary(const __nv_bfloat16* q, const __nv_bfloat16* k, __nv_bfloat16* q_out, __nv_bfloat16* k_out,
           const long long* positions, const float* inv_freq, int tokens, int heads, int kv_heads, int dim,
           cudaStream_t stream);
int router_topk(const __nv_bfloat16* logits, int tokens, int experts, int top_k, bool renormalize,
                __nv_bfloat16* weights, int* ids, cudaStream_t stream);
int moe_route(const __nv_bfloat16* logits, int tokens, int experts, int top_k, bool renormalize,
              __nv_bfloat16* weights, int* ids, int* group_offsets, int* group_expert, int* row_ids, int* num_groups,
              cudaStream_t stream);
int moe_route_fused(const __nv_bfloat16* logits, int ld, int tokens, int experts, int top_k, bool renormalize,
                    bool shared, const float* expert_scale, float* weights, int* ids, int* order, int* group_offsets,
                    int* group_expert, int* row_ids, int* num_groups, cudaStream_t stream);
int moe_align(const int* ids, int rows, int experts, int* group_offsets, int* group_expert, int* row_ids,
              int* num_groups, cudaStream_t stream);
int moe_piece_table(const int* sorted_ids, int rows, int experts, int max_rows, int* offsets, int* group_expert,
                    int* num_groups, cudaStream_t stream);
int moe_combine(const __nv_bfloat16* y, const __nv_bfloat16* w, const int* ids, __nv_bfloat16* out, int tokens,
                int top_k, int hidden, cudaStream_t stream);
int gdn_conv_update(const __nv_bfloat16* x, long long ldx, const __nv_bfloat16* weight, __nv_bfloat16* state,
                    const long long* slots, const int* context_lens, __nv_bfloat16* out, int rows, int channels,
                    int kernel_width, cudaStream_t stream);
int gdn_conv_prefill(const __nv_bfloat16* x, long long ldx, const __nv_bfloat16* weight, __nv_bfloat16* state,
                     const long long* slots, const int* context_lens, const int* offsets, int seqs,
                     __nv_bfloat16* out, int tokens, int channels, int kernel_width, cudaStream_t stream);
int gdn_decode(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, long long q_stride,
               long long k_stride, long long v_stride, const __nv_bfloat16* a, const __nv_bfloat16* b,
               long long a_stride, long long b_stride, const __nv_bfloat16* a_log, const __nv_bfloat16* dt_bias,
               float* state, const long long* slots, const int* context_lens, __nv_bfloat16* out, int rows,
               int k_heads, int v_heads, int dk, int dv, cudaStream_t stream);
int gated_rms_norm(const __nv_bfloat16* x, const __nv_bfloat16* z, long long ldz, const __nv_bfloat16* w,
                   __nv_bfloat16* y, int rows, int dim, float eps, cudaStream_t stream);
}  // namespace adaq

namespace {

const char* status_text(int status) {
  switch (status) {
    case 1: return "shape not supported by the kernel";
    case 2: return "tensor not 16-byte aligned";
    case 3: return "workspace too small";
    default: return "CUDA launch failed";
  }
}

#define ADAQ_CHECK_STATUS(status, what)                                                                    \
  TORCH_CHECK((status) == 0, "adaq kernel ", what, ": ", status_text(status),                              \
              (status) == 4 ? std::string(" (") + cudaGetErrorString(cudaGetLastError()) + ")" : std::string())

#define ADAQ_CHECK_BF16(t) TORCH_CHECK((t).scalar_type() == at::kBFloat16, #t " must be bfloat16, got ", (t).scalar_type())
#define ADAQ_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")

const __nv_bfloat16* bf16_ptr(const torch::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); }
__nv_bfloat16* bf16_mut(torch::Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data_ptr()); }
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Dense y [M, N] = x W^T (+ bias): the decode kernel (mid = false, M <= 64) or the mid-size one (any M).
torch::Tensor dense_gemm(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, torch::Tensor colscale,
                         c10::optional<torch::Tensor> bias, torch::Tensor counters, int64_t N, int64_t K,
                         int64_t splits_override, bool mid) {
  ADAQ_CHECK_CUDA(x);
  ADAQ_CHECK_BF16(x);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.stride(1) == 1, "x must be [M, ", K, "] with unit column stride");
  const c10::cuda::CUDAGuard guard(x.device());
  const int M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  long long partial_floats = 0;
  int num_counters = 0;
  if (mid)
    adaq::nvfp4_gemm_mid_workspace(M, M, N, K, 0, splits_override, &partial_floats, &num_counters);
  else
    adaq::nvfp4_gemm_workspace(M, M, N, K, 1, splits_override, &partial_floats, &num_counters, 0);
  TORCH_CHECK(num_counters <= counters.numel(), "GEMM needs ", num_counters, " counters");
  auto partial = torch::empty({std::max<long long>(partial_floats, 1)}, x.options().dtype(at::kFloat));
  const auto launch = mid ? adaq::nvfp4_gemm_mid : adaq::nvfp4_gemm;
  const int status = launch(bf16_ptr(x), x.stride(0), wq.data_ptr(), ws.data_ptr(), colscale.data_ptr<float>(),
                            bias ? bf16_ptr(*bias) : nullptr, bf16_mut(y), N, partial.data_ptr<float>(),
                            partial_floats, counters.data_ptr<int>(), counters.numel(), M, N, K, splits_override,
                            stream());
  ADAQ_CHECK_STATUS(status, std::string(mid ? "nvfp4_gemm_mid" : "nvfp4_gemm") + " M=" + std::to_string(M) +
                                " N=" + std::to_string(N) + " K=" + std::to_string(K));
  return y;
}

torch::Tensor gemm(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, torch::Tensor colscale,
                   c10::optional<torch::Tensor> bias, torch::Tensor counters, int64_t N, int64_t K,
                   int64_t splits_override) {
  return dense_gemm(x, wq, ws, colscale, bias, counters, N, K, splits_override, false);
}

torch::Tensor gemm_mid(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, torch::Tensor colscale,
                       c10::optional<torch::Tensor> bias, torch::Tensor counters, int64_t N, int64_t K,
                       int64_t splits_override) {
  return dense_gemm(x, wq, ws, colscale, bias, counters, N, K, splits_override, true);
}

// What every grouped-GEMM entry point checks of x and the stacked weights, and its split-K scratch: partial sums
// (fp32) sized by nvfp4_gemm_workspace for this shape and epilogue (0 plain, 1 gated gate|up, 2 down + combine).
void check_grouped_inputs(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& ws,
                          const torch::Tensor& colscale, int64_t K) {
  ADAQ_CHECK_CUDA(x);
  ADAQ_CHECK_BF16(x);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.stride(1) == 1, "x must be [rows, ", K, "]");
  TORCH_CHECK(wq.dim() == 2 && ws.dim() == 2 && colscale.dim() == 2, "expert weights must be stacked [E, ...]");
}

torch::Tensor grouped_partials(const torch::Tensor& x, const torch::Tensor& counters, int64_t max_rows_per_group,
                               int64_t out_rows, int64_t N, int64_t K, int64_t max_groups, int64_t splits_override,
                               int epilogue, long long* partial_floats) {
  int num_counters = 0;
  adaq::nvfp4_gemm_workspace(max_rows_per_group, out_rows, N, K, max_groups, splits_override, partial_floats,
                             &num_counters, epilogue);
  TORCH_CHECK(num_counters <= counters.numel(), "grouped GEMM needs ", num_counters, " counters");
  return torch::empty({std::max<long long>(*partial_floats, 1)}, x.options().dtype(at::kFloat));
}

// The grouped GEMM with a plain epilogue (act < 0: y [out_rows, N]) or the fused MoE decode gated gate|up
// (act 0 silu / 1 gelu tanh: y [out_rows, N / 2], nvfp4_gemm.cu's pair_tiles). Same tables and weights either way.
torch::Tensor grouped_gemm(torch::Tensor x, int64_t x_row_div, torch::Tensor wq, torch::Tensor ws,
                           torch::Tensor colscale, torch::Tensor counters, torch::Tensor group_offsets,
                           torch::Tensor group_expert, torch::Tensor row_ids, torch::Tensor num_groups,
                           int64_t max_groups, int64_t max_rows_per_group, int64_t out_rows, int64_t N, int64_t K,
                           int64_t act, int64_t splits_override) {
  check_grouped_inputs(x, wq, ws, colscale, K);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool gated = act >= 0;
  const int64_t width = gated ? N / 2 : N;
  auto y = torch::empty({out_rows, width}, x.options());
  if (out_rows == 0) return y;
  long long partial_floats = 0;
  auto partial = grouped_partials(x, counters, max_rows_per_group, out_rows, N, K, max_groups, splits_override,
                                  gated ? 1 : 0, &partial_floats);
  const auto* xp = bf16_ptr(x);
  float* pp = partial.data_ptr<float>();
  const int status =
      gated ? adaq::nvfp4_moe_gate_up_act(xp, x.stride(0), x_row_div, wq.data_ptr(), wq.stride(0), ws.data_ptr(),
                                          ws.stride(0), colscale.data_ptr<float>(), colscale.stride(0), bf16_mut(y),
                                          width, pp, partial_floats, counters.data_ptr<int>(), counters.numel(),
                                          group_offsets.data_ptr<int>(), group_expert.data_ptr<int>(),
                                          row_ids.data_ptr<int>(), num_groups.data_ptr<int>(), max_groups,
                                          max_rows_per_group, out_rows, N, K, act, splits_override, stream())
            : adaq::nvfp4_gemm_grouped(xp, x.stride(0), x_row_div, wq.data_ptr(), wq.stride(0), ws.data_ptr(),
                                       ws.stride(0), colscale.data_ptr<float>(), colscale.stride(0), bf16_mut(y),
                                       width, pp, partial_floats, counters.data_ptr<int>(), counters.numel(),
                                       group_offsets.data_ptr<int>(), group_expert.data_ptr<int>(),
                                       row_ids.data_ptr<int>(), num_groups.data_ptr<int>(), max_groups,
                                       max_rows_per_group, out_rows, N, K, splits_override, stream());
  ADAQ_CHECK_STATUS(status, std::string(gated ? "nvfp4_moe_gate_up_act" : "nvfp4_gemm_grouped") + " rows=" +
                                std::to_string(out_rows) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                " rows/group=" + std::to_string(max_rows_per_group));
  return y;
}

torch::Tensor gemm_grouped(torch::Tensor x, int64_t x_row_div, torch::Tensor wq, torch::Tensor ws,
                           torch::Tensor colscale, torch::Tensor counters, torch::Tensor group_offsets,
                           torch::Tensor group_expert, torch::Tensor row_ids, torch::Tensor num_groups,
                           int64_t max_groups, int64_t max_rows_per_group, int64_t out_rows, int64_t N, int64_t K,
                           int64_t splits_override) {
  return grouped_gemm(x, x_row_div, wq, ws, colscale, counters, group_offsets, group_expert, row_ids, num_groups,
                      max_groups, max_rows_per_group, out_rows, N, K, -1, splits_override);
}

// The mid-size kernel's grouped form: groups of <= max_rows_per_group <= 64 rows (MoE prefill), y [out_rows, N].
torch::Tensor gemm_mid_grouped(torch::Tensor x, int64_t x_row_div, torch::Tensor wq, torch::Tensor ws,
                               torch::Tensor colscale, torch::Tensor counters, torch::Tensor group_offsets,
                               torch::Tensor group_expert, torch::Tensor row_ids, torch::Tensor num_groups,
                               int64_t max_groups, int64_t max_rows_per_group, int64_t out_rows, int64_t N, int64_t K,
                               int64_t splits_override) {
  check_grouped_inputs(x, wq, ws, colscale, K);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({out_rows, N}, x.options());
  if (out_rows == 0) return y;
  long long partial_floats = 0;
  int num_counters = 0;
  adaq::nvfp4_gemm_mid_workspace(max_rows_per_group, out_rows, N, K, max_groups, splits_override, &partial_floats,
                                 &num_counters);
  TORCH_CHECK(num_counters <= counters.numel(), "grouped GEMM needs ", num_counters, " counters");
  auto partial = torch::empty({std::max<long long>(partial_floats, 1)}, x.options().dtype(at::kFloat));
  const int status = adaq::nvfp4_gemm_mid_grouped(
      bf16_ptr(x), x.stride(0), x_row_div, wq.data_ptr(), wq.stride(0), ws.data_ptr(), ws.stride(0),
      colscale.data_ptr<float>(), colscale.stride(0), bf16_mut(y), N, partial.data_ptr<float>(), partial_floats,
      counters.data_ptr<int>(), counters.numel(), group_offsets.data_ptr<int>(), group_expert.data_ptr<int>(),
      row_ids.data_ptr<int>(), num_groups.data_ptr<int>(), max_groups, max_rows_per_group, out_rows, N, K,
      splits_override, stream());
  ADAQ_CHECK_STATUS(status, "nvfp4_gemm_mid_grouped rows=" + std::to_string(out_rows) + " N=" + std::to_string(N) +
                                " K=" + std::to_string(K) + " groups=" + std::to_string(max_groups));
  return y;
}

torch::Tensor moe_gate_up_act(torch::Tensor x, int64_t x_row_div, torch::Tensor wq, torch::Tensor ws,
                              torch::Tensor colscale, torch::Tensor counters, torch::Tensor group_offsets,
                              torch::Tensor group_expert, torch::Tensor row_ids, torch::Tensor num_groups,
                              int64_t max_groups, int64_t max_rows_per_group, int64_t out_rows, int64_t N, int64_t K,
                              int64_t act, int64_t splits_override) {
  TORCH_CHECK(act >= 0, "moe_gate_up_act needs an activation (0 silu, 1 gelu tanh)");
  return grouped_gemm(x, x_row_div, wq, ws, colscale, counters, group_offsets, group_expert, row_ids, num_groups,
                      max_groups, max_rows_per_group, out_rows, N, K, act, splits_override);
}

torch::Tensor moe_down_combine(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, torch::Tensor colscale,
                               torch::Tensor counters, torch::Tensor group_offsets, torch::Tensor group_expert,
                               torch::Tensor row_ids, torch::Tensor num_groups, int64_t max_groups,
                               int64_t max_rows_per_group, torch::Tensor weights, torch::Tensor order, int64_t N,
                               int64_t K, int64_t splits_override) {
  check_grouped_inputs(x, wq, ws, colscale, K);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 && weights.is_contiguous() &&
                  order.scalar_type() == at::kInt && order.sizes() == weights.sizes() && order.is_contiguous(),
              "combine needs fp32 weights and int32 order, both [tokens, slots]");
  const c10::cuda::CUDAGuard guard(x.device());
  const int tokens = weights.size(0), slots = weights.size(1);
  TORCH_CHECK(x.size(0) == static_cast<int64_t>(tokens) * slots, "x must have tokens x slots rows");
  auto out = torch::empty({tokens, N}, x.options());
  if (tokens == 0) return out;
  auto y = torch::empty({static_cast<int64_t>(tokens) * slots, N}, x.options());
  long long partial_floats = 0;
  auto partial = grouped_partials(x, counters, max_rows_per_group, static_cast<int64_t>(tokens) * slots, N, K,
                                  max_groups, splits_override, 2, &partial_floats);
  const int status = adaq::nvfp4_moe_down_combine(
      bf16_ptr(x), x.stride(0), wq.data_ptr(), wq.stride(0), ws.data_ptr(), ws.stride(0), colscale.data_ptr<float>(),
      colscale.stride(0), bf16_mut(y), partial.data_ptr<float>(), partial_floats, counters.data_ptr<int>(),
      counters.numel(), group_offsets.data_ptr<int>(), group_expert.data_ptr<int>(), row_ids.data_ptr<int>(),
      num_groups.data_ptr<int>(), max_groups, max_rows_per_group, tokens, slots, weights.data_ptr<float>(),
      order.data_ptr<int>(), bf16_mut(out), N, K, splits_override, stream());
  ADAQ_CHECK_STATUS(status, "nvfp4_moe_down_combine tokens=" + std::to_string(tokens) + " N=" + std::to_string(N) +
                                " K=" + std::to_string(K) + " rows/group=" + std::to_string(max_rows_per_group));
  return out;
}

// A layer's cache [blocks, block_size, Hkv, row] (row: head_dim values, or an NVFP4 row's bytes) with dense heads
// and rows but any whole number of rows (at least Hkv) from one slot (token) to the next: a layer's view into a slot
// as wide as the widest layer's (Gemma 4, adaq.engine.model_runner.layer_view). K and V alike. Returns that number of
// rows; `align`: bytes the slots and the base must be a multiple of (the kernels' widest loads).
int64_t cache_slot_rows(const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t align) {
  const auto& c = k_cache;
  TORCH_CHECK(c.dim() == 4 && c.stride(3) == 1 && c.stride(2) == c.size(3) && c.stride(1) >= c.size(2) * c.size(3) &&
                  c.stride(1) % c.size(3) == 0 && c.stride(0) == c.size(1) * c.stride(1) && v_cache.sizes() == c.sizes() &&
                  v_cache.strides() == c.strides() && v_cache.scalar_type() == c.scalar_type(),
              "KV caches must be [blocks, block_size, Hkv, row] alike, with dense heads and rows, whole rows per slot "
              "and pages of block_size slots");
  const int64_t elem = c.element_size();
  TORCH_CHECK((c.stride(1) * elem) % align == 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % align == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % align == 0,
              "KV cache slots must start at multiples of ", align, " bytes");
  return c.stride(1) / c.size(3);
}

// Scales (FP8: fp32, NVFP4: E8M0 bytes) [blocks, block_size, Hkv], dense heads, any distance between slots.
int64_t scale_slot_stride(const torch::Tensor& k_scale, const torch::Tensor& v_scale) {
  const auto& s = k_scale;
  TORCH_CHECK(s.dim() == 3 && s.stride(2) == 1 && s.stride(1) >= s.size(2) && s.stride(0) == s.size(1) * s.stride(1) &&
                  v_scale.sizes() == s.sizes() && v_scale.strides() == s.strides(),
              "KV scales must be [blocks, block_size, Hkv] alike, with dense heads");
  return s.stride(1);
}

// Bytes every slot of a cache must be aligned to: the attention kernels' 16-byte loads; NVFP4 rows of 36 / 72 bytes
// (head_dim 64 / 128) are loaded in 4 / 8-byte pieces.
int64_t cache_alignment(bool nvfp4, int64_t head_dim) {
  return nvfp4 ? (head_dim == 64 ? 4 : head_dim == 128 ? 8 : 16) : 16;
}

void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale, torch::Tensor slots) {
  ADAQ_CHECK_BF16(k);
  ADAQ_CHECK_BF16(v);
  TORCH_CHECK(k.dim() == 3 && k.stride(2) == 1 && k.stride(1) == k.size(2), "k must be [T, Hkv, D] with dense heads");
  TORCH_CHECK(v.dim() == 3 && v.stride(2) == 1 && v.stride(1) == v.size(2), "v must be [T, Hkv, D] with dense heads");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), "slot_mapping must be int64 [T]");
  const bool nvfp4 = k_cache.scalar_type() == at::kByte;
  const int64_t slot_rows = cache_slot_rows(k_cache, v_cache, cache_alignment(nvfp4, k.size(2)));
  TORCH_CHECK(k_cache.size(2) == k.size(1), "k has ", k.size(1), " KV heads, the cache ", k_cache.size(2));
  if (nvfp4) {  // NVFP4: rows of D/2 + D/16 bytes, uint8 E8M0 exponents as scales
    const int64_t D = k.size(2);
    TORCH_CHECK(k_cache.size(-1) == D / 2 + D / 16, "an NVFP4 KV cache has rows of head_dim / 2 + head_dim / 16 bytes");
    TORCH_CHECK(k_scale && v_scale && k_scale->scalar_type() == at::kByte && v_scale->scalar_type() == at::kByte,
                "an NVFP4 KV cache needs its uint8 exponent tensors");
    const int64_t scale_stride = scale_slot_stride(*k_scale, *v_scale);
    const c10::cuda::CUDAGuard guard(k.device());
    const int status = adaq::store_kv_nvfp4(
        bf16_ptr(k), bf16_ptr(v), k.stride(0), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        k_scale->data_ptr(), v_scale->data_ptr(), reinterpret_cast<const long long*>(slots.data_ptr<int64_t>()),
        k.size(0), k.size(1), D, slot_rows, scale_stride, stream());
    ADAQ_CHECK_STATUS(status, "store_kv (nvfp4) head_dim=" + std::to_string(D));
    return;
  }
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || k_cache.scalar_type() == at::kBFloat16, "KV cache must be float8_e4m3fn or bfloat16");
  TORCH_CHECK(!fp8 || (k_scale && v_scale), "an FP8 KV cache needs its scales");
  TORCH_CHECK(k_cache.size(3) == k.size(2), "k has head_dim ", k.size(2), ", the cache rows ", k_cache.size(3));
  const int64_t scale_stride = fp8 ? scale_slot_stride(*k_scale, *v_scale) : 0;
  const c10::cuda::CUDAGuard guard(k.device());
  const int status = adaq::store_kv(bf16_ptr(k), bf16_ptr(v), k.stride(0), v.stride(0), k_cache.data_ptr(),
                                    v_cache.data_ptr(), fp8 ? k_scale->data_ptr<float>() : nullptr,
                                    fp8 ? v_scale->data_ptr<float>() : nullptr, reinterpret_cast<const long long*>(slots.data_ptr<int64_t>()), k.size(0),
                                    k.size(1), k.size(2), slot_rows, scale_stride, fp8, stream());
  ADAQ_CHECK_STATUS(status, "store_kv head_dim=" + std::to_string(k.size(2)));
}

// The fused decode prologue (attention.cu qk_norm_rope_store_kernel): q/k RMSNorm, RoPE and the KV store in one
// launch; returns the normed, rotated queries [T, H, D]. q, k, v may be views of the fused qkv output (dense heads).
torch::Tensor qk_norm_rope_store(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor q_weight,
                                 torch::Tensor k_weight, double eps, bool unit_offset, torch::Tensor positions,
                                 torch::Tensor inv_freq, torch::Tensor k_cache, torch::Tensor v_cache,
                                 c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                 torch::Tensor slots) {
  for (const auto* t : {&q, &k, &v}) {
    ADAQ_CHECK_BF16(*t);
    TORCH_CHECK(t->is_cuda() && t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2),
                "qk_norm_rope_store: q, k, v must be [T, heads, D] CUDA tensors with dense heads");
  }
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.size(2) == D && v.size(2) == D && v.size(1) == k.size(1),
              "qk_norm_rope_store: q [T, H, D], k and v [T, Hkv, D] of one T and D");
  ADAQ_CHECK_BF16(q_weight);
  ADAQ_CHECK_BF16(k_weight);
  TORCH_CHECK(q_weight.is_contiguous() && k_weight.is_contiguous() && q_weight.numel() == D && k_weight.numel() == D,
              "qk_norm_rope_store: norm weights must be contiguous [D]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == T,
              "qk_norm_rope_store: positions must be contiguous int64 [T]");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() && inv_freq.numel() == D / 2,
              "qk_norm_rope_store: inv_freq must be contiguous fp32 [D/2]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == T, "slot_mapping must be int64 [T]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  int kv_format = 0;
  if (k_cache.scalar_type() == at::kByte) {
    TORCH_CHECK(k_cache.size(-1) == D / 2 + D / 16 && v_cache.scalar_type() == at::kByte && k_scale && v_scale &&
                    k_scale->scalar_type() == at::kByte && v_scale->scalar_type() == at::kByte,
                "an NVFP4 KV cache has rows of head_dim / 2 + head_dim / 16 bytes and uint8 exponent tensors");
    kv_format = 2;
  } else if (k_cache.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(k_scale && v_scale && k_scale->scalar_type() == at::kFloat, "an FP8 KV cache needs its fp32 scales");
    kv_format = 1;
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "KV cache must be float8_e4m3fn, bfloat16 or NVFP4 bytes");
  }
  TORCH_CHECK((!k_scale || k_scale->is_contiguous()) && (!v_scale || v_scale->is_contiguous()),
              "KV scales must be contiguous");
  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = torch::empty({T, q.size(1), D}, q.options());
  const int status = adaq::qk_norm_rope_store(
      bf16_ptr(q), q.stride(0), bf16_ptr(k), k.stride(0), bf16_ptr(v), v.stride(0), bf16_ptr(q_weight),
      bf16_ptr(k_weight), static_cast<float>(eps), unit_offset,
      reinterpret_cast<const long long*>(positions.data_ptr<int64_t>()), inv_freq.data_ptr<float>(), bf16_mut(q_out),
      k_cache.data_ptr(), v_cache.data_ptr(), kv_format ? k_scale->data_ptr() : nullptr,
      kv_format ? v_scale->data_ptr() : nullptr, reinterpret_cast<const long long*>(slots.data_ptr<int64_t>()), T,
      q.size(1), k.size(1), D, kv_format, stream());
  ADAQ_CHECK_STATUS(status, "qk_norm_rope_store head_dim=" + std::to_string(D) + " (kernels: 64, 128, 256)");
  return q_out;
}

void gemm_set_variant(int64_t variant) { adaq::nvfp4_gemm_set_variant(variant); }
void gemm_mid_set_override(int64_t rows, int64_t tw) { adaq::nvfp4_gemm_mid_set_override(rows, tw); }

// wq/ws as layout.PackedNVFP4 holds them -> out (bf16, >= n*k elements, 16-byte aligned) as a row-major [n, k]
// matrix of e2m1 x block_scale (exact; 1/global_scale not applied).
static void check_layout_output(const torch::Tensor& wq, const torch::Tensor& ws, const torch::Tensor& out, int64_t n,
                                int64_t k, const char* op) {
  ADAQ_CHECK_CUDA(wq);
  ADAQ_CHECK_CUDA(ws);
  TORCH_CHECK(out.numel() >= n * k && out.is_contiguous(), op, ": out must hold ", n * k, " elements");
  TORCH_CHECK(wq.numel() >= ((n + 15) / 16) * ((k + 127) / 128) * 1024, op, ": wq too small for [", n, ", ", k, "]");
}

void gemm_dequantize(torch::Tensor wq, torch::Tensor ws, torch::Tensor out, int64_t n, int64_t k) {
  ADAQ_CHECK_BF16(out);
  check_layout_output(wq, ws, out, n, k, "gemm_dequantize");
  const c10::cuda::CUDAGuard guard(out.device());
  const int status = adaq::nvfp4_dequantize(wq.data_ptr(), ws.data_ptr(), out.data_ptr(), n, k, stream());
  ADAQ_CHECK_STATUS(status, "nvfp4_dequantize N=" + std::to_string(n) + " K=" + std::to_string(k));
}

// The same layout -> out (float8_e4m3fn, >= n*k) = e4m3((e2m1 x block_scale) x row_mul[n]) (row_mul fp32 [n]):
// the FP8 prefill path's weight operand (adaq.layers.fp8_prefill.expand_weight is the spec).
void gemm_expand_e4m3(torch::Tensor wq, torch::Tensor ws, torch::Tensor row_mul, torch::Tensor out, int64_t n,
                      int64_t k) {
  TORCH_CHECK(out.scalar_type() == at::kFloat8_e4m3fn, "gemm_expand_e4m3: out must be float8_e4m3fn");
  TORCH_CHECK(row_mul.scalar_type() == at::kFloat && row_mul.is_cuda() && row_mul.numel() >= n,
              "gemm_expand_e4m3: row_mul must be fp32 [n] on the GPU");
  check_layout_output(wq, ws, out, n, k, "gemm_expand_e4m3");
  const c10::cuda::CUDAGuard guard(out.device());
  const int status = adaq::nvfp4_expand_e4m3(wq.data_ptr(), ws.data_ptr(), row_mul.data_ptr<float>(),
                                             out.data_ptr(), n, k, stream());
  ADAQ_CHECK_STATUS(status, "nvfp4_expand_e4m3 N=" + std::to_string(n) + " K=" + std::to_string(k));
}

void attention_set_variant(int64_t variant) { adaq::attention_set_variant(variant); }

// kv_format: 0 bf16, 1 FP8, 2 NVFP4 (adaq::KvFormat).
int64_t attention_prefill_block_tokens(int64_t head_dim, int64_t group, int64_t kv_format, int64_t block_size) {
  return adaq::attention_prefill_block_tokens(head_dim, group, kv_format, block_size);
}

int64_t attention_splits(int64_t tokens, int64_t kv_heads, int64_t max_context, int64_t head_dim, int64_t group,
                         int64_t kv_format, int64_t block_size) {
  return adaq::attention_splits(tokens, kv_heads, max_context, head_dim, group, kv_format, block_size);
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                              torch::Tensor block_tables, torch::Tensor context_lens,
                              c10::optional<torch::Tensor> query_seq, c10::optional<torch::Tensor> query_ctx,
                              int64_t splits, int64_t window, double scale, double softcap,
                              c10::optional<torch::Tensor> counters, c10::optional<torch::Tensor> query_blocks) {
  ADAQ_CHECK_BF16(q);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [T, H, D] with dense heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  const bool nvfp4 = k_cache.scalar_type() == at::kByte;
  const int64_t slot_rows = cache_slot_rows(k_cache, v_cache, cache_alignment(nvfp4, q.size(2)));
  TORCH_CHECK(nvfp4 || k_cache.size(3) == q.size(2), "q has head_dim ", q.size(2), ", the cache rows ", k_cache.size(3));
  TORCH_CHECK(!fp8 || (k_scale && v_scale), "an FP8 KV cache needs its scales");
  TORCH_CHECK(!nvfp4 || (k_cache.size(3) == q.size(2) / 2 + q.size(2) / 16 && k_scale && v_scale &&
                         k_scale->scalar_type() == at::kByte && v_scale->scalar_type() == at::kByte),
              "an NVFP4 KV cache: rows of head_dim / 2 + head_dim / 16 bytes and uint8 exponents");
  TORCH_CHECK(!query_blocks || (query_blocks->scalar_type() == at::kInt && query_blocks->dim() == 2 &&
                                query_blocks->size(1) == 3 && query_blocks->is_contiguous() && query_ctx),
              "query_blocks must be int32 [blocks, 3] (sequence, first token, count), with query_ctx");
  const int64_t scale_stride = fp8 || nvfp4 ? scale_slot_stride(*k_scale, *v_scale) : 0;
  const c10::cuda::CUDAGuard guard(q.device());
  const int T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  auto out = torch::empty({T, H, D}, q.options());
  torch::Tensor part_out, part_lse;
  if (splits > 1) {
    part_out = torch::empty({T, H, splits, D}, q.options().dtype(at::kFloat));
    part_lse = torch::empty({T, H, splits}, q.options().dtype(at::kFloat));
  }
  const int status = adaq::paged_attention(
      bf16_ptr(q), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), slot_rows,
      fp8 || nvfp4 ? static_cast<const float*>(k_scale->data_ptr()) : nullptr,
      fp8 || nvfp4 ? static_cast<const float*>(v_scale->data_ptr()) : nullptr, scale_stride, nvfp4 ? 2 : fp8 ? 1 : 0,
      block_tables.data_ptr<int>(), block_tables.stride(0),
      context_lens.data_ptr<int>(), query_seq ? query_seq->data_ptr<int>() : nullptr,
      query_ctx ? query_ctx->data_ptr<int>() : nullptr, bf16_mut(out), splits > 1 ? part_out.data_ptr<float>() : nullptr,
      splits > 1 ? part_lse.data_ptr<float>() : nullptr, T, H, Hkv, D, k_cache.size(1), splits, window, scale, softcap,
      counters ? counters->data_ptr<int>() : nullptr, counters ? static_cast<int>(counters->numel()) : 0,
      query_blocks ? query_blocks->data_ptr<int>() : nullptr, query_blocks ? static_cast<int>(query_blocks->size(0)) : 0,
      stream());
  ADAQ_CHECK_STATUS(status, "paged_attention heads=" + std::to_string(H) + " kv_heads=" + std::to_string(Hkv) +
                                " head_dim=" + std::to_string(D));
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, bool unit_offset) {
  ADAQ_CHECK_BF16(x);
  ADAQ_CHECK_BF16(w);
  TORCH_CHECK(x.stride(-1) == 1, "rms_norm needs a unit last-dim stride");
  const c10::cuda::CUDAGuard guard(x.device());
  const int dim = x.size(-1);
  torch::Tensor x3 = x.dim() == 3 ? x : x.reshape({-1, 1, dim});
  TORCH_CHECK(x3.dim() == 3 && w.numel() == dim, "rms_norm: x [.., ", dim, "] and weight [", dim, "]");
  const int rows = x3.size(0) * x3.size(1);
  auto y = torch::empty(x.sizes(), x.options());
  const int status = adaq::rms_norm(bf16_ptr(x3), x3.stride(0), x3.stride(1), x3.size(1), bf16_ptr(w), bf16_mut(y),
                                    rows, dim, eps, unit_offset, stream());
  ADAQ_CHECK_STATUS(status, "rms_norm dim=" + std::to_string(dim));
  return y;
}

// (x + delta, norm(x + delta)): the residual stream's add fused into the next norm.
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor w, double eps,
                                        bool unit_offset) {
  ADAQ_CHECK_BF16(x);
  ADAQ_CHECK_BF16(delta);
  ADAQ_CHECK_BF16(w);
  TORCH_CHECK(x.is_contiguous() && delta.is_contiguous() && x.sizes() == delta.sizes(),
              "add_rms_norm needs contiguous x and delta of one shape");
  const c10::cuda::CUDAGuard guard(x.device());
  const int dim = x.size(-1);
  TORCH_CHECK(w.numel() == dim, "add_rms_norm: x [.., ", dim, "] and weight [", dim, "]");
  auto sum = torch::empty_like(x);
  auto y = torch::empty_like(x);
  const int status = adaq::add_rms_norm(bf16_ptr(x), bf16_ptr(delta), bf16_ptr(w), bf16_mut(sum), bf16_mut(y),
                                        x.numel() / dim, dim, eps, unit_offset, stream());
  ADAQ_CHECK_STATUS(status, "add_rms_norm dim=" + std::to_string(dim));
  return {sum, y};
}

torch::Tensor gated_activation(torch::Tensor x, int64_t kind) {
  ADAQ_CHECK_BF16(x);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "gated activation needs [T, 2I]");
  const c10::cuda::CUDAGuard guard(x.device());
  const int inter = x.size(1) / 2;
  auto y = torch::empty({x.size(0), inter}, x.options());
  const int status = adaq::gated_activation(bf16_ptr(x), x.stride(0), bf16_mut(y), x.size(0), inter, kind, stream());
  ADAQ_CHECK_STATUS(status, "gated_activation I=" + std::to_string(inter));
  return y;
}

std::vector<torch::Tensor> rotary(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor inv_freq) {
  ADAQ_CHECK_BF16(q);
  ADAQ_CHECK_BF16(k);
  q = q.contiguous();
  k = k.contiguous();
  positions = positions.to(at::kLong).contiguous();
  inv_freq = inv_freq.to(at::kFloat).contiguous();
  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = torch::empty_like(q), k_out = torch::empty_like(k);
  const int status = adaq::rotary(bf16_ptr(q), bf16_ptr(k), bf16_mut(q_out), bf16_mut(k_out),
                                  reinterpret_cast<const long long*>(positions.data_ptr<int64_t>()), inv_freq.data_ptr<float>(), q.size(0), q.size(1),
                                  k.size(1), q.size(2), stream());
  ADAQ_CHECK_STATUS(status, "rotary head_dim=" + std::to_string(q.size(2)));
  return {q_out, k_out};
}

std::vector<torch::Tensor> router_topk(torch::Tensor logits, int64_t top_k, bool renormalize) {
  ADAQ_CHECK_BF16(logits);
  logits = logits.contiguous();
  const c10::cuda::CUDAGuard guard(logits.device());
  const int T = logits.size(0), E = logits.size(1);
  auto weights = torch::empty({T, top_k}, logits.options());
  auto ids = torch::empty({T, top_k}, logits.options().dtype(at::kInt));
  const int status = adaq::router_topk(bf16_ptr(logits), T, E, top_k, renormalize, bf16_mut(weights),
                                       ids.data_ptr<int>(), stream());
  ADAQ_CHECK_STATUS(status, "router_topk experts=" + std::to_string(E) + " top_k=" + std::to_string(top_k));
  return {weights, ids};
}

std::vector<torch::Tensor> moe_align(torch::Tensor ids, int64_t experts, int64_t max_groups) {
  const c10::cuda::CUDAGuard guard(ids.device());
  const int rows = ids.numel();
  auto opts = ids.options().dtype(at::kInt);
  auto offsets = torch::empty({max_groups + 1}, opts), group_expert = torch::empty({max_groups}, opts);
  auto row_ids = torch::empty({rows}, opts), num_groups = torch::empty({1}, opts);
  const int status = adaq::moe_align(ids.data_ptr<int>(), rows, experts, offsets.data_ptr<int>(),
                                     group_expert.data_ptr<int>(), row_ids.data_ptr<int>(), num_groups.data_ptr<int>(),
                                     stream());
  ADAQ_CHECK_STATUS(status, "moe_align experts=" + std::to_string(experts));
  return {offsets, group_expert, row_ids, num_groups};
}

// Router top-k and grouping by expert in one launch: {weights, ids, offsets, group_expert, row_ids, num_groups}.
std::vector<torch::Tensor> moe_route(torch::Tensor logits, int64_t top_k, bool renormalize, int64_t max_groups) {
  ADAQ_CHECK_BF16(logits);
  logits = logits.contiguous();
  const c10::cuda::CUDAGuard guard(logits.device());
  const int T = logits.size(0), E = logits.size(1);
  auto weights = torch::empty({T, top_k}, logits.options());
  auto opts = logits.options().dtype(at::kInt);
  auto ids = torch::empty({T, top_k}, opts);
  auto offsets = torch::empty({max_groups + 1}, opts), group_expert = torch::empty({max_groups}, opts);
  auto row_ids = torch::empty({T * top_k}, opts), num_groups = torch::empty({1}, opts);
  const int status = adaq::moe_route(bf16_ptr(logits), T, E, top_k, renormalize, bf16_mut(weights), ids.data_ptr<int>(),
                                     offsets.data_ptr<int>(), group_expert.data_ptr<int>(), row_ids.data_ptr<int>(),
                                     num_groups.data_ptr<int>(), stream());
  ADAQ_CHECK_STATUS(status, "moe_route tokens=" + std::to_string(T) + " experts=" + std::to_string(E) +
                                " top_k=" + std::to_string(top_k));
  return {weights, ids, offsets, group_expert, row_ids, num_groups};
}

// Router top-k with fp32 weights, the combine's slot order and the grouping, one launch:
// {weights, ids, order, offsets, group_expert, row_ids, num_groups}. logits [T, E (+1: the shared expert's gate)].
std::vector<torch::Tensor> moe_route_fused(torch::Tensor logits, int64_t experts, int64_t top_k, bool renormalize,
                                           bool shared, c10::optional<torch::Tensor> expert_scale,
                                           int64_t max_groups) {
  ADAQ_CHECK_BF16(logits);
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [T, E] with unit column stride");
  if (expert_scale)
    TORCH_CHECK(expert_scale->scalar_type() == at::kFloat && expert_scale->is_contiguous() &&
                    expert_scale->numel() == experts, "expert_scale must be fp32 [E]");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int T = logits.size(0), slots = top_k + (shared ? 1 : 0);
  auto opts = logits.options().dtype(at::kInt);
  auto weights = torch::empty({T, slots}, logits.options().dtype(at::kFloat));
  auto ids = torch::empty({T, slots}, opts), order = torch::empty({T, slots}, opts);
  auto offsets = torch::empty({max_groups + 1}, opts), group_expert = torch::empty({max_groups}, opts);
  auto row_ids = torch::empty({T * slots}, opts), num_groups = torch::empty({1}, opts);
  const int status = adaq::moe_route_fused(
      bf16_ptr(logits), logits.stride(0), T, experts, top_k, renormalize, shared,
      expert_scale ? expert_scale->data_ptr<float>() : nullptr, weights.data_ptr<float>(), ids.data_ptr<int>(),
      order.data_ptr<int>(), offsets.data_ptr<int>(), group_expert.data_ptr<int>(), row_ids.data_ptr<int>(),
      num_groups.data_ptr<int>(), stream());
  ADAQ_CHECK_STATUS(status, "moe_route_fused tokens=" + std::to_string(T) + " experts=" + std::to_string(experts) +
                                " top_k=" + std::to_string(top_k) + (shared ? " + shared" : ""));
  return {weights, ids, order, offsets, group_expert, row_ids, num_groups};
}

// The grouped mid path's piece table from expert-sorted ids: {offsets [bound+1], group_expert [bound], num_groups [1]}
// with bound = ceil(rows / max_rows) + experts (ops.split_groups' layout).
std::vector<torch::Tensor> moe_piece_table(torch::Tensor sorted_ids, int64_t experts, int64_t max_rows) {
  TORCH_CHECK(sorted_ids.scalar_type() == at::kInt && sorted_ids.dim() == 1 && sorted_ids.is_contiguous(),
              "moe_piece_table: sorted_ids must be a contiguous int32 vector");
  const c10::cuda::CUDAGuard guard(sorted_ids.device());
  const int rows = sorted_ids.numel();
  TORCH_CHECK(max_rows > 0, "moe_piece_table: max_rows must be positive");
  const int64_t bound = (rows + max_rows - 1) / max_rows + experts;
  auto opts = sorted_ids.options();
  auto offsets = torch::empty({bound + 1}, opts), group_expert = torch::empty({bound}, opts);
  auto num_groups = torch::empty({1}, opts);
  const int status = adaq::moe_piece_table(sorted_ids.data_ptr<int>(), rows, experts, max_rows,
                                           offsets.data_ptr<int>(), group_expert.data_ptr<int>(),
                                           num_groups.data_ptr<int>(), stream());
  ADAQ_CHECK_STATUS(status, "moe_piece_table rows=" + std::to_string(rows) + " experts=" + std::to_string(experts));
  return {offsets, group_expert, num_groups};
}

torch::Tensor moe_combine(torch::Tensor y, torch::Tensor w, torch::Tensor ids) {
  ADAQ_CHECK_BF16(y);
  ADAQ_CHECK_BF16(w);
  const c10::cuda::CUDAGuard guard(y.device());
  const int T = w.size(0), k = w.size(1), hidden = y.size(1);
  auto out = torch::empty({T, hidden}, y.options());
  const int status = adaq::moe_combine(bf16_ptr(y), bf16_ptr(w), ids.data_ptr<int>(), bf16_mut(out), T, k, hidden,
                                       stream());
  ADAQ_CHECK_STATUS(status, "moe_combine top_k=" + std::to_string(k));
  return out;
}

// ---- Gated DeltaNet decode (csrc/gated_delta.cu) ----
void check_state_inputs(const c10::optional<torch::Tensor>& state, const c10::optional<torch::Tensor>& slots,
                        const torch::Tensor& context_lens, int64_t rows) {
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.numel() == rows && context_lens.is_contiguous(),
              "context_lens must be int32 [", rows, "]");
  TORCH_CHECK(!slots || (slots->scalar_type() == at::kLong && slots->numel() == rows && slots->is_contiguous()),
              "state slots must be int64 [", rows, "]");
  TORCH_CHECK(!state || state->is_contiguous(), "the state cache must be contiguous");
}

const long long* slots_ptr(const c10::optional<torch::Tensor>& slots) {
  return slots ? reinterpret_cast<const long long*>(slots->data_ptr<int64_t>()) : nullptr;
}

torch::Tensor gdn_conv_update(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> state,
                              c10::optional<torch::Tensor> slots, torch::Tensor context_lens) {
  ADAQ_CHECK_BF16(x);
  ADAQ_CHECK_BF16(weight);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [B, C] with unit column stride");
  const int64_t B = x.size(0), C = x.size(1), K = weight.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && weight.is_contiguous(), "conv weight must be [", C, ", K]");
  TORCH_CHECK(!state || (state->scalar_type() == at::kBFloat16 && state->dim() == 3 && state->size(1) == C &&
                         state->size(2) == K - 1), "conv state must be bf16 [slots, ", C, ", ", K - 1, "]");
  check_state_inputs(state, slots, context_lens, B);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({B, C}, x.options());
  const int status = adaq::gdn_conv_update(bf16_ptr(x), x.stride(0), bf16_ptr(weight),
                                           state ? bf16_mut(*state) : nullptr, slots_ptr(slots),
                                           context_lens.data_ptr<int>(), bf16_mut(out), B, C, K, stream());
  ADAQ_CHECK_STATUS(status, "gdn_conv_update channels=" + std::to_string(C) + " kernel=" + std::to_string(K) +
                                " (kernel widths 2, 3, 4)");
  return out;
}

// The packed prefill step's conv: x [T, C] (unit column stride), offsets int32 [B+1]; with a state cache, slots
// int64 [B] and context_lens int32 [B] (a sequence continues its slot's state when context_len > q_len).
torch::Tensor gdn_conv_prefill(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> state,
                               c10::optional<torch::Tensor> slots, c10::optional<torch::Tensor> context_lens,
                               torch::Tensor offsets) {
  ADAQ_CHECK_BF16(x);
  ADAQ_CHECK_BF16(weight);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, C] with unit column stride");
  const int64_t T = x.size(0), C = x.size(1), K = weight.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && weight.is_contiguous(), "conv weight must be [", C, ", K]");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.numel() >= 2 &&
              offsets.is_contiguous(), "offsets must be a contiguous int32 [B + 1]");
  const int64_t B = offsets.numel() - 1;
  if (state) {
    TORCH_CHECK(state->scalar_type() == at::kBFloat16 && state->dim() == 3 && state->size(1) == C &&
                state->size(2) == K - 1 && state->is_contiguous(), "conv state must be bf16 [slots, ", C, ", ", K - 1, "]");
    TORCH_CHECK(slots && slots->scalar_type() == at::kLong && slots->numel() == B && slots->is_contiguous(),
                "a conv state needs int64 slots [", B, "]");
    TORCH_CHECK(context_lens && context_lens->scalar_type() == at::kInt && context_lens->numel() == B &&
                context_lens->is_contiguous(), "a conv state needs int32 context_lens [", B, "]");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({T, C}, x.options());
  const int status = adaq::gdn_conv_prefill(
      bf16_ptr(x), x.stride(0), bf16_ptr(weight), state ? bf16_mut(*state) : nullptr,
      state ? slots_ptr(slots) : nullptr, state ? context_lens->data_ptr<int>() : nullptr, offsets.data_ptr<int>(),
      B, bf16_mut(out), T, C, K, stream());
  ADAQ_CHECK_STATUS(status, "gdn_conv_prefill channels=" + std::to_string(C) + " kernel=" + std::to_string(K) +
                                " (kernel widths 2, 3, 4)");
  return out;
}

torch::Tensor gdn_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
                         torch::Tensor a_log, torch::Tensor dt_bias, c10::optional<torch::Tensor> state,
                         c10::optional<torch::Tensor> slots, torch::Tensor context_lens) {
  for (const auto* t : {&q, &k, &v, &a, &b, &a_log, &dt_bias}) ADAQ_CHECK_BF16(*t);
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && q.stride(2) == 1 && k.stride(2) == 1 &&
                  q.stride(1) == q.size(2) && k.stride(1) == k.size(2), "q, k must be [B, Hk, Dk] with dense heads");
  TORCH_CHECK(v.dim() == 3 && v.size(0) == q.size(0) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "v must be [B, Hv, Dv] with dense heads");
  const int64_t B = q.size(0), Hk = q.size(1), Dk = q.size(2), Hv = v.size(1), Dv = v.size(2);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == B && b.size(0) == B && a.size(1) == Hv &&
                  b.size(1) == Hv && a.stride(1) == 1 && b.stride(1) == 1, "a, b must be [B, ", Hv, "]");
  TORCH_CHECK(a_log.numel() == Hv && dt_bias.numel() == Hv && a_log.is_contiguous() && dt_bias.is_contiguous(),
              "A_log and dt_bias must be [", Hv, "]");
  TORCH_CHECK(!state || (state->scalar_type() == at::kFloat && state->dim() == 4 && state->size(1) == Hv &&
                         state->size(2) == Dk && state->size(3) == Dv),
              "recurrent state must be fp32 [slots, ", Hv, ", ", Dk, ", ", Dv, "]");
  check_state_inputs(state, slots, context_lens, B);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({B, Hv, Dv}, v.options());
  const int status = adaq::gdn_decode(
      bf16_ptr(q), bf16_ptr(k), bf16_ptr(v), q.stride(0), k.stride(0), v.stride(0), bf16_ptr(a), bf16_ptr(b),
      a.stride(0), b.stride(0), bf16_ptr(a_log), bf16_ptr(dt_bias), state ? state->data_ptr<float>() : nullptr,
      slots_ptr(slots), context_lens.data_ptr<int>(), bf16_mut(out), B, Hk, Hv, Dk, Dv, stream());
  ADAQ_CHECK_STATUS(status, "gdn_decode key_heads=" + std::to_string(Hk) + " value_heads=" + std::to_string(Hv) +
                                " head_k_dim=" + std::to_string(Dk) + " head_v_dim=" + std::to_string(Dv) +
                                " (head_k_dim 32, 64, 128 or 256; head_v_dim a multiple of 32)");
  return out;
}

torch::Tensor gated_rms_norm(torch::Tensor x, torch::Tensor z, torch::Tensor w, double eps) {
  ADAQ_CHECK_BF16(x);
  ADAQ_CHECK_BF16(z);
  ADAQ_CHECK_BF16(w);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && z.dim() == 2 && z.sizes() == x.sizes() && z.stride(1) == 1,
              "gated_rms_norm: x [N, D] contiguous and z [N, D] with unit column stride");
  TORCH_CHECK(w.numel() == x.size(1) && w.is_contiguous(), "gated_rms_norm: weight [", x.size(1), "]");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  const int status = adaq::gated_rms_norm(bf16_ptr(x), bf16_ptr(z), z.stride(0), bf16_ptr(w), bf16_mut(y), x.size(0),
                                          x.size(1), eps, stream());
  ADAQ_CHECK_STATUS(status, "gated_rms_norm dim=" + std::to_string(x.size(1)));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm);
  m.def("gemm_set_variant", &gemm_set_variant);
  m.def("gemm_grouped", &gemm_grouped);
  m.def("gemm_mid", &gemm_mid);
  m.def("gemm_mid_grouped", &gemm_mid_grouped);
  m.def("gemm_mid_set_override", &gemm_mid_set_override);
  m.def("gemm_dequantize", &gemm_dequantize);
  m.def("gemm_expand_e4m3", &gemm_expand_e4m3);
  m.def("store_kv", &store_kv);
  m.def("qk_norm_rope_store", &qk_norm_rope_store);
  m.def("attention_splits", &attention_splits);
  m.def("attention_set_variant", &attention_set_variant);
  m.def("attention_prefill_block_tokens", &attention_prefill_block_tokens);
  m.def("paged_attention", &paged_attention);
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("gated_activation", &gated_activation);
  m.def("rotary", &rotary);
  m.def("router_topk", &router_topk);
  m.def("moe_align", &moe_align);
  m.def("moe_route", &moe_route);
  m.def("moe_combine", &moe_combine);
  m.def("moe_piece_table", &moe_piece_table);
  m.def("moe_route_fused", &moe_route_fused);
  m.def("moe_gate_up_act", &moe_gate_up_act);
  m.def("moe_down_combine", &moe_down_combine);
  m.def("gdn_conv_update", &gdn_conv_update);
  m.def("gdn_conv_prefill", &gdn_conv_prefill);
  m.def("gdn_decode", &gdn_decode);
  m.def("gated_rms_norm", &gated_rms_norm);
}
