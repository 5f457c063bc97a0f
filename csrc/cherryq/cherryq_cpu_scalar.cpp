// CherryQ CPU kernels for any x86/ARM CPU: plain C++ over 16-float "vectors" that the
// compiler vectorizes for the baseline ISA. Used when AVX-512 is not available.
#include <cstdint>
#include <cstring>

#include "cherryq/cherryq_cpu.h"
#include "common/cpu_vec16_scalar.h"

namespace pyfast::cherryq {
namespace {

struct Isa : Vec16 {
  template <int BITS>
  static inline void decode(const int32_t* w, V& c0, V& c1) {
    const uint32_t* u = reinterpret_cast<const uint32_t*>(w);
    for (int i = 0; i < 32; ++i) {
      uint32_t code;
      if (BITS == 4) code = (u[i >> 3] >> (4 * (i & 7))) & 15u;
      else if (BITS == 2) code = (u[i >> 4] >> (2 * (i & 15))) & 3u;
      else code = ((u[i >> 4] >> (2 * (i & 15))) & 3u) | (((u[2] >> i) & 1u) << 2);
      (i < 16 ? c0.v[i] : c1.v[i - 16]) = 1.f + static_cast<float>(code) * (1.f / (1 << BITS));
    }
  }
};

#include "cherryq/cherryq_cpu_kernel.h"

}  // namespace

void gemv_rows_scalar(const CpuMatmulArgs& a, int64_t n0, int64_t n1) { gemv_rows(a, n0, n1); }
void gemm_rows_scalar(const CpuMatmulArgs& a, int64_t n0, int64_t rows, float* panel) { gemm_rows(a, n0, rows, panel); }

}  // namespace pyfast::cherryq
