// Warp-level tensor-core MMA (sm_80+): D[16x8] = A[16x16] B[16x8] + C, fp16 or bf16 operands, fp32
// accumulators. Torch-free device code. Fragment layouts (PTX ISA, "mma.m16n8k16"), per lane with
// g = lane / 4 and t = lane % 4, the lower element index in the low half of each 32-bit register:
//   A row-major, a[0..3] hold elements i = 0..7: row g + 8 * ((i / 2) % 2), col 2t + i % 2 + 8 * (i / 4)
//   B col-major, b[0..1] hold elements i = 0..3: row 2t + i % 2 + 8 * (i / 2), col g
//   C, D        c[0..3], d[0..3] element i:       row g + 8 * (i / 2),       col 2t + i % 2
// Under the CPU emulation (tests) the same layouts are computed by csrc/emu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace pyfast {

template <typename T>  // __half or __nv_bfloat16
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16 operands");
#if defined(PYFAST_CUDA_EMU)
  pyfast_emu::mma_m16n8k16(d, a, b, c, std::is_same<T, __nv_bfloat16>::value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3]));
  }
#endif  // below sm_80 (never launched there: the launchers pick other kernels)
}

}  // namespace pyfast
