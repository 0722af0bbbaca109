// The chunked cosine classifier on the GPU, shared by the cosine_ce_fwd and cbd_loss_fwd bindings:
// cuBLAS GEMMs (at::mm) and the kernels of cosine_ce.cu around them. Same algorithm as the CPU's
// csrc/cpu/cosine_classifier.h: S = P W^T per chunk, one row pass to losses / E' / s_b, then
// grad_p[chunk] = E' W, grad_w += E'^T P, and grad_w's normalisation backward at the end.
//
// Precision: the logits GEMM takes a bf16/fp16 W as it is (p's chunk cast to W's dtype, fp32 output).
// The two gradient GEMMs take E' in fp32: cast to fp16, most of a wide row's entries (softmax
// probabilities of ~1e-8 at C = 8142, times 1/B) would flush to zero and grad_p would be off by percents.
// So grad_p = E' W runs in fp32 against W converted a block of classes at a time (fp32 blocks of at most
// kWBlockElems, never a whole fp32 copy of W).
#pragma once

#include <ATen/ATen.h>

#include "cuda/cuda_utils.h"

namespace fastcbd {
namespace cuda {

// Rows of t starting at row r0.
inline Rows rows_from(const at::Tensor& t, int64_t r0) {
  Rows r = rows_of(t);
  r.ptr = static_cast<const char*>(r.ptr) + r0 * t.stride(0) * t.element_size();
  return r;
}

// Elements of one fp32 block of W converted for the grad_p GEMM (32 MiB).
constexpr int64_t kWBlockElems = int64_t(8) << 20;

// G = S W in fp32 for a bf16/fp16 W: sum over blocks of classes of S[:, block] @ float(W[block]).
inline void mm_fp32_by_w_blocks(at::Tensor& G, const at::Tensor& S, const at::Tensor& w) {
  const int64_t C = w.size(0), D = w.size(1);
  const int64_t cb = std::max<int64_t>(1, kWBlockElems / std::max<int64_t>(D, 1));
  for (int64_t c0 = 0; c0 < C; c0 += cb) {
    const int64_t n = std::min(cb, C - c0);
    const at::Tensor Wb = w.narrow(0, c0, n).to(at::kFloat);
    if (c0 == 0) {
      at::mm_out(G, S.narrow(1, c0, n), Wb);
    } else {
      G.addmm_(S.narrow(1, c0, n), Wb);
    }
  }
}

// `finish(r0, n)` runs once a chunk's loss_rows, s_rows and grad_p rows (= E' W) are written.
// rp (B,) and p_unclamped are precomputed by the caller (launch_row_norms on p).
template <typename Finish>
void cosine_classifier_cuda(const at::Tensor& p, const at::Tensor& w, const at::Tensor& target, ClassifierArgs args,
                            int64_t chunk_size, const at::Tensor& rp, at::Tensor& loss_rows, at::Tensor& s_rows,
                            at::Tensor& grad_p, at::Tensor& grad_w, Finish&& finish) {
  const int64_t B = p.size(0), C = w.size(0), D = p.size(1);
  const cudaStream_t stream = current_stream();
  const auto f32 = p.options().dtype(at::kFloat);
  at::Tensor rw = at::empty({C}, f32);
  at::Tensor w_unclamped = at::empty({C}, p.options().dtype(at::kByte));
  C10_CUDA_CHECK(launch_row_norms(rows_of(w), C, D, rw.data_ptr<float>(), w_unclamped.data_ptr<uint8_t>(), stream));

  const at::ScalarType gemm_t = w.scalar_type();
  const bool low = gemm_t != at::kFloat;  // bf16/fp16 W: the logits GEMM in its dtype with fp32 output
  const int64_t chunk = auto_chunk_rows(B, C, chunk_size);
  at::Tensor S_buf = at::empty({std::min(chunk, B), C}, f32);
  const at::Tensor wT = w.t();
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    at::Tensor S = S_buf.narrow(0, 0, n);
    const at::Tensor Pc = p.narrow(0, r0, n);
    if (low) {
      at::mm_out(S, Pc.to(gemm_t), wT, at::kFloat);
    } else {
      at::mm_out(S, Pc.to(at::kFloat), wT);
    }
    C10_CUDA_CHECK(launch_classifier_rows(S.data_ptr<float>(), n, C, rp.const_data_ptr<float>() + r0,
                                          rw.const_data_ptr<float>(), target.const_data_ptr<int64_t>() + r0, args,
                                          loss_rows.data_ptr<float>() + r0,
                                          args.compute_grad ? s_rows.data_ptr<float>() + r0 : nullptr, stream));
    if (args.compute_grad) {
      at::Tensor G = grad_p.narrow(0, r0, n);
      if (low) {
        mm_fp32_by_w_blocks(G, S, w);  // E' stays fp32 (see the top of this file)
      } else {
        at::mm_out(G, S, w);
      }
      const at::Tensor Pf = Pc.to(at::kFloat);
      if (r0 == 0) {
        at::mm_out(grad_w, S.t(), Pf);
      } else {
        grad_w.addmm_(S.t(), Pf);
      }
    }
    finish(r0, n);
  }
  if (args.compute_grad) {
    if (B == 0) grad_w.zero_();
    C10_CUDA_CHECK(launch_project_rows(grad_w.data_ptr<float>(), rows_of(w), C, D, rw.const_data_ptr<float>(),
                                       w_unclamped.const_data_ptr<uint8_t>(), stream));
  }
}

}  // namespace cuda
}  // namespace fastcbd
