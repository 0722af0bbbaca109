"""Cosine feature distillation from K teachers, loss and gradient in one pass.

    t_b  = concat_k(t_kb / ||t_kb||) / sqrt(K)        (teachers read in place, never concatenated)
    f_b  = p_b / ||p_b||
    loss = mean_b (1 - <f_b, t_b>)
    dL/dp_b = -(1/B) (t_b - <f_b, t_b> f_b) / ||p_b||

p (B, D) fp32/bf16/fp16 with D = sum_k D_k; teachers K x (B, D_k), any of those dtypes, no gradient.
Returns a 0-dim fp32 loss. Norms are clamped below at 1e-12 as in F.normalize (and, as in its autograd,
a row clamped that way gets no projection term in its gradient).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastcbd.ops import _common
from fastcbd.ops._common import EPS, triton

__all__ = ["cosine_distill", "cosine_distill_ref"]


def cosine_distill_ref(p: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
    """The definition: plain PyTorch in the inputs' dtype (promoted), autograd for the backward."""
    t = torch.cat([F.normalize(tk, dim=1, eps=EPS) for tk in teachers], dim=1) / math.sqrt(len(teachers))
    f = F.normalize(p, dim=1, eps=EPS)
    return (1.0 - (f * t.to(f.dtype)).sum(dim=1)).mean()


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _cosine_distill_kernel(
        p_ptr, stride_p,
        t_ptrs, t_strides, t_dims,  # tuples of K: teacher pointers, row strides, widths
        grad_ptr, stride_g,
        loss_ptr,  # (B,) fp32, one partial loss per row
        scale, grad_scale, inv_sqrt_k,  # loss = scale * sum_b (1 - cos_b); grad of grad_scale * sum_b ...
        K: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_GRAD: tl.constexpr, PROJECT: tl.constexpr,
        EPS_: tl.constexpr,
    ):
        # One program per row. Pass 1 reads p and the teachers once for the norms and dots; pass 2 (the
        # gradient) reads the same row again, which a row-sized working set keeps in L2.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        p_row = p_ptr + row * stride_p
        pp = tl.zeros([BLOCK_D], dtype=tl.float32)
        # The teachers' row pointers and widths, once (static_range unrolls the loops over K).
        t_rows = ()
        dims = ()
        for k in tl.static_range(K):
            t_rows = t_rows + (t_ptrs[k] + row * t_strides[k],)
            dims = dims + (t_dims[k],)
        dot = 0.0
        inv_nts = ()
        col0 = 0
        for k in tl.static_range(K):
            t_row = t_rows[k]
            d_k = dims[k]
            tt = tl.zeros([BLOCK_D], dtype=tl.float32)
            pt = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, d_k, BLOCK_D):
                offs = start + cols
                m = offs < d_k
                x = tl.load(p_row + col0 + offs, mask=m, other=0.0).to(tl.float32)
                t = tl.load(t_row + offs, mask=m, other=0.0).to(tl.float32)
                pp += x * x
                tt += t * t
                pt += x * t
            inv_nt = 1.0 / tl.maximum(tl.sqrt(tl.sum(tt, axis=0)), EPS_)
            dot += tl.sum(pt, axis=0) * inv_nt
            inv_nts = inv_nts + (inv_nt,)
            col0 += d_k
        norm_p = tl.sqrt(tl.sum(pp, axis=0))
        inv_np = 1.0 / tl.maximum(norm_p, EPS_)
        cos = dot * inv_sqrt_k * inv_np  # <f_b, t_b>
        tl.store(loss_ptr + row, scale * (1.0 - cos))
        if COMPUTE_GRAD:
            # grad = a_k * t_k + b * p per teacher segment; b = 0 when the norm was clamped (F.normalize's
            # autograd: the clamp has no gradient) or when the caller projects later (PROJECT=False).
            if PROJECT:
                b = tl.where(norm_p > EPS_, grad_scale * cos * inv_np * inv_np, 0.0)
            else:
                b = 0.0
            g_row = grad_ptr + row * stride_g
            col0 = 0
            for k in tl.static_range(K):
                t_row = t_rows[k]
                d_k = dims[k]
                a = -grad_scale * inv_np * inv_nts[k] * inv_sqrt_k
                for start in range(0, d_k, BLOCK_D):
                    offs = start + cols
                    m = offs < d_k
                    x = tl.load(p_row + col0 + offs, mask=m, other=0.0).to(tl.float32)
                    t = tl.load(t_row + offs, mask=m, other=0.0).to(tl.float32)
                    tl.store(g_row + col0 + offs, a * t + b * x, mask=m)
                col0 += d_k


def _triton_fwd(p, teachers, scale: float, compute_grad: bool, grad_scale: float | None = None,
                grad_out=None, project: bool = True):
    """Launch the kernel: (loss, grad_p fp32).

    grad_scale: the gradient is that of grad_scale * sum_b (1 - cos_b) (default: scale); grad_out: an fp32
    (B, D) buffer to write it into; project=False leaves out the normalisation's projection (cbd_loss
    applies it once to the sum of its terms).
    """
    p = _common.rowmajor(p)
    teachers = [_common.rowmajor(t) for t in teachers]
    B = p.shape[0]
    loss_rows = torch.empty(B, device=p.device, dtype=torch.float32)
    if compute_grad:
        grad = grad_out if grad_out is not None else p.new_empty(p.shape, dtype=torch.float32)
    else:
        grad = loss_rows  # never written; any pointer will do
    dims = tuple(int(t.shape[1]) for t in teachers)
    if B > 0:
        _common.launch(
            _cosine_distill_kernel, (B,),
            p, p.stride(0),
            tuple(teachers), tuple(int(t.stride(0)) for t in teachers), dims,
            grad, grad.stride(0) if compute_grad else 0,
            loss_rows,
            float(scale), float(scale if grad_scale is None else grad_scale), 1.0 / math.sqrt(len(teachers)),
            K=len(teachers), BLOCK_D=_common.next_pow2(max(dims)), COMPUTE_GRAD=compute_grad,
            PROJECT=project, EPS_=EPS,
        )
    # the kernel scales each row; with no rows the scale still applies (1/0: NaN, the mean of nothing)
    loss = loss_rows.sum() if B > 0 else loss_rows.sum() * scale
    return loss, (grad if compute_grad else p.new_empty(0, dtype=torch.float32))


def _torch_fwd(p, teachers, scale: float, compute_grad: bool, grad_scale: float | None = None,
               project: bool = True):
    """The kernel's formulas in PyTorch, fp32; arguments as for _triton_fwd."""
    K = len(teachers)
    p32 = p.float()
    inv_np = _common.inv_norms(p)
    t = torch.cat([tk.float() * (_common.inv_norms(tk) / math.sqrt(K))[:, None] for tk in teachers], dim=1)
    cos = torch.linalg.vecdot(p32, t) * inv_np  # <f_b, t_b>
    loss = scale * (1.0 - cos).sum()
    if not compute_grad:
        return loss, p.new_empty(0, dtype=torch.float32)
    grad_scale = scale if grad_scale is None else grad_scale
    grad = t.mul_((-grad_scale * inv_np)[:, None])  # the un-projected gradient; t is not needed any more
    if project:
        _common.project_rows_torch(grad, p32, inv_np)
    return loss, grad


def _forward(p, teachers, compute_grad: bool):
    """(loss fp32 0-dim, grad_p fp32 (B, D) or empty) on the backend FASTCBD_BACKEND selects."""
    scale = 1.0 / p.shape[0] if p.shape[0] else float("nan")
    return _common.dispatch(
        "cosine_distill", p.device,
        triton_fwd=lambda: _triton_fwd(p, teachers, scale, compute_grad),
        compiled_fwd=lambda: torch.ops.fastcbd_C.cosine_distill_fwd(p, list(teachers), scale, compute_grad),
        torch_fwd=lambda: _torch_fwd(p, teachers, scale, compute_grad))


def _impl(p: torch.Tensor, teachers: list[torch.Tensor], compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = _forward(p, teachers, compute_grad)
    return loss, grad


_cosine_distill_op = torch.library.custom_op("fastcbd::cosine_distill", _impl, mutates_args=())


@_cosine_distill_op.register_fake
def _(p, teachers, compute_grad):
    grad_shape = p.shape if compute_grad else (0,)
    return p.new_empty((), dtype=torch.float32), p.new_empty(grad_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    p, teachers, compute_grad = inputs
    ctx.p_dtype = p.dtype
    ctx.num_teachers = len(teachers)
    ctx.computed = compute_grad
    ctx.save_for_backward(output[1])  # the gradient, computed in forward; teachers are never saved
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled (B, D) "gradient" of grad_p


def _backward(ctx, grad_loss, _grad_grad):
    (grad_p,) = ctx.saved_tensors
    if not ctx.computed:
        raise RuntimeError("cosine_distill: backward without a gradient computed in forward")
    return _common.scale_saved_grad(grad_p, grad_loss, ctx.p_dtype), [None] * ctx.num_teachers, None


torch.library.register_autograd("fastcbd::cosine_distill", _backward, setup_context=_setup_context)
_Eager = _common.eager_autograd("CosineDistill", _impl, _setup_context, _backward)


def cosine_distill(p: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
    """mean_b (1 - <p_b/||p_b||, concat_k(t_kb/||t_kb||)/sqrt(K)>) as a 0-dim fp32 tensor.

    p (B, D) fp32/bf16/fp16, differentiable; teachers K x (B, D_k) with sum_k D_k = D, no gradient
    (inference-mode tensors are fine). Shapes are not checked here (see fastcbd.functional).
    """
    loss, _ = _common.run_op(_cosine_distill_op, _Eager, p, list(teachers), _common.needs_grad(p))
    return loss
