// NVFP4 x bf16 GEMM for decode (M = 1..64 rows per group), and its grouped form for MoE experts (v5).
//
//   y[m, n] = colscale[n] * sum_k x[m, k] * (e2m1[n, k] * block_scale[n, k / 16] * 2^-20)  (+ bias[n])
//
// colscale = 2^20 / global_scale. The weights are the mma's A operand (16 output columns = the m16 rows of
// mma.sync m16n8k16) and the activations its B operand (8 tokens = n8), so at M <= 8 no tensor-core work is
// spent on padding rows. Weights are read once, 16 bytes per lane per load, straight into registers, dequantized
// there; x rows are read from L1/L2 by the lanes that need them (no shared-memory staging, no barrier in the loop).
//
// Layout (made at load by adaq/kernels/layout.py, which holds the Python twin of this indexing and a CPU
// emulation of the bit tricks below):
//   wq [N/16 tiles][K/128 super-tiles][2 halves][32 lanes][16 bytes]  half h = columns 8h..8h+7 of the tile
//   ws [N/16 tiles][K/128 super-tiles][32 lanes][4 bytes]              block scales, re-encoded (see below)
// Lane l = 4g + c owns column 8h + g of each half and the 32 contiguous k = 32c .. 32c+31 of the super-tile: in
// virtual mma step t (0..7) its four fragment slots (virtual k 2c, 2c+1, 2c+8, 2c+9) hold real k = 32c + 4t + 0..3.
// The same virtual->real map is used for x, so x's fragment for step t is 8 contiguous bytes of the row, and a
// lane's 32 k span exactly two NVFP4 blocks (2c, 2c+1): four block scales per lane per super-tile.
//
// Word i (0..3) of a lane's 16 bytes holds steps 2i and 2i+1: four bf16 pairs, each placed so that one rotate and
// one mask (or just the mask) turns it into bf16x2 bits with the E2M1 sign at bit 15 and its exponent/mantissa at
// bits 8..6 (value x 2^-126, E2M1's subnormal 0.5 landing on bf16's subnormal 2^-127). No placement of four
// such 8-bit patterns tiles a 32-bit word by rotations alone (checked exhaustively), so the fourth pair is
// assembled from two rotations: 9 integer ops per 4 pairs (the v2 layout needed ~15).
//   pair A (step 2i,   slots 0,1):  w & M
//   pair B (step 2i,   slots 2,3):  rotr(w, 4) & M
//   pair C (step 2i+1, slots 0,1):  rotr(w, 10) & M
//   pair D (step 2i+1, slots 2,3):  (rotr(w, 6) & MQ) | (rotr(w, 14) & MR)
// Block scales are re-encoded at load as an unsigned E5M3 byte (exponent e + 9, 3 mantissa bits; E4M3
// subnormals become normals, negative scales fold their sign into the block's E2M1 codes, zero scales zero the
// codes, NaN becomes 0xFF), so (byte << 4) | 0x7000 is the bf16 bits of scale x 2^106: one mask per two scales
// (the four bytes of a lane are pre-positioned for it), and the halves feed fma.rn.bf16x2 through its operand
// swizzle. E2M1 (x 2^-126) times scale (x 2^106) is the weight x 2^-20: exact in bf16 (<= 5 significant bits,
// never subnormal), the 2^20 returns in colscale.
#include "common.cuh"

namespace adaq {

constexpr int kGemmWarps = 8;  // warps per block: kCT column tiles x kKS k-slices (kCT * kKS = 8)
constexpr int kGemmThreads = kGemmWarps * 32;
constexpr int kSuperK = 128;   // k values per super-tile (8 mma k16 steps, 16 bytes per lane per half)
constexpr int kTileN = 16;     // output columns per tile (the mma's m16)
constexpr int kMaxRowsPerGroup = 64;  // 8 token tiles of n8

constexpr uint32_t kPairMask = 0x81C081C0u;   // sign -> 15/31, exponent+mantissa -> 8..6 / 24..22
constexpr uint32_t kPairMaskQ = 0x01000100u;  // pair D: bit 8/24 from rotr 6
constexpr uint32_t kPairMaskR = 0x80C080C0u;  // pair D: bits 15,7,6 / 31,23,22 from rotr 14
constexpr uint32_t kScaleMask = 0x0FF00FF0u;  // two E5M3 bytes at bits 11..4 / 27..20
constexpr uint32_t kScaleBias = 0x70007000u;  // bf16 exponent field 224 + E5: scale x 2^106

struct GemmParams {
  const __nv_bfloat16* x;      // [rows, K] activations, row stride ldx (elements), 16-byte aligned rows
  const uint4* wq;             // repacked E2M1 nibbles (layout above), per expert stride expert_wq (uint4s)
  const uint32_t* ws;          // repacked E5M3 block scales, per expert stride expert_ws (words)
  const float* colscale;       // [experts][tiles * 16] 2^20 / global_scale per output column
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
  int tiles;                   // N rounded up to 16, over 16
  int kst;                     // K rounded up to 128, over 128: super-tiles
  int ks;                      // k-slices per block (warps sharing a column tile; reduced in shared memory)
  int st_per_split;            // super-tiles per split (the last split may have fewer)
  int splits;
  int n_blocks;                // column blocks: tiles / (8 / ks), rounded up
  // Fused MoE epilogues (grouped form, <= 16 rows per group; csrc/moe.cu's route kernel makes the tables):
  int pair_tiles;              // > 0, gated gate|up (TW = 2): a warp's two tiles are gate tile t and up tile
                               // t + pair_tiles of the same columns, N = 2I with I = 16 pair_tiles, and y [rows, I]
                               // gets act(gate) * up rounded as gated_act_kernel rounds it
  int act;                     // pair_tiles > 0: 0 silu, 1 gelu tanh
  __nv_bfloat16* combine_out;  // non-null, down + combine: out [combine_tokens, N] = sum over the token's slots in
                               // ascending expert order of bf16(y * w), bf16 after each add (moe_combine_kernel's sum)
  const float* combine_w;      // [tokens, combine_k] routing weights, fp32 (bf16 values for Qwen, Gemma 4's scaled)
  const int* combine_order;    // [tokens, combine_k] the token's slots in ascending expert order
  int combine_k, combine_tokens;
  int* combine_counters;       // [n_blocks] blocks of every group that have written a column block of y
};

__device__ __forceinline__ uint32_t rotr(uint32_t w, int d) { return __funnelshift_r(w, w, d); }

// common.cuh's ld_stream_v4 (L1 no-allocate, L2 evict-first: each weight byte is used once) with the cache policy
// made once per thread, and its 4-byte twin for a lane's four block scales.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ uint4 ld_stream_v4p(const void* ptr, uint64_t pol) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr), "l"(pol));
  return r;
}
__device__ __forceinline__ uint32_t ld_stream_u32p(const void* ptr, uint64_t pol) {
  uint32_t r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;\n" : "=r"(r) : "l"(ptr), "l"(pol));
  return r;
}

// 16 bytes of x through L1 (every warp of an SM reads the same x slices). Volatile, like the mma, so that ptxas
// keeps it next to its use instead of hoisting a whole ring's worth of x into registers.
__device__ __forceinline__ uint4 ld_x_v4(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(ptr));
  return r;
}

// {lo, lo} or {hi, hi} of a bf16x2: ptxas folds this into fma.rn.bf16x2's operand swizzle (.H0_H0 / .H1_H1).
template <bool kLow>
__device__ __forceinline__ uint32_t bf16_half_dup(uint32_t v) {
  uint32_t d;
  if (kLow)
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; mov.b32 %0, {l, l};}" : "=r"(d) : "r"(v));
  else
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; mov.b32 %0, {h, h};}" : "=r"(d) : "r"(v));
  return d;
}

// The A fragments of steps 2i (a0) and 2i+1 (a1) from word i of the two halves (wa: column g, wb: column 8 + g)
// and the halves' scale pairs: {g slots 0,1; 8+g slots 0,1; g slots 2,3; 8+g slots 2,3} = mma rows g, g+8 at
// virtual k {2c, 2c+1} and {2c+8, 2c+9}.
template <bool kLowBlock>
__device__ __forceinline__ void dequant_word(uint32_t wa, uint32_t wb, uint32_t sa, uint32_t sb, uint32_t (&a0)[4],
                                             uint32_t (&a1)[4]) {
  const uint32_t s0 = bf16_half_dup<kLowBlock>(sa), s1 = bf16_half_dup<kLowBlock>(sb);
  a0[0] = bf16x2_mul(wa & kPairMask, s0);
  a0[2] = bf16x2_mul(rotr(wa, 4) & kPairMask, s0);
  a1[0] = bf16x2_mul(rotr(wa, 10) & kPairMask, s0);
  a1[2] = bf16x2_mul((rotr(wa, 6) & kPairMaskQ) | (rotr(wa, 14) & kPairMaskR), s0);
  a0[1] = bf16x2_mul(wb & kPairMask, s1);
  a0[3] = bf16x2_mul(rotr(wb, 4) & kPairMask, s1);
  a1[1] = bf16x2_mul(rotr(wb, 10) & kPairMask, s1);
  a1[3] = bf16x2_mul((rotr(wb, 6) & kPairMaskQ) | (rotr(wb, 14) & kPairMaskR), s1);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One super-tile of TW column tiles: dequantize each tile's 2 x 16 bytes per lane with its four block scales and
// multiply them with x for every token tile; each x piece serves all TW tiles. x_piece(nt, i), i = 0..3: the lane's
// 16 bytes of token tile nt at k = 32 (lane % 4) + 8i of the super-tile (the B fragments of steps 2i and 2i+1),
// from global memory (decode) or from a shared-memory stage (nvfp4_gemm_mid_kernel).
template <int NT, int TW, typename XPiece>
__device__ __forceinline__ void multiply_super_tile(const uint4 (&w)[TW][2], const uint32_t (&sc)[TW],
                                                    XPiece&& x_piece, float (&acc)[TW][NT][4]) {
  uint32_t sa[TW], sb[TW];
#pragma unroll
  for (int tw = 0; tw < TW; ++tw) {
    sa[tw] = (sc[tw] & kScaleMask) | kScaleBias;
    sb[tw] = (__funnelshift_l(sc[tw], sc[tw], 8) & kScaleMask) | kScaleBias;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 xv[NT];  // piece i of each token tile: 16 bytes = the B fragments of steps 2i and 2i+1
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xv[nt] = x_piece(nt, i);
#pragma unroll
    for (int tw = 0; tw < TW; ++tw) {
      uint32_t step0[4], step1[4];
      if (i < 2)
        dequant_word<true>(word_of(w[tw][0], i), word_of(w[tw][1], i), sa[tw], sb[tw], step0, step1);
      else
        dequant_word<false>(word_of(w[tw][0], i), word_of(w[tw][1], i), sa[tw], sb[tw], step0, step1);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma_bf16_16816(acc[tw][nt], step0, xv[nt].x, xv[nt].y);
        mma_bf16_16816(acc[tw][nt], step1, xv[nt].z, xv[nt].w);
      }
    }
  }
}

// A lane's share of one super-tile of TW column tiles, tile_stride super-tiles apart (w, sc: the first tile's, lane
// included): 2 x 16 bytes of codes and 4 bytes of block scales per tile. Tile tw is absent when tw >= tiles_ok.
template <int TW>
__device__ __forceinline__ void fetch_tiles(const uint4* w, const uint32_t* sc, long long tile_stride, int tiles_ok,
                                            uint64_t policy, uint4 (&wr)[TW][2], uint32_t (&sr)[TW]) {
#pragma unroll
  for (int tw = 0; tw < TW; ++tw)
    if (TW == 1 || tw < tiles_ok) {
      wr[tw][0] = ld_stream_v4p(w + tw * tile_stride * 64, policy);
      wr[tw][1] = ld_stream_v4p(w + tw * tile_stride * 64 + 32, policy);
      sr[tw] = ld_stream_u32p(sc + tw * tile_stride * 32, policy);
    }
}

// One warp's share of TW adjacent column tiles: super-tiles [s0, s1) (tiles at wq + tw * tile_stride; tile tw
// absent when tw >= tiles_ok), all NT token tiles, into acc. Weights flow through a register ring of ST
// super-tiles: the loads of super-tile s + ST - 1 are issued before super-tile s is multiplied, so ST - 1
// super-tiles per warp are always in flight; loads past the range are not issued. x (tiny, shared by every warp)
// comes through L1 when its super-tile is multiplied. A ragged last super-tile (K % 128 != 0) is multiplied after
// the ring, with its x reads guarded.
template <int NT, int ST, int TW>
__device__ __forceinline__ void gemm_warp_tiles(const uint4* __restrict__ wq, const uint32_t* __restrict__ ws,
                                                long long tile_stride, int tiles_ok, int s0, int s1, int kst,
                                                const __nv_bfloat16* const (&xrow)[NT], int K,
                                                float (&acc)[TW][NT][4]) {
  if (s1 <= s0 || tiles_ok <= 0) return;
  const int lane = threadIdx.x & 31;
  const bool ragged_last = s1 == kst && (K % kSuperK) != 0;
  const int n = s1 - s0 - (ragged_last ? 1 : 0);  // super-tiles through the ring
  const uint64_t policy = evict_first_policy();
  const uint4* wp = wq + static_cast<long long>(s0) * 64 + lane;  // advances ST super-tiles per chunk
  const uint32_t* sp = ws + static_cast<long long>(s0) * 32 + lane;
  const __nv_bfloat16* xp[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xp[nt] = xrow[nt] + s0 * kSuperK + (lane & 3) * 32;
  auto fetch = [&](const uint4* w, const uint32_t* sc, uint4 (&wr)[TW][2], uint32_t (&sr)[TW]) {
    fetch_tiles<TW>(w, sc, tile_stride, tiles_ok, policy, wr, sr);
  };

  uint4 wr[ST][TW][2];
  uint32_t sr[ST][TW];
#pragma unroll
  for (int j = 0; j < ST - 1; ++j)
    if (j < n) fetch(wp + j * 64, sp + j * 32, wr[j], sr[j]);
  for (int b = 0; b < n; b += ST) {
#pragma unroll
    for (int j = 0; j < ST; ++j) {
      constexpr int kAhead = ST - 1;
      if (b + j + kAhead < n) fetch(wp + (j + kAhead) * 64, sp + (j + kAhead) * 32, wr[(j + kAhead) % ST],
                                    sr[(j + kAhead) % ST]);
      if (b + j >= n) break;  // uniform across the warp
      multiply_super_tile<NT, TW>(wr[j], sr[j], [&](int nt, int i) { return ld_x_v4(xp[nt] + j * kSuperK + 8 * i); },
                                  acc);
    }
    wp += ST * 64;
    sp += ST * 32;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xp[nt] += ST * kSuperK;
  }
  if (ragged_last) {
    uint4 w[TW][2];
    uint32_t sc[TW];
    fetch(wq + static_cast<long long>(s1 - 1) * 64 + lane, ws + static_cast<long long>(s1 - 1) * 32 + lane, w, sc);
    // Pieces at k >= K are zeros, never read: the row may end, or hold non-finite padding.
    const int k_lane = (s1 - 1) * kSuperK + (lane & 3) * 32;
    const __nv_bfloat16* xt[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xt[nt] = xrow[nt] + k_lane;
    multiply_super_tile<NT, TW>(w, sc, [&](int nt, int i) {
      return k_lane + 8 * i < K ? ld_x_v4(xt[nt] + 8 * i) : make_uint4(0, 0, 0, 0);
    }, acc);
  }
}

// MINB: blocks per SM the register budget must allow (launch bounds).
// f(row in group, column, value) for each of a warp's accumulator elements inside the output: element i of tile tw,
// token tile nt is column (tile0 + tw * step) * 16 + 8 (i >> 1) + lane/4, token 8 nt + 2 (lane%4) + (i & 1).
// step: 1, or pair_tiles for a gated gate|up warp (its up tile lies I columns after its gate tile).
template <int TW, int NT, typename F>
__device__ __forceinline__ void for_each_output(const float (&acc)[TW][NT][4], int tile0, int step, int rows, int N,
                                                F&& f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int tw = 0; tw < TW; ++tw)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = nt * 8 + c2 + (i & 1), n = (tile0 + tw * step) * kTileN + 8 * (i >> 1) + g;
        if (r < rows && n < N) f(r, n, acc[tw][nt][i]);
      }
}

// y[dst, n] = bf16(sum * colscale[n] (+ bias[n])).
__device__ __forceinline__ void store_output(const GemmParams& p, const float* colscale, int dst, int n, float sum) {
  float v = sum * colscale[n];
  if (p.bias != nullptr) v += __bfloat162float(p.bias[n]);
  p.y[static_cast<long long>(dst) * p.ldy + n] = __float2bfloat16_rn(v);
}

// y[dst, n] = bf16(bf16(act(g)) * u) with g, u = the gate and up outputs (column n and I + n) rounded as
// store_output rounds them: the unfused gate|up GEMM + gated_act_kernel, bit for bit.
__device__ __forceinline__ void store_gated(const GemmParams& p, const float* colscale, int dst, int n, float gate_sum,
                                            float up_sum) {
  const int inter = p.pair_tiles * kTileN;
  const float g = __bfloat162float(__float2bfloat16_rn(gate_sum * colscale[n]));
  const float u = __bfloat162float(__float2bfloat16_rn(up_sum * colscale[inter + n]));
  const float a = __bfloat162float(__float2bfloat16_rn(p.act == 0 ? gate_act<0>(g) : gate_act<1>(g)));
  p.y[static_cast<long long>(dst) * p.ldy + n] = __float2bfloat16_rn(a * u);
}

// Down + combine: called by every block once its y columns [nb * cols, + cols) are written (all threads). The block
// that arrives last for this column block, of all groups, sums the column block for every token: each token's slots
// in ascending expert order, bf16(y * w) added and rounded to bf16 one by one (moe_combine_kernel's arithmetic, so
// no atomics and a fixed order). y comes from other blocks through L2 (ld.global.cg: never a stale L1 line).
// 8 columns per thread, 16-byte loads: at 16 tokens one pass of a 256-thread block over a 128-column block.
__device__ __forceinline__ void combine_when_last(const GemmParams& p, int nb, int cols, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(p.combine_counters + nb, 1) == *p.num_groups - 1;
  __syncthreads();
  if (!*flag) return;
  __threadfence();
  const int chunks = cols / 8, k = p.combine_k;
  for (int i = threadIdx.x; i < p.combine_tokens * chunks; i += blockDim.x) {
    const int t = i / chunks, n = nb * cols + (i % chunks) * 8;
    if (n >= p.N) continue;
    float acc[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = 0.f;
    for (int j = 0; j < k; ++j) {
      const int slot = p.combine_order[t * k + j];
      const float w = p.combine_w[t * k + slot];
      const uint4 v = __ldcg(reinterpret_cast<const uint4*>(p.y + static_cast<long long>(t * k + slot) * p.ldy + n));
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float lo = __bfloat162float(__float2bfloat16_rn(__uint_as_float(words[q] << 16) * w));
        const float hi = __bfloat162float(__float2bfloat16_rn(__uint_as_float(words[q] & 0xFFFF0000u) * w));
        acc[2 * q] = __bfloat162float(__float2bfloat16_rn(acc[2 * q] + lo));
        acc[2 * q + 1] = __bfloat162float(__float2bfloat16_rn(acc[2 * q + 1] + hi));
      }
    }
    *reinterpret_cast<uint4*>(p.combine_out + static_cast<long long>(t) * p.N + n) =
        make_uint4(pack_bf16x2(acc[0], acc[1]), pack_bf16x2(acc[2], acc[3]), pack_bf16x2(acc[4], acc[5]),
                   pack_bf16x2(acc[6], acc[7]));
  }
  if (threadIdx.x == 0) p.combine_counters[nb] = 0;  // zero again for the next launch
}

// Split-K over blocks, after every block parked its fp32 partials (partial[split][out_rows][N]): the block that
// arrives last at `counter` (all threads call this) sums columns [col0, col0 + cols) of its rows in split order
// (deterministic), scales, and writes bf16 (gated: act(gate) * up), then zeroes the counter for the next launch.
// Returns whether this block was the last.
__device__ __forceinline__ bool sum_splits_when_last(const GemmParams& p, const float* colscale, const int* dst_row,
                                                     int rows, int* counter, int col0, int cols, bool paired,
                                                     int* is_last) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *is_last = atomicAdd(counter, 1) == p.splits - 1;
  __syncthreads();
  if (!*is_last) return false;
  __threadfence();
  const int inter = p.pair_tiles * kTileN;
  const long long split_stride = static_cast<long long>(p.out_rows) * p.N;
  for (int i = threadIdx.x; i < rows * cols; i += kGemmThreads) {
    const int r = i / cols, n = col0 + i % cols;
    if (n >= (paired ? inter : p.N)) continue;
    const float* part = p.partial + static_cast<long long>(dst_row[r]) * p.N + n;
    float sum = 0.f, up = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      sum += __ldcg(part + s * split_stride);
      if (paired) up += __ldcg(part + s * split_stride + inter);
    }
    if (paired)
      store_gated(p, colscale, dst_row[r], n, sum, up);
    else
      store_output(p, colscale, dst_row[r], n, sum);
  }
  if (threadIdx.x == 0) *counter = 0;
  return true;
}

// The rows a block serves, at most `limit`: group `group`'s (grouped form; an idle group has none) or rows
// [dense_block * limit, + limit) of the dense form. Writes their x rows (src_row) and y rows (dst_row) into the
// block's tables, sets *expert, returns the count (<= 0: none, and the caller's whole block returns). No barrier.
__device__ __forceinline__ int block_rows(const GemmParams& p, int group, int dense_block, int limit, int* src_row,
                                          int* dst_row, int* expert) {
  const int tid = threadIdx.x;
  if (p.group_offsets == nullptr) {
    *expert = 0;
    const int rows = min(p.M - dense_block * limit, limit);
    if (tid < rows) src_row[tid] = dst_row[tid] = dense_block * limit + tid;
    return rows;
  }
  if (group >= *p.num_groups) return 0;
  const int first = p.group_offsets[group];
  const int rows = min(p.group_offsets[group + 1] - first, limit);
  *expert = p.group_expert[group];
  if (tid < rows) {
    const int r = p.row_ids[first + tid];
    src_row[tid] = r / p.x_row_div;
    dst_row[tid] = r;
  }
  return rows;
}

template <int TW, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[TW][NT][4]) {
#pragma unroll
  for (int tw = 0; tw < TW; ++tw)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[tw][nt][i] = 0.f;
}

// TW: adjacent column tiles per warp (each x piece read once for all of them); with pair_tiles > 0 (TW = 2 only)
// the warp's gate tile and up tile instead.
template <int NT, int ST, int MINB, int TW>
__global__ void __launch_bounds__(kGemmThreads, MINB) nvfp4_gemm_kernel(const GemmParams p) {
  __shared__ int src_row[kMaxRowsPerGroup], dst_row[kMaxRowsPerGroup];
  __shared__ float red[kGemmWarps][TW * NT * 4][32];  // k-slice partial sums (slices >= 1)
  __shared__ int is_last, combine_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nb = blockIdx.x, split = blockIdx.y, group = blockIdx.z;

  // ---- Which rows and which expert this block serves (dense: one group, blockIdx.z = 0).
  int expert = 0;
  const int rows = block_rows(p, group, 0, NT * 8, src_row, dst_row, &expert);
  if (rows <= 0) return;  // uniform across the block: no barrier is skipped by half of it
  __syncthreads();

  const int ct_count = kGemmWarps / p.ks;
  const int ct = warp % ct_count, ks = warp / ct_count;
  // The fused MoE epilogues exist in the variants the MoE plans pick (kFusedEpilogue: 1/3, 5, 8); the others
  // (3 or 4 blocks per SM, four tiles per warp) have no registers to spare for them (ptxas spilled v2 and v7).
  constexpr bool kFusedEpilogue = MINB <= 2 && TW <= 2;
  const bool paired = kFusedEpilogue && TW == 2 && p.pair_tiles > 0;  // gated gate|up (activation in the epilogue)
  const bool combine = kFusedEpilogue && p.combine_out != nullptr;    // down + combine
  const int step = paired ? p.pair_tiles : 1;
  const int tile0 = paired ? nb * ct_count + ct : (nb * ct_count + ct) * TW;  // this warp's first column tile
  const int tiles_ok = paired ? (tile0 < p.pair_tiles ? 2 : 0) : min(TW, p.tiles - tile0);
  const int split_begin = split * p.st_per_split;
  const int split_end = min(split_begin + p.st_per_split, p.kst);
  const int per_warp = ceil_div(split_end - split_begin, p.ks);
  const int s0 = split_begin + ks * per_warp, s1 = min(s0 + per_warp, split_end);

  const __nv_bfloat16* xrow[NT];  // absent rows read row 0: their output columns are never written
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = nt * 8 + (lane >> 2);
    xrow[nt] = p.x + static_cast<long long>(src_row[r < rows ? r : 0]) * p.ldx;
  }
  const long long tile_base = static_cast<long long>(tiles_ok > 0 ? tile0 : 0) * p.kst;
  const uint4* wq = p.wq + expert * p.expert_wq + tile_base * 64;
  const uint32_t* ws = p.ws + expert * p.expert_ws + tile_base * 32;

  float acc[TW][NT][4];
  zero_acc(acc);
  gemm_warp_tiles<NT, ST, TW>(wq, ws, static_cast<long long>(p.kst) * step, tiles_ok, s0, s1, p.kst, xrow, p.K, acc);

  // ---- k-slices of a column tile meet in shared memory; slice 0 adds them in slice order (deterministic).
  if (p.ks > 1) {
    if (ks > 0)
#pragma unroll
      for (int tw = 0; tw < TW; ++tw)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) red[warp][(tw * NT + nt) * 4 + i][lane] = acc[tw][nt][i];
    __syncthreads();
    if (ks == 0)
      for (int q = 1; q < p.ks; ++q)
#pragma unroll
        for (int tw = 0; tw < TW; ++tw)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[tw][nt][i] += red[warp + q * ct_count][(tw * NT + nt) * 4 + i][lane];
  }

  const float* colscale = p.colscale + expert * p.expert_colscale;
  const int cols = ct_count * (paired ? 1 : TW) * kTileN;  // this block's output columns (gate columns if paired)
  if (p.splits == 1) {
    if (ks == 0 && paired && tiles_ok == 2) {
      const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = nt * 8 + c2 + (i & 1);
          if (r < rows)
            store_gated(p, colscale, dst_row[r], tile0 * kTileN + 8 * (i >> 1) + g, acc[0][nt][i], acc[TW - 1][nt][i]);
        }
    } else if (ks == 0 && !paired) {
      for_each_output(acc, tile0, 1, rows, p.N, [&](int r, int n, float v) { store_output(p, colscale, dst_row[r], n, v); });
    }
    if (combine) combine_when_last(p, nb, cols, &combine_last);
    return;
  }

  // ---- Split-K over blocks: park fp32 partials; the block that arrives last for this column block sums them in
  // split order (deterministic), scales, and writes bf16. Its counter goes back to zero for the next launch.
  if (ks == 0 && (!paired || tiles_ok == 2))  // a paired warp past the last pair would land in up's columns
    for_each_output(acc, tile0, step, rows, p.N, [&](int r, int n, float v) {
      p.partial[(static_cast<long long>(split) * p.out_rows + dst_row[r]) * p.N + n] = v;
    });
  if (sum_splits_when_last(p, colscale, dst_row, rows, p.counters + group * p.n_blocks + nb, nb * cols, cols, paired,
                           &is_last) &&
      combine)
    combine_when_last(p, nb, cols, &combine_last);
}

// Dense bf16 [N, K] = e2m1 x block_scale (exact: <= 6 significant bits in [2^-10, 2688]; 1/global_scale NOT
// applied) from the same layout and the same bit tricks as the GEMM, for paths that hand the weight to a dense
// GEMM (large-M prefill). 0.5625 bytes read and 2 written per weight; graph-safe.
// Each warp walks super-tiles (16 rows x 128 k) grid-stride, the next one's 36 bytes per lane loaded before the
// current one is converted. Lane (g, c) owns 32 values of rows g and g + 8; written straight out that is 16-byte
// pieces 64 bytes apart in 8 rows per store, and the first version (which did so) ran at ~830 GB/s on the H100
// (device run 1, session 3). So the warp stages its 4 KB tile in shared memory and stores 2 rows x 256 contiguous
// bytes per instruction. Staging slots are 16-byte chunks x (0..15) of a row, swizzled by
// x ^ (2 * bit3(x) | row & 1): the 8 lanes of a store phase (rows g in {0, 1}, chunks 4c + i) and of a load phase
// (one row, 8 consecutive chunks) then hit 8 distinct bank groups.
__device__ __forceinline__ int dequant_slot(int row, int chunk) {
  return row * 16 + (chunk ^ ((((chunk >> 3) & 1) << 1) | (row & 1)));
}

// E4M3 (OUT = uint8_t): the FP8 prefill path's weight operand from the same layout, adaq.layers.fp8_prefill's spec
// e4m3((e2m1 x block_scale) x row_mul[n]) with row_mul = 64 / (the row's largest block scale), made at load: the
// staged bf16 value is that exact product, so the output phase only multiplies, rounds (float_to_e4m3_exact, torch's
// RNE bit for bit) and stores 2 rows x 128 contiguous bytes per instruction. The decode layout is the only copy of
// the NVFP4 bytes the cuda backend keeps, so the FP8 path needs no second one.
template <typename OUT>
__global__ void __launch_bounds__(kGemmThreads) nvfp4_dequantize_kernel(const uint4* __restrict__ wq,
                                                                         const uint32_t* __restrict__ ws,
                                                                         const float* __restrict__ row_mul,
                                                                         OUT* __restrict__ out, int n, int k, int kst,
                                                                         long long super_tiles) {
  __shared__ uint4 stage[kGemmWarps][16 * 16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  uint4* tile_buf = stage[warp];
  const long long stride = static_cast<long long>(gridDim.x) * kGemmWarps;
  long long st_index = static_cast<long long>(blockIdx.x) * kGemmWarps + warp;
  if (st_index >= super_tiles) return;
  uint4 w0 = __ldg(wq + st_index * 64 + lane), w1 = __ldg(wq + st_index * 64 + 32 + lane);
  uint32_t sc = __ldg(ws + st_index * 32 + lane);
  const uint32_t undo = 0x49804980u;  // bf16x2 {2^20, 2^20}: the products carry weight x 2^-20
  for (; st_index < super_tiles; st_index += stride) {
    const long long next = st_index + stride;
    uint4 n0 = w0, n1 = w1;
    uint32_t nsc = sc;
    if (next < super_tiles) {
      n0 = __ldg(wq + next * 64 + lane);
      n1 = __ldg(wq + next * 64 + 32 + lane);
      nsc = __ldg(ws + next * 32 + lane);
    }
    const uint32_t sa = (sc & kScaleMask) | kScaleBias;
    const uint32_t sb = (__funnelshift_l(sc, sc, 8) & kScaleMask) | kScaleBias;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t step0[4], step1[4];
      if (i < 2)
        dequant_word<true>(word_of(w0, i), word_of(w1, i), sa, sb, step0, step1);
      else
        dequant_word<false>(word_of(w0, i), word_of(w1, i), sa, sb, step0, step1);
      tile_buf[dequant_slot(g, 4 * c + i)] = make_uint4(bf16x2_mul(step0[0], undo), bf16x2_mul(step0[2], undo),
                                                        bf16x2_mul(step1[0], undo), bf16x2_mul(step1[2], undo));
      tile_buf[dequant_slot(g + 8, 4 * c + i)] = make_uint4(bf16x2_mul(step0[1], undo), bf16x2_mul(step0[3], undo),
                                                            bf16x2_mul(step1[1], undo), bf16x2_mul(step1[3], undo));
    }
    __syncwarp();
    const int tile = static_cast<int>(st_index / kst), s = static_cast<int>(st_index % kst);
    const int chunk = lane & 15, col = s * kSuperK + chunk * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = 2 * j + (lane >> 4), row = tile * kTileN + r;
      if (row >= n || col >= k) continue;  // K % 16 == 0: an 8-value chunk is wholly inside K or wholly padding
      const uint4 values = tile_buf[dequant_slot(r, chunk)];
      if constexpr (sizeof(OUT) == 2) {
        *reinterpret_cast<uint4*>(out + static_cast<long long>(row) * k + col) = values;
      } else {
        const float mul = __ldg(row_mul + row);
        const uint32_t words[4] = {values.x, values.y, values.z, values.w};
        uint32_t bytes[2] = {0u, 0u};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float lo = __uint_as_float(words[w] << 16), hi = __uint_as_float(words[w] & 0xFFFF0000u);
          bytes[w >> 1] |= (static_cast<uint32_t>(float_to_e4m3_exact(__fmul_rn(lo, mul))) |
                            (static_cast<uint32_t>(float_to_e4m3_exact(__fmul_rn(hi, mul))) << 8))
                           << (16 * (w & 1));
        }
        *reinterpret_cast<uint2*>(out + static_cast<long long>(row) * k + col) = make_uint2(bytes[0], bytes[1]);
      }
    }
    __syncwarp();
    w0 = n0; w1 = n1; sc = nsc;
  }
}

// ---- Mid-size M (prefill chunks of up to a few hundred rows; perhaps decode batches of 9-16). The decode kernel
// reads the weights once per 64 rows and, with 64 rows at 1 block of 8 warps per SM, keeps too few bytes in flight:
// 0.33 ms per Qwen3-8B layer at M = 64 against 0.09 at M = 16 (session-6 sweep), below cuBLAS bf16 from M = 32 on.
// And every one of its warps reads x itself: at M = 16 a warp's x per super-tile (4 KB) outweighs its weights
// (2.3 KB at TW 2), so x traffic from L1/L2 may be what holds M = 16 at 40 % of copy. This kernel keeps the weight
// path (each byte read once per column block and row block, straight into a register ring, dequantized there: no
// dense copy of the weight, no per-prompt expansion) and stages x instead: a block of 8 warps serves ROWS rows,
// each super-tile's x slice (ROWS x 128 k, 16 KB at 64 rows) comes through a kMidStages-deep cp.async ring in
// shared memory, read from L2 once per block and by all 8 warps from there, so a dequantized weight fragment feeds
// NT = ROWS / 8 token tiles of mma. Row blocks of a column block are adjacent in the grid (blockIdx.x), so the later
// ones find the weights in L2. Split-K over blockIdx.z when column x row blocks leave SMs idle; the last block sums
// (sum_splits_when_last). Staging slots use the dequantize kernel's swizzle: a quarter-warp's 8 lanes (rows g,
// g + 1; chunks 4c + i, c = 0..3) read 8 distinct bank groups. Grouped form (MoE): row block b is group b (<= ROWS
// rows of one expert). ROWS 16 or 32 (M <= 32, or small groups) wastes no mma on padding rows and leaves registers
// for two blocks per SM.
constexpr int kMidMaxRows = 64;  // rows per block: 16, 32 or 64 (ROWS), the fewest that hold M (dense)
constexpr int kMidStages = 3;
constexpr int kMidRing = 3;       // weight super-tiles per warp in registers
constexpr int mid_stage_chunks(int rows) { return rows * (kSuperK * 2 / 16); }  // 16-byte chunks per stage
constexpr int mid_smem_bytes(int rows) { return kMidStages * mid_stage_chunks(rows) * 16; }

// x at k = s * 128 .. + 127 of the block's rows into a stage; rows past the block's and k past K are zero-filled
// (K % 16 == 0: a chunk of 8 is wholly inside or outside).
template <int ROWS>
__device__ __forceinline__ void stage_x(uint4* stage, const GemmParams& p, const int* src_row, int rows, int s) {
  for (int q = threadIdx.x; q < mid_stage_chunks(ROWS); q += kGemmThreads) {
    const int r = q >> 4, chunk = q & 15, k = s * kSuperK + chunk * 8;
    const bool ok = r < rows && k < p.K;
    const __nv_bfloat16* src = ok ? p.x + static_cast<long long>(src_row[r]) * p.ldx + k : p.x;
    cp_async16_zfill(stage + dequant_slot(r, chunk), src, ok ? 16 : 0);
  }
}

// MINB 2 where the registers allow (ROWS <= 32): two blocks of 8 warps per SM keep more weight bytes in flight.
template <int ROWS, int TW, int ST, int MINB>
__global__ void __launch_bounds__(kGemmThreads, MINB) nvfp4_gemm_mid_kernel(const GemmParams p) {
  extern __shared__ uint4 x_stages[];  // [kMidStages][mid_stage_chunks(ROWS)]
  __shared__ int src_row[ROWS], dst_row[ROWS];
  __shared__ int is_last;
  constexpr int NT = ROWS / 8, kStageChunks = mid_stage_chunks(ROWS);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
  const int rb = blockIdx.x, nb = blockIdx.y, split = blockIdx.z;

  int expert = 0;
  const int rows = block_rows(p, rb, rb, ROWS, src_row, dst_row, &expert);
  if (rows <= 0) return;  // uniform across the block
  __syncthreads();

  const int tile0 = (nb * kGemmWarps + warp) * TW;
  const int tiles_ok = min(TW, p.tiles - tile0);  // <= 0: the warp only stages x and meets the barriers
  const int s0 = split * p.st_per_split, n = min(s0 + p.st_per_split, p.kst) - s0;
  const long long first_st = static_cast<long long>(tiles_ok > 0 ? tile0 : 0) * p.kst + s0;
  const uint4* wp = p.wq + expert * p.expert_wq + first_st * 64 + lane;
  const uint32_t* sp = p.ws + expert * p.expert_ws + first_st * 32 + lane;
  const uint64_t policy = evict_first_policy();

  float acc[TW][NT][4];
  zero_acc(acc);

  // One cp.async group per super-tile, committed even when empty, so wait_group counts super-tiles.
#pragma unroll
  for (int j = 0; j < kMidStages - 1; ++j) {
    if (j < n) stage_x<ROWS>(x_stages + j * kStageChunks, p, src_row, rows, s0 + j);
    cp_async_commit();
  }
  uint4 wr[ST][TW][2];
  uint32_t sr[ST][TW];
#pragma unroll
  for (int j = 0; j < ST - 1; ++j)
    if (j < n && tiles_ok > 0) fetch_tiles<TW>(wp + j * 64, sp + j * 32, p.kst, tiles_ok, policy, wr[j], sr[j]);
  for (int b = 0; b < n; b += ST) {
#pragma unroll
    for (int j = 0; j < ST; ++j) {
      const int s = b + j;
      if (s >= n) break;  // uniform across the block
      constexpr int kAhead = ST - 1;
      if (s + kAhead < n && tiles_ok > 0)
        fetch_tiles<TW>(wp + (s + kAhead) * 64, sp + (s + kAhead) * 32, p.kst, tiles_ok, policy,
                        wr[(j + kAhead) % ST], sr[(j + kAhead) % ST]);
      cp_async_wait_group<kMidStages - 2>();
      __syncthreads();  // stage s is in for every thread, and every warp is done with stage s - 1 (refilled next)
      if (s + kMidStages - 1 < n)
        stage_x<ROWS>(x_stages + ((s + kMidStages - 1) % kMidStages) * kStageChunks, p, src_row, rows,
                      s0 + s + kMidStages - 1);
      cp_async_commit();
      const uint4* stage = x_stages + (s % kMidStages) * kStageChunks;
      if (tiles_ok > 0)
        multiply_super_tile<NT, TW>(wr[j], sr[j],
                                    [&](int nt, int i) { return stage[dequant_slot(nt * 8 + g, 4 * c + i)]; }, acc);
    }
  }

  const float* colscale = p.colscale + expert * p.expert_colscale;
  constexpr int kCols = kGemmWarps * TW * kTileN;  // this block's output columns
  if (p.splits == 1) {
    for_each_output(acc, tile0, 1, rows, p.N,
                    [&](int r, int col, float v) { store_output(p, colscale, dst_row[r], col, v); });
    return;
  }
  for_each_output(acc, tile0, 1, rows, p.N, [&](int r, int col, float v) {
    p.partial[(static_cast<long long>(split) * p.out_rows + dst_row[r]) * p.N + col] = v;
  });
  sum_splits_when_last(p, colscale, dst_row, rows, p.counters + rb * p.n_blocks + nb, nb * kCols, kCols, false,
                       &is_last);
}

// ------------------------------------------------------------------------------------------------------------
// Host side. Instantiations: NT = 1..8 token tiles (rows = 8 NT); for NT <= 2 one kernel per variant.
// Every shape with K % 16 == 0 runs (N and K are padded at load); rows > 64 are the caller's loop.
//
// Variants (ring depth ST, register cap = blocks per SM MINB, column tiles per warp TW; k-slicing):
//   1: ST 4, 2 blocks/SM, TW 1      2: ST 3, 3 blocks/SM, TW 1      4: ST 2, 4 blocks/SM, TW 1
//   3: as 1 with wide blocks (k-slices only down to >= 8 super-tiles per warp)
//   5: ST 3, 2 blocks/SM, TW 2      6: ST 2, 1 block/SM, TW 4   (x read once per 32 / 64 columns: M = 9..16)
//   7: ST 1, 2 blocks/SM, TW 4 (no ring: 4 tiles' loads in flight per warp)      8: ST 2, 2 blocks/SM, TW 2
//   0 (default): per shape, from the H100 sweeps (docs/KERNELS.md "GEMM v5", runs 6-8): see default_variant.
struct GemmPlan {
  int nt, ks, n_blocks, splits, st_per_split, variant;
};

static int g_variant = 0;
constexpr int kVariants = 8;

static int default_variant(int nt, int n, int k, bool grouped) {
  if (grouped) return 3;  // runs 6-8, MoE layer: 3 best or within 3 % at 1 and 16 tokens (32.1 / 144.6 us)
  if (nt == 1) return n >= 6144 ? 4 : 2;  // runs 6-8: 4 on qkv/gate_up (8.8/26.3 us), 2 on o/down (7.4/14.7)
  return static_cast<long long>(n) * k >= 6144LL * 4096 ? 8 : 2;  // run 8, M=16: 8 on qkv/gate_up/down, 2 on o
}
static int tiles_per_warp(int variant) {
  switch (variant) {
    case 5: case 8: return 2;
    case 6: case 7: return 4;
    default: return 1;
  }
}
static int blocks_per_sm(int variant) {
  switch (variant) {
    case 2: return 3;
    case 4: return 4;
    case 6: return 1;
    default: return 2;
  }
}

static int num_sms() {
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  return sms;
}

// k-slices first (free: reduced in shared memory), then split-K over blocks only when the column blocks of all
// groups still leave SMs idle, never so far that the fp32 partials (8 bytes per output per split) cost more than a
// quarter of the weight bytes. M > 16 always runs variant-independent kernels (TW 1).
// epilogue 1, gated gate|up (M <= 16): a TW 2 variant whose warp holds one gate tile and its up tile, so a column
// position is a pair of tiles: 5 (ring of 3, the deepest TW 2 ring: v3's four super-tiles in flight per warp are
// what the grouped GEMM measured best with), or 8 when ADAQ_GEMM_VARIANT asks for it. Epilogue 2, down + combine
// (M <= 16): the variants that carry it (kFusedEpilogue): 3 unless ADAQ_GEMM_VARIANT asks for 1, 5 or 8.
static GemmPlan plan_gemm(int rows, int tiles, int kst, int groups, int splits_override, int epilogue = 0) {
  GemmPlan plan{};
  const bool paired = epilogue == 1;
  plan.nt = ceil_div(rows, 8);
  plan.variant = g_variant != 0 ? g_variant : default_variant(plan.nt, tiles * kTileN, kst * kSuperK, groups > 1);
  if (plan.nt > 2) plan.variant = 1;
  if (paired) plan.variant = g_variant == 8 ? 8 : 5;
  const bool carries_combine = plan.variant == 1 || plan.variant == 3 || plan.variant == 5 || plan.variant == 8;
  if (epilogue == 2 && !carries_combine) plan.variant = 3;
  const int min_per_warp = plan.variant == 3 ? 8 : 2;
  plan.ks = kGemmWarps;
  while (plan.ks > 1 && kst < min_per_warp * plan.ks) plan.ks /= 2;
  const int positions = paired ? tiles / 2 : tiles;  // column positions of one warp each
  plan.n_blocks = ceil_div(positions, kGemmWarps / plan.ks * (paired ? 1 : tiles_per_warp(plan.variant)));
  int splits = splits_override;
  if (splits <= 0) {
    const int slots = blocks_per_sm(plan.variant) * num_sms();
    const int blocks = plan.n_blocks * groups;
    splits = blocks >= slots ? 1 : slots / blocks;
    splits = min(splits, max(1, kst / (plan.ks * min_per_warp)));
    const double weight_bytes = 16.0 * tiles * kst * 128 * 0.5625;
    while (splits > 1 && splits * 8.0 * rows * tiles * 16 > weight_bytes / 4) --splits;
  }
  splits = splits < 1 ? 1 : splits > kst ? kst : splits;
  plan.st_per_split = ceil_div(kst, splits);
  plan.splits = ceil_div(kst, plan.st_per_split);  // no empty split
  return plan;
}

template <int NT, int ST, int MINB, int TW>
static int launch(const GemmParams& p, int groups, cudaStream_t stream) {
  dim3 grid(p.n_blocks, p.splits, groups);
  nvfp4_gemm_kernel<NT, ST, MINB, TW><<<grid, kGemmThreads, 0, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

template <int ST, int MINB, int TW>
static int launch_small(const GemmParams& p, int nt, int groups, cudaStream_t stream) {
  return nt == 1 ? launch<1, ST, MINB, TW>(p, groups, stream) : launch<2, ST, MINB, TW>(p, groups, stream);
}

// 17..64 rows: a shallow ring (their x and accumulator registers leave no room for a deeper one); 2 blocks/SM up
// to 24 rows, then 1 (no spills).
static int launch_large(const GemmParams& p, int nt, int groups, cudaStream_t stream) {
  switch (nt) {
    case 3: return launch<3, 2, 2, 1>(p, groups, stream);
    case 4: return launch<4, 2, 1, 1>(p, groups, stream);
    case 5: return launch<5, 2, 1, 1>(p, groups, stream);
    case 6: return launch<6, 2, 1, 1>(p, groups, stream);
    case 7: return launch<7, 2, 1, 1>(p, groups, stream);
    case 8: return launch<8, 2, 1, 1>(p, groups, stream);
    default: return kUnsupportedShape;
  }
}

static int dispatch(const GemmParams& p, const GemmPlan& plan, int groups, cudaStream_t stream) {
  if (plan.nt > 2) return launch_large(p, plan.nt, groups, stream);
  switch (plan.variant) {
    case 2: return launch_small<3, 3, 1>(p, plan.nt, groups, stream);
    case 4: return launch_small<2, 4, 1>(p, plan.nt, groups, stream);
    case 5: return launch_small<3, 2, 2>(p, plan.nt, groups, stream);
    case 6: return launch_small<2, 1, 4>(p, plan.nt, groups, stream);
    case 7: return launch_small<1, 2, 4>(p, plan.nt, groups, stream);
    case 8: return launch_small<2, 2, 2>(p, plan.nt, groups, stream);
    default: return launch_small<4, 2, 1>(p, plan.nt, groups, stream);  // variants 1 and 3
  }
}

static void apply_plan(GemmParams& p, const GemmPlan& plan) {
  p.ks = plan.ks;
  p.st_per_split = plan.st_per_split;
  p.splits = plan.splits;
  p.n_blocks = plan.n_blocks;
}

void nvfp4_gemm_set_variant(int variant) { g_variant = (variant >= 0 && variant <= kVariants) ? variant : 0; }

// Sizes the caller must provide for a launch: partial floats and counters. Returns the plan's splits.
// epilogue: 0 plain, 1 gated gate|up (paired tiles), 2 down + combine (one more counter per column block).
int nvfp4_gemm_workspace(int rows, int out_rows, int N, int K, int groups, int splits_override, long long* partial_floats,
                         int* counters, int epilogue) {
  const int tiles = ceil_div(N, kTileN), kst = ceil_div(K, kSuperK);
  GemmPlan plan = plan_gemm(rows, tiles, kst, groups, splits_override, epilogue);
  *partial_floats = plan.splits > 1 ? static_cast<long long>(plan.splits) * out_rows * N : 0;
  *counters = (groups + (epilogue == 2 ? 1 : 0)) * plan.n_blocks;
  return plan.splits;
}

// The parameters every dense launch shares (decode and mid-size kernels).
static GemmParams dense_params(const __nv_bfloat16* x, int ldx, const void* wq, const void* ws, const float* colscale,
                               const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, float* partial, int* counters,
                               int M, int N, int K) {
  GemmParams p{};
  p.x = x; p.wq = static_cast<const uint4*>(wq); p.ws = static_cast<const uint32_t*>(ws); p.colscale = colscale;
  p.bias = bias; p.y = y; p.partial = partial; p.counters = counters;
  p.x_row_div = 1; p.M = M; p.out_rows = M; p.N = N; p.K = K; p.ldx = ldx; p.ldy = ldy;
  p.tiles = ceil_div(N, kTileN); p.kst = ceil_div(K, kSuperK);
  return p;
}

// The parameters every grouped launch shares: the tables, the stacked experts' strides (bytes in, elements out).
static GemmParams grouped_params(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq,
                                 long long expert_wq_bytes, const void* ws, long long expert_ws_bytes,
                                 const float* colscale, int expert_colscale, __nv_bfloat16* y, int ldy, float* partial,
                                 int* counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                                 const int* num_groups, int out_rows, int N, int K) {
  GemmParams p = dense_params(x, ldx, wq, ws, colscale, nullptr, y, ldy, partial, counters, 0, N, K);
  p.group_offsets = group_offsets; p.group_expert = group_expert; p.row_ids = row_ids; p.num_groups = num_groups;
  p.x_row_div = x_row_div; p.expert_wq = expert_wq_bytes / 16; p.expert_ws = expert_ws_bytes / 4;
  p.expert_colscale = expert_colscale;
  p.out_rows = out_rows;
  return p;
}

static bool grouped_aligned(const __nv_bfloat16* x, int ldx, long long expert_wq_bytes, long long expert_ws_bytes) {
  return (reinterpret_cast<uintptr_t>(x) & 15) == 0 && ldx % 8 == 0 && expert_wq_bytes % 16 == 0 &&
         expert_ws_bytes % 4 == 0;
}

// Dense: y[M, N] = x[M, K] * W^T. M in 1..64.
int nvfp4_gemm(const __nv_bfloat16* x, int ldx, const void* wq, const void* ws, const float* colscale,
               const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, float* partial, long long partial_floats,
               int* counters, int num_counters, int M, int N, int K, int splits_override, cudaStream_t stream) {
  if (M < 1 || M > kMaxRowsPerGroup || N < 1 || K < 16 || K % 16 != 0) return kUnsupportedShape;
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || ldx % 8 != 0) return kBadAlignment;
  GemmParams p = dense_params(x, ldx, wq, ws, colscale, bias, y, ldy, partial, counters, M, N, K);
  const GemmPlan plan = plan_gemm(M, p.tiles, p.kst, 1, splits_override);
  apply_plan(p, plan);
  if (plan.splits > 1 && (partial_floats < static_cast<long long>(plan.splits) * M * N || num_counters < plan.n_blocks))
    return kWorkspaceTooSmall;
  return dispatch(p, plan, 1, stream);
}

// The fused MoE epilogues of the grouped GEMM (GemmParams: pair_tiles, act, combine_*). act >= 0: gated gate|up,
// y [out_rows, N / 2]; combine_out: down + combine into [combine_tokens, N] (y [out_rows, N] is its scratch).
struct MoeEpilogue {
  int act = -1;
  const float* combine_w = nullptr;
  const int* combine_order = nullptr;
  int combine_k = 0, combine_tokens = 0;
  __nv_bfloat16* combine_out = nullptr;
};

static int grouped(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                   const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                   __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                   int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                   const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                   int splits_override, const MoeEpilogue& epi, cudaStream_t stream) {
  if (max_rows_per_group < 1 || max_rows_per_group > kMaxRowsPerGroup || N < 1 || K % 16 != 0 || max_groups < 1)
    return kUnsupportedShape;
  if (!grouped_aligned(x, ldx, expert_wq_bytes, expert_ws_bytes)) return kBadAlignment;
  const bool paired = epi.act >= 0, combine = epi.combine_out != nullptr;
  // Gated: gate and up tiles pair up only when I fills whole tiles, and only the M <= 16 kernels have TW 2.
  if (paired && (N % (2 * kTileN) != 0 || max_rows_per_group > 16 || epi.act > 1)) return kUnsupportedShape;
  if (combine && (epi.combine_k < 1 || epi.combine_tokens * epi.combine_k != out_rows || max_rows_per_group > 16))
    return kUnsupportedShape;
  if (combine && (N % 8 != 0 || ldy % 8 != 0 || (reinterpret_cast<uintptr_t>(y) & 15) != 0 ||
                  (reinterpret_cast<uintptr_t>(epi.combine_out) & 15) != 0))
    return kBadAlignment;
  GemmParams p = grouped_params(x, ldx, x_row_div, wq, expert_wq_bytes, ws, expert_ws_bytes, colscale,
                                expert_colscale, y, ldy, partial, counters, group_offsets, group_expert, row_ids,
                                num_groups, out_rows, N, K);
  p.pair_tiles = paired ? p.tiles / 2 : 0;
  p.act = paired ? epi.act : 0;
  p.combine_out = epi.combine_out; p.combine_w = epi.combine_w; p.combine_order = epi.combine_order;
  p.combine_k = epi.combine_k; p.combine_tokens = epi.combine_tokens;
  const GemmPlan plan = plan_gemm(max_rows_per_group, p.tiles, p.kst, max_groups, splits_override,
                                  paired ? 1 : combine ? 2 : 0);
  apply_plan(p, plan);
  const int split_counters = plan.splits > 1 ? max_groups * plan.n_blocks : 0;
  p.combine_counters = counters + max_groups * plan.n_blocks;
  if (plan.splits > 1 && partial_floats < static_cast<long long>(plan.splits) * out_rows * N)
    return kWorkspaceTooSmall;
  if (num_counters < split_counters || (combine && num_counters < (max_groups + 1) * plan.n_blocks))
    return kWorkspaceTooSmall;
  return dispatch(p, plan, max_groups, stream);
}

// Grouped (MoE): for each group g < *num_groups (at most max_groups), rows row_ids[offsets[g]..offsets[g+1]) go
// through expert group_expert[g]. max_rows_per_group (<= 64) picks the tile; out_rows = rows of y.
int nvfp4_gemm_grouped(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                       const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                       __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                       int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                       const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                       int splits_override, cudaStream_t stream) {
  return grouped(x, ldx, x_row_div, wq, expert_wq_bytes, ws, expert_ws_bytes, colscale, expert_colscale, y, ldy,
                 partial, partial_floats, counters, num_counters, group_offsets, group_expert, row_ids, num_groups,
                 max_groups, max_rows_per_group, out_rows, N, K, splits_override, MoeEpilogue{}, stream);
}

// Gated gate|up (N = 2I, I % 16 == 0, <= 16 rows per group): y [out_rows, I] = act(x W_gate^T) * (x W_up^T), act
// 0 silu / 1 gelu tanh, one launch instead of the GEMM and gated_act_kernel.
int nvfp4_moe_gate_up_act(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                          const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                          __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                          int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                          const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                          int act, int splits_override, cudaStream_t stream) {
  MoeEpilogue epi;
  epi.act = act < 0 ? 2 : act;  // a negative kind is the caller's error, not "no activation"
  return grouped(x, ldx, x_row_div, wq, expert_wq_bytes, ws, expert_ws_bytes, colscale, expert_colscale, y, ldy,
                 partial, partial_floats, counters, num_counters, group_offsets, group_expert, row_ids, num_groups,
                 max_groups, max_rows_per_group, out_rows, N, K, splits_override, epi, stream);
}

// Down + combine (<= 16 rows per group): y [tokens * top_k, N] per slot (scratch), out [tokens, N] = the weighted
// sum of each token's slots in ascending expert order (order: moe_route_fused's table), one launch instead of two.
int nvfp4_moe_down_combine(const __nv_bfloat16* x, int ldx, const void* wq, long long expert_wq_bytes, const void* ws,
                           long long expert_ws_bytes, const float* colscale, int expert_colscale, __nv_bfloat16* y,
                           float* partial, long long partial_floats, int* counters, int num_counters,
                           const int* group_offsets, const int* group_expert, const int* row_ids,
                           const int* num_groups, int max_groups, int max_rows_per_group, int tokens, int top_k,
                           const float* weights, const int* order, __nv_bfloat16* out, int N, int K,
                           int splits_override, cudaStream_t stream) {
  if (out == nullptr || weights == nullptr || order == nullptr) return kUnsupportedShape;
  MoeEpilogue epi;
  epi.combine_w = weights; epi.combine_order = order; epi.combine_k = top_k; epi.combine_tokens = tokens;
  epi.combine_out = out;
  return grouped(x, ldx, 1, wq, expert_wq_bytes, ws, expert_ws_bytes, colscale, expert_colscale, y, N, partial,
                 partial_floats, counters, num_counters, group_offsets, group_expert, row_ids, num_groups, max_groups,
                 max_rows_per_group, tokens * top_k, N, K, splits_override, epi, stream);
}

template <typename OUT>
static int dequantize_layout(const void* wq, const void* ws, const float* row_mul, void* out, int n, int k,
                             cudaStream_t stream) {
  if (n <= 0 || k <= 0 || k % 16 != 0) return kUnsupportedShape;
  if ((reinterpret_cast<uintptr_t>(out) & 15) != 0 || (reinterpret_cast<uintptr_t>(wq) & 15) != 0 ||
      (reinterpret_cast<uintptr_t>(ws) & 3) != 0)
    return kBadAlignment;
  const int kst = ceil_div(k, kSuperK);
  const long long super_tiles = static_cast<long long>(ceil_div(n, kTileN)) * kst;
  // A few super-tiles per warp (the prefetch has something to overlap), at most ~16 resident blocks' worth per SM.
  const long long blocks = std::min<long long>((super_tiles + kGemmWarps - 1) / kGemmWarps, num_sms() * 16LL);
  nvfp4_dequantize_kernel<OUT><<<static_cast<unsigned>(blocks), kGemmThreads, 0, stream>>>(
      static_cast<const uint4*>(wq), static_cast<const uint32_t*>(ws), row_mul, static_cast<OUT*>(out), n, k, kst,
      super_tiles);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

// Dense e2m1 x block_scale [N, K] (bf16, row stride K) from a packed weight: wq/ws as layout.PackedNVFP4 holds them.
int nvfp4_dequantize(const void* wq, const void* ws, void* out, int n, int k, cudaStream_t stream) {
  return dequantize_layout<__nv_bfloat16>(wq, ws, nullptr, out, n, k, stream);
}

// E4M3 [N, K] = e4m3((e2m1 x block_scale) x row_mul[n]) from the same packed weight (the FP8 prefill operand).
int nvfp4_expand_e4m3(const void* wq, const void* ws, const float* row_mul, void* out, int n, int k,
                      cudaStream_t stream) {
  if (row_mul == nullptr) return kUnsupportedShape;
  return dequantize_layout<uint8_t>(wq, ws, row_mul, out, n, k, stream);
}

// ---- Mid-size M (nvfp4_gemm_mid_kernel). Rows per block: the fewest of 16, 32, 64 that hold M (dense) or the
// largest group. TW 2 (256 columns per block) when the grid fills every SM with it, else TW 1 and split-K up to the
// resident blocks: >= 4 super-tiles per split (the rings fill), and the fp32 partials (8 bytes per output per split,
// written and read once, mostly in L2) at most twice the weight bytes.
// Overrides for measurements (the prefill sweep's variants; 0: the plan's choice): rows per block (16, 32 or 64;
// a grouped launch never below its largest group) and column tiles per warp (1 or 2).
static int g_mid_rows = 0, g_mid_tw = 0;
void nvfp4_gemm_mid_set_override(int rows, int tw) {
  g_mid_rows = (rows == 16 || rows == 32 || rows == kMidMaxRows) ? rows : 0;
  g_mid_tw = (tw == 1 || tw == 2) ? tw : 0;
}
static int mid_rows(int rows, bool grouped) {
  const int fit = rows <= 16 ? 16 : rows <= 32 ? 32 : kMidMaxRows;
  if (g_mid_rows == 0) return fit;
  return grouped ? max(g_mid_rows, fit) : g_mid_rows;
}
static int mid_blocks_per_sm(int rows_per_block) { return rows_per_block <= 32 ? 2 : 1; }

static GemmPlan plan_mid(int rows_per_block, int row_blocks, int out_rows, int tiles, int kst, int splits_override) {
  GemmPlan plan{};
  plan.nt = rows_per_block / 8;
  plan.ks = 1;
  const int slots = mid_blocks_per_sm(rows_per_block) * num_sms();
  plan.variant = g_mid_tw != 0 ? g_mid_tw : ceil_div(tiles, kGemmWarps * 2) * row_blocks >= slots ? 2 : 1;  // TW
  plan.n_blocks = ceil_div(tiles, kGemmWarps * plan.variant);
  int splits = splits_override;
  if (splits <= 0) {
    const int blocks = plan.n_blocks * row_blocks;
    splits = blocks >= slots ? 1 : slots / blocks;
    splits = min(splits, max(1, kst / 4));
    const double weight_bytes = 16.0 * tiles * kst * 128 * 0.5625;
    while (splits > 1 && splits * 8.0 * out_rows * tiles * 16 > 2 * weight_bytes) --splits;
  }
  splits = splits < 1 ? 1 : splits > kst ? kst : splits;
  plan.st_per_split = ceil_div(kst, splits);
  plan.splits = ceil_div(kst, plan.st_per_split);
  return plan;
}

template <int ROWS, int TW>
static int launch_mid(const GemmParams& p, int row_blocks, cudaStream_t stream) {
  constexpr int kBytes = mid_smem_bytes(ROWS);
  // Two blocks per SM below 64 rows; at 32 rows x TW 2 that register budget holds a ring of 2 (3 spilled).
  auto kernel = nvfp4_gemm_mid_kernel<ROWS, TW, ROWS == 32 && TW == 2 ? 2 : kMidRing, ROWS <= 32 ? 2 : 1>;
  // 64 rows: 48 KB of dynamic shared memory plus the static tables pass the 48 KB default: opt in (per device).
  static bool opted_in[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return kCudaError;
  if (!opted_in[dev]) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) != cudaSuccess)
      return kCudaError;
    opted_in[dev] = true;
  }
  dim3 grid(row_blocks, p.n_blocks, p.splits);
  kernel<<<grid, kGemmThreads, kBytes, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? kOk : kCudaError;
}

template <int ROWS>
static int launch_mid_rows(const GemmParams& p, int tw, int row_blocks, cudaStream_t stream) {
  return tw == 2 ? launch_mid<ROWS, 2>(p, row_blocks, stream) : launch_mid<ROWS, 1>(p, row_blocks, stream);
}

static int run_mid(GemmParams& p, int rows_per_block, int row_blocks, long long partial_floats, int num_counters,
                   int splits_override, cudaStream_t stream) {
  const GemmPlan plan = plan_mid(rows_per_block, row_blocks, p.out_rows, p.tiles, p.kst, splits_override);
  apply_plan(p, plan);
  if (plan.splits > 1 && (partial_floats < static_cast<long long>(plan.splits) * p.out_rows * p.N ||
                          num_counters < row_blocks * plan.n_blocks))
    return kWorkspaceTooSmall;
  switch (rows_per_block) {
    case 16: return launch_mid_rows<16>(p, plan.variant, row_blocks, stream);
    case 32: return launch_mid_rows<32>(p, plan.variant, row_blocks, stream);
    default: return launch_mid_rows<kMidMaxRows>(p, plan.variant, row_blocks, stream);
  }
}

// Workspace of a mid-size launch. Dense: groups = 0, rows = M = out_rows; grouped: groups = max groups, rows = the
// largest group's rows (<= 64).
int nvfp4_gemm_mid_workspace(int rows, int out_rows, int N, int K, int groups, int splits_override,
                             long long* partial_floats, int* counters) {
  const int tiles = ceil_div(N, kTileN), kst = ceil_div(K, kSuperK), per_block = mid_rows(rows, groups > 0);
  const int row_blocks = groups > 0 ? groups : ceil_div(rows, per_block);
  const GemmPlan plan = plan_mid(per_block, row_blocks, out_rows, tiles, kst, splits_override);
  *partial_floats = plan.splits > 1 ? static_cast<long long>(plan.splits) * out_rows * N : 0;
  *counters = plan.splits > 1 ? row_blocks * plan.n_blocks : 0;  // run_mid touches counters only when split
  return plan.splits;
}

// Dense, any M >= 1 (16, 32 or 64 rows per block): y[M, N] = x[M, K] * W^T (+ bias), the weights read once per
// row block.
int nvfp4_gemm_mid(const __nv_bfloat16* x, int ldx, const void* wq, const void* ws, const float* colscale,
                   const __nv_bfloat16* bias, __nv_bfloat16* y, int ldy, float* partial, long long partial_floats,
                   int* counters, int num_counters, int M, int N, int K, int splits_override, cudaStream_t stream) {
  if (M < 1 || N < 1 || K < 16 || K % 16 != 0) return kUnsupportedShape;
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || ldx % 8 != 0) return kBadAlignment;
  GemmParams p = dense_params(x, ldx, wq, ws, colscale, bias, y, ldy, partial, counters, M, N, K);
  const int per_block = mid_rows(M, false);
  return run_mid(p, per_block, ceil_div(M, per_block), partial_floats, num_counters, splits_override, stream);
}

// Grouped (MoE prefill): group g < *num_groups (at most max_groups, each <= max_rows_per_group <= 64 rows)
// multiplies rows row_ids[offsets[g] .. offsets[g+1]) (x row r / x_row_div) by expert group_expert[g] into y row r.
int nvfp4_gemm_mid_grouped(const __nv_bfloat16* x, int ldx, int x_row_div, const void* wq, long long expert_wq_bytes,
                           const void* ws, long long expert_ws_bytes, const float* colscale, int expert_colscale,
                           __nv_bfloat16* y, int ldy, float* partial, long long partial_floats, int* counters,
                           int num_counters, const int* group_offsets, const int* group_expert, const int* row_ids,
                           const int* num_groups, int max_groups, int max_rows_per_group, int out_rows, int N, int K,
                           int splits_override, cudaStream_t stream) {
  if (max_groups < 1 || max_rows_per_group < 1 || max_rows_per_group > kMidMaxRows || N < 1 || K < 16 || K % 16 != 0)
    return kUnsupportedShape;
  if (!grouped_aligned(x, ldx, expert_wq_bytes, expert_ws_bytes)) return kBadAlignment;
  GemmParams p = grouped_params(x, ldx, x_row_div, wq, expert_wq_bytes, ws, expert_ws_bytes, colscale,
                                expert_colscale, y, ldy, partial, counters, group_offsets, group_expert, row_ids,
                                num_groups, out_rows, N, K);
  return run_mid(p, mid_rows(max_rows_per_group, true), max_groups, partial_floats, num_counters, splits_override,
                 stream);
}

}  // namespace adaq
