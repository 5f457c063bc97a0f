// Torch-free interface between the Hedgehog backward host code (hedgehog_cpu_backward.cpp) and its
// per-ISA kernels (hedgehog_cpu_backward_{avx512,scalar}.cpp, both built from hedgehog_bwd_kernel.h).
//
// One task = one sequence (a batch row, or a packed segment) x one KV head j, with the G query heads
// h = j * G + g that read it. A task owns every output row it writes (dq of its query heads, dk/dv of
// its KV head, dS0/dz0 of (n, j)); sums over tasks (dq_weight, dk_weight, biases, alpha, beta) go to
// per-thread Partials that the host adds up. Nothing of size [B, H, T, 2F] is ever stored: features
// are recomputed per chunk of kChunk tokens; what a thread keeps for its current task are the
// states entering each chunk (Layout, below).
#pragma once
#include <cstdint>

#include "common/cpu_elem.h"  // Elem: the q/k/v element type

namespace pyfast::hedgehog::bwd {

constexpr int64_t kLanes = 16;  // fp32 lanes per vector; every scratch row is padded to a multiple
constexpr int64_t kChunk = 64;  // tokens per chunk (the contract's chunk)

inline int64_t pad16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

struct Rows {  // a [B, H, T, X] input (last stride 1), strides in elements
  const void* p = nullptr;
  int64_t sb = 0, sh = 0, st = 0;
};

struct Problem {
  Elem elem;
  Rows q, k, v, go;  // go = grad_out [B, Hq, T, Dv]
  int64_t B, Hq, Hkv, T;
  int64_t D;   // q/k row width: the feature-map input dim, or the feature width F2 without a feature map
  int64_t F;   // feature-map output width (features are 2F wide); 0 without a feature map
  int64_t F2;  // feature width: 2F, or F' for linear_attention
  int64_t Dv;
  bool feature_map, causal;
  int64_t window;  // > 0: the sliding-window hybrid (causal, no states)
  float scale, eps;
  const float* alpha;  // [Hq] or null (= ones); only read when window > 0
  const float* beta;
  // Feature-map parameters in fp32, zero-padded by the host: w [H, D, pad16(F)] (u = x w + b),
  // wt [H, F, pad16(D)] (dx = du wt), b [H, pad16(F)] or null.
  const float *wq, *wqt, *bq, *wk, *wkt, *bk;
  const float *S0, *z0;  // [N, Hkv, F2, Dv], [N, Hkv, F2] contiguous, or null
  const float *gS, *gz;  // gradients of the returned state, same shapes, or null
  const int32_t* cu;     // [N + 1] segment offsets, or null (then N = B, every sequence is T long)
  int64_t N;
  // Outputs, fp32 contiguous, written in full by the tasks: dq [B, Hq, T, D], dk [B, Hkv, T, D],
  // dv [B, Hkv, T, Dv]; dS0 [N, Hkv, F2, Dv] and dz0 [N, Hkv, F2] (null: not needed).
  float *dq, *dk, *dv, *dS0, *dz0;
};

struct Partials {  // one thread's sums (zero-initialised by the host)
  float* dwq;  // [Hq, D, pad16(F)]
  float* dwk;  // [Hkv, D, pad16(F)]
  float* dbq;  // [Hq, pad16(F)]
  float* dbk;  // [Hkv, pad16(F)]
  float* dalpha;  // [Hq]
  float* dbeta;   // [Hq]
};

// Causal: the state entering every chunk (S^T [Dv, F2p] and z [F2p]) and the chunk's key features
// ([kChunk, F2p]), one "slot", are kept between the forward pre-pass and the reverse pass, so the
// reverse pass computes no key features; at most kStateBytes per thread (about 32k tokens at
// F2 = 128, Dv = 64) or block_chunks slots when that is > 0 (tests); longer sequences are done in
// blocks of that many chunks, each block's slots recomputed from a checkpoint (a state only) at its
// start (one more K pass over those chunks).
constexpr int64_t kStateBytes = int64_t{32} << 20;

// The fp32 scratch of one thread (offsets in floats, each a multiple of kLanes). tmax = the longest
// sequence.
struct Layout {
  int64_t Dp, Fp, F2p, Dvp, G, wb, state, slot, nslots, nckpt;  // state: floats of S^T and z
  int64_t xq, xk, u, qf, kf, kft, vv, vt, gr, ga, m, pm, st, z, dst, r, dqf, dkf, du, dx, ds, dz, dva, rows;
  int64_t slots, ckpts, sc, e, gv, qs, dqrow, total;

  Layout(const Problem& p, int64_t tmax, int64_t block_chunks) {
    const int64_t C = kChunk;
    Dp = pad16(p.D), Fp = pad16(p.F), F2p = pad16(p.F2), Dvp = pad16(p.Dv), G = p.Hq / p.Hkv;
    wb = p.window > 0 ? pad16(p.window < tmax ? p.window : tmax) : 0;
    state = pad16(p.Dv * F2p + F2p), slot = state + C * F2p;
    const int64_t budget = kStateBytes / 4 / slot > 1 ? kStateBytes / 4 / slot : 1;
    const int64_t nchunks = (tmax + C - 1) / C, cap = block_chunks > 0 ? block_chunks : budget;
    nslots = p.causal ? (nchunks < cap ? nchunks : cap) : 0;
    nckpt = nslots ? (nchunks + nslots - 1) / nslots : 0;
    int64_t at = 0;
    auto take = [&at](int64_t n) { const int64_t o = at; at += pad16(n); return o; };
    xq = take(C * Dp), xk = take(C * Dp), u = take(C * Fp);       // raw q/k rows, pre-softmax u
    qf = take(C * F2p), kf = take(C * F2p), kft = take(F2p * C);  // features, kf transposed
    vv = take(C * Dvp), vt = take(Dvp * C), gr = take(C * Dvp), ga = take(C * Dvp);  // v, v^T, grad_out, r * grad_out
    m = take(C * C), pm = take(C * C);                 // masked Q K^T and grad_out V^T (then P) of a chunk
    st = take(Dvp * F2p), z = take(F2p);               // running state S^T [Dv, F2p], z
    dst = take(Dvp * F2p);                             // dS^T
    r = take(C * F2p), dqf = take(C * F2p), dkf = take(C * F2p), du = take(C * Fp), dx = take(C * Dp);
    ds = take(F2p * Dvp), dz = take(F2p), dva = take(C * Dvp);  // running dS [F2p, Dv], dz; dv of a chunk
    rows = take(2 * C);                                         // r_t, k_t of a chunk's rows
    slots = take(nslots * slot), ckpts = take(nckpt * state);  // chunk-entry states + key features, block checkpoints
    sc = take(wb), e = take(wb), gv = take(wb), qs = take(Dp), dqrow = take(Dp);  // window band of one row
    total = at;
  }
};

void backward_task_avx512(const Problem& p, const Layout& l, int64_t n, int64_t j, float* scratch, const Partials& acc);
void backward_task_scalar(const Problem& p, const Layout& l, int64_t n, int64_t j, float* scratch, const Partials& acc);

}  // namespace pyfast::hedgehog::bwd
