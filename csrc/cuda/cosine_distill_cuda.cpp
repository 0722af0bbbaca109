// CUDA binding of cosine_distill_fwd (schema in csrc/cpu/cosine_distill.cpp, contract in docs/ops.md).
#include <torch/library.h>

#include "cuda/cuda_utils.h"

namespace fastcbd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> cosine_distill_fwd_cuda(const at::Tensor& p_in, at::TensorList teachers_in,
                                                           double scale, bool compute_grad) {
  check_cuda_input(p_in, "p");
  check_dim(p_in, 2, "p");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = rows_dense(p_in);
  const std::vector<at::Tensor> teachers = check_teachers(teachers_in, p, /*allow_double=*/false);
  const int64_t B = p.size(0), D = p.size(1);
  const auto opts = p.options().dtype(at::kFloat);

  at::Tensor loss_rows = at::empty({B}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor grad = compute_grad ? at::empty({B, D}, opts) : at::empty({0}, opts);
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(launch_cosine_distill(rows_of(p), B, D, teacher_rows_of(teachers), static_cast<float>(scale),
                                       loss_rows.data_ptr<float>(), compute_grad ? grad.data_ptr<float>() : nullptr,
                                       stream));
  C10_CUDA_CHECK(launch_scaled_sum(loss_rows.const_data_ptr<float>(), B, scale, nullptr, loss.data_ptr<float>(), stream));
  return {loss, grad};
}

}  // namespace
}  // namespace cuda
}  // namespace fastcbd

TORCH_LIBRARY_IMPL(fastcbd_C, CUDA, m) { m.impl("cosine_distill_fwd", &fastcbd::cuda::cosine_distill_fwd_cuda); }
