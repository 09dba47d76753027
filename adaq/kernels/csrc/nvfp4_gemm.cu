// NVFP4 x bf16 GEMM for decode (M = 1..64 rows per group), and its grouped form for MoE experts.
//
//   y[m, n] = colscale[n] * sum_k x[m, k] * (e2m1[n, k] * block_scale[n, k / 16] / 128)  (+ bias[n])
//
// colscale = 128 / global_scale (the per-tensor divisor of compressed-tensors, folded with the 2^7 of the
// dequantization trick below). Weights are read once, 16 bytes per lane per load, straight into registers, and
// dequantized there into bf16 mma.sync B fragments; x is staged in shared memory and read with ldmatrix.
//
// Weight layout (made at load by adaq/kernels/layout.py, which holds the Python twin of this indexing):
//   wq  [N/8 groups][K/128 super-tiles][32 lanes][16 bytes]  one 8-column x 128-k super-tile = 512 contiguous bytes
//   ws  [N/8 groups][K/128 super-tiles][8 columns][8 bytes]  E4M3 block scale of (column g, k16 step t) at byte t
// Lane l = 4g + c owns column g of the group and, in each of the 8 k16 steps t, the B-fragment values
// k = 16t + {2c, 2c+1, 2c+8, 2c+9}. Its 16 bytes are four 32-bit words; word w holds steps 2w and 2w+1 as
// nibbles (value k: nibble): step 2w: 2c->3, 2c+1->7, 2c+8->2, 2c+9->6; step 2w+1: 2c->1, 2c+1->5, 2c+8->0,
// 2c+9->4. That order lets one shift and one mask per bf16 pair move a nibble's sign to bit 15 and its
// exponent/mantissa to bits 8..6 (see e2m1_pair).
// A k16 step is exactly one NVFP4 block, so each B fragment needs a single scale.
#include "common.cuh"

namespace adaq {

constexpr int kGemmWarps = 8;         // warps per block; each owns NG groups of 8 output columns
constexpr int kGemmThreads = kGemmWarps * 32;
constexpr int kSuperK = 128;          // k values per super-tile (8 mma k16 steps, 16 bytes per lane)
constexpr int kMaxRowsPerGroup = 64;  // 4 m16 tiles

struct GemmParams {
  const __nv_bfloat16* x;      // [rows, K] activations, row stride ldx (elements), 16-byte aligned rows
  const uint4* wq;             // repacked E2M1 nibbles (layout above), per expert stride expert_wq (uint4s)
  const uint2* ws;             // repacked E4M3 block scales, per expert stride expert_ws (uint2s)
  const float* colscale;       // [experts][n8 * 8] 128 / global_scale per output column
  const __nv_bfloat16* bias;   // [N] or nullptr (dense only)
  __nv_bfloat16* y;            // [rows, N] output, row stride ldy
  float* partial;              // [splits][out_rows][N] fp32 split-K partial sums (splits > 1)
  int* counters;               // [groups * n_blocks] arrival counters, zero between launches (last block resets)
  // Grouped (MoE) form: group g computes rows row_ids[offsets[g] .. offsets[g+1]) with expert group_expert[g];
  // row r reads x row (r / x_row_div) and writes y row r. Dense form: group_offsets == nullptr, rows 0..M-1.
  const int* group_offsets;    // [num_groups + 1] or nullptr
  const int* group_expert;     // [num_groups]
  const int* row_ids;          // [total rows], sorted by expert
  const int* num_groups;       // device scalar: groups in use (blocks of idle groups exit at once)
  int x_row_div;
  long long expert_wq, expert_ws;  // strides between experts in wq / ws (0 for dense)
  int expert_colscale;             // stride between experts in colscale
  int M;                       // dense rows
  int out_rows;                // rows of y (partial's middle dimension)
  int N, K, ldx, ldy;
  int n8;                      // N rounded up to 8, over 8: column groups
  int kst;                     // K rounded up to 128, over 128: super-tiles
  int num_chunks;              // ceil(kst / CH)
  int chunks_per_split;
  int splits;
  int n_blocks;
};

// One E2M1 pair -> bf16x2 bits carrying value * 2^-126: nibble (3-j) of each 16-bit half lands with its sign at
// bit 15 and its 3 exponent/mantissa bits at bits 8..6 (bf16 exponent LSBs + mantissa MSB). An E2M1 exponent e
// then reads as bf16 exponent e (bias 127 instead of 1), and E2M1's subnormal 0.5 as bf16's subnormal 2^-127:
// both are the true value times 2^-126, which the scale multiply below absorbs.
template <int J>
__device__ __forceinline__ uint32_t e2m1_pair(uint32_t q) {
  constexpr int kSignShift = 4 * J;       // nibble (3-J)'s sign bit 15-4J -> 15
  constexpr int kMagShift = 6 - 4 * J;    // its bits 14-4J..12-4J -> 8..6 (negative = left shift)
  uint32_t sign = (q << kSignShift) & 0x80008000u;
  uint32_t mag = (kMagShift >= 0 ? (q >> kMagShift) : (q << (-kMagShift))) & 0x01C001C0u;
  return sign | mag;
}

// Eight E4M3 scales -> bf16x2 {s, s} with s = scale * 2^119 (exact: 3 mantissa bits, exponent <= 2^127.8).
// Times the 2^-126 of e2m1_pair it gives the dequantized weight / 128, an exact bf16 (<= 5 significant bits,
// >= 2^-17, so never subnormal); the 128 returns in colscale.
__device__ __forceinline__ void scales_to_bf16x2(uint2 raw, uint32_t (&s)[8]) {
  const float kBias = 6.646139978924579e35f;  // 2^119
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t word = i < 2 ? raw.x : raw.y;
    float2 f = e4m3x2_to_float2(static_cast<uint16_t>(word >> (16 * (i & 1))));
    __nv_bfloat16 lo = __float2bfloat16_rn(f.x * kBias), hi = __float2bfloat16_rn(f.y * kBias);
    uint32_t blo = *reinterpret_cast<uint16_t*>(&lo), bhi = *reinterpret_cast<uint16_t*>(&hi);
    s[2 * i] = blo | (blo << 16);
    s[2 * i + 1] = bhi | (bhi << 16);
  }
}

// B fragment (2 regs) of k16 step T from the lane's four weight words: word T/2, pairs (T&1)*2 and +1.
template <int T>
__device__ __forceinline__ void b_fragment(const uint4& q, uint32_t scale, uint32_t& b0, uint32_t& b1) {
  const uint32_t word = (T / 2 == 0) ? q.x : (T / 2 == 1) ? q.y : (T / 2 == 2) ? q.z : q.w;
  b0 = bf16x2_mul(e2m1_pair<(T & 1) * 2>(word), scale);
  b1 = bf16x2_mul(e2m1_pair<(T & 1) * 2 + 1>(word), scale);
}

// MT: m16 tiles (rows = 16 * MT); NG: 8-column groups per warp; CH: super-tiles per staged chunk.
template <int MT, int NG, int CH>
__global__ void __launch_bounds__(kGemmThreads) nvfp4_gemm_kernel(const GemmParams p) {
  constexpr int kChunkK = CH * kSuperK;
  constexpr int kStride = kChunkK + 8;  // +16 bytes per row: the 8 rows of an ldmatrix hit distinct bank groups
  constexpr int kRows = MT * 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kRows][kStride]
  __shared__ int src_row[kRows], dst_row[kRows];
  __shared__ int is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nb = blockIdx.x, split = blockIdx.y, group = blockIdx.z;

  // ---- Which rows and which expert this block serves.
  int rows = p.M, expert = 0;
  if (p.group_offsets != nullptr) {
    if (group >= *p.num_groups) return;  // uniform across the block: no barrier is skipped by half of it
    const int first = p.group_offsets[group];
    rows = p.group_offsets[group + 1] - first;
    expert = p.group_expert[group];
    if (tid < rows) {
      const int r = p.row_ids[first + tid];
      src_row[tid] = r / p.x_row_div;
      dst_row[tid] = r;
    }
  } else if (tid < rows) {
    src_row[tid] = tid;
    dst_row[tid] = tid;
  }
  if (rows <= 0) return;
  const uint4* wq = p.wq + expert * p.expert_wq;
  const uint2* ws = p.ws + expert * p.expert_ws;
  const float* colscale = p.colscale + expert * p.expert_colscale;

  // Rows past `rows` stay zero for the whole kernel: their products vanish in the mma.
  for (int i = rows * kStride + tid; i < kRows * kStride; i += kGemmThreads) xs[i] = __float2bfloat16_rn(0.f);

  const int col_group0 = (nb * kGemmWarps + warp) * NG;  // this warp's first 8-column group
  const int c0 = split * p.chunks_per_split;
  const int c1 = min(c0 + p.chunks_per_split, p.num_chunks);

  float acc[MT][NG][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][g][i] = 0.f;

  for (int chunk = c0; chunk < c1; ++chunk) {
    // ---- Fetch: this chunk's weights and scales into registers (all loads issued before any use).
    uint4 wreg[CH][NG];
    uint2 sreg[CH][NG];
#pragma unroll
    for (int j = 0; j < CH; ++j)
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        const int st = chunk * CH + j, cg = col_group0 + g;
        if (st < p.kst && cg < p.n8) {
          const long long tile = static_cast<long long>(cg) * p.kst + st;
          wreg[j][g] = ld_stream_v4(wq + tile * 32 + lane);
          sreg[j][g] = ld_stream_v2(ws + tile * 8 + (lane >> 2));
        } else {
          wreg[j][g] = make_uint4(0, 0, 0, 0);
          sreg[j][g] = make_uint2(0, 0);
        }
      }

    // ---- Stage x[:, chunk] into shared memory (zeros past K) while the weight loads are in flight.
    __syncthreads();  // every warp is done reading the previous chunk
    constexpr int kPieces = kChunkK / 8;  // 16-byte pieces per row
    for (int i = tid; i < rows * kPieces; i += kGemmThreads) {
      const int r = i / kPieces, piece = i % kPieces;
      const int k = chunk * kChunkK + piece * 8;
      const __nv_bfloat16* src = p.x + static_cast<long long>(src_row[r]) * p.ldx + (k < p.K ? k : 0);
      cp_async16_zfill(xs + r * kStride + piece * 8, src, k < p.K ? 16 : 0);
    }
    cp_async_wait_all();
    __syncthreads();

    // ---- Multiply: per super-tile, per k16 step: A from shared memory, B dequantized from registers.
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      uint32_t scale[NG][8];
#pragma unroll
      for (int g = 0; g < NG; ++g) scales_to_bf16x2(sreg[j][g], scale[g]);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldmatrix_x4(a[mt], xs + (mt * 16 + (lane & 15)) * kStride + j * kSuperK + t * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          uint32_t b0, b1;
          switch (t) {  // t is a compile-time constant after unrolling: picks the word and shifts statically
            case 0: b_fragment<0>(wreg[j][g], scale[g][0], b0, b1); break;
            case 1: b_fragment<1>(wreg[j][g], scale[g][1], b0, b1); break;
            case 2: b_fragment<2>(wreg[j][g], scale[g][2], b0, b1); break;
            case 3: b_fragment<3>(wreg[j][g], scale[g][3], b0, b1); break;
            case 4: b_fragment<4>(wreg[j][g], scale[g][4], b0, b1); break;
            case 5: b_fragment<5>(wreg[j][g], scale[g][5], b0, b1); break;
            case 6: b_fragment<6>(wreg[j][g], scale[g][6], b0, b1); break;
            default: b_fragment<7>(wreg[j][g], scale[g][7], b0, b1); break;
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_bf16_16816(acc[mt][g], a[mt], b0, b1);
        }
      }
    }
  }

  // ---- Write: accumulator (row 16mt + lane/4 [+8], columns 2(lane%4) + {0,1} of each group).
  const int gr = lane >> 2, gc = (lane & 3) * 2;
  if (p.splits == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int g = 0; g < NG; ++g)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = mt * 16 + gr + (i >= 2 ? 8 : 0);
          const int n = (col_group0 + g) * 8 + gc + (i & 1);
          if (r < rows && n < p.N) {
            float v = acc[mt][g][i] * colscale[n];
            if (p.bias != nullptr) v += __bfloat162float(p.bias[n]);
            p.y[static_cast<long long>(dst_row[r]) * p.ldy + n] = __float2bfloat16_rn(v);
          }
        }
    return;
  }

  // ---- Split-K: park fp32 partials; the block that arrives last for this column tile sums them in split
  // order (deterministic), scales, and writes bf16. Its counter goes back to zero for the next launch.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = mt * 16 + gr + (i >= 2 ? 8 : 0);
        const int n = (col_group0 + g) * 8 + gc + (i & 1);
        if (r < rows && n < p.N)
          p.partial[(static_cast<long long>(split) * p.out_rows + dst_row[r]) * p.N + n] = acc[mt][g][i];
      }
  __threadfence();
  __syncthreads();
  int* counter = p.counters + group * p.n_blocks + nb;
  if (tid == 0) is_last = atomicAdd(counter, 1) == p.splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  constexpr int kCols = kGemmWarps * NG * 8;
  for (int i = tid; i < rows * kCols; i += kGemmThreads) {
    const int r = i / kCols, n = nb * kCols + i % kCols;
    if (n >= p.N) continue;
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s)
      sum += __ldcg(p.partial + (static_cast<long long>(s) * p.out_rows + dst_row[r]) * p.N + n);
    float v = sum * colscale[n];
    if (p.bias != nullptr) v += __bfloat162float(p.bias[n]);
    p.y[static_cast<long long>(dst_row[r]) * p.ldy + n] = __float2bfloat16_rn(v);
  }
  if (tid == 0) *counter = 0;
}

// ---- v2: the same arithmetic with the weight fetch software-pipelined through registers. ST super-tiles form one
// x chunk (double-buffered in shared memory, one cp.async group each); the weights of super-tile s + ST - 1 are
// requested before super-tile s is multiplied, so ST - 1 super-tiles per warp are always in flight and the
// dequantize/mma work of one overlaps the DRAM latency of the next (v1 serialised them: time = fetch + compute).
// The ring index of super-tile s is (s - s_begin) % ST, a compile-time constant inside the unrolled chunk loop.
// MINB: blocks per SM the register budget must allow (ncu on the H100: at 128 registers, 2 blocks of 8 warps, the
// schedulers found an eligible warp only 52 % of cycles; a shallower ring at 80 or 64 registers fits 3 or 4).
template <int MT, int NG, int ST, int MINB = 2>
__global__ void __launch_bounds__(kGemmThreads, MINB) nvfp4_gemm_v2_kernel(const GemmParams p) {
  constexpr int kChunkK = ST * kSuperK;
  constexpr int kStride = kChunkK + 8;  // +16 bytes per row: conflict-free ldmatrix
  constexpr int kRows = MT * 16;
  constexpr int kBuf = kRows * kStride;
  constexpr int kPieces = kChunkK / 8;  // 16-byte pieces per staged row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [2][kRows][kStride]
  __shared__ int src_row[kRows], dst_row[kRows];
  __shared__ int is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nb = blockIdx.x, split = blockIdx.y, group = blockIdx.z;

  int rows = p.M, expert = 0;
  if (p.group_offsets != nullptr) {
    if (group >= *p.num_groups) return;
    const int first = p.group_offsets[group];
    rows = p.group_offsets[group + 1] - first;
    expert = p.group_expert[group];
    if (tid < rows) {
      const int r = p.row_ids[first + tid];
      src_row[tid] = r / p.x_row_div;
      dst_row[tid] = r;
    }
  } else if (tid < rows) {
    src_row[tid] = tid;
    dst_row[tid] = tid;
  }
  if (rows <= 0) return;
  const uint4* wq = p.wq + expert * p.expert_wq;
  const uint2* ws = p.ws + expert * p.expert_ws;
  const float* colscale = p.colscale + expert * p.expert_colscale;

  // Rows past `rows` are zero in both buffers for the whole kernel (16-byte stores).
  {
    const int pieces = (kRows - rows) * (kStride / 8);
    for (int i = tid; i < 2 * pieces; i += kGemmThreads) {
      const int buf = i / pieces, rem = i % pieces;
      *reinterpret_cast<uint4*>(xs + buf * kBuf + (rows + rem / (kStride / 8)) * kStride + (rem % (kStride / 8)) * 8) =
          make_uint4(0, 0, 0, 0);
    }
  }

  const int col_group0 = (nb * kGemmWarps + warp) * NG;
  const int s_begin = split * p.chunks_per_split * ST;
  const int s_end = min(s_begin + p.chunks_per_split * ST, p.kst);
  const int n_chunks = ceil_div(s_end - s_begin, ST);

  // Fetch: one super-tile's nibbles and scales for the NG groups, zeros outside this block's range.
  auto fetch = [&](int st, uint4 (&w)[NG], uint2 (&sc)[NG]) {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const int cg = col_group0 + g;
      if (st < s_end && cg < p.n8) {
        const long long tile = static_cast<long long>(cg) * p.kst + st;
        w[g] = ld_stream_v4(wq + tile * 32 + lane);
        sc[g] = ld_stream_v2(ws + tile * 8 + (lane >> 2));
      } else {
        w[g] = make_uint4(0, 0, 0, 0);
        sc[g] = make_uint2(0, 0);
      }
    }
  };
  // Stage x rows for the ST super-tiles of chunk c into buffer `buf` (zeros past K), as one cp.async group.
  auto stage_x = [&](int c, int buf) {
    const int k0 = (s_begin + c * ST) * kSuperK;
    for (int i = tid; i < rows * kPieces; i += kGemmThreads) {
      const int r = i / kPieces, piece = i % kPieces, k = k0 + piece * 8;
      const __nv_bfloat16* src = p.x + static_cast<long long>(src_row[r]) * p.ldx + (k < p.K ? k : 0);
      cp_async16_zfill(xs + buf * kBuf + r * kStride + piece * 8, src, k < p.K ? 16 : 0);
    }
    cp_async_commit();
  };

  float acc[MT][NG][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][g][i] = 0.f;

  uint4 wring[ST][NG];
  uint2 sring[ST][NG];
#pragma unroll
  for (int j = 0; j < ST - 1; ++j) fetch(s_begin + j, wring[j], sring[j]);
  __syncthreads();  // src_row/dst_row and the zero rows are visible before the first staging
  stage_x(0, 0);

  for (int c = 0; c < n_chunks; ++c) {
    if (c + 1 < n_chunks) {
      stage_x(c + 1, (c + 1) & 1);
      cp_async_wait_group<1>();
    } else {
      cp_async_wait_group<0>();
    }
    __syncthreads();  // chunk c's x is in shared memory for every warp
    const __nv_bfloat16* xb = xs + (c & 1) * kBuf;
#pragma unroll
    for (int j = 0; j < ST; ++j) {
      fetch(s_begin + c * ST + j + ST - 1, wring[(j + ST - 1) % ST], sring[(j + ST - 1) % ST]);
      uint32_t scale[NG][8];
#pragma unroll
      for (int g = 0; g < NG; ++g) scales_to_bf16x2(sring[j][g], scale[g]);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldmatrix_x4(a[mt], xb + (mt * 16 + (lane & 15)) * kStride + j * kSuperK + t * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          uint32_t b0, b1;
          switch (t) {
            case 0: b_fragment<0>(wring[j][g], scale[g][0], b0, b1); break;
            case 1: b_fragment<1>(wring[j][g], scale[g][1], b0, b1); break;
            case 2: b_fragment<2>(wring[j][g], scale[g][2], b0, b1); break;
            case 3: b_fragment<3>(wring[j][g], scale[g][3], b0, b1); break;
            case 4: b_fragment<4>(wring[j][g], scale[g][4], b0, b1); break;
            case 5: b_fragment<5>(wring[j][g], scale[g][5], b0, b1); break;
            case 6: b_fragment<6>(wring[j][g], scale[g][6], b0, b1); break;
            default: b_fragment<7>(wring[j][g], scale[g][7], b0, b1); break;
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_bf16_16816(acc[mt][g], a[mt], b0, b1);
        }
      }
    }
    __syncthreads();  // every warp is done with buffer c & 1 before chunk c + 2 is staged into it
  }

  const int gr = lane >> 2, gc = (lane & 3) * 2;
  if (p.splits == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int g = 0; g < NG; ++g)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = mt * 16 + gr + (i >= 2 ? 8 : 0);
          const int n = (col_group0 + g) * 8 + gc + (i & 1);
          if (r < rows && n < p.N) {
            float v = acc[mt][g][i] * colscale[n];
            if (p.bias != nullptr) v += __bfloat162float(p.bias[n]);
            p.y[static_cast<long long>(dst_row[r]) * p.ldy + n] = __float2bfloat16_rn(v);
          }
        }
    return;
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int g = 0; g < NG; ++g)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = mt * 16 + gr + (i >= 2 ? 8 : 0);
        const int n = (col_group0 + g) * 8 + gc + (i & 1);
        if (r < rows && n < p.N)
          p.partial[(static_cast<long long>(split) * p.out_rows + dst_row[r]) * p.N + n] = acc[mt][g][i];
      }
  __threadfence();
  __syncthreads();
  int* counter = p.counters + group * p.n_blocks + nb;
  if (tid == 0) is_last = atomicAdd(counter, 1) == p.splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  constexpr int kCols = kGemmWarps * NG * 8;
  for (int i = tid; i < rows * kCols; i += kGemmThreads) {
    const int r = i / kCols, n = nb * kCols + i % kCols;
    if (n >= p.N) continue;
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s)
      sum += __ldcg(p.partial + (static_cast<long long>(s) * p.out_rows + dst_row[r]) * p.N + n);
    float v = sum * colscale[n];
    if (p.bias != nullptr) v += __bfloat162float(p.bias[n]);
    p.y[static_cast<long long>(dst_row[r]) * p.ldy + n] = __float2bfloat16_rn(v);
  }
  if (tid == 0) *counter = 0;
}

// ------------------------------------------------------------------------------------------------------------
// Host side. The instantiations that exist (rows per group -> tile shape):
//   rows  1..16: MT=1, NG=2, CH=4   (x chunk 16 x 512 bf16 = 16.6 KB shared)
//   rows 17..32: MT=2, NG=2, CH=2   (32 x 256, 16.9 KB)
//   rows 33..48: MT=3, NG=2, CH=1   (48 x 128, 13.1 KB)
//   rows 49..64: MT=4, NG=2, CH=1   (64 x 128, 17.4 KB)
// Every shape with K % 16 == 0 runs (N and K are padded at load); rows > 64 are the caller's loop.
constexpr int kNG = 2;

template <int MT, int CH>
constexpr int gemm_smem_bytes() { return MT * 16 * (CH * kSuperK + 8) * 2; }

static int num_sms() {
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  return sms;
}

struct GemmPlan {
  int mt, ch, n_blocks, splits, chunks_per_split, num_chunks, variant;
};

// v2 super-tiles per x chunk (= register ring depth) by m16 tiles: deeper for one tile, where registers allow.
constexpr int v2_stages(int mt) { return mt == 1 ? 4 : 2; }
// Variants (the planner and the tests can pick one):
//   1: v1, fetch then compute;  2: v2, ring of 4 super-tiles (128 registers, 2 blocks/SM at one m16 tile);
//   3: v2, ring of 3, capped at 80 registers (3 blocks/SM);  4: v2, ring of 2, capped at 64 registers (4 blocks/SM).
//   0 (default): per shape, from the H100 sweep (docs/KERNELS.md): variant 3 for wide layers (N >= 12288: 15 %
//   faster on gate_up at M=1), else 2. Variants 3 and 4 differ from 2 only for one m16 tile (M <= 16).
static int g_variant = 0;
static int effective_variant(int mt, int n) {
  if (g_variant != 0) return g_variant;
  return (mt == 1 && n >= 12288) ? 3 : 2;
}
static int plan_ng(int) { return kNG; }
static int plan_st(int mt, int variant) {
  if (variant == 1) return mt == 1 ? 4 : mt == 2 ? 2 : 1;
  if (mt == 1 && variant == 3) return 3;
  if (mt == 1 && variant == 4) return 2;
  return v2_stages(mt);
}

// Split K until the grid covers the GPU about twice, but never so far that the fp32 partials (written and read
// back, 8 bytes per output per split) cost more than a quarter of the weight bytes.
static GemmPlan plan_gemm(int rows, int n8, int kst, int groups, int splits_override) {
  GemmPlan plan{};
  plan.mt = ceil_div(rows, 16);
  plan.variant = effective_variant(plan.mt, n8 * 8);
  plan.ch = plan_st(plan.mt, plan.variant);
  plan.n_blocks = ceil_div(n8, kGemmWarps * plan_ng(plan.mt));
  plan.num_chunks = ceil_div(kst, plan.ch);
  int splits = splits_override;
  if (splits <= 0) {
    const int target = 2 * num_sms();
    splits = ceil_div(target, plan.n_blocks * groups);
    const double weight_bytes = 8.0 * n8 * kst * 128 * 0.5625;
    while (splits > 1 && splits * 8.0 * rows * n8 * 8 > weight_bytes / 4) --splits;
  }
  splits = splits < 1 ? 1 : splits > plan.num_chunks ? plan.num_chunks : splits;
  plan.chunks_per_split = ceil_div(plan.num_chunks, splits);
  plan.splits = ceil_div(plan.num_chunks, plan.chunks_per_split);  // no empty split
  return plan;
}

template <int MT, int CH>
static int launch(const GemmParams& p, int groups, cudaStream_t stream) {
  constexpr int smem = gemm_smem_bytes<MT, CH>();
  auto kernel = nvfp4_gemm_kernel<MT, kNG, CH>;
  dim3 grid(p.n_blocks, p.splits, groups);
  kernel<<<grid, kGemmThreads, smem, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

template <int MT, int NG = kNG, int ST = v2_stages(MT), int MINB = 2>
static int launch_v2(const GemmParams& p, int groups, cudaStream_t stream) {
  constexpr int smem = 2 * MT * 16 * (ST * kSuperK + 8) * 2;
  auto kernel = nvfp4_gemm_v2_kernel<MT, NG, ST, MINB>;
  static bool configured = false;  // > 48 KB of dynamic shared memory needs an explicit opt-in (Ada: up to 99 KB)
  if (!configured) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
      return kCudaError;
    configured = true;
  }
  dim3 grid(p.n_blocks, p.splits, groups);
  kernel<<<grid, kGemmThreads, smem, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

static int dispatch(GemmParams& p, const GemmPlan& plan, int groups, cudaStream_t stream) {
  if (plan.variant != 1) {
    switch (plan.mt) {
      case 1:
        if (plan.variant == 3) return launch_v2<1, kNG, 3, 3>(p, groups, stream);
        if (plan.variant == 4) return launch_v2<1, kNG, 2, 4>(p, groups, stream);
        return launch_v2<1>(p, groups, stream);
      case 2: return launch_v2<2>(p, groups, stream);
      case 3: return launch_v2<3>(p, groups, stream);
      case 4: return launch_v2<4>(p, groups, stream);
      default: return kUnsupportedShape;
    }
  }
  switch (plan.mt) {
    case 1: return launch<1, 4>(p, groups, stream);
    case 2: return launch<2, 2>(p, groups, stream);
    case 3: return launch<3, 1>(p, groups, stream);
    case 4: return launch<4, 1>(p, groups, stream);
    default: return kUnsupportedShape;
  }
}

void nvfp4_gemm_set_variant(int variant) { g_variant = (variant >= 0 && variant <= 4) ? variant : 0; }

// Sizes the caller must provide for a launch: partial floats and counters. Returns the plan's splits.
int nvfp4_gemm_workspace(int rows, int out_rows, int N, int K, int groups, int splits_override, long long* partial_floats,
                         int* counters) {
  const int n8 = ceil_div(N, 8), kst = ceil_div(K, kSuperK);
  GemmPlan plan = plan_gemm(rows, n8, kst, groups, splits_override);
  *partial_floats = plan.splits > 1 ? static_cast<long long>(plan.splits) * out_rows * N : 0;
  *counters = groups * plan.n_blocks;
  return plan.splits;
}

// Dense: y[M, N] = x[M, K] * W^T. M in 1..64.
int nvfp4_gemm(const __nv_bfloat16* x, int ldx, const void* wq, const void* ws, const float* colscale,
               const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, float* partial, long long partial_floats,
               int* counters, int num_counters, int M, int N, int K, int splits_override, cudaStream_t stream) {
  if (M < 1 || M > kMaxRowsPerGroup || N < 1 || K < 16 || K % 16 != 0) return kUnsupportedShape;
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || ldx % 8 != 0) return kBadAlignment;
  GemmParams p{};
  p.x = x; p.wq = static_cast<const uint4*>(wq); p.ws = static_cast<const uint2*>(ws); p.colscale = colscale;
  p.bias = bias; p.y = y; p.partial = partial; p.counters = counters;
  p.x_row_div = 1; p.M = M; p.out_rows = M; p.N = N; p.K = K; p.ldx = ldx; p.ldy = ldy;
  p.n8 = ceil_div(N, 8); p.kst = ceil_div(K, kSuperK);
  GemmPlan plan = plan_gemm(M, p.n8, p.kst, 1, splits_override);
  p.num_chunks = plan.num_chunks; p.chunks_per_split = plan.chunks_per_split; p.splits = plan.splits;
  p.n_blocks = plan.n_blocks;
  if (plan.splits > 1 && (partial_floats < static_cast<long long>(plan.splits) * M * N || num_counters < plan.n_blocks))
    return kWorkspaceTooSmall;
  return dispatch(p, plan, 1, stream);
}

// Grouped (MoE): for each group g < *num_groups (at most max_groups), rows row_ids[offsets[g]..offsets[g+1]) go
// through expert group_expert[g]. max_rows_per_group (<= 64) picks the tile; out_rows = rows of y.
int nvfp4_gemm_grouped(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                       const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                       __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                       int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                       const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                       int splits_override, cudaStream_t stream) {
  if (max_rows_per_group < 1 || max_rows_per_group > kMaxRowsPerGroup || N < 1 || K % 16 != 0 || max_groups < 1)
    return kUnsupportedShape;
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || ldx % 8 != 0 || expert_wq_bytes % 16 || expert_ws_bytes % 8)
    return kBadAlignment;
  GemmParams p{};
  p.x = x; p.wq = static_cast<const uint4*>(wq); p.ws = static_cast<const uint2*>(ws); p.colscale = colscale;
  p.y = y; p.partial = partial; p.counters = counters;
  p.group_offsets = group_offsets; p.group_expert = group_expert; p.row_ids = row_ids; p.num_groups = num_groups;
  p.x_row_div = x_row_div; p.expert_wq = expert_wq_bytes / 16; p.expert_ws = expert_ws_bytes / 8;
  p.expert_colscale = expert_colscale;
  p.M = 0; p.out_rows = out_rows; p.N = N; p.K = K; p.ldx = ldx; p.ldy = ldy;
  p.n8 = ceil_div(N, 8); p.kst = ceil_div(K, kSuperK);
  GemmPlan plan = plan_gemm(max_rows_per_group, p.n8, p.kst, max_groups, splits_override);
  p.num_chunks = plan.num_chunks; p.chunks_per_split = plan.chunks_per_split; p.splits = plan.splits;
  p.n_blocks = plan.n_blocks;
  if (plan.splits > 1 &&
      (partial_floats < static_cast<long long>(plan.splits) * out_rows * N || num_counters < max_groups * plan.n_blocks))
    return kWorkspaceTooSmall;
  return dispatch(p, plan, max_groups, stream);
}

}  // namespace adaq
