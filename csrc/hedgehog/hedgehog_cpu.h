// Torch-free interface between the Hedgehog forward CPU host code (hedgehog_cpu.cpp) and its
// per-ISA kernels (hedgehog_cpu_{avx512,scalar}.cpp, both built from hedgehog_cpu_kernel.h).
// Layouts (docs/design.md § Layouts): attention tensors [B, H, T, *] with unit stride in the last
// dim, the other strides in elements; states [N, Hkv, FF, Dv] / [N, Hkv, FF] float32 contiguous.
#pragma once
#include <cstdint>

#include "common/cpu_elem.h"  // Elem: the q/k/v element type

namespace pyfast::hedgehog {

constexpr int kLanes = 16;  // fp32 lanes per vector; Dv is padded to Dvp = a multiple of 16
constexpr int kChunk = 64;  // tokens per chunk: intra-chunk products are [64 x FF] x [FF x 64]

struct Strided {  // one [B, H, T, *] tensor (or [B, H, *] for decode: st unused)
  const void* p;
  int64_t sb, sh, st;
};

struct FwdArgs {
  Strided q, k, v;  // q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]
  void* out;        // [B, Hq, T, Dv] contiguous, element type `elem`
  Elem elem;
  int64_t Hq, Hkv, G, T, D, Dv, Dvp;
  // Feature map: F > 0: q/k are raw inputs, phi(x) = cat(softmax(x W + b), softmax(-(x W + b)))
  // with W [H, D, F], b [H, F] fp32 contiguous (b zeros when absent); FF = 2F. F == 0: q/k are
  // already features (linear_attention), FF = D.
  int64_t F, FF;
  const float* wq;
  const float* wk;
  const float* bq;
  const float* bk;
  bool causal;
  float eps;
  int64_t window;       // > 0: the sliding-window hybrid (causal only, no states)
  float scale;          // softmax scale of the window part
  const float* alpha;   // [Hq], nullptr = ones (window part only)
  const float* beta;
  const float* S0;      // [N, Hkv, FF, Dv] or nullptr (zeros)
  const float* z0;      // [N, Hkv, FF]
  float* ST;            // [N, Hkv, FF, Dv] or nullptr (not returned)
  float* zT;
};

// One unit of work: KV head j of sequence n (batch row b, tokens [t0, t0 + len)), query heads
// j * G + [g0, g1). Only the unit with g0 == 0 writes the final state.
struct FwdWork {
  int64_t n, b, t0, len, j, g0, g1;
  float* scratch;  // FwdScratch(a).total floats, 64-byte aligned
};

inline int64_t round16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Per-thread fp32 scratch of one FwdWork, offsets in floats (each a multiple of 16 = 64 bytes).
// Token-indexed buffers are transposed, [rows x kChunk], so that vectors run along the tokens:
// the feature map's softmax over F is then a vertical (lane-wise) reduction, and the key features
// are the [FF x 64] right-hand side of the score product.
struct FwdScratch {
  int64_t xt, ut, kt, qt, vb, am, s, z, den, bkt, bvb, ns, ds, bm, total;
  static constexpr int kRowBlock = 8;  // at least the largest row block of the kernels
  explicit FwdScratch(const FwdArgs& a) {
    const int64_t ffp = round16(a.FF), hybrid = a.window > 0;
    int64_t o = 0;
    auto take = [&o](int64_t n) { const int64_t at = o; o += round16(n); return at; };
    xt = take(round16(a.D) * kChunk);  // q or k chunk transposed, [Dp x 64]
    ut = take(a.F * kChunk);           // x W + b, [F x 64]
    kt = take(ffp * kChunk);           // key features, [FF x 64]
    qt = take(ffp * kChunk);           // query features, [FF x 64]
    vb = take(kChunk * a.Dvp);         // values in fp32, [64 x Dvp]
    am = take(kRowBlock * kChunk);     // masked scores (or window probabilities) of one row block
    s = take(a.FF * a.Dvp);            // running state S, [FF x Dvp]
    z = take(ffp);                     // running z, [FF]
    den = take(kChunk);                // q_t . z per chunk row
    // Window part only: raw band keys transposed [Dp x 64] and values [64 x Dvp]; per chunk row
    // sum e_s v_s [64 x Dvp], sum e_s and the running max.
    bkt = take(hybrid * round16(a.D) * kChunk);
    bvb = take(hybrid * kChunk * a.Dvp);
    ns = take(hybrid * kChunk * a.Dvp);
    ds = take(hybrid * kChunk);
    bm = take(hybrid * kChunk);
    total = o;
  }
};

void fwd_work_avx512(const FwdArgs& a, const FwdWork& w);
void fwd_work_scalar(const FwdArgs& a, const FwdWork& w);

// hedgehog_feature_map: x [B, H, T, D] -> out [B, H, T, 2F] (contiguous, x's element type).
struct FmapArgs {
  Strided x;
  void* out;
  Elem elem;
  int64_t H, T, D, F;
  const float* w;  // [H, D, F] fp32
  const float* b;  // [H, F] fp32
};
// Scratch: [Dp x 64] transposed input, [F x 64] projections, [2F x 64] features.
inline int64_t fmap_scratch_floats(const FmapArgs& a) { return (round16(a.D) + a.F + round16(2 * a.F)) * kChunk; }
// Tokens [t0, t0 + len) (len <= kChunk) of (batch b, head h).
void fmap_chunk_avx512(const FmapArgs& a, int64_t b, int64_t h, int64_t t0, int64_t len, float* scratch);
void fmap_chunk_scalar(const FmapArgs& a, int64_t b, int64_t h, int64_t t0, int64_t len, float* scratch);

// hedgehog_decode: q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv], S [B, Hkv, 2F, Dv], z [B, Hkv, 2F]
// (float32 contiguous, updated in place), out [B, Hq, Dv] contiguous.
struct DecodeArgs {
  Strided q, k, v;  // st unused
  void* out;
  Elem elem;
  int64_t Hkv, G, D, F, Dv;
  const float* wq;
  const float* wk;
  const float* bq;
  const float* bk;
  float* S;
  float* z;
  float eps;
};
// Scratch: one input row [Dp], phi_k and phi_q as [softmax(u) | softmax(-u)], 2 Fp each, one
// value / numerator row [Dvp].
inline int64_t decode_scratch_floats(const DecodeArgs& a) { return round16(a.D) + 4 * round16(a.F) + round16(a.Dv); }
// One step for KV head j of batch row b and its G query heads.
void decode_head_avx512(const DecodeArgs& a, int64_t b, int64_t j, float* scratch);
void decode_head_scalar(const DecodeArgs& a, int64_t b, int64_t j, float* scratch);

}  // namespace pyfast::hedgehog
