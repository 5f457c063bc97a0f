// Torch-free interface between the CherryQ CPU host code and its per-ISA kernels.
#pragma once
#include <cstdint>

namespace pyfast::cherryq {

// All pointers are raw; fp16 tensors are passed as their uint16 bit patterns.
struct CpuMatmulArgs {
  const float* x;  // [M, K] fp32, row stride ldx
  int64_t ldx;
  const float* xsum;  // [M, K / group_size]: sum of x over each group
  const int32_t* qweight;  // [N, K/32*bits]
  const uint16_t* scales;  // [N, G] fp16
  const uint16_t* zeros;   // [N, G] fp16
  const int32_t* cherry_idx;  // [N, C]
  const uint16_t* cherry_val;  // [N, C] fp16
  const float* bias;  // [N] fp32 or nullptr
  float* y;  // [M, N] fp32, row stride ldy
  int64_t ldy;
  int64_t M, N, K, C;
  int bits, group_size;
  // VNNI path only: x[m, k] ~= xstep[m, g] * (d0 + 256 d1 + 65536 d2), the three int8 planes of
  // xdig [3, M, K] (balanced base-256 digits of a 23-bit fixed-point x, per group: see the host).
  const int8_t* xdig;
  const float* xstep;  // [M, G]
};

// Rows [n0, n1) of the output for every x row (GEMV path).
void gemv_rows_avx512(const CpuMatmulArgs& a, int64_t n0, int64_t n1);
void gemv_rows_scalar(const CpuMatmulArgs& a, int64_t n0, int64_t n1);
// GEMV with AVX-512 VNNI int8 dot products of the raw codes against x's digit planes (exact to
// ~2^-23 of each group's max |x|); needs group_size % 64 == 0.
void gemv_rows_vnni(const CpuMatmulArgs& a, int64_t n0, int64_t n1);
// x [M, K] (fp32, contiguous) -> xdig [3, M, K] and xstep [M, K / gs] for gemv_rows_vnni: per row
// and group, x ~= step * (d0 + 256 d1 + 65536 d2), step = max|x| / 2^22, balanced digits in
// [-128, 127] (x rounded to 2^-23 of its group's largest entry). False when x has a non-finite
// entry (the fp32 kernel then keeps NaN/inf semantics exact). Needs gs % 16 == 0.
bool split_x_digits(const float* x, int64_t M, int64_t K, int64_t gs, int8_t* xdig, float* xstep);
// Output columns [n0, n0+rows) for every x row via a dequantized fp32 panel [rows, K] (GEMM path).
void gemm_rows_avx512(const CpuMatmulArgs& a, int64_t n0, int64_t rows, float* panel);
void gemm_rows_scalar(const CpuMatmulArgs& a, int64_t n0, int64_t rows, float* panel);

}  // namespace pyfast::cherryq
