// The CherryQ GEMV kernels for x of type __nv_bfloat16 (why one file per dtype: cherryq_cuda_launch.cuh).
#include "cherryq/cherryq_cuda_launch.cuh"

namespace pyfast {
namespace cherryq {
namespace detail {

template cudaError_t launch_dtype<__nv_bfloat16>(const GemvParams&, int, const gemv::GemvPlan&, int64_t,
                                                 unsigned, cudaStream_t);

}  // namespace detail
}  // namespace cherryq
}  // namespace pyfast
