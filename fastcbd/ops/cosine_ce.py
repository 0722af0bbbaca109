"""Cross-entropy of a cosine classifier, fused and chunked over rows: loss and gradients in one pass.

    z_bc = sigma * <p_b, w_c> / (||p_b|| ||w_c||)                   (no bias; W never normalised in memory)
    l_b  = (1 - ls) (lse_b - z_{b,y_b}) + ls (lse_b - mean_c z_bc),     0 where y_b == ignore_index
    loss = sum_b l_b / n_valid  ("mean")  or  sum_b l_b  ("sum")

p (B, D), w (C, D) fp32/bf16/fp16, target (B,) int64. The rows go through in chunks: per chunk one GEMM
gives the raw dots S = p_c W^T (chunk, C) fp32, a Triton kernel (or its PyTorch twin) turns them into dL/dS
(softmax, lse, label smoothing, ignore_index and the normalisation scales), and two GEMMs accumulate the
unprojected gradients G W and G^T p_c. A last pass removes from each row of those its component along
p_b (resp. w_c): the gradient of the normalisation, `dL/dx = (g - <g, x^> x^) / ||x||`, applied once.
So the (B, C) logits never exist whole, and neither does a normalised copy of W.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastcbd.ops import _common
from fastcbd.ops._common import EPS, triton

__all__ = ["cosine_ce", "cosine_ce_ref"]

_REDUCTIONS = ("mean", "sum", "none")


def cosine_ce_ref(p: torch.Tensor, w: torch.Tensor, target: torch.Tensor, *, sigma: float = 20.0,
                  ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """The definition: plain PyTorch in the promoted dtype of p and w, autograd for the backward."""
    dtype = torch.promote_types(p.dtype, w.dtype)
    z = sigma * F.linear(F.normalize(p.to(dtype), dim=1, eps=EPS), F.normalize(w.to(dtype), dim=1, eps=EPS))
    return F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _cosine_ce_rows_kernel(
        s_ptr, stride_s,  # (R, C) fp32: raw dots in, dL/dS out (in place)
        target_ptr, inv_np_ptr, inv_nw_ptr,  # (R,) int64, (R,) fp32, (C,) fp32
        loss_ptr,  # (R,) fp32: unscaled per-row loss, 0 for ignored rows
        scale_ptr,  # 0-dim fp32 on the device: the gradient's scale (1/n_valid or 1, x a loss weight)
        C, sigma, ignore_index, label_smoothing,
        BLOCK_C: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        y = tl.load(target_ptr + row)
        valid = y != ignore_index
        y_safe = tl.where(valid, y, 0)
        a = sigma * tl.load(inv_np_ptr + row)  # z = s * a * inv_nw
        cols = tl.arange(0, BLOCK_C)
        # pass 1: online max / sum-exp (the lse), and the sum of z for label smoothing
        m = -float("inf")
        l = 0.0
        z_sum = 0.0
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            mask = offs < C
            s = tl.load(s_row + offs, mask=mask, other=0.0)
            nw = tl.load(inv_nw_ptr + offs, mask=mask, other=0.0)
            z = tl.where(mask, s * a * nw, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = m + tl.log(l)
        z_y = tl.load(s_row + y_safe) * a * tl.load(inv_nw_ptr + y_safe)
        loss = (1.0 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - z_sum / C)
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        if COMPUTE_GRAD:
            # dL/dz = scale (softmax - (1-ls) onehot - ls/C); dL/dS = dL/dz * a * inv_nw
            coef = tl.where(valid, tl.load(scale_ptr), 0.0)
            for start in range(0, C, BLOCK_C):
                offs = start + cols
                mask = offs < C
                s = tl.load(s_row + offs, mask=mask, other=0.0)
                nw = tl.load(inv_nw_ptr + offs, mask=mask, other=0.0)
                z = s * a * nw
                dz = tl.exp(z - lse) - label_smoothing / C - tl.where(offs == y, 1.0 - label_smoothing, 0.0)
                tl.store(s_row + offs, coef * dz * a * nw, mask=mask)

    @triton.jit
    def _project_rows_kernel(
        g_ptr, stride_g,  # (N, D) fp32 gradient w.r.t. the normalised direction, scaled; updated in place
        x_ptr, stride_x,  # (N, D) the rows that were normalised (any float dtype)
        inv_n_ptr,  # (N,) fp32: 1 / max(||x||, eps)
        N, D, inv_eps,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # g <- g - <g, x> x / ||x||^2 per row: the normalisation's gradient, once for every term that
        # fed the row. A clamped norm has no gradient (F.normalize's autograd), so no projection there.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        cols = tl.arange(0, BLOCK_D)
        g_rows = g_ptr + rows[:, None] * stride_g
        x_rows = x_ptr + rows[:, None] * stride_x
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            offs = start + cols
            m = rmask[:, None] & (offs < D)[None, :]
            g = tl.load(g_rows + offs[None, :], mask=m, other=0.0)
            x = tl.load(x_rows + offs[None, :], mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(g * x, axis=1)
        inv_n = tl.load(inv_n_ptr + rows, mask=rmask, other=0.0)
        c = tl.where(inv_n < inv_eps, dot * inv_n * inv_n, 0.0)
        for start in range(0, D, BLOCK_D):
            offs = start + cols
            m = rmask[:, None] & (offs < D)[None, :]
            g = tl.load(g_rows + offs[None, :], mask=m, other=0.0)
            x = tl.load(x_rows + offs[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(g_rows + offs[None, :], g - c[:, None] * x, mask=m)


def _project_rows_triton(g: torch.Tensor, x: torch.Tensor, inv_n: torch.Tensor) -> None:
    """In place: g_r -= <g_r, x_r> x_r / ||x_r||^2; g fp32 (N, D), x (N, D), inv_n (N,) fp32."""
    N, D = x.shape
    if N == 0 or D == 0:
        return
    block_d = _common.next_pow2(D, hi=256)
    block_r = max(1, min(64, 4096 // block_d))
    _common.launch(_project_rows_kernel, (triton.cdiv(N, block_r),), g, g.stride(0), x, x.stride(0), inv_n,
                   N, D, 1.0 / EPS, BLOCK_R=block_r, BLOCK_D=block_d)


def _rows_triton(s, target, inv_np, inv_nw, loss_rows, scale, sigma, ignore_index, ls, compute_grad):
    R, C = s.shape
    block_c = _common.next_pow2(C, hi=2048)
    _common.launch(
        _cosine_ce_rows_kernel, (R,),
        s, s.stride(0), target, inv_np, inv_nw, loss_rows, scale,
        C, float(sigma), int(ignore_index), float(ls),
        BLOCK_C=block_c, COMPUTE_GRAD=compute_grad, num_warps=8 if block_c >= 2048 else 4,
    )


def _rows_torch(s, target, inv_np, inv_nw, loss_rows, scale, sigma, ignore_index, ls, compute_grad):
    """What _cosine_ce_rows_kernel does, in PyTorch: s (R, C) raw dots in, dL/dS out."""
    C = s.shape[1]
    a = sigma * inv_np
    z = s * a[:, None] * inv_nw[None, :]
    lse = torch.logsumexp(z, dim=1)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))[:, None]
    loss = (1.0 - ls) * (lse - z.gather(1, y)[:, 0]) + ls * (lse - z.mean(dim=1))
    loss_rows.copy_(torch.where(valid, loss, torch.zeros_like(loss)))
    if compute_grad:
        dz = torch.softmax(z, dim=1).sub_(ls / C)
        dz.scatter_add_(1, y, torch.full_like(z[:, :1], ls - 1.0))
        coef = torch.where(valid, scale, torch.zeros_like(scale)) * a
        s.copy_(dz.mul_(coef[:, None]).mul_(inv_nw[None, :]))


def auto_chunk(B: int, C: int, D: int) -> int:
    """Rows per chunk: the chunk's fp32 logits no larger than the (B, D) input (Liger's rule)."""
    return max(1, math.ceil(B / max(1, math.ceil(C / max(D, 1)))))


def _fused_fwd(p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size, use_triton,
               *, grad_weight: float = 1.0, grad_p=None):
    """The chunked algorithm of the module docstring; the row and projection steps in Triton or PyTorch.

    Returns (loss, grad_p, grad_w), the gradients fp32 and of grad_weight * loss. grad_p: an fp32 (B, D)
    buffer already holding other un-projected terms of dL/dp / ||p|| (cbd_loss's distillation term); the
    CE's are added to it and the normalisation's projection is applied once to the sum.
    """
    p, w, target = _common.rowmajor(p), _common.rowmajor(w), target.contiguous()
    (B, D), C = p.shape, w.shape[0]
    dev = p.device
    # 0-dim device tensor, so "mean" needs no host sync; 1/0 = inf gives PyTorch's NaN loss, 0 gradient
    scale = 1.0 / (target != ignore_index).sum().float() if mean else torch.ones((), device=dev)
    w32 = w.float()  # the GEMMs run in fp32 (no copy when w is fp32, the autocast case)
    inv_nw, inv_np = _common.inv_norms(w), _common.inv_norms(p)
    rows = _rows_triton if use_triton else _rows_torch
    project = _project_rows_triton if use_triton else _common.project_rows_torch
    loss_rows = torch.empty(B, device=dev, dtype=torch.float32)
    accumulate = grad_p is not None
    if not accumulate:
        grad_p = torch.empty((B, D) if compute_grad else (0,), device=dev, dtype=torch.float32)
    grad_scale = scale * grad_weight
    # empty, not zeros: the first chunk's GEMM writes it (a zero fill is a full extra pass over (C, D))
    grad_w = torch.empty((C, D) if compute_grad else (0,), device=dev, dtype=torch.float32)
    if compute_grad and B == 0:
        grad_w.zero_()
    chunk = min(B, chunk_size if chunk_size > 0 else auto_chunk(B, C, D))
    s_buf = torch.empty((chunk, C), device=dev, dtype=torch.float32) if B else None
    for r0 in range(0, B, chunk):
        r1 = min(B, r0 + chunk)
        pc = p[r0:r1].float()
        s = s_buf[: r1 - r0]
        torch.mm(pc, w32.t(), out=s)
        rows(s, target[r0:r1], inv_np[r0:r1], inv_nw, loss_rows[r0:r1], grad_scale, sigma, ignore_index,
             label_smoothing, compute_grad)
        if compute_grad:
            if accumulate:
                grad_p[r0:r1].addmm_(s, w32)
            else:
                torch.mm(s, w32, out=grad_p[r0:r1])
            if r0 == 0:
                torch.mm(s.t(), pc, out=grad_w)
            else:
                grad_w.addmm_(s.t(), pc)
    if compute_grad:
        project(grad_p, p, inv_np)
        project(grad_w, w, inv_nw)
    return loss_rows.sum() * scale, grad_p, grad_w


def _forward(p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size):
    args = (p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size)

    def compiled():
        # the compiled op takes the scale as a number: one host sync for "mean" on a GPU
        n_valid = int((target != ignore_index).sum()) if mean else 1
        scale = 1.0 / n_valid if n_valid else float("nan")
        return torch.ops.fastcbd_C.cosine_ce_fwd(p, w, target, sigma, ignore_index, label_smoothing, scale,
                                                 compute_grad, chunk_size)

    return _common.dispatch("cosine_ce", p.device, triton_fwd=lambda: _fused_fwd(*args, use_triton=True),
                            compiled_fwd=compiled, torch_fwd=lambda: _fused_fwd(*args, use_triton=False))


@torch.library.custom_op("fastcbd::cosine_ce", mutates_args=())
def _cosine_ce_op(p: torch.Tensor, w: torch.Tensor, target: torch.Tensor, sigma: float, ignore_index: int,
                  label_smoothing: float, mean: bool, compute_grad: bool,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size)


@_cosine_ce_op.register_fake
def _(p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size):
    f32 = torch.float32
    return (p.new_empty((), dtype=f32), p.new_empty(p.shape if compute_grad else (0,), dtype=f32),
            w.new_empty(w.shape if compute_grad else (0,), dtype=f32))


def _setup_context(ctx, inputs, output):
    p, w = inputs[0], inputs[1]
    ctx.dtypes = (p.dtype, w.dtype)
    ctx.computed = inputs[7]
    ctx.save_for_backward(output[1], output[2])  # gradients from forward; no inputs saved
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled (B, D) / (C, D) "gradients" of grad_p / grad_w


def _backward(ctx, grad_loss, _gp, _gw):
    if not ctx.computed:
        raise RuntimeError("cosine_ce: backward without a gradient computed in forward")
    grad_p, grad_w = ctx.saved_tensors
    gp = _common.scale_saved_grad(grad_p, grad_loss, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    gw = _common.scale_saved_grad(grad_w, grad_loss, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return gp, gw, None, None, None, None, None, None, None


torch.library.register_autograd("fastcbd::cosine_ce", _backward, setup_context=_setup_context)


def cosine_ce(p: torch.Tensor, w: torch.Tensor, target: torch.Tensor, *, sigma: float = 20.0,
              ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
              chunk_size: int = 0) -> torch.Tensor:
    """Cross-entropy of the cosine classifier sigma * cos(p_b, w_c), fused; 0-dim fp32 loss.

    p (B, D) features (un-normalised), w (C, D) class weights (un-normalised), target (B,) int64.
    reduction "mean" (over non-ignored rows) or "sum" run fused; "none" returns the (B,) fp32 per-row
    losses through the plain reference (the fused op saves one combined gradient, which a per-row
    upstream gradient cannot use). chunk_size: rows per chunk, 0 = automatic.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(_REDUCTIONS)}")
    if reduction == "none":
        with _common.no_autocast(p.device):
            return cosine_ce_ref(p.float(), w.float(), target, sigma=sigma, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, reduction="none")
    loss, _, _ = _cosine_ce_op(p, w, target, float(sigma), int(ignore_index), float(label_smoothing),
                               reduction == "mean", _common.needs_grad(p, w), int(chunk_size))
    return loss
