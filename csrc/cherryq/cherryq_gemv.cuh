// CherryQ dequant-GEMV for small batches (M <= 8 rows of x per block): torch-free device code.
//
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n],   float32 accumulation
//   W[n, k] = zeros[n, g] + code[n, k] * scales[n, g]  (g = k / group_size), except at the C
//             cherries of row n, where W = cherry_val and the packed code is 0.
//
// Bit layout (authoritative: pyfast/cherryq/format.py): K is cut into packs of 32 columns; pack p
// of row n is the `bits` int32 words qweight[n, p*bits : (p+1)*bits]:
//   4 bits   word j holds c(8j) .. c(8j+7), code c(i) at bits [4*(i%8), 4*(i%8)+4)
//   2 bits   word j holds c(16j) .. c(16j+15), code c(i) at bits [2*(i%16), 2*(i%16)+2)
//   3 bits   words 0, 1 = the low 2 bits of every code, laid out as for 2 bits;
//            word 2 = bit 2 of code c(i) at bit i
//
// Work decomposition
//   * A "tile" is the smallest run of packs whose words are a multiple of 16 bytes:
//       4 bits: 1 pack  (32 columns,  4 words = one 16-byte load)
//       2 bits: 2 packs (64 columns,  4 words = one 16-byte load)
//       3 bits: 4 packs (128 columns, 12 words = three 16-byte loads)
//     Tile t of a row starts at word t*words, so when the row stride (K/32*bits words) is a
//     multiple of 4 words and qweight is 16-byte aligned, every tile is one aligned run of
//     uint4 loads. That holds exactly when K % tile_cols == 0 (4 bits: always), i.e. when
//     no row ends in a partial tile. Otherwise (VEC = false) tiles are read word by word
//     and the last tile of a row may hold fewer packs.
//   * A thread group of tpr = 1..32 lanes (a power of two, inside one warp) owns R output
//     rows; lane l of the group takes tiles l, l+tpr, ... of those R rows, so each x value
//     read from shared memory serves R rows. The group's partial sums are combined with
//     xor-shuffles, so every lane ends with the row totals and the lanes share the stores.
//   * x[MB, K] is staged in shared memory as float32, one K-chunk at a time (chunk size set
//     by a 48 KiB budget), along with the sum of x over each pack (for the zero points).
//     Each tile's run of x in shared memory is followed by 4 floats of padding, so the
//     16-byte reads of 8 lanes on 8 consecutive tiles hit distinct banks.
//
// Arithmetic per pack of a row (group g, scale s, zero z):
//   sum_i x_i * (z + c_i * s) = z * sum_i x_i + sum_i x_i * (c_i * s)
// The first term uses the staged pack sum of x. For the second, codes are moved into the low
// byte of the float 2^23 (bit pattern 0x4B0000cc = 2^23 + c, one PRMT per code) and
//   c * s = fma(2^23 + c, s, -2^23 * s)
// which is exact before its single rounding (2^23 * s is exact), so it equals the float32
// product c * s while costing one FMA instead of an int->float conversion plus a multiply.
// Cherries add x[m, idx] * (cherry_val - z) in the same kernel (x read from global memory,
// while the first tile's loads are in flight); indices outside [0, K) are skipped. Rows past N
// (last block) compute on row N-1 and store nothing. NaN or Inf in x reaches every product of
// that row of x and nothing else.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cherryq/cherryq_cuda.h"
#include "common/cuda_dtype.cuh"

namespace pyfast {
namespace cherryq {
namespace gemv {

constexpr int kThreads = 256;          // threads per block (8 warps)
constexpr int kMaxBatch = 8;           // rows of x per block (the MB template argument is 1..8)
constexpr int kPackCols = 32;          // columns per pack
constexpr int kTilePad = 4;            // floats of padding after each tile of staged x
constexpr int kMinBlocks = 2;          // __launch_bounds__ minimum blocks per SM: at most 128 registers
constexpr int kStage = 4;              // x elements each thread has in flight while staging
constexpr int kSmemFloats = 48 * 256;  // 48 KiB of dynamic shared memory at most (no opt-in needed)

__host__ __device__ constexpr int tile_packs(int bits) { return bits == 4 ? 1 : bits == 2 ? 2 : 4; }
__host__ __device__ constexpr int tile_cols(int bits) { return tile_packs(bits) * kPackCols; }

// Output rows per thread group: each x value read from shared memory serves R rows (shared
// memory bandwidth, not DRAM, bounds the kernel once MB > 1), but every row costs registers
// (its tile, accumulators); these are the largest R that compile without spills at <= 128
// registers on sm_80 and sm_90a.
__host__ __device__ constexpr int rows_per_group(int bits, int mb) {
  return bits == 4   ? (mb <= 4 ? 4 : mb <= 6 ? 3 : 2)
         : bits == 2 ? (mb <= 3 ? 4 : mb <= 5 ? 3 : 2)
                     : (mb <= 5 ? 2 : 1);
}

template <int BITS>
struct TileShape {
  static_assert(BITS == 2 || BITS == 3 || BITS == 4, "CherryQ packs 2, 3 or 4 bits");
  static constexpr int packs = tile_packs(BITS);
  static constexpr int cols = tile_cols(BITS);
  static constexpr int words = packs * BITS;  // int32 words per tile and row
  static constexpr int vecs = words / 4;      // 16-byte loads per tile and row
  static constexpr int smem_cols = cols + kTilePad;
  static_assert(words % 4 == 0, "a tile must be a whole number of 16-byte vectors");
};

// Launch geometry, computed on the host by make_plan and passed to the kernel.
struct GemvPlan {
  int tpr_shift;        // lanes per row group = 1 << tpr_shift (1..32)
  int tiles_per_chunk;  // tiles of x staged in shared memory at once (<= chunk_tiles)
  int gs_shift;         // log2(group_size)
  int rows_per_block;   // output rows per block
  unsigned grid_x;      // blocks along N
  unsigned smem_bytes;  // dynamic shared memory per block
  bool vec;             // every tile full and 16-byte aligned -> uint4 loads
};

inline int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// Tiles of x staged per chunk (the capacity of the shared-memory buffer): as many as fit in
// kSmemFloats, a multiple of 32 when that many fit (all lanes busy in every chunk), else of 4.
// A compile-time constant, so shared-memory row strides are immediates in the kernel.
__host__ __device__ constexpr int chunk_tiles(int bits, int mb) {
  return kSmemFloats / (mb * (tile_cols(bits) + kTilePad + tile_packs(bits))) >= 32
             ? kSmemFloats / (mb * (tile_cols(bits) + kTilePad + tile_packs(bits))) / 32 * 32
             : kSmemFloats / (mb * (tile_cols(bits) + kTilePad + tile_packs(bits))) / 4 * 4;
}

// Shared memory: pack sums sxs[MB][chunk * packs], then x sx[MB][chunk * (cols + pad)], the
// last row of x only as long as the chunk actually staged.
inline size_t smem_floats(int bits, int mb, int tiles) {
  const int cap = chunk_tiles(bits, mb);
  return static_cast<size_t>(mb) * cap * tile_packs(bits) +
         (static_cast<size_t>(mb - 1) * cap + tiles) * (tile_cols(bits) + kTilePad);
}

// `qweight_aligned`: the qweight pointer is 16-byte aligned.
inline GemvPlan make_plan(int bits, int mb, int64_t N, int64_t K, int group_size, bool qweight_aligned) {
  const int tc = tile_cols(bits);
  const int64_t total_tiles = (K + tc - 1) / tc;
  const int cap = chunk_tiles(bits, mb);
  GemvPlan plan{};
  plan.tiles_per_chunk = static_cast<int>(total_tiles < cap ? total_tiles : cap);
  int tpr_shift = 0;
  while (tpr_shift < 5 && (1 << tpr_shift) < plan.tiles_per_chunk) ++tpr_shift;
  plan.tpr_shift = tpr_shift;
  plan.gs_shift = log2_exact(group_size);
  plan.rows_per_block = (kThreads >> tpr_shift) * rows_per_group(bits, mb);
  plan.grid_x = static_cast<unsigned>((N + plan.rows_per_block - 1) / plan.rows_per_block);
  plan.smem_bytes = static_cast<unsigned>(smem_floats(bits, mb, plan.tiles_per_chunk) * sizeof(float));
  plan.vec = qweight_aligned && K % tc == 0;
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Small helpers (host-callable where cheap, so the bit tricks can be unit-tested on a CPU).

__host__ __device__ __forceinline__ uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = (uint64_t{b} << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

__host__ __device__ __forceinline__ float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

__host__ __device__ __forceinline__ float f16_bits_to_float(uint16_t b) {
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}

__host__ __device__ __forceinline__ float bf16_bits_to_float(uint16_t b) { return bits_to_float(uint32_t{b} << 16); }

// 2^23 + code for the code in byte `b` (0..3) of `u`: PRMT puts that byte under the exponent
// byte 0x4B of 0x4B000000 and zeros in between.
constexpr uint32_t kMagic = 0x4B000000u;  // 2^23 as float32
constexpr float kTwo23 = 8388608.0f;

// `b` must fold to a constant (it does in the fully unrolled loops) so PRMT takes an immediate.
__host__ __device__ __forceinline__ float magic_code(uint32_t u, int b) {
  return bits_to_float(byte_perm(u, kMagic, 0x7440u | static_cast<uint32_t>(b)));
}

// Decoding works on one "code word" of a pack at a time: the 4 words of a 4-bit pack (8 columns
// each) or the 2 low-plane words of a 2/3-bit pack (16 columns each). A code word becomes
// `parts` byte-code words u[], each holding 4 codes, one per byte:
//   4 bits:   column c = 2b + e of the word  -> u[e] byte b   (e = 0: low nibbles, 1: high)
//   2/3 bits: column c = 4b + j of the word  -> u[j] byte b   (j = 2-bit field inside the byte)
template <int BITS>
struct WordLayout {
  static constexpr int words = BITS == 4 ? 4 : 2;  // code words per pack
  static constexpr int cols = kPackCols / words;   // columns per code word: 8 or 16
  static constexpr int parts = BITS == 4 ? 2 : 4;  // byte-code words per code word
  __host__ __device__ static constexpr int part(int c) { return c % parts; }
  __host__ __device__ static constexpr int byte(int c) { return c / parts; }
};

// Byte-code words of code word q (0 .. words-1) of the pack whose `bits` words start at w.
template <int BITS>
__host__ __device__ __forceinline__ void unpack_word(const uint32_t* w, int q,
                                                     uint32_t (&u)[WordLayout<BITS>::parts]) {
  if constexpr (BITS == 4) {
    u[0] = w[q] & 0x0F0F0F0Fu;
    u[1] = (w[q] >> 4) & 0x0F0F0F0Fu;
  } else if constexpr (BITS == 2) {
    u[0] = w[q] & 0x03030303u;
    u[1] = (w[q] >> 2) & 0x03030303u;
    u[2] = (w[q] >> 4) & 0x03030303u;
    u[3] = (w[q] >> 6) & 0x03030303u;
  } else {
    // Low 2 bits as for 2 bits. Bit 2 of column 4b + j of word q is bit 16q + 4b + j of w[2],
    // i.e. bit j of nibble b of half q: spread the nibbles to bytes, move bit j to bit 2.
    const uint32_t h = byte_perm(w[2], 0u, q == 0 ? 0x4140u : 0x4342u);  // w2.b[2q], 0, w2.b[2q+1], 0
    const uint32_t hs = (h | (h << 4)) & 0x0F0F0F0Fu;                      // byte b = nibble b of half q
    u[0] = (w[q] & 0x03030303u) | ((hs << 2) & 0x04040404u);
    u[1] = ((w[q] >> 2) & 0x03030303u) | ((hs << 1) & 0x04040404u);
    u[2] = ((w[q] >> 4) & 0x03030303u) | (hs & 0x04040404u);
    u[3] = ((w[q] >> 6) & 0x03030303u) | ((hs >> 1) & 0x04040404u);
  }
}

// Move code word 1 of the pack at w into word 0 (for 3 bits, also the high-plane half), so a
// rolled loop over the code words always decodes word 0.
template <int BITS>
__host__ __device__ __forceinline__ void next_word(uint32_t* w) {
  if constexpr (BITS == 4) {
    w[0] = w[1], w[1] = w[2], w[2] = w[3];
  } else {
    w[0] = w[1];
    if constexpr (BITS == 3) w[2] >>= 16;
  }
}

// Code of column c (0..31) of the pack at w, through the same path as the kernel (tests).
template <int BITS>
__host__ __device__ inline float pack_code(const uint32_t* w, int c) {
  using L = WordLayout<BITS>;
  uint32_t u[L::parts];
  unpack_word<BITS>(w, c / L::cols, u);
  return magic_code(u[L::part(c % L::cols)], L::byte(c % L::cols)) - kTwo23;
}

__device__ __forceinline__ float load_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return f16_bits_to_float(ld_ro(static_cast<const uint16_t*>(p) + i));
    case DType::kBFloat16:
      return bf16_bits_to_float(ld_ro(static_cast<const uint16_t*>(p) + i));
    default:
      return ld_ro(static_cast<const float*>(p) + i);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Packed words plus the per-pack scale and zero (raw float16) of one tile of R rows.
template <int R, int BITS>
struct TileFrag {
  uint32_t w[R][TileShape<BITS>::words];
  uint16_t s[R][TileShape<BITS>::packs];
  uint16_t z[R][TileShape<BITS>::packs];
};

// ---------------------------------------------------------------------------------------------
// One block: rows m0 .. m0+MB-1 of x against plan.rows_per_block rows of W.

template <typename T, int BITS, int MB, bool VEC>
__device__ __forceinline__ void gemv_block(const GemvParams& p, const GemvPlan& plan, int64_t m_begin, float* smem) {
  using TS = TileShape<BITS>;
  using WL = WordLayout<BITS>;
  constexpr int TP = TS::packs, TC = TS::cols, TW = TS::words, XS = TS::smem_cols;
  constexpr int R = rows_per_group(BITS, MB);
  static_assert(MB >= 1 && MB <= kMaxBatch, "1 <= MB <= 8");

  const int tid = static_cast<int>(threadIdx.x);
  const int tpr = 1 << plan.tpr_shift;
  const int lane_g = tid & (tpr - 1);
  const int N = static_cast<int>(p.N), K = static_cast<int>(p.K), C = static_cast<int>(p.C);
  const int G = K >> plan.gs_shift;
  const int row_words = K / kPackCols * BITS;
  const int64_t n_first =
      (static_cast<int64_t>(blockIdx.x) * (kThreads >> plan.tpr_shift) + (tid >> plan.tpr_shift)) * R;
  const bool active = n_first < N;  // uniform over the group
  const int64_t m0 = m_begin + static_cast<int64_t>(blockIdx.y) * MB;
  const int64_t ldx = p.x_row_stride;
  const T* __restrict__ x = static_cast<const T*>(p.x) + m0 * ldx;

  // Rows past N compute on row N-1 (no divergence, no out-of-bounds read) and store nothing.
  // Row offsets stay 32-bit here; pointers are formed at each use to keep registers free.
  int nrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) nrow[r] = static_cast<int>(n_first + r < N ? n_first + r : N - 1);
  const auto* scales = static_cast<const uint16_t*>(p.scales);
  const auto* zeros = static_cast<const uint16_t*>(p.zeros);
  const auto* cherry_val = static_cast<const uint16_t*>(p.cherry_val);
  auto row_of = [](const auto* base, int n, int len) { return base + static_cast<int64_t>(n) * len; };

  float acc[R][MB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[r][m] = 0.0f;

  // Cherries: the packed code under a cherry is 0, so the dense product holds zeros[g] there;
  // add x * (cherry_val - zeros[g]), reading x from global memory. Indices outside [0, K) are
  // skipped. Run while the first tile's loads are in flight.
  auto add_cherries = [&]() {
    for (int c = lane_g; c < C; c += tpr) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int idx = ld_ro(row_of(p.cherry_idx, nrow[r], C) + c);
        const uint16_t val = ld_ro(row_of(cherry_val, nrow[r], C) + c);
        if (static_cast<unsigned>(idx) < static_cast<unsigned>(K)) {
          const uint16_t z = ld_ro(row_of(zeros, nrow[r], G) + (idx >> plan.gs_shift));
          const float d = f16_bits_to_float(val) - f16_bits_to_float(z);
#pragma unroll
          for (int m = 0; m < MB; ++m) acc[r][m] = fmaf(to_float(ld_ro(x + m * ldx + idx)), d, acc[r][m]);
        }
      }
    }
  };

  // Shared memory (see smem_floats): sxs[MB][CAP * TP] pack sums of x, then sx[MB][CAP * XS] x
  // with kTilePad floats after each tile. Row strides are compile-time, so they fold into
  // the load offsets.
  constexpr int CAP = chunk_tiles(BITS, MB);
  constexpr int x_stride = CAP * XS;
  constexpr int xs_stride = CAP * TP;
  static_assert((MB * xs_stride) % 4 == 0, "sx must stay 16-byte aligned");
  float* sxs = smem;
  float* sx = smem + MB * xs_stride;
  constexpr int chunk_cols = CAP * TC;  // a chunk holds at most CAP tiles (plan.tiles_per_chunk <= CAP)

  for (int k0 = 0; k0 < K; k0 += chunk_cols) {
    const int kc = K - k0 < chunk_cols ? K - k0 : chunk_cols;  // a multiple of 32
    const int nt = (kc + TC - 1) / TC;                          // tiles in this chunk
    const int tile0 = k0 / TC;

    TileFrag<R, BITS> frag;
    // Packs of tile t (of this chunk) that lie inside the row: TP unless the row ends in a
    // partial tile (never when VEC, never for 4 bits, whose tile is a single pack).
    auto packs_in = [&](int t) {
      if constexpr (VEC || TP == 1) return TP;
      else return kc - t * TC >= TC ? TP : (kc - t * TC) / kPackCols;
    };
    auto load_tile = [&](int t) {
      const int npk = packs_in(t);
      const int word0 = (tile0 + t) * TW;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int32_t* q = row_of(p.qweight, nrow[r], row_words) + word0;
        if constexpr (VEC) {
#pragma unroll
          for (int v = 0; v < TS::vecs; ++v) {
            const uint4 q4 = ld_ro(reinterpret_cast<const uint4*>(q) + v);
            frag.w[r][4 * v + 0] = q4.x;
            frag.w[r][4 * v + 1] = q4.y;
            frag.w[r][4 * v + 2] = q4.z;
            frag.w[r][4 * v + 3] = q4.w;
          }
        } else {
          // Word by word; packs past the row's end (never computed) re-read its last pack.
#pragma unroll
          for (int i = 0; i < TW; ++i) {
            const int word = i / BITS < npk ? i : i % BITS + (npk - 1) * BITS;
            frag.w[r][i] = static_cast<uint32_t>(ld_ro(q + word));
          }
        }
#pragma unroll
        for (int pk = 0; pk < TP; ++pk) {
          const int g = (k0 + t * TC + (VEC || pk < npk ? pk : npk - 1) * kPackCols) >> plan.gs_shift;
          frag.s[r][pk] = ld_ro(row_of(scales, nrow[r], G) + g);
          frag.z[r][pk] = ld_ro(row_of(zeros, nrow[r], G) + g);
        }
      }
    };

    // Issue the first tile's loads before waiting on the x staging.
    int t = lane_g;
    bool have = active && t < nt;
    if (have) load_tile(t);

    if (k0 == 0 && active) add_cherries();
    if (k0 > 0) __syncthreads();  // every lane is done reading the previous chunk
    // Stage x[:, k0 : k0+kc] as float32, element e = m * kc + c, kStage loads in flight per
    // thread. kc % 32 == 0: each warp's 32 consecutive elements are one pack of one row of x,
    // so the warp sums that pack with shuffles (all lanes take the same branches).
    auto split = [&](int e, int& m, int& c) {  // e = m * kc + c, 0 <= c < kc (for e < MB * kc)
      m = 0, c = e;
#pragma unroll
      for (int j = 1; j < MB; ++j) {
        if (c >= kc) c -= kc, ++m;
      }
    };
    for (int base = 0; base < MB * kc; base += kThreads * kStage) {
      float v[kStage];
#pragma unroll
      for (int i = 0; i < kStage; ++i) {
        const int e = base + i * kThreads + tid;
        int m, c;
        split(e, m, c);
        v[i] = e < MB * kc ? to_float(ld_ro(x + m * ldx + k0 + c)) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kStage; ++i) {
        const int e = base + i * kThreads + tid;
        if (e < MB * kc) {
          int m, c;
          split(e, m, c);
          sx[m * x_stride + (c / TC) * XS + c % TC] = v[i];
          const float sum = warp_sum(v[i]);
          if ((tid & 31) == 0) sxs[m * xs_stride + c / kPackCols] = sum;
        }
      }
    }
    __syncthreads();

    while (have) {
      // One pack per step. The pack loop stays rolled (bounded live ranges, no spills at large
      // MB); the tile's words are shifted down after each pack so register indices stay static.
      const int npk = packs_in(t);
      const float* xt = sx + t * XS;
      const float* xst = sxs + t * TP;
#pragma unroll 1
      for (int pk = 0; pk < npk; ++pk) {
        float sc[R], nb[R], zf[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sc[r] = f16_bits_to_float(frag.s[r][0]);
          nb[r] = -kTwo23 * sc[r];  // exact
          zf[r] = f16_bits_to_float(frag.z[r][0]);
        }
        // Zero point: acc += z * (sum of x over the pack).
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          const float ps = xst[m * xs_stride + pk];
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r][m] = fmaf(zf[r], ps, acc[r][m]);
        }
        // Codes: acc += x * (c * s), one code word of the R rows per step (rolled; the next code
        // word is shifted into word 0), 4 columns at a time.
        const float* xp = xt + pk * kPackCols;
#pragma unroll 1
        for (int q = 0; q < WL::words; ++q, xp += WL::cols) {
          uint32_t u[R][WL::parts];
#pragma unroll
          for (int r = 0; r < R; ++r) unpack_word<BITS>(frag.w[r], 0, u[r]);
#pragma unroll
          for (int c4 = 0; c4 < WL::cols; c4 += 4) {
            float cs[R][4];  // c * s of columns c4 .. c4+3 of the word
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int i = 0; i < 4; ++i)
                cs[r][i] = fmaf(magic_code(u[r][WL::part(c4 + i)], WL::byte(c4 + i)), sc[r], nb[r]);
#pragma unroll
            for (int m = 0; m < MB; ++m) {
              const float4 xv = *reinterpret_cast<const float4*>(xp + m * x_stride + c4);
#pragma unroll
              for (int r = 0; r < R; ++r) {
                float a = acc[r][m];
                a = fmaf(cs[r][0], xv.x, a);
                a = fmaf(cs[r][1], xv.y, a);
                a = fmaf(cs[r][2], xv.z, a);
                a = fmaf(cs[r][3], xv.w, a);
                acc[r][m] = a;
              }
            }
          }
#pragma unroll
          for (int r = 0; r < R; ++r) next_word<BITS>(frag.w[r]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int i = 0; i + BITS < TW; ++i) frag.w[r][i] = frag.w[r][i + BITS];
#pragma unroll
          for (int i = 0; i + 1 < TP; ++i) frag.s[r][i] = frag.s[r][i + 1], frag.z[r][i] = frag.z[r][i + 1];
        }
      }

      t += tpr;
      have = t < nt;
      if (have) load_tile(t);
    }
  }

  // Sum over the group's lanes; after the xor butterfly every lane holds the totals.
  for (int o = tpr >> 1; o > 0; o >>= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
  }

  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n_first + r;
    if (n >= N) continue;
    const float b = p.bias != nullptr ? load_float(p.bias, p.bias_dtype, n) : 0.0f;
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (((r * MB + m) & (tpr - 1)) == lane_g) y[(m0 + m) * p.N + n] = from_float<T>(acc[r][m] + b);
    }
  }
}

template <typename T, int BITS, int MB, bool VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gemv_kernel(const GemvParams p, const GemvPlan plan, int64_t m_begin) {
  extern __shared__ float4 gemv_smem[];  // float4: 16-byte aligned
  gemv_block<T, BITS, MB, VEC>(p, plan, m_begin, reinterpret_cast<float*>(gemv_smem));
}

}  // namespace gemv
}  // namespace cherryq
}  // namespace pyfast
