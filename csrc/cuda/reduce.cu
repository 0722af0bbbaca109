// Deterministic final reduction of per-row losses (one block, fixed order).
#include "cuda/common.cuh"

namespace fastcbd {
namespace cuda {
namespace {

__global__ void scaled_sum_kernel(const float* __restrict__ v, int64_t n, double scale,
                                  const float* __restrict__ dev_scale, float* __restrict__ out) {
  __shared__ double smem[1024];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(v[i]);
  smem[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) smem[threadIdx.x] += smem[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double k = dev_scale == nullptr ? scale : scale * static_cast<double>(dev_scale[0]);
    out[0] = static_cast<float>(k * smem[0]);
  }
}

}  // namespace

cudaError_t launch_scaled_sum(const float* values, int64_t n, double scale, const float* dev_scale, float* out,
                              cudaStream_t stream) {
  scaled_sum_kernel<<<1, 1024, 0, stream>>>(values, n, scale, dev_scale, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastcbd
