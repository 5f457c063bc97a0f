// Torch-free interface between the LN-free linear layers' host code (lnfree_cpu.cpp) and their
// per-ISA kernels (lnfree_cpu_{avx512,scalar}.cpp, both built from lnfree_cpu_kernel.h):
//     y [M, N] = epilogue(x [M, K] @ w [N, K]^T)      (F.linear's weight layout)
//     epilogue: + bias [N], then GPT-2's tanh GELU (gelu) or + residual [M, N] (residual)
// fp32 accumulation; x, w, bias, residual and y share one element type (fp32/fp16/bf16).
#pragma once
#include <cstdint>

#include "common/cpu_elem.h"

namespace pyfast::lnfree {

constexpr int64_t kLanes = 16;     // fp32 lanes per vector
constexpr int64_t kPanel = 64;     // output columns per panel: 4 vectors, the register block's width
constexpr int64_t kDepth = 256;    // K per packed panel block: [kDepth, kPanel] fp32 = 64 KiB (L2)
constexpr int64_t kGemvRows = 4;   // up to this many rows of x: dot products along K, no packing

inline int64_t pad16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

struct LinearArgs {
  Elem elem;
  const float* x;  // [M, pad16(K)] fp32, zero-padded (converted by the host)
  int64_t M, K, N;
  const void* w;   // [N, K] rows, row stride ldw elements
  int64_t ldw;
  const void* bias;      // [N] or null
  const void* residual;  // [M, N] rows (row stride ldr) or null
  int64_t ldr;
  void* y;               // [M, N] contiguous
  bool gelu;
};

// Output columns [n0, n1) (multiples of kPanel except at N), every row. scratch: the thread's
// fp32 buffer of scratch_floats(M) floats.
int64_t scratch_floats(int64_t M);
void linear_columns_avx512(const LinearArgs& a, int64_t n0, int64_t n1, float* scratch);
void linear_columns_scalar(const LinearArgs& a, int64_t n0, int64_t n1, float* scratch);

}  // namespace pyfast::lnfree
