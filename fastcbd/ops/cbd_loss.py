"""The whole CBD student loss, fused: cosine-classifier CE and cosine feature distillation on one f.

    f = p / ||p||,  t = concat_k(t_k / ||t_k||) / sqrt(K)
    ce      = mean_b CE(sigma * <f_b, w_c / ||w_c||>, y_b)
    distill = mean_b (1 - <f_b, t_b>)
    loss    = (1 - alpha) ce + alpha beta distill

Both terms depend on p only through f, so their gradients w.r.t. f are summed (the distillation kernel
writes its term un-projected into the gradient buffer, the CE chunks add theirs) and pushed through the
normalisation of p once. p (B, D), w (C, D) fp32/bf16/fp16, target (B,) int64/int32, teachers K x (B, D_k)
with sum D_k = D. A target equal to -100 (F.cross_entropy's default ignore_index, as in cbd_loss_ref) leaves
its row out of the CE term (averaged over the other rows) but not out of the distillation term.
"""
from __future__ import annotations

import torch

from fastcbd.ops import _common, cosine_ce, cosine_distill

__all__ = ["cbd_loss", "cbd_loss_ref"]

IGNORE_INDEX = -100  # rows with this target have no CE term (F.cross_entropy's default, as in cbd_loss_ref)


def cbd_loss_ref(p: torch.Tensor, w: torch.Tensor, target: torch.Tensor, teachers: list[torch.Tensor], *,
                 alpha: float = 0.4, beta: float = 100.0, sigma: float = 20.0) -> torch.Tensor:
    """The definition: the two reference terms, autograd for the backward."""
    ce = cosine_ce.cosine_ce_ref(p, w, target, sigma=sigma)
    distill = cosine_distill.cosine_distill_ref(p, teachers)
    return (1.0 - alpha) * ce + alpha * beta * distill


def _fused_fwd(p, w, target, teachers, alpha, beta, sigma, compute_grad, chunk_size, use_triton):
    B = p.shape[0]
    scale = 1.0 / B if B else float("nan")
    distill_fwd = cosine_distill._triton_fwd if use_triton else cosine_distill._torch_fwd
    distill, grad_p = distill_fwd(p, teachers, scale, compute_grad, grad_scale=alpha * beta * scale,
                                  project=False)
    ce, grad_p, grad_w = cosine_ce._fused_fwd(
        p, w, target, sigma, IGNORE_INDEX, 0.0, True, compute_grad, chunk_size, use_triton,
        grad_weight=1.0 - alpha, grad_p=grad_p if compute_grad else None,
    )
    loss = (1.0 - alpha) * ce + (alpha * beta) * distill
    return loss, ce, distill, grad_p, grad_w


def _forward(p, w, target, teachers, alpha, beta, sigma, compute_grad, chunk_size):
    args = (p, w, target, teachers, alpha, beta, sigma, compute_grad, chunk_size)
    return _common.dispatch(
        "cbd_loss", p.device, triton_fwd=lambda: _fused_fwd(*args, use_triton=True),
        compiled_fwd=lambda: torch.ops.fastcbd_C.cbd_loss_fwd(p, w, target, list(teachers), alpha, beta, sigma,
                                                              compute_grad, chunk_size),
        torch_fwd=lambda: _fused_fwd(*args, use_triton=False))


_T = torch.Tensor


def _impl(p: _T, w: _T, target: _T, teachers: list[_T], alpha: float, beta: float, sigma: float,
          compute_grad: bool, chunk_size: int) -> tuple[_T, _T, _T, _T, _T]:
    loss, ce, distill, grad_p, grad_w = _forward(p, w, target, teachers, alpha, beta, sigma, compute_grad,
                                                 chunk_size)
    return loss, ce, distill, grad_p, grad_w


_cbd_loss_op = torch.library.custom_op("fastcbd::cbd_loss", _impl, mutates_args=())


@_cbd_loss_op.register_fake
def _(p, w, target, teachers, alpha, beta, sigma, compute_grad, chunk_size):
    f32 = torch.float32
    scalar = p.new_empty((), dtype=f32)
    return (scalar, torch.empty_like(scalar), torch.empty_like(scalar),
            p.new_empty(p.shape if compute_grad else (0,), dtype=f32),
            w.new_empty(w.shape if compute_grad else (0,), dtype=f32))


def _setup_context(ctx, inputs, output):
    p, w, _target, teachers = inputs[:4]
    ctx.dtypes = (p.dtype, w.dtype)
    ctx.num_teachers = len(teachers)
    ctx.computed = inputs[7]
    ctx.save_for_backward(output[3], output[4])
    # ce and distill are reported values; only loss carries the saved gradient
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])
    # The other outputs get no gradient: without this autograd would hand backward zero-filled (B, D) and
    # (C, D) tensors for grad_p and grad_w (a 266 MB fill per step at iNat18 size).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _g_ce, _g_distill, _g_grad_p, _g_grad_w):
    if not ctx.computed:
        raise RuntimeError("cbd_loss: backward without a gradient computed in forward")
    grad_p, grad_w = ctx.saved_tensors
    gp = _common.scale_saved_grad(grad_p, grad_loss, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    gw = _common.scale_saved_grad(grad_w, grad_loss, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return gp, gw, None, [None] * ctx.num_teachers, None, None, None, None, None


torch.library.register_autograd("fastcbd::cbd_loss", _backward, setup_context=_setup_context)
_Eager = _common.eager_autograd("CBDLoss", _impl, _setup_context, _backward)


def cbd_loss(p: torch.Tensor, w: torch.Tensor, target: torch.Tensor, teachers: list[torch.Tensor], *,
             alpha: float = 0.4, beta: float = 100.0, sigma: float = 20.0, chunk_size: int = 0,
             return_parts: bool = False):
    """(1 - alpha) CE(sigma cos(p, w), y) + alpha beta mean(1 - <f, t>) as a 0-dim fp32 tensor.

    p (B, D) student projection (after its ReLU, not normalised), w (C, D) classifier weight (not
    normalised), target (B,) int64/int32 in [0, C), or -100 to leave the row out of the CE term (ValueError
    otherwise), teachers K x (B, D_k) raw pooled features (no gradient).
    return_parts=True returns (loss, ce, distill): the two terms come detached, for logging.
    chunk_size: rows per CE chunk, 0 = automatic.
    """
    _common.check_target(target, w.shape[0], IGNORE_INDEX)
    loss, ce, distill, _, _ = _common.run_op(_cbd_loss_op, _Eager, p, w, target, list(teachers), float(alpha),
                                             float(beta), float(sigma), _common.needs_grad(p, w), int(chunk_size))
    return (loss, ce, distill) if return_parts else loss
