// cosine_ce_fwd on the CPU (contract: docs/ops.md): cross-entropy of the cosine classifier
// z_bc = sigma <p_b, w_c> / (||p_b|| ||w_c||) with label smoothing and ignore_index, loss and both
// gradients in one chunked pass (csrc/cpu/cosine_classifier.h holds the machinery).
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "cpu/cosine_classifier.h"
#include "cpu/row_ops.h"

namespace fastcbd {
namespace cpu {
namespace {

template <typename acc_t>
double cosine_ce_impl(const at::Tensor& p, const at::Tensor& w, const at::Tensor& target, const ClassifierParams& P,
                      at::Tensor& grad_p, at::Tensor& grad_w) {
  const int64_t B = p.size(0), D = p.size(1);
  std::vector<acc_t> rp(B), loss_rows(B), s_rows(B);
  std::vector<uint8_t> p_unclamped(B);
  row_norms<acc_t>(p, rp.data(), p_unclamped.data());

  // Finish the normalisation backward of p: grad_p_b = rp_b (g_b - <g_b, f_b> f_b), of which the
  // GEMM left rp_b g_b; subtract rp_b^2 s_b p_b (nothing when the norm clamp is active).
  auto finish = [&](int64_t r0, int64_t n) {
    if (!P.compute_grad) return;
    acc_t* G = grad_p.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    at::parallel_for(r0, r0 + n, grain, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> buf(D);
      for (int64_t b = b0; b < b1; ++b) {
        if (!p_unclamped[b] || s_rows[b] == acc_t(0)) continue;
        const acc_t* pb = row_as<acc_t>(row_ptr(p, b), p.scalar_type(), D, buf.data());
        const acc_t k = rp[b] * rp[b] * s_rows[b];
        acc_t* g = G + b * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) g[i] -= k * pb[i];
      }
    });
  };
  cosine_classifier<acc_t>(p, w, target, P, rp.data(), loss_rows.data(), s_rows.data(), grad_p, grad_w, finish);
  return ordered_sum(loss_rows.data(), B);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_ce_fwd_cpu(const at::Tensor& p_in, const at::Tensor& w_in,
                                                                 const at::Tensor& target_in, double sigma,
                                                                 int64_t ignore_index, double label_smoothing,
                                                                 const at::Tensor& scale_t, bool compute_grad,
                                                                 int64_t chunk_size) {
  check_float_input(p_in, "p");
  check_float_input(w_in, "w");
  check_classifier_shapes(p_in, w_in, target_in, chunk_size);
  check_scale(scale_t);
  const double scale = scale_t.item<double>();  // a CPU tensor here: no device sync
  const at::Tensor p = rows_dense(p_in), w = rows_dense(w_in), target = target_int64(target_in);
  const int64_t B = p.size(0), C = w.size(0), D = p.size(1);
  const bool dbl = p.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble;
  const auto opts = p.options().dtype(dbl ? at::kDouble : at::kFloat);
  at::Tensor grad_p = compute_grad ? at::empty({B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_w = compute_grad ? at::empty({C, D}, opts) : at::empty({0}, opts);
  const ClassifierParams P{sigma, ignore_index, label_smoothing, scale, compute_grad, chunk_size};
  const double total = dbl ? cosine_ce_impl<double>(p, w, target, P, grad_p, grad_w)
                           : cosine_ce_impl<float>(p, w, target, P, grad_p, grad_w);
  return {at::full({}, scale * total, opts), grad_p, grad_w};
}

}  // namespace
}  // namespace cpu
}  // namespace fastcbd

TORCH_LIBRARY_FRAGMENT(fastcbd_C, m) {
  m.def(
      "cosine_ce_fwd(Tensor p, Tensor w, Tensor target, float sigma, int ignore_index, float label_smoothing, "
      "Tensor scale, bool compute_grad, int chunk_size) -> (Tensor loss, Tensor grad_p, Tensor grad_w)");
}

TORCH_LIBRARY_IMPL(fastcbd_C, CPU, m) { m.impl("cosine_ce_fwd", &fastcbd::cpu::cosine_ce_fwd_cpu); }
