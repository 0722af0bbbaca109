// CUDA binding of cbd_loss_fwd (schema in csrc/cpu/cbd_loss.cpp, contract in docs/ops.md).
#include <torch/library.h>

#include <limits>

#include "cuda/cosine_classifier_cuda.h"

namespace fastcbd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbd_loss_fwd_cuda(
    const at::Tensor& p_in, const at::Tensor& w_in, const at::Tensor& target_in, at::TensorList teachers_in,
    double alpha, double beta, double sigma, bool compute_grad, int64_t chunk_size) {
  check_cuda_input(p_in, "p");
  check_cuda_input(w_in, "w");
  check_classifier_shapes(p_in, w_in, target_in, chunk_size);
  TORCH_CHECK(target_in.device() == p_in.device() && w_in.device() == p_in.device(),
              "p, w and target must be on the same device");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = rows_dense(p_in), w = rows_dense(w_in), target = target_int64(target_in);
  const std::vector<at::Tensor> teachers = check_teachers(teachers_in, p, /*allow_double=*/false);
  const TeacherRows trows = teacher_rows_of(teachers);
  const int64_t B = p.size(0), C = w.size(0), D = p.size(1);
  const auto f32 = p.options().dtype(at::kFloat);
  const cudaStream_t stream = current_stream();

  at::Tensor rp = at::empty({B}, f32), p_unclamped = at::empty({B}, p.options().dtype(at::kByte));
  at::Tensor ce_rows = at::empty({B}, f32), s_rows = at::empty({B}, f32), dist_rows = at::empty({B}, f32);
  at::Tensor grad_p = compute_grad ? at::empty({B, D}, f32) : at::empty({0}, f32);
  at::Tensor grad_w = compute_grad ? at::empty({C, D}, f32) : at::empty({0}, f32);
  C10_CUDA_CHECK(launch_row_norms(rows_of(p), B, D, rp.data_ptr<float>(), p_unclamped.data_ptr<uint8_t>(), stream));

  // ce is the mean over the n_valid rows whose target is not kCbdIgnoreIndex; 1/n_valid stays on the
  // device (no host sync; inf when no row counts, hence the reference's NaN). The classifier's scale makes
  // its gradient that of (1 - alpha) * ce. An out-of-range target gives a NaN loss (the kernels cannot raise).
  const at::Tensor ce_scale = at::ne(target, kCbdIgnoreIndex).sum().to(at::kFloat).reciprocal();
  const at::Tensor grad_scale = ce_scale * (1.0 - alpha);
  const ClassifierArgs args{static_cast<float>(sigma), kCbdIgnoreIndex, 0.f, grad_scale.const_data_ptr<float>(),
                            compute_grad};
  const float sd = static_cast<float>(alpha * beta / static_cast<double>(B));
  auto finish = [&](int64_t r0, int64_t n) {
    C10_CUDA_CHECK(launch_cbd_finish(rows_of(p), r0, n, D, trows, rp.const_data_ptr<float>() + r0,
                                     p_unclamped.const_data_ptr<uint8_t>() + r0,
                                     compute_grad ? s_rows.const_data_ptr<float>() + r0 : nullptr, sd,
                                     dist_rows.data_ptr<float>() + r0,
                                     compute_grad ? grad_p.data_ptr<float>() + r0 * D : nullptr, stream));
  };
  cosine_classifier_cuda(p, w, target, args, chunk_size, rp, ce_rows, s_rows, grad_p, grad_w, finish);

  at::Tensor ce = at::empty({}, f32), distill = at::empty({}, f32);
  C10_CUDA_CHECK(launch_scaled_sum(ce_rows.const_data_ptr<float>(), B, 1.0, ce_scale.const_data_ptr<float>(),
                                   ce.data_ptr<float>(), stream));
  C10_CUDA_CHECK(launch_scaled_sum(dist_rows.const_data_ptr<float>(), B, 1.0 / static_cast<double>(B), nullptr,
                                   distill.data_ptr<float>(), stream));
  at::Tensor loss = at::add(ce * (1.0 - alpha), distill, alpha * beta);
  return {loss, ce, distill, grad_p, grad_w};
}

}  // namespace
}  // namespace cuda
}  // namespace fastcbd

TORCH_LIBRARY_IMPL(fastcbd_C, CUDA, m) { m.impl("cbd_loss_fwd", &fastcbd::cuda::cbd_loss_fwd_cuda); }
