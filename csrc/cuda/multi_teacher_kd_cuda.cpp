// CUDA binding of multi_teacher_kd_fwd (schema in csrc/cpu/multi_teacher_kd.cpp, contract in docs/ops.md).
#include <torch/library.h>

#include "cuda/cuda_utils.h"

namespace fastcbd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> multi_teacher_kd_fwd_cuda(const at::Tensor& z_in, at::TensorList teachers_in,
                                                             const at::Tensor& weights_in, double tau, double scale,
                                                             bool compute_grad) {
  check_cuda_input(z_in, "z");
  check_dim(z_in, 2, "z");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = rows_dense(z_in);
  const std::vector<at::Tensor> teachers =
      check_teachers(teachers_in, z, /*allow_double=*/false, /*same_width=*/true);
  const int64_t K = static_cast<int64_t>(teachers.size());
  TORCH_CHECK(weights_in.dim() == 1 && weights_in.size(0) == K, "weights must have shape (K,) = (", K, "), got ",
              weights_in.sizes());
  TORCH_CHECK(at::isFloatingType(weights_in.scalar_type()), "weights must be a float tensor");
  TORCH_CHECK(tau > 0, "tau must be > 0, got ", tau);
  // Read on the device: no host sync. (A CPU weights tensor is copied over.)
  const at::Tensor weights = weights_in.to(z.device(), at::kFloat).contiguous();
  const int64_t B = z.size(0), C = z.size(1);
  const auto opts = z.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::empty({B}, opts), loss = at::empty({}, opts);
  at::Tensor grad = compute_grad ? at::empty({B, C}, opts) : at::empty({0}, opts);
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(launch_multi_teacher_kd(rows_of(z), B, C, teacher_rows_of(teachers), weights.const_data_ptr<float>(),
                                         static_cast<float>(tau), static_cast<float>(scale),
                                         loss_rows.data_ptr<float>(), compute_grad ? grad.data_ptr<float>() : nullptr,
                                         stream));
  C10_CUDA_CHECK(launch_scaled_sum(loss_rows.const_data_ptr<float>(), B, scale, nullptr, loss.data_ptr<float>(), stream));
  return {loss, grad};
}

}  // namespace
}  // namespace cuda
}  // namespace fastcbd

TORCH_LIBRARY_IMPL(fastcbd_C, CUDA, m) { m.impl("multi_teacher_kd_fwd", &fastcbd::cuda::multi_teacher_kd_fwd_cuda); }
