// The chunked cosine classifier shared by cosine_ce_fwd and cbd_loss_fwd on the CPU.
//
//   z_bc = sigma * <p_b, w_c> * rp_b * rw_c          (rp_b = 1/max(||p_b||, eps), rw_c likewise)
//
// Per chunk of rows: S = P_chunk W^T (at::mm, the only (chunk, C) buffer, reused across chunks), one
// fused row pass turns S into the losses and, in place, into
//   E'_bc = dz_bc * sigma * rw_c * rp_b,   dz = scale * (softmax(z) - (1-ls) onehot(y) - ls/C)
// and s_b = <dL/df_b, f_b> = sum_c dz_bc z_bc (what the normalisation backward of p needs), then
//   grad_p[chunk] = E' W        (= rp_b dL/df_b: the normalisation is finished by the caller's hook)
//   grad_w       += E'^T P      (= H, with H_c = sigma rw_c sum_b dz_bc f_b)
// and at the end grad_w_c = H_c - rw_c^2 <H_c, w_c> w_c. W / ||W|| is never formed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "cpu/row_ops.h"

namespace fastcbd {
namespace cpu {

struct ClassifierParams {
  double sigma;
  int64_t ignore_index;
  double label_smoothing;
  double scale;  // multiplies every row loss (and so every gradient)
  bool compute_grad;
  int64_t chunk_size;  // 0 = automatic
};

// rinv[r] = 1 / max(||x_r||, eps); unclamped[r] = ||x_r|| >= eps (the projection term of the
// normalisation backward applies only then, exactly as autograd through F.normalize).
template <typename acc_t>
void row_norms(const at::Tensor& x, acc_t* rinv, uint8_t* unclamped) {
  const int64_t R = x.size(0), D = x.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(D);
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t n = std::sqrt(sumsq(row_as<acc_t>(row_ptr(x, r), x.scalar_type(), D, buf.data()), D));
      rinv[r] = acc_t(1) / std::max(n, static_cast<acc_t>(kNormEps));
      unclamped[r] = n >= static_cast<acc_t>(kNormEps);
    }
  });
}

// One row of the fused pass, in place on the raw dots z (C,) of a row that is not ignored: returns
// the unscaled loss l_b and, when computing gradients, writes E' over z and s_b into *s.
template <typename acc_t>
FASTCBD_INLINE acc_t classifier_row_impl(acc_t* z, int64_t C, const acc_t* rw, int64_t yb, acc_t a, acc_t ls,
                                         acc_t scale, bool compute_grad, acc_t* s) {
  const acc_t invC = acc_t(1) / static_cast<acc_t>(C);
  acc_t m = -std::numeric_limits<acc_t>::infinity(), zsum = 0;
#pragma omp simd reduction(max : m) reduction(+ : zsum)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = a * rw[c] * z[c];
    z[c] = v;
    m = vmax(m, v);
    zsum += v;
  }
  const acc_t zy = z[yb];
  acc_t Z = 0, A = 0;  // sum_c e_c, sum_c e_c z_c with e_c = exp(z_c - m)
#pragma omp simd reduction(+ : Z, A)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t e = exp_acc(z[c] - m);
    A += e * z[c];
    Z += e;
    z[c] = e;
  }
  const acc_t lse = m + std::log(Z);
  const acc_t zmean = zsum * invC;
  if (compute_grad) {
    const acc_t invZ = acc_t(1) / Z;
    *s = scale * (A * invZ - (1 - ls) * zy - ls * zmean);
    const acc_t k = scale * a;  // E'_c = scale * (e_c / Z - ls / C) * sigma rp_b * rw_c
    const acc_t off = ls * invC;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) z[c] = k * rw[c] * (z[c] * invZ - off);
    z[yb] -= k * rw[yb] * (1 - ls);
  }
  return (1 - ls) * (lse - zy) + ls * (lse - zmean);
}

// static: this header is compiled into several translation units, each with its own clones.
FASTCBD_SIMD_CLONES static float classifier_row(float* z, int64_t C, const float* rw, int64_t yb, float a, float ls,
                                                float scale, bool compute_grad, float* s) {
  return classifier_row_impl(z, C, rw, yb, a, ls, scale, compute_grad, s);
}
static inline double classifier_row(double* z, int64_t C, const double* rw, int64_t yb, double a, double ls,
                                    double scale, bool compute_grad, double* s) {
  return classifier_row_impl(z, C, rw, yb, a, ls, scale, compute_grad, s);
}

// The fused row pass over a chunk of raw dots S (n, C), in place. Writes loss_rows (unscaled row
// losses l_b) and, when computing gradients, E' into S and s_b into s_rows. A row whose target is
// ignore_index gets 0 everywhere; one whose target is outside [0, C) (and not ignore_index) is masked,
// never read out of bounds: NaN loss, NaN E' row and s_b (so NaN gradients), as on CUDA and in Triton.
template <typename acc_t>
void classifier_rows(acc_t* S, int64_t n, int64_t C, const acc_t* rp, const acc_t* rw, const int64_t* y,
                     const ClassifierParams& P, acc_t* loss_rows, acc_t* s_rows) {
  const acc_t sigma = static_cast<acc_t>(P.sigma), ls = static_cast<acc_t>(P.label_smoothing);
  const acc_t scale = static_cast<acc_t>(P.scale);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* z = S + b * C;
      if (y[b] == P.ignore_index || y[b] < 0 || y[b] >= C) {
        const acc_t v = y[b] == P.ignore_index ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
        loss_rows[b] = v;
        if (P.compute_grad) {
          s_rows[b] = v;
          std::fill(z, z + C, v);
        }
        continue;
      }
      loss_rows[b] = classifier_row(z, C, rw, y[b], sigma * rp[b], ls, scale, P.compute_grad,
                                    P.compute_grad ? s_rows + b : nullptr);
    }
  });
}

// grad_w_c = H_c - rw_c^2 <H_c, w_c> w_c, one class row at a time (H_c and w_c read once, in cache).
template <typename acc_t>
void project_grad_w(at::Tensor& grad_w, const at::Tensor& w, const acc_t* rw, const uint8_t* unclamped) {
  const int64_t C = w.size(0), D = w.size(1);
  acc_t* H = grad_w.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> buf(D);
    for (int64_t c = c0; c < c1; ++c) {
      if (!unclamped[c]) continue;
      const acc_t* wc = row_as<acc_t>(row_ptr(w, c), w.scalar_type(), D, buf.data());
      acc_t* h = H + c * D;
      const acc_t k = rw[c] * rw[c] * dot(h, wc, D);
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) h[i] -= k * wc[i];
    }
  });
}

// Calls fn(c0, cb, Wb) over blocks of class rows of w converted to acc_t (a few MiB each), so a
// bf16/fp16 W feeds fp32 GEMMs without a whole converted copy of W.
template <typename acc_t, typename Fn>
void for_w_blocks(const at::Tensor& w, Fn&& fn) {
  const int64_t C = w.size(0), D = w.size(1);
  const int64_t cb = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(D, 1));
  for (int64_t c0 = 0; c0 < C; c0 += cb) {
    const int64_t n = std::min(cb, C - c0);
    fn(c0, n, w.narrow(0, c0, n).to(c10::CppTypeToScalarType<acc_t>::value));
  }
}

// Runs the classifier over all rows. `finish(r0, n)` is called once a chunk's loss_rows, s_rows and
// (when computing gradients) grad_p rows = E' W are final, while those p rows are still warm.
// All GEMMs run in acc_t (fp32, or fp64 for float64 inputs): p is converted a chunk at a time and a W
// of another dtype a block of classes at a time, so the logits are never rounded to bf16/fp16.
template <typename acc_t, typename Finish>
void cosine_classifier(const at::Tensor& p, const at::Tensor& w, const at::Tensor& target, const ClassifierParams& P,
                       const acc_t* rp, acc_t* loss_rows, acc_t* s_rows, at::Tensor& grad_p, at::Tensor& grad_w,
                       Finish&& finish) {
  const int64_t B = p.size(0), C = w.size(0);
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const bool w_is_acc = w.scalar_type() == acc_type;
  std::vector<acc_t> rw(C);
  std::vector<uint8_t> w_unclamped(C);
  row_norms<acc_t>(w, rw.data(), w_unclamped.data());

  const int64_t chunk = auto_chunk_rows(B, C, P.chunk_size);
  at::Tensor S_buf = at::empty({std::min(chunk, B), C}, p.options().dtype(acc_type));
  const int64_t* y = target.const_data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    at::Tensor S = S_buf.narrow(0, 0, n);
    const at::Tensor Pc = p.narrow(0, r0, n).to(acc_type);  // a no-op for acc_t inputs
    if (w_is_acc) {
      at::mm_out(S, Pc, w.t());
    } else {
      for_w_blocks<acc_t>(w, [&](int64_t c0, int64_t cb, const at::Tensor& Wb) {
        S.narrow(1, c0, cb).copy_(at::mm(Pc, Wb.t()));
      });
    }
    classifier_rows<acc_t>(S.data_ptr<acc_t>(), n, C, rp + r0, rw.data(), y + r0, P, loss_rows + r0, s_rows + r0);
    if (P.compute_grad) {
      at::Tensor G = grad_p.narrow(0, r0, n);
      if (w_is_acc) {
        at::mm_out(G, S, w);
      } else {
        for_w_blocks<acc_t>(w, [&](int64_t c0, int64_t cb, const at::Tensor& Wb) {
          if (c0 == 0) {
            at::mm_out(G, S.narrow(1, c0, cb), Wb);
          } else {
            G.addmm_(S.narrow(1, c0, cb), Wb);
          }
        });
      }
      if (r0 == 0) {
        at::mm_out(grad_w, S.t(), Pc);
      } else {
        grad_w.addmm_(S.t(), Pc);
      }
    }
    finish(r0, n);
  }
  if (P.compute_grad) {
    if (B == 0) grad_w.zero_();
    project_grad_w<acc_t>(grad_w, w, rw.data(), w_unclamped.data());
  }
}

}  // namespace cpu
}  // namespace fastcbd
