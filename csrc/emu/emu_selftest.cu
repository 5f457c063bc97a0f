// Kernels that test the CUDA emulation itself (tests/test_cuda_emu.py): the warp operations and
// conversions against their CUDA definitions, and one kernel per bug class the emulation must
// report (out-of-bounds global and shared accesses, uninitialised shared reads, deadlock, a warp
// operation with an exited lane, misaligned vector loads, bad launches, unchecked launch errors).
// Compiled only for the emulation (rewritten like every .cu file by tests/cuda_emu.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "common/cuda_mma.cuh"
#include "emu/emu_selftest.h"

namespace pyfast_emu_selftest {
namespace {

// out[64 * 6]: per thread of 2 warps, the results of each warp operation.
__global__ void warp_ops_kernel(int* out) {
  const int t = threadIdx.x, lane = t & 31;
  const int v = 100 * t + 7;
  int* o = out + 6 * t;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[1] = __shfl_down_sync(0xffffffffu, v, 3);
  o[2] = __shfl_up_sync(0xffffffffu, v, 2, 16);
  o[3] = __shfl_sync(0xffffffffu, v, 9, 8);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, (lane % 3) == 0 || t == 40));
  // Half the warp: lanes 0..15 shuffle among themselves (a partial mask).
  o[5] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : -1;
}

// Block sum of in[0..n) through shared memory and barriers; out[0] = sum (n <= 256).
__global__ void block_sum_kernel(const float* in, float* out, int n) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = t < n ? in[t] : 0.0f;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (t < w) s[t] += s[t + w];
    __syncthreads();
  }
  if (t == 0) out[0] = s[0];
}

// Like block_sum but without the first barrier: thread t < w reads s[t + w] before its writer ran.
__global__ void missing_barrier_kernel(const float* in, float* out, int n) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = t < n ? in[t] : 0.0f;
  for (int w = 128; w > 0; w >>= 1) {
    if (t < w) s[t] += s[t + w];
    __syncthreads();
  }
  if (t == 0) out[0] = s[0];
}

__global__ void uninit_shared_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;  // s[32..63] never written
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void global_read_past_end_kernel(const float* in, float* out, int n) {
  out[threadIdx.x] = in[threadIdx.x + n];  // one element past the end for thread 0 .. beyond
}

__global__ void global_write_past_end_kernel(float* out, int n) {
  if (threadIdx.x == 0) out[n] = 1.0f;  // the element after the last (inside the 64-byte padding)
}

__global__ void shared_write_past_end_kernel(float* out) {
  __shared__ float s[32];
  __shared__ float after[32];
  s[threadIdx.x] = 1.0f;
  after[threadIdx.x] = 2.0f;
  if (threadIdx.x == 0) s[32] = 3.0f;  // past s
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x] + after[threadIdx.x];
}

__global__ void dynamic_read_past_end_kernel(float* out, int n) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x + n];
}

__global__ void deadlock_kernel(float* out) {
  const int lane = threadIdx.x & 31;
  float v = 1.0f;
  if (lane < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);  // waits for lanes 0..15, which wait at the barrier
  }
  out[threadIdx.x] = v;
}

__global__ void exited_lane_kernel(float* out) {
  const int lane = threadIdx.x & 31;
  if (lane == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void misaligned_kernel(const float* in, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));  // 4-byte aligned only
  out[threadIdx.x] = __uint_as_float(v.x);
}

__global__ void shared_limit_kernel(float* out) {
  __shared__ float big[16384];  // 64 KiB of static shared memory: over the 48 KiB limit
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

// bits[i] = the half (or bfloat16) bits of in[i] rounded by the device conversion.
__global__ void convert_kernel(const float* in, int16_t* half_bits, int16_t* bf16_bits, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half h = __float2half_rn(in[i]);
  const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
  half_bits[i] = static_cast<int16_t>(static_cast<__half_raw>(h).x);
  bf16_bits[i] = static_cast<int16_t>(static_cast<__nv_bfloat16_raw>(b).x);
}

// One warp: D = A B + C with in = [A 16x16 | B 16x8 | C 16x8] row-major fp32 (A and B rounded to
// T), out = D 16x8 row-major, through the fragment layouts of cuda_mma.cuh.
template <typename T>
__global__ void mma_kernel(const float* in, float* out) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const float* A = in;
  const float* B = in + 256;
  const float* C = in + 384;
  auto bits = [](float v) -> uint32_t {
    if constexpr (std::is_same<T, __half>::value) return static_cast<__half_raw>(__float2half_rn(v)).x;
    else return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(v)).x;
  };
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int r = 0; r < 4; ++r) {
    const int i0 = 2 * r, i1 = 2 * r + 1;  // the register's two elements
    auto at = [&](int i) { return A[(g + 8 * ((i / 2) % 2)) * 16 + 2 * t + (i % 2) + 8 * (i / 4)]; };
    a[r] = bits(at(i0)) | (bits(at(i1)) << 16);
  }
  for (int r = 0; r < 2; ++r) {
    auto at = [&](int i) { return B[(2 * t + (i % 2) + 8 * (i / 2)) * 8 + g]; };
    b[r] = bits(at(2 * r)) | (bits(at(2 * r + 1)) << 16);
  }
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)];
  pyfast::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) out[(g + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = d[i];
}

}  // namespace

// Runs case `name` on the given buffers; returns the launch's error (the caller raises on it).
cudaError_t run(const std::string& name, const float* in, float* out, int16_t* a, int16_t* b, int n) {
  if (name == "warp_ops") {
    warp_ops_kernel<<<1, 64>>>(reinterpret_cast<int*>(out));
  } else if (name == "block_sum") {
    block_sum_kernel<<<1, 256>>>(in, out, n);
  } else if (name == "missing_barrier") {
    missing_barrier_kernel<<<1, 256>>>(in, out, n);
  } else if (name == "uninit_shared") {
    uninit_shared_kernel<<<1, 64>>>(out);
  } else if (name == "global_read_past_end") {
    global_read_past_end_kernel<<<1, 32>>>(in, out, n);
  } else if (name == "global_write_past_end") {
    global_write_past_end_kernel<<<1, 32>>>(out, n);
  } else if (name == "shared_write_past_end") {
    shared_write_past_end_kernel<<<1, 32>>>(out);
  } else if (name == "dynamic_read_past_end") {
    dynamic_read_past_end_kernel<<<1, 32, 32 * sizeof(float)>>>(out, n);
  } else if (name == "deadlock") {
    deadlock_kernel<<<1, 64>>>(out);
  } else if (name == "exited_lane") {
    exited_lane_kernel<<<1, 32>>>(out);
  } else if (name == "misaligned") {
    misaligned_kernel<<<1, 32>>>(in, out);
  } else if (name == "shared_limit") {
    shared_limit_kernel<<<1, 32>>>(out);
  } else if (name == "bad_launch") {
    block_sum_kernel<<<1, 2048>>>(in, out, n);  // more than 1024 threads per block
  } else if (name == "unchecked_launch_error") {
    block_sum_kernel<<<dim3(1, 70000), 256>>>(in, out, n);  // grid.y > 65535, error not returned
    return cudaSuccess;
  } else if (name == "mma_f16") {
    mma_kernel<__half><<<1, 32>>>(in, out);
  } else if (name == "mma_bf16") {
    mma_kernel<__nv_bfloat16><<<1, 32>>>(in, out);
  } else if (name == "convert") {
    convert_kernel<<<(n + 127) / 128, 128>>>(in, a, b, n);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace pyfast_emu_selftest
