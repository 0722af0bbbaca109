// Plain C++ interface between the torch bindings (*_cuda.cpp) and the kernels (*.cu).
//
// The .cu files include only CUDA headers and this one, so nvcc never parses torch and the kernels
// stay reusable. Tensors cross this boundary as raw pointers, sizes, row strides (in elements) and a
// dtype code; every launcher returns the launch's cudaError_t for the caller to check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastcbd {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// A row-major matrix whose last dimension is dense; rows start every `stride` elements.
struct Rows {
  const void* ptr;
  int64_t stride;
  int dtype;
};

// Teachers K x (B, D_k), passed by value in the kernel parameters (well under the 4 KiB limit).
constexpr int kMaxTeachers = 32;
struct TeacherRows {
  const void* ptr[kMaxTeachers];
  int64_t stride[kMaxTeachers];
  int64_t dim[kMaxTeachers];
  int dtype[kMaxTeachers];
  int K;
};

// Sums n fp32 values in a fixed order (deterministic) and writes scale * sum to out[0], times
// dev_scale[0] (a device value, read without a host sync) when dev_scale is not null.
cudaError_t launch_scaled_sum(const float* values, int64_t n, double scale, const float* dev_scale, float* out,
                              cudaStream_t stream);

// cosine_distill_fwd: loss_rows[b] = 1 - <f_b, t_b>; grad (B, D) fp32 or nullptr.
cudaError_t launch_cosine_distill(Rows p, int64_t B, int64_t D, const TeacherRows& teachers, float scale,
                                  float* loss_rows, float* grad, cudaStream_t stream);

// rinv[r] = 1 / max(||x_r||, eps); unclamped[r] = ||x_r|| >= eps. One block per row.
cudaError_t launch_row_norms(Rows x, int64_t R, int64_t D, float* rinv, uint8_t* unclamped, cudaStream_t stream);

// The cosine-classifier row pass over a chunk of raw dots S (n, C) fp32, in place (see
// csrc/cuda/cosine_ce.cu). rp, y, loss_rows and s_rows point at the chunk's first row.
struct ClassifierArgs {
  float sigma;
  int64_t ignore_index;
  float label_smoothing;
  const float* scale;  // device pointer to the gradient's scale (1/n_valid x a weight): no host sync
  bool compute_grad;
};
cudaError_t launch_classifier_rows(float* S, int64_t n, int64_t C, const float* rp, const float* rw, const int64_t* y,
                                   ClassifierArgs args, float* loss_rows, float* s_rows, cudaStream_t stream);

// G_b -= rp_b^2 s_b x_b for the n rows of a chunk (rows with the norm clamp active are left alone).
cudaError_t launch_normalize_backward_rows(float* G, Rows x, int64_t n, int64_t D, const float* rp,
                                           const uint8_t* unclamped, const float* s_rows, cudaStream_t stream);

// H_c -= rw_c^2 <H_c, w_c> w_c for every class row c (grad_w's normalisation backward).
cudaError_t launch_project_rows(float* H, Rows w, int64_t C, int64_t D, const float* rw, const uint8_t* unclamped,
                                cudaStream_t stream);

// multi_teacher_kd_fwd: teachers K x (B, C) logits, weights (K,) fp32 on the device.
// loss_rows[b] = tau^2 sum_k w_k KL_kb; grad (B, C) fp32 (already times scale) or nullptr.
cudaError_t launch_multi_teacher_kd(Rows z, int64_t B, int64_t C, const TeacherRows& teachers, const float* weights,
                                    float tau, float scale, float* loss_rows, float* grad, cudaStream_t stream);

// cbd_loss_fwd's finishing pass over the n rows of a chunk (pointers at the chunk's first row):
// dist_rows[b] = 1 - <f_b, t_b>; when G is not null, G_b += -sd rp_b t_b - rp_b^2 (s_b - sd c_b) p_b.
// `b0` is the chunk's first row, for the teacher rows.
cudaError_t launch_cbd_finish(Rows p, int64_t b0, int64_t n, int64_t D, const TeacherRows& teachers, const float* rp,
                              const uint8_t* unclamped, const float* s_rows, float sd, float* dist_rows, float* G,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fastcbd
