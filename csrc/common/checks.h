// Input checks and dtype helpers shared by the CPU and CUDA bindings (.cpp only, never .cu).
//
// The kernels check only what would make them read or write out of bounds; shapes that are merely
// inconsistent with the maths are the Python layer's business (fastcbd/functional.py).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastcbd {

// Norms are clamped below as in F.normalize.
constexpr double kNormEps = 1e-12;

// cbd_loss_fwd leaves rows with this target out of its CE term (F.cross_entropy's default ignore_index).
constexpr int64_t kCbdIgnoreIndex = -100;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_float_input(const at::Tensor& t, const char* name, bool allow_double = true) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(is_supported_float(t.scalar_type()) && (allow_double || t.scalar_type() != at::kDouble),
              name, " must be float32, bfloat16 or float16", allow_double ? " (or float64)" : "",
              ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// Rows of a 2-d tensor are read through (pointer, row stride); only the last dimension must be dense.
inline at::Tensor rows_dense(const at::Tensor& t) {
  if (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1)) return t;
  return t.contiguous();
}

// The shape checks shared by the cosine-classifier ops (cosine_ce, cbd_loss) on every device: p (B, D),
// w (C >= 1, D), target int64 or int32 (B,), chunk_size >= 0. Dtypes and devices are the caller's to check.
// Target values are not checked (that would need a device sync on a GPU): the row kernels mask a target
// outside [0, C) that is not ignore_index, giving its row a NaN loss and NaN gradients (docs/ops.md).
inline void check_classifier_shapes(const at::Tensor& p, const at::Tensor& w, const at::Tensor& target,
                                    int64_t chunk_size) {
  check_dim(p, 2, "p");
  check_dim(w, 2, "w");
  TORCH_CHECK(p.size(1) == w.size(1), "p is (B, ", p.size(1), ") but w is (C, ", w.size(1), ")");
  TORCH_CHECK(w.size(0) > 0, "w must have at least one class");
  TORCH_CHECK((target.scalar_type() == at::kLong || target.scalar_type() == at::kInt) && target.dim() == 1 &&
                  target.size(0) == p.size(0),
              "target must be an int64 or int32 tensor of shape (B,) = (", p.size(0), "), got ", target.scalar_type(),
              " ", target.sizes());
  TORCH_CHECK(chunk_size >= 0, "chunk_size must be >= 0 (0 = automatic)");
}

// The kernels read int64 targets: an int32 target is converted here (B elements, on its device, no sync).
inline at::Tensor target_int64(const at::Tensor& target) { return target.to(at::kLong).contiguous(); }

// cosine_ce_fwd's scale: a one-element float tensor (0-dim), so that 1/n_valid can stay on the device.
inline void check_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.defined() && scale.numel() == 1 && at::isFloatingType(scale.scalar_type()),
              "scale must be a one-element float tensor, got ", scale.defined() ? scale.sizes() : at::IntArrayRef{});
}

inline int64_t row_stride(const at::Tensor& t) { return t.stride(0); }

// Teachers K x (B, D_k): same device, same row count, sum D_k == D (or, with same_width, each D_k ==
// D: teacher logits against student logits). Returns them row-dense.
inline std::vector<at::Tensor> check_teachers(at::TensorList teachers, const at::Tensor& p, bool allow_double = true,
                                              bool same_width = false) {
  TORCH_CHECK(!teachers.empty(), "teachers must hold at least one tensor");
  const int64_t B = p.size(0), D = p.size(1);
  int64_t total = 0;
  std::vector<at::Tensor> out;
  out.reserve(teachers.size());
  for (size_t k = 0; k < teachers.size(); ++k) {
    const at::Tensor& t = teachers[k];
    check_float_input(t, "teachers[k]", allow_double);
    check_dim(t, 2, "teachers[k]");
    TORCH_CHECK(t.device() == p.device(), "teachers[", k, "] is on ", t.device(), ", p on ", p.device());
    TORCH_CHECK(t.size(0) == B, "teachers[", k, "] has ", t.size(0), " rows, the student has ", B);
    TORCH_CHECK(!same_width || t.size(1) == D, "teachers[", k, "] has ", t.size(1), " columns, the student has ", D);
    total += t.size(1);
    out.push_back(rows_dense(t));
  }
  TORCH_CHECK(same_width || total == D, "sum of teacher widths (", total, ") must equal p.size(1) (", D, ")");
  return out;
}

// Accumulation (and output) dtype: float64 stays float64 (CPU only, for gradcheck); the rest is fp32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Chunk of rows for the chunked cosine classifier: the fp32 (chunk, C) logits stay under ~16 MiB.
inline int64_t auto_chunk_rows(int64_t B, int64_t C, int64_t requested) {
  if (requested > 0) return std::min<int64_t>(requested, std::max<int64_t>(B, 1));
  const int64_t budget = int64_t(4) << 20;  // elements
  int64_t rows = std::max<int64_t>(1, budget / std::max<int64_t>(C, 1));
  if (rows >= 16) rows -= rows % 16;
  return std::min<int64_t>(rows, std::max<int64_t>(B, 1));
}

}  // namespace fastcbd
