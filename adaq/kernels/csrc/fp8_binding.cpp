// Thin torch binding of the FP8 prefill path: the generated sm_89 GEMM (generated/fp8_gemm_sm89.cu) and the
// operand kernels (fp8_quant.cu). Every op writes into tensors the caller owns and runs on torch's current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include "../generated/fp8_gemm_sm89.h"

namespace adaq {
int quantize_rows(const void* x, const void* norm, float eps, int unit_offset, void* out, float* row_scale, int m,
                  int k, cudaStream_t stream);
int expand_nvfp4(const void* packed, const void* block_scale, const float* global_scale, void* out, float* col_scale,
                 int n, int k, cudaStream_t stream);
int fp8_mma_peak(float* sink, int blocks, int threads, int iterations, cudaStream_t stream);
int fp8_mma_peak_mmas_per_iteration();
int fp8_mma_peak_blocks_per_sm(int threads);
int moe_tile_offsets(const int* group_offsets, const int* num_groups, int max_groups, int tile_m, int* tile_offsets,
                     cudaStream_t stream);
}  // namespace adaq

namespace {

void check(int status, const char* op, int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(status == 0, op, " failed (status ", status, ") for M=", m, " N=", n, " K=", k,
              status == 1 ? ": unsupported shape (N and K must be multiples of 16)" : "");
}

void require(const torch::Tensor& t, c10::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

// a [M,K] e4m3, b [N,K] e4m3, row_scale [M] f32, col_scale [N] f32, out [M,N] bf16.
void fp8_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor row_scale, torch::Tensor col_scale, torch::Tensor out,
              int64_t tile) {
  require(a, c10::ScalarType::Float8_e4m3fn, "a");
  require(b, c10::ScalarType::Float8_e4m3fn, "b");
  require(row_scale, at::kFloat, "row_scale");
  require(col_scale, at::kFloat, "col_scale");
  require(out, at::kBFloat16, "out");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  TORCH_CHECK(b.size(1) == k && out.size(0) == m && out.size(1) == n && row_scale.numel() == m &&
                  col_scale.numel() == n, "fp8_gemm: inconsistent shapes");
  check(adaq::fp8_gemm_sm89(int(tile), a.data_ptr(), b.data_ptr(), row_scale.data_ptr<float>(),
                            col_scale.data_ptr<float>(), out.data_ptr(), int(m), int(n), int(k),
                            c10::cuda::getCurrentCUDAStream()),
        "fp8_gemm", m, n, k);
}

// x [M,K] bf16 -> out [M,K] e4m3, row_scale [M]; norm: optional [K] bf16 RMSNorm weight fused in front.
void quantize_rows(torch::Tensor x, c10::optional<torch::Tensor> norm, double eps, bool unit_offset,
                   torch::Tensor out, torch::Tensor row_scale) {
  require(x, at::kBFloat16, "x");
  require(out, c10::ScalarType::Float8_e4m3fn, "out");
  require(row_scale, at::kFloat, "row_scale");
  if (norm) require(*norm, at::kBFloat16, "norm");
  check(adaq::quantize_rows(x.data_ptr(), norm ? norm->data_ptr() : nullptr, float(eps), unit_offset ? 1 : 0,
                            out.data_ptr(), row_scale.data_ptr<float>(), int(x.size(0)), int(x.size(1)),
                            c10::cuda::getCurrentCUDAStream()),
        "quantize_rows", x.size(0), 0, x.size(1));
}

// packed [N,K/2] uint8, block_scale [N,K/16] e4m3, global_scale [1] f32 -> out [N,K] e4m3, col_scale [N] f32.
void expand_nvfp4(torch::Tensor packed, torch::Tensor block_scale, torch::Tensor global_scale, torch::Tensor out,
                  torch::Tensor col_scale) {
  require(packed, at::kByte, "packed");
  require(block_scale, c10::ScalarType::Float8_e4m3fn, "block_scale");
  require(global_scale, at::kFloat, "global_scale");
  require(out, c10::ScalarType::Float8_e4m3fn, "out");
  require(col_scale, at::kFloat, "col_scale");
  check(adaq::expand_nvfp4(packed.data_ptr(), block_scale.data_ptr(), global_scale.data_ptr<float>(), out.data_ptr(),
                           col_scale.data_ptr<float>(), int(packed.size(0)), int(packed.size(1) * 2),
                           c10::cuda::getCurrentCUDAStream()),
        "expand_nvfp4", 0, packed.size(0), packed.size(1) * 2);
}

// MoE prefill (fp8_moe.cu + fp8_grouped.cuh): a [R,K] e4m3 rows sorted by group, b [E,N,K] e4m3, row_scale [R],
// col_scale [E,N], moe_align's group_offsets [G+1] / group_expert [G] / num_groups [1] (int32), out [R,N] bf16.
void fp8_grouped_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor row_scale, torch::Tensor col_scale,
                      torch::Tensor group_offsets, torch::Tensor group_expert, torch::Tensor num_groups,
                      torch::Tensor out, int64_t tile) {
  require(a, c10::ScalarType::Float8_e4m3fn, "a");
  require(b, c10::ScalarType::Float8_e4m3fn, "b");
  require(row_scale, at::kFloat, "row_scale");
  require(col_scale, at::kFloat, "col_scale");
  require(group_offsets, at::kInt, "group_offsets");
  require(group_expert, at::kInt, "group_expert");
  require(num_groups, at::kInt, "num_groups");
  require(out, at::kBFloat16, "out");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && col_scale.dim() == 2,
              "fp8_grouped_gemm: a [R,K], b [E,N,K], col_scale [E,N]");
  const int64_t rows = a.size(0), k = a.size(1), n = b.size(1), groups = group_expert.numel();
  TORCH_CHECK(b.size(2) == k && col_scale.size(0) == b.size(0) && col_scale.size(1) == n && row_scale.numel() == rows &&
                  out.size(0) == rows && out.size(1) == n && group_offsets.numel() == groups + 1 &&
                  num_groups.numel() == 1,
              "fp8_grouped_gemm: inconsistent shapes");
  if (rows == 0 || groups == 0) return;
  const int tile_m = adaq::fp8_gemm_sm89_tile_m(int(tile));
  TORCH_CHECK(tile_m > 0, "fp8_grouped_gemm: no tile ", tile);
  auto tile_offsets = torch::empty({groups + 1}, group_offsets.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  check(adaq::moe_tile_offsets(group_offsets.data_ptr<int>(), num_groups.data_ptr<int>(), int(groups), tile_m,
                               tile_offsets.data_ptr<int>(), stream),
        "moe_tile_offsets", rows, n, k);
  const int64_t max_m_tiles = (rows + tile_m - 1) / tile_m + groups;  // every group may end in a partial tile
  check(adaq::fp8_grouped_gemm_sm89(int(tile), a.data_ptr(), b.data_ptr(), row_scale.data_ptr<float>(),
                                    col_scale.data_ptr<float>(), out.data_ptr(), group_offsets.data_ptr<int>(),
                                    group_expert.data_ptr<int>(), tile_offsets.data_ptr<int>(),
                                    num_groups.data_ptr<int>(), int(max_m_tiles), int(n), int(k), stream),
        "fp8_grouped_gemm", rows, n, k);
}

// The FP8 mma.sync ceiling kernel (fp8_mma_peak.cu); sink [blocks] f32.
void fp8_mma_peak(torch::Tensor sink, int64_t threads, int64_t iterations) {
  require(sink, at::kFloat, "sink");
  check(adaq::fp8_mma_peak(sink.data_ptr<float>(), int(sink.numel()), int(threads), int(iterations),
                           c10::cuda::getCurrentCUDAStream()),
        "fp8_mma_peak", 0, 0, 0);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_gemm", &fp8_gemm, "sm_89 FP8 GEMM with row x column scale epilogue (CUTLASS-generated)");
  m.def("fp8_gemm_tiles", []() { return adaq::kFp8GemmTiles; });
  m.def("fp8_gemm_shared_bytes", [](int64_t tile) { return adaq::fp8_gemm_sm89_shared_bytes(int(tile)); });
  m.def("quantize_rows", &quantize_rows, "bf16 -> e4m3 per token, optional fused RMSNorm");
  m.def("expand_nvfp4", &expand_nvfp4, "NVFP4 -> e4m3 with per-channel scales");
  m.def("fp8_mma_peak", &fp8_mma_peak, "register-only FP8 mma.sync loop (the ceiling)");
  m.def("fp8_grouped_gemm", &fp8_grouped_gemm, "grouped (MoE) sm_89 FP8 GEMM over expert-sorted rows, one launch");
  m.def("fp8_gemm_tile_m", [](int64_t tile) { return adaq::fp8_gemm_sm89_tile_m(int(tile)); });
  m.def("fp8_mma_peak_mmas_per_iteration", []() { return adaq::fp8_mma_peak_mmas_per_iteration(); });
  m.def("fp8_mma_peak_blocks_per_sm", [](int64_t threads) { return adaq::fp8_mma_peak_blocks_per_sm(int(threads)); });
}
