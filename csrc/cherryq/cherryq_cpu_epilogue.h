// GEMV epilogue of the CPU kernels; included by cherryq_cpu_kernel.h *inside* each ISA unit's
// namespace so it is compiled for that unit's ISA only.
//
// out[m] holds the dense part of y[m0 + m, n]. Cherries are rank-1 fix-ups on top of it: the
// packed code under a cherry is 0, so the dense part used `zero` there and the cherry adds
// x[m, k] * (cherry - zero). Out-of-range indices are skipped (never read). Then bias, store.
template <int MB, class HalfFn>
inline void add_cherries_and_store(const CpuMatmulArgs& a, int64_t n, int m0, float* out, HalfFn half) {
  // group_size is a power of two: shift instead of a 64-bit division per cherry (~1/6 of a
  // GEMV row's time at 16 cherries per row when it was a division).
  const int shift = __builtin_ctz(static_cast<unsigned>(a.group_size));
  const int64_t G = a.K >> shift;
  const int32_t* crow = a.cherry_idx + n * a.C;
  const uint16_t* vrow = a.cherry_val + n * a.C;
  for (int64_t c = 0; c < a.C; ++c) {
    const int64_t k = crow[c];
    if (k < 0 || k >= a.K) continue;
    const float delta = half(vrow[c]) - half(a.zeros[n * G + (k >> shift)]);
    for (int m = 0; m < MB; ++m) out[m] += a.x[(m0 + m) * a.ldx + k] * delta;
  }
  const float b = a.bias ? a.bias[n] : 0.f;
  for (int m = 0; m < MB; ++m) a.y[(m0 + m) * a.ldy + n] = out[m] + b;
}
