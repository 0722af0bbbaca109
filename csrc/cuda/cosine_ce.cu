// Kernels around the GEMMs of the cosine classifier (cosine_ce_fwd, cbd_loss_fwd); the GEMMs are
// cuBLAS calls made by the bindings. All one block per row, fp32 accumulation, int64 offsets.
#include "cuda/common.cuh"

namespace fastcbd {
namespace cuda {
namespace {

constexpr float kEps = 1e-12f;

template <typename T>
__global__ void row_norms_kernel(Rows x, int64_t D, float* __restrict__ rinv, uint8_t* __restrict__ unclamped) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const T* xr = row_of<T>(x.ptr, x.stride, r);
  float v[1] = {0.f};
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float a = to_f32(xr[i]);
    v[0] = fmaf(a, a, v[0]);
  }
  block_sum<1>(v, smem);
  if (threadIdx.x == 0) {
    const float n = sqrtf(v[0]);
    rinv[r] = 1.f / fmaxf(n, kEps);
    unclamped[r] = n >= kEps;
  }
}

// One block per row of S (raw dots p_b . w_c). z_c = sigma rp_b rw_c S_c; the softmax statistics
// come from a per-thread online (max, sum e, sum e z) merged over the block; when computing
// gradients a second pass overwrites S with
//   E'_c = scale sigma rp_b rw_c (softmax_c - (1 - ls) [c == y] - ls / C)
// and s_rows[b] = sum_c dz_c z_c. A target outside [0, C) that is not ignore_index is masked (never
// read): its row gets a NaN loss, NaN E' and NaN s_b, hence NaN gradients (the CPU and Triton agree).
__global__ void classifier_rows_kernel(float* __restrict__ S, int64_t C, const float* __restrict__ rp,
                                       const float* __restrict__ rw, const int64_t* __restrict__ y, ClassifierArgs a,
                                       float* __restrict__ loss_rows, float* __restrict__ s_rows) {
  __shared__ float smem[32 * 3];
  const int64_t b = blockIdx.x;
  float* z = S + b * C;
  const int64_t yb = y[b];
  if (yb == a.ignore_index || yb < 0 || yb >= C) {
    const float v = yb == a.ignore_index ? 0.f : __int_as_float(0x7fc00000);  // 0, or a quiet NaN
    if (threadIdx.x == 0) {
      loss_rows[b] = v;
      if (a.compute_grad) s_rows[b] = v;
    }
    if (a.compute_grad)
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) z[c] = v;
    return;
  }
  const float k = a.sigma * rp[b];

  float m = -INFINITY, Z = 0.f, A = 0.f, zsum = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = k * rw[c] * z[c];
    zsum += v;
    if (v > m) {  // rescale the running sums to the new max
      const float r = __expf(m - v);
      Z = fmaf(Z, r, 1.f);
      A = fmaf(A, r, v);
      m = v;
    } else {
      const float e = __expf(v - m);
      Z += e;
      A = fmaf(e, v, A);
    }
  }
  const float M = block_max(m, smem);
  const float r = m == -INFINITY ? 0.f : __expf(m - M);
  float v3[3] = {Z * r, A * r, zsum};
  block_sum<3>(v3, smem);
  const float Zt = v3[0], At = v3[1], zmean = v3[2] / static_cast<float>(C);
  const float ls = a.label_smoothing;
  const float zy = k * rw[yb] * z[yb];
  const float lse = M + logf(Zt);
  if (threadIdx.x == 0) {
    loss_rows[b] = (1.f - ls) * (lse - zy) + ls * (lse - zmean);
    if (a.compute_grad) s_rows[b] = *a.scale * (At / Zt - (1.f - ls) * zy - ls * zmean);
  }
  if (!a.compute_grad) return;
  __syncthreads();  // every thread has read z[yb] before it is overwritten
  const float invZ = 1.f / Zt, ks = *a.scale * k, off = ls / static_cast<float>(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float kc = ks * rw[c];
    const float e = __expf(k * rw[c] * z[c] - M) * invZ;
    z[c] = kc * (e - off - (c == yb ? 1.f - ls : 0.f));
  }
}

template <typename T>
__global__ void normalize_backward_kernel(float* __restrict__ G, Rows x, int64_t D, const float* __restrict__ rp,
                                          const uint8_t* __restrict__ unclamped, const float* __restrict__ s_rows) {
  const int64_t b = blockIdx.x;
  if (!unclamped[b]) return;
  const float k = rp[b] * rp[b] * s_rows[b];
  if (k == 0.f) return;
  const T* xr = row_of<T>(x.ptr, x.stride, b);
  float* g = G + b * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) g[i] -= k * to_f32(xr[i]);
}

template <typename T>
__global__ void project_rows_kernel(float* __restrict__ H, Rows w, int64_t D, const float* __restrict__ rw,
                                    const uint8_t* __restrict__ unclamped) {
  __shared__ float smem[32];
  const int64_t c = blockIdx.x;
  if (!unclamped[c]) return;
  const T* wc = row_of<T>(w.ptr, w.stride, c);
  float* h = H + c * D;
  float v[1] = {0.f};
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) v[0] = fmaf(h[i], to_f32(wc[i]), v[0]);
  block_sum<1>(v, smem);
  const float k = rw[c] * rw[c] * v[0];
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) h[i] -= k * to_f32(wc[i]);
}

template <template <typename> class Kernel, typename... Args>
void launch_typed(int dtype, dim3 grid, int threads, cudaStream_t stream, Args... args) {
  switch (dtype) {
    case kF16: Kernel<__half>::run(grid, threads, stream, args...); break;
    case kBF16: Kernel<__nv_bfloat16>::run(grid, threads, stream, args...); break;
    default: Kernel<float>::run(grid, threads, stream, args...);
  }
}

template <typename T>
struct RowNorms {
  template <typename... A>
  static void run(dim3 g, int t, cudaStream_t s, A... a) { row_norms_kernel<T><<<g, t, 0, s>>>(a...); }
};
template <typename T>
struct NormalizeBackward {
  template <typename... A>
  static void run(dim3 g, int t, cudaStream_t s, A... a) { normalize_backward_kernel<T><<<g, t, 0, s>>>(a...); }
};
template <typename T>
struct ProjectRows {
  template <typename... A>
  static void run(dim3 g, int t, cudaStream_t s, A... a) { project_rows_kernel<T><<<g, t, 0, s>>>(a...); }
};

}  // namespace

cudaError_t launch_row_norms(Rows x, int64_t R, int64_t D, float* rinv, uint8_t* unclamped, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  launch_typed<RowNorms>(x.dtype, dim3(static_cast<unsigned>(R)), row_block_threads(D), stream, x, D, rinv, unclamped);
  return cudaGetLastError();
}

cudaError_t launch_classifier_rows(float* S, int64_t n, int64_t C, const float* rp, const float* rw, const int64_t* y,
                                   ClassifierArgs args, float* loss_rows, float* s_rows, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  classifier_rows_kernel<<<static_cast<unsigned>(n), row_block_threads(C), 0, stream>>>(S, C, rp, rw, y, args,
                                                                                         loss_rows, s_rows);
  return cudaGetLastError();
}

cudaError_t launch_normalize_backward_rows(float* G, Rows x, int64_t n, int64_t D, const float* rp,
                                           const uint8_t* unclamped, const float* s_rows, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  launch_typed<NormalizeBackward>(x.dtype, dim3(static_cast<unsigned>(n)), row_block_threads(D), stream, G, x, D, rp,
                                  unclamped, s_rows);
  return cudaGetLastError();
}

cudaError_t launch_project_rows(float* H, Rows w, int64_t C, int64_t D, const float* rw, const uint8_t* unclamped,
                                cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  launch_typed<ProjectRows>(w.dtype, dim3(static_cast<unsigned>(C)), row_block_threads(D), stream, H, w, D, rw,
                            unclamped);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastcbd
