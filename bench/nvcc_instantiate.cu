// Instantiates device templates no kernel of csrc uses yet (for bench/nvcc_check.sh): the
// tensor-core MMA wrapper of csrc/common/cuda_mma.cuh, in both operand types.
#include "common/cuda_mma.cuh"
__global__ void instantiate_mma(float* o, const uint32_t* x) {
  uint32_t a[4] = {x[0], x[1], x[2], x[3]}, b[2] = {x[4], x[5]};
  float c[4] = {0, 0, 0, 0}, d[4], e[4];
  pyfast::mma_m16n8k16<__half>(d, a, b, c);
  pyfast::mma_m16n8k16<__nv_bfloat16>(e, a, b, d);
  o[threadIdx.x] = e[0] + e[1] + e[2] + e[3];
}
