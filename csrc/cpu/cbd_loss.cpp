// cbd_loss_fwd on the CPU (contract: docs/ops.md): the Class-Balanced Distillation loss
//   loss = (1 - alpha) * ce + alpha * beta * distill
// with ce the mean cosine-classifier cross-entropy and distill = mean_b (1 - <f_b, t_b>), both on the
// same f = p / ||p||. The chunked classifier (cpu/cosine_classifier.h) leaves rp_b dL_ce/df_b in
// grad_p; the finishing pass over each chunk's rows then reads p_b and the teacher rows once, adds the
// distillation gradient and pushes the summed dL/df_b through the normalisation of p in one go:
//   grad_p_b = rp_b (g_b - <g_b, f_b> f_b),  g_b = dL_ce/df_b - alpha beta / B * t_b.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/checks.h"
#include "cpu/cosine_classifier.h"
#include "cpu/distill_row.h"
#include "cpu/row_ops.h"

namespace fastcbd {
namespace cpu {
namespace {

// Returns (ce, distill): ce the mean over the n_valid rows whose target is not kCbdIgnoreIndex (0/0 = NaN
// when there are none, as F.cross_entropy), distill the mean over all B rows.
template <typename acc_t>
std::pair<double, double> cbd_impl(const at::Tensor& p, const at::Tensor& w, const at::Tensor& target,
                                   const std::vector<at::Tensor>& teachers, double alpha, double beta, int64_t n_valid,
                                   const ClassifierParams& P, at::Tensor& grad_p, at::Tensor& grad_w) {
  const int64_t B = p.size(0), D = p.size(1);
  std::vector<acc_t> rp(B), ce_rows(B), s_rows(B), dist_rows(B);
  std::vector<uint8_t> p_unclamped(B);
  row_norms<acc_t>(p, rp.data(), p_unclamped.data());
  const acc_t sd = static_cast<acc_t>(alpha * beta / static_cast<double>(B));  // dL/df_b = -sd t_b

  auto finish = [&](int64_t r0, int64_t n) {
    acc_t* G = P.compute_grad ? grad_p.data_ptr<acc_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    at::parallel_for(r0, r0 + n, grain, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> pbuf(D);
      DistillScratch<acc_t> scratch(D, teachers.size());
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t* pr = row_as<acc_t>(row_ptr(p, b), p.scalar_type(), D, pbuf.data());
        const acc_t c = rp[b] * distill_row_dot(pr, teachers, b, scratch);  // <f_b, t_b>
        dist_rows[b] = acc_t(1) - c;
        if (G == nullptr) continue;
        const acc_t gf = s_rows[b] - sd * c;  // <g_b, f_b>
        const acc_t cp = p_unclamped[b] ? -rp[b] * rp[b] * gf : acc_t(0);
        distill_row_axpy(G + b * D, -sd * rp[b], pr, cp, teachers, scratch, /*accumulate=*/true);
      }
    });
  };
  cosine_classifier<acc_t>(p, w, target, P, rp.data(), ce_rows.data(), s_rows.data(), grad_p, grad_w, finish);
  return {ordered_sum(ce_rows.data(), B) / static_cast<double>(n_valid),
          ordered_sum(dist_rows.data(), B) / static_cast<double>(B)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbd_loss_fwd_cpu(
    const at::Tensor& p_in, const at::Tensor& w_in, const at::Tensor& target_in, at::TensorList teachers_in,
    double alpha, double beta, double sigma, bool compute_grad, int64_t chunk_size) {
  check_float_input(p_in, "p");
  check_float_input(w_in, "w");
  check_classifier_shapes(p_in, w_in, target_in, chunk_size);
  const at::Tensor p = rows_dense(p_in), w = rows_dense(w_in), target = target_int64(target_in);
  const std::vector<at::Tensor> teachers = check_teachers(teachers_in, p);
  const int64_t B = p.size(0), C = w.size(0), D = p.size(1);
  int64_t n_valid = 0;  // rows with a CE term (on the host: the target is a CPU tensor)
  const int64_t* y = target.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) n_valid += y[b] != kCbdIgnoreIndex;
  const bool dbl = p.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble;
  const auto opts = p.options().dtype(dbl ? at::kDouble : at::kFloat);
  at::Tensor grad_p = compute_grad ? at::empty({B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_w = compute_grad ? at::empty({C, D}, opts) : at::empty({0}, opts);
  // The classifier's scale makes its gradient that of (1 - alpha) * ce, ce the mean over the n_valid rows
  // whose target is not kCbdIgnoreIndex (B = 0 or n_valid = 0: NaN terms, as the reference's empty means).
  const ClassifierParams P{sigma, kCbdIgnoreIndex, 0.0, (1.0 - alpha) / static_cast<double>(n_valid), compute_grad,
                           chunk_size};
  const auto [ce, distill] = dbl ? cbd_impl<double>(p, w, target, teachers, alpha, beta, n_valid, P, grad_p, grad_w)
                                 : cbd_impl<float>(p, w, target, teachers, alpha, beta, n_valid, P, grad_p, grad_w);
  const double loss = (1.0 - alpha) * ce + alpha * beta * distill;
  return {at::full({}, loss, opts), at::full({}, ce, opts), at::full({}, distill, opts), grad_p, grad_w};
}

}  // namespace
}  // namespace cpu
}  // namespace fastcbd

TORCH_LIBRARY_FRAGMENT(fastcbd_C, m) {
  m.def(
      "cbd_loss_fwd(Tensor p, Tensor w, Tensor target, Tensor[] teachers, float alpha, float beta, float sigma, "
      "bool compute_grad, int chunk_size) -> (Tensor loss, Tensor ce, Tensor distill, Tensor grad_p, Tensor grad_w)");
}

TORCH_LIBRARY_IMPL(fastcbd_C, CPU, m) { m.impl("cbd_loss_fwd", &fastcbd::cpu::cbd_loss_fwd_cpu); }
