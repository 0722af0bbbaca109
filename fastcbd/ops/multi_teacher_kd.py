"""Logit distillation from K teachers (Hinton KD with a temperature), loss and gradient in one pass.

    p_b   = softmax(z_b / tau),  q_kb = softmax(t_kb / tau)
    loss  = (1/B) sum_b sum_k w_k tau^2 KL(q_kb || p_b)
    dL/dz = (1/B) tau sum_k w_k (p_b - q_kb)

z (B, C) student logits fp32/bf16/fp16; teacher_logits K x (B, C), any of those dtypes, read in place
(never stacked), no gradient; weights (K,) default 1/K each (the loss scale does not grow with K).
A teacher logit of -inf is a class of probability 0: it adds 0 to the KL (xlogy's convention, as
F.kl_div with a probability target), never NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcbd.ops import _common
from fastcbd.ops._common import triton

__all__ = ["multi_teacher_kd", "multi_teacher_kd_ref"]


def multi_teacher_kd_ref(z: torch.Tensor, teacher_logits: list[torch.Tensor], *, tau: float = 4.0,
                         weights=None) -> torch.Tensor:
    """The definition: plain PyTorch in z's dtype, autograd for the backward.

    The teacher distribution is passed to F.kl_div as probabilities, whose xlogy makes a class of
    probability 0 (a -inf teacher logit) add 0 rather than 0 * inf = NaN.
    """
    K = len(teacher_logits)
    weights = [1.0 / K] * K if weights is None else weights
    log_p = F.log_softmax(z / tau, dim=1)
    loss = z.new_zeros(())
    for k, t in enumerate(teacher_logits):
        q = F.softmax(t.to(z.dtype) / tau, dim=1)
        loss = loss + weights[k] * tau**2 * F.kl_div(log_p, q, reduction="batchmean")
    return loss


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_lse(row_ptr, C, inv_tau, cols, BLOCK_C: tl.constexpr):
        """log-sum-exp of one row / tau, in one online sweep over blocks of classes.

        -inf entries (probability 0) are allowed, also a whole block of them before any finite one: the
        running max is then still -inf, and exp(-inf - -inf) would be NaN, so such a block shifts by 0.
        """
        m = -float("inf")
        s = 0.0
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < C, other=-float("inf")).to(tl.float32) * inv_tau
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        return m + tl.log(s)

    @triton.jit
    def _multi_teacher_kd_kernel(
        z_ptr, stride_z,
        t_ptrs, t_strides,  # tuples of K teacher pointers and row strides
        w_ptr,  # (K,) fp32 teacher weights
        grad_ptr, stride_g,
        loss_ptr,  # (B,) fp32: tau^2 sum_k w_k KL_k per row
        C, inv_tau, grad_scale,  # grad_scale = scale * tau
        K: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        z_row = z_ptr + row * stride_z
        # pass 1: the log-sum-exp of z/tau and of every t_k/tau, one online sweep per tensor
        lse_z = _row_lse(z_row, C, inv_tau, cols, BLOCK_C)
        t_rows = ()
        lses = ()
        ws = ()
        w_sum = 0.0
        for k in tl.static_range(K):
            t_row = t_ptrs[k] + row * t_strides[k]
            t_rows = t_rows + (t_row,)
            lses = lses + (_row_lse(t_row, C, inv_tau, cols, BLOCK_C),)
            w_k = tl.load(w_ptr + k)
            ws = ws + (w_k,)
            w_sum += w_k
        # pass 2: KL terms and the gradient, all teachers at once per block of classes
        kl = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            mask = offs < C
            log_p = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_z
            q_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k in tl.static_range(K):
                log_q = tl.load(t_rows[k] + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau - lses[k]
                q = tl.exp(log_q)
                # q = 0 (a -inf teacher logit) adds 0, as xlogy: not 0 * (-inf) = NaN
                kl += ws[k] * q * tl.where(mask & (q > 0.0), log_q - log_p, 0.0)
                q_sum += ws[k] * q
            if COMPUTE_GRAD:
                g = grad_scale * (w_sum * tl.exp(log_p) - q_sum)
                tl.store(grad_ptr + row * stride_g + offs, g, mask=mask)
        tl.store(loss_ptr + row, tl.sum(kl, axis=0) / (inv_tau * inv_tau))


def _triton_fwd(z, teachers, weights, tau: float, scale: float, compute_grad: bool):
    z = _common.rowmajor(z)
    teachers = [_common.rowmajor(t) for t in teachers]
    # the kernel reads weights[k] at w_ptr + k as fp32: a strided or other-dtype (K,) tensor is copied
    weights = weights.to(device=z.device, dtype=torch.float32).contiguous()
    B, C = z.shape
    loss_rows = torch.empty(B, device=z.device, dtype=torch.float32)
    grad = torch.empty((B, C) if compute_grad else (0,), device=z.device, dtype=torch.float32)
    block_c = _common.next_pow2(C, hi=2048)
    if B > 0:
        _common.launch(
            _multi_teacher_kd_kernel, (B,),
            z, z.stride(0), tuple(teachers), tuple(int(t.stride(0)) for t in teachers),
            weights, grad if compute_grad else loss_rows, grad.stride(0) if compute_grad else 0, loss_rows,
            C, 1.0 / tau, scale * tau,
            K=len(teachers), BLOCK_C=block_c, COMPUTE_GRAD=compute_grad,
            num_warps=8 if block_c >= 2048 else 4,
        )
    return loss_rows.sum() * scale, grad


def _torch_fwd(z, teachers, weights, tau: float, scale: float, compute_grad: bool):
    """The kernel's formulas in PyTorch, fp32."""
    log_p = F.log_softmax(z.float() / tau, dim=1)
    kl = z.new_zeros((), dtype=torch.float32)
    q_sum = torch.zeros_like(log_p) if compute_grad else None
    for k, t in enumerate(teachers):
        log_q = F.log_softmax(t.float() / tau, dim=1)
        q = log_q.exp()
        # xlogy's convention: a class of teacher probability 0 (a -inf logit) adds 0, not 0 * inf = NaN
        kl = kl + weights[k] * torch.sum(torch.where(q > 0, q * (log_q - log_p), 0.0))
        if compute_grad:
            q_sum.add_(q * weights[k])
    loss = kl * (scale * tau * tau)
    if not compute_grad:
        return loss, z.new_empty(0, dtype=torch.float32)
    grad = log_p.exp_().mul_(weights.sum()).sub_(q_sum).mul_(scale * tau)
    return loss, grad


def _forward(z, teachers, weights, tau: float, compute_grad: bool):
    scale = 1.0 / z.shape[0] if z.shape[0] else float("nan")
    return _common.dispatch(
        "multi_teacher_kd", z.device,
        triton_fwd=lambda: _triton_fwd(z, teachers, weights, tau, scale, compute_grad),
        compiled_fwd=lambda: torch.ops.fastcbd_C.multi_teacher_kd_fwd(z, list(teachers), weights, tau, scale,
                                                                      compute_grad),
        torch_fwd=lambda: _torch_fwd(z, teachers, weights, tau, scale, compute_grad))


def _impl(z: torch.Tensor, teacher_logits: list[torch.Tensor], weights: torch.Tensor, tau: float,
          compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = _forward(z, teacher_logits, weights, tau, compute_grad)
    return loss, grad


_multi_teacher_kd_op = torch.library.custom_op("fastcbd::multi_teacher_kd", _impl, mutates_args=())


@_multi_teacher_kd_op.register_fake
def _(z, teacher_logits, weights, tau, compute_grad):
    f32 = torch.float32
    return z.new_empty((), dtype=f32), z.new_empty(z.shape if compute_grad else (0,), dtype=f32)


def _setup_context(ctx, inputs, output):
    ctx.z_dtype = inputs[0].dtype
    ctx.num_teachers = len(inputs[1])
    ctx.computed = inputs[4]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled (B, C) "gradient" of grad_z


def _backward(ctx, grad_loss, _grad_grad):
    if not ctx.computed:
        raise RuntimeError("multi_teacher_kd: backward without a gradient computed in forward")
    (grad_z,) = ctx.saved_tensors
    gz = _common.scale_saved_grad(grad_z, grad_loss, ctx.z_dtype)
    return gz, [None] * ctx.num_teachers, None, None, None


torch.library.register_autograd("fastcbd::multi_teacher_kd", _backward, setup_context=_setup_context)
_Eager = _common.eager_autograd("MultiTeacherKD", _impl, _setup_context, _backward)


def multi_teacher_kd(z: torch.Tensor, teacher_logits: list[torch.Tensor], *, tau: float = 4.0,
                     weights=None) -> torch.Tensor:
    """(1/B) sum_b sum_k w_k tau^2 KL(softmax(t_kb/tau) || softmax(z_b/tau)) as a 0-dim fp32 tensor.

    z (B, C) differentiable; teacher_logits K x (B, C), no gradient; weights: K numbers (a sequence or a
    (K,) tensor, no gradient), default 1/K each.
    """
    teachers = list(teacher_logits)
    K = len(teachers)
    if weights is None:
        w = torch.full((K,), 1.0 / K, dtype=torch.float32, device=z.device)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32, device=z.device).detach().reshape(K)
    loss, _ = _common.run_op(_multi_teacher_kd_op, _Eager, z, teachers, w, float(tau), _common.needs_grad(z))
    return loss
