// CPU emulation of the CUDA device API that pyfast's kernels use (tests only; never in pyfast._C).
//
// The real .cu/.cuh sources are compiled by the host compiler against this header (it shadows
// cuda_runtime.h, cuda_fp16.h and cuda_bf16.h through csrc/emu/include) after one mechanical rewrite
// by tests/cuda_emu.py: `kernel<<<grid, block, smem, stream>>>(args)` becomes a call of
// pyfast_emu::launch, and each `__shared__` declaration becomes a reference into the block's
// emulated shared memory (a stray `__shared__` does not compile).
//
// Execution model (csrc/emu/emu_runtime.cpp): blocks run one after another; the threads of a block
// are fibers on one OS thread, each running until it reaches a synchronization point
// (__syncthreads, a warp shuffle / ballot / __syncwarp), in thread order (or reversed). So
//   * __syncthreads releases when every thread that has not exited waits at one;
//   * a warp operation releases when every lane of its mask waits at the same operation with the
//     same mask, then each lane gets its result; a lane of the mask that exited, or lanes that
//     disagree, are errors (as is a block that can make no progress);
//   * shared memory is fresh and filled with a poison byte at every block start, each variable
//     followed by a guarded gap, the dynamic part ending at an inaccessible page;
//   * cp.async wrappers take their plain-copy branch: __CUDA_ARCH__ is 750 here, below the sm_80
//     asm, while the other __CUDA_ARCH__ branches use the intrinsics emulated below.
// Arithmetic is the host's IEEE float32 (fmaf fused, no flush-to-zero, as nvcc without fast-math);
// half and bfloat16 conversions round to nearest even like the device's.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 750
#endif
#define PYFAST_CUDA_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
#define __shared__ PYFAST_EMU_shared_declaration_not_rewritten_by_tests_cuda_emu_py

// ---------------------------------------------------------------------------------------------
// Runtime API types

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorIllegalAddress = 700,
  cudaErrorInvalidConfiguration = 9,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace pyfast_emu {

// ---- the emulator's interface (emu_runtime.cpp) ----
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();

enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kSync, kGather };
// One lane's part of a warp operation; returns its result (the source lane's payload, the ballot;
// for kGather a pointer to the 32 lanes' payloads, valid until the warp's next operation).
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t payload, int arg, int width);

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 for the calling lane, all 32
// lanes taking part; fragments as the PTX ISA lays them out (csrc/common/cuda_mma.cuh).
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16);

void* dynamic_shared();
// Shared memory of one `__shared__` declaration site (`slot` is a static of that site): the same
// address for every thread of the block, fresh (poisoned) for every block.
struct SharedSlot {
  uint64_t block_serial = 0;
  void* ptr = nullptr;
};
void* shared_alloc(SharedSlot& slot, size_t bytes, size_t align, const char* name);
template <typename T>
T& shared_var(SharedSlot& slot, const char* name, size_t align) {
  if (align < alignof(T)) align = alignof(T);
  return *static_cast<T*>(shared_alloc(slot, sizeof(T), align < 16 ? 16 : align, name));
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem = 0;
  cudaStream_t stream = nullptr;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};
// Runs every block of the grid (synchronously); returns and records the launch's error.
cudaError_t launch(const LaunchConfig& cfg, const char* kernel, const std::function<void()>& body);

// ---- bit-exact conversions ----
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return u2f(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return u2f(sign | ((exp + 112) << 23) | (man << 13));
}
// Round to nearest even; NaN -> 0x7FFF (the device's canonical NaN), overflow -> inf.
inline uint16_t float_to_half_bits_rn(float f) {
  const uint32_t x = f2u(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return 0x7FFF;
  if (ax >= 0x47800000u) return sign | 0x7C00;  // >= 2^16 (also inf)
  if (ax < 0x38800000u) {                        // below 2^-14: a half subnormal (or zero)
    const float a = u2f(ax) * 16777216.0f;       // in units of 2^-24, exact
    return sign | static_cast<uint16_t>(std::nearbyint(a));  // default rounding: to nearest even
  }
  uint32_t h = ((((ax >> 23) - 112) << 10) | ((ax >> 13) & 0x3FFu));
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may reach inf: correct
  return sign | static_cast<uint16_t>(h);
}
inline uint16_t float_to_bf16_bits_rn(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

template <typename T>
uint64_t to_payload(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
  uint64_t p = 0;
  std::memcpy(&p, &v, sizeof(T));
  return p;
}
template <typename T>
T from_payload(uint64_t p) {
  T v;
  std::memcpy(&v, &p, sizeof(T));
  return v;
}

}  // namespace pyfast_emu

#define threadIdx (::pyfast_emu::thread_idx())
#define blockIdx (::pyfast_emu::block_idx())
#define blockDim (::pyfast_emu::block_dim())
#define gridDim (::pyfast_emu::grid_dim())

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

// ---------------------------------------------------------------------------------------------
// half / bfloat16 (storage types with the device's conversions)

struct __half_raw {
  unsigned short x;
};
struct __half {
  unsigned short __x;
  __half() = default;
  __half(__half_raw r) : __x(r.x) {}
  operator __half_raw() const { return {__x}; }
};
struct __half2_raw {
  unsigned short x, y;
};
struct __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half2_raw r) : x(__half_raw{r.x}), y(__half_raw{r.y}) {}
};
struct __nv_bfloat16_raw {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  operator __nv_bfloat16_raw() const { return {__x}; }
};

inline float __half2float(__half h) { return pyfast_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half_raw{pyfast_emu::float_to_half_bits_rn(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return pyfast_emu::u2f(static_cast<uint32_t>(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16_raw{pyfast_emu::float_to_bf16_bits_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---------------------------------------------------------------------------------------------
// Intrinsics

inline void __syncthreads() { pyfast_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  pyfast_emu::warp_op(pyfast_emu::WarpOp::kSync, mask, 0, 0, 32);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  using namespace pyfast_emu;
  return from_payload<T>(warp_op(WarpOp::kShflIdx, mask, to_payload(v), src, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace pyfast_emu;
  return from_payload<T>(warp_op(WarpOp::kShflUp, mask, to_payload(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace pyfast_emu;
  return from_payload<T>(warp_op(WarpOp::kShflDown, mask, to_payload(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace pyfast_emu;
  return from_payload<T>(warp_op(WarpOp::kShflXor, mask, to_payload(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(pyfast_emu::warp_op(pyfast_emu::WarpOp::kBallot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
// PRMT (default mode): byte i of the result is byte (s >> 4i) & 7 of the 8-byte value {b, a}.
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}
inline float __uint_as_float(unsigned u) { return pyfast_emu::u2f(u); }
inline unsigned __float_as_uint(float f) { return pyfast_emu::f2u(f); }
inline float __int_as_float(int i) { return pyfast_emu::u2f(static_cast<uint32_t>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(pyfast_emu::f2u(f)); }
// Checks the alignment a GPU load of T needs (a misaligned 8- or 16-byte load faults there).
void misaligned_load(const void* p, size_t align);
template <typename T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) misaligned_load(p, alignof(T));
  return *p;
}
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// Fibers never preempt each other: a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}

// CUDA's min/max overloads for integers (the float ones come from <cmath> as fminf/fmaxf).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
