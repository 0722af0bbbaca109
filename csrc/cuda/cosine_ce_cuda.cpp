// CUDA binding of cosine_ce_fwd (schema in csrc/cpu/cosine_ce.cpp, contract in docs/ops.md).
#include <torch/library.h>

#include "cuda/cosine_classifier_cuda.h"

namespace fastcbd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_ce_fwd_cuda(const at::Tensor& p_in, const at::Tensor& w_in,
                                                                  const at::Tensor& target_in, double sigma,
                                                                  int64_t ignore_index, double label_smoothing,
                                                                  const at::Tensor& scale_in, bool compute_grad,
                                                                  int64_t chunk_size) {
  check_cuda_input(p_in, "p");
  check_cuda_input(w_in, "w");
  check_classifier_shapes(p_in, w_in, target_in, chunk_size);
  check_scale(scale_in);
  TORCH_CHECK(target_in.device() == p_in.device() && w_in.device() == p_in.device(),
              "p, w and target must be on the same device");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = rows_dense(p_in), w = rows_dense(w_in), target = target_int64(target_in);
  // The scale is read on the device (no host sync; a CPU scale is copied over, which a CUDA graph cannot
  // capture: pass it on p's device).
  const at::Tensor scale = scale_in.reshape({}).to(p.device(), at::kFloat).contiguous();
  const int64_t B = p.size(0), C = w.size(0), D = p.size(1);
  const auto f32 = p.options().dtype(at::kFloat);
  const cudaStream_t stream = current_stream();

  at::Tensor rp = at::empty({B}, f32), p_unclamped = at::empty({B}, p.options().dtype(at::kByte));
  at::Tensor loss_rows = at::empty({B}, f32), s_rows = at::empty({B}, f32), loss = at::empty({}, f32);
  at::Tensor grad_p = compute_grad ? at::empty({B, D}, f32) : at::empty({0}, f32);
  at::Tensor grad_w = compute_grad ? at::empty({C, D}, f32) : at::empty({0}, f32);
  C10_CUDA_CHECK(launch_row_norms(rows_of(p), B, D, rp.data_ptr<float>(), p_unclamped.data_ptr<uint8_t>(), stream));

  const ClassifierArgs args{static_cast<float>(sigma), ignore_index, static_cast<float>(label_smoothing),
                            scale.const_data_ptr<float>(), compute_grad};
  auto finish = [&](int64_t r0, int64_t n) {
    if (!compute_grad) return;
    C10_CUDA_CHECK(launch_normalize_backward_rows(grad_p.data_ptr<float>() + r0 * D, rows_from(p, r0), n, D,
                                                  rp.const_data_ptr<float>() + r0,
                                                  p_unclamped.const_data_ptr<uint8_t>() + r0,
                                                  s_rows.const_data_ptr<float>() + r0, stream));
  };
  cosine_classifier_cuda(p, w, target, args, chunk_size, rp, loss_rows, s_rows, grad_p, grad_w, finish);
  C10_CUDA_CHECK(launch_scaled_sum(loss_rows.const_data_ptr<float>(), B, 1.0, scale.const_data_ptr<float>(),
                                   loss.data_ptr<float>(), stream));
  return {loss, grad_p, grad_w};
}

}  // namespace
}  // namespace cuda
}  // namespace fastcbd

TORCH_LIBRARY_IMPL(fastcbd_C, CUDA, m) { m.impl("cosine_ce_fwd", &fastcbd::cuda::cosine_ce_fwd_cuda); }
