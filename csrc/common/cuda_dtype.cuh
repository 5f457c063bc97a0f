// Device-side conversions between float32 and the storage dtypes (float, __half, __nv_bfloat16),
// shared by every CUDA family. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace pyfast {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Read-only loads through the non-coherent path (only for data no kernel of the launch writes).
template <typename U>
__device__ __forceinline__ U ld_ro(const U* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// 16 bytes = kVec16<T> elements of T: the unit of vectorized global and shared-memory access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// The kVec16<T> elements packed in a 16-byte word, as float32.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&f)[kVec16<T>]) {
  if constexpr (sizeof(T) == 4) {
    f[0] = __uint_as_float(raw.x), f[1] = __uint_as_float(raw.y);
    f[2] = __uint_as_float(raw.z), f[3] = __uint_as_float(raw.w);
  } else {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // Element 2i is the low half of word i (little-endian), 2i + 1 the high half.
      if constexpr (std::is_same<T, __half>::value) {
        __half2_raw h;
        h.x = static_cast<unsigned short>(w[i] & 0xFFFFu);
        h.y = static_cast<unsigned short>(w[i] >> 16);
        const float2 p = __half22float2(__half2(h));
        f[2 * i] = p.x, f[2 * i + 1] = p.y;
      } else {
        f[2 * i] = __uint_as_float(w[i] << 16);  // bfloat16 = the high 16 bits of a float32
        f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
      }
    }
  }
}

}  // namespace pyfast
