"""Cross-entropy of a cosine classifier, fused and chunked over rows: loss and gradients in one pass.

    z_bc = sigma * <p_b, w_c> / (||p_b|| ||w_c||)                   (no bias; W never normalised in memory)
    l_b  = (1 - ls) (lse_b - z_{b,y_b}) + ls (lse_b - mean_c z_bc),     0 where y_b == ignore_index
    loss = sum_b l_b / n_valid  ("mean")  or  sum_b l_b  ("sum")

p (B, D), w (C, D) fp32/bf16/fp16, target (B,) int64/int32. The rows go through in chunks: per chunk one GEMM
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
        target_ptr, inv_np_ptr, inv_nw_ptr,  # (R,) int64 or int32, (R,) fp32, (C,) fp32
        loss_ptr,  # (R,) fp32: unscaled per-row loss, 0 for ignored rows, NaN for a target outside [0, C)
        scale_ptr,  # 0-dim fp32 on the device: the gradient's scale (1/n_valid or 1, x a loss weight)
        C, sigma, ignore_index, label_smoothing,
        BLOCK_C: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        y = tl.load(target_ptr + row).to(tl.int64)
        ignored = y == ignore_index
        bad = ((y < 0) | (y >= C)) & (y != ignore_index)
        a = sigma * tl.load(inv_np_ptr + row)  # z = s * a * inv_nw
        cols = tl.arange(0, BLOCK_C)
        # pass 1: online max / sum-exp (the lse), the sum of z for label smoothing, and z_y. z_y is picked
        # out here, not loaded after the loop: pass 2 overwrites the row in place, and another warp may
        # already be writing s[y] while this one would still read it (no barrier orders the two).
        # A target outside [0, C) never matches, so nothing is read out of bounds.
        m = -float("inf")
        l = 0.0
        z_sum = 0.0
        z_y = 0.0
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
            z_y += tl.sum(tl.where(mask & (offs == y), z, 0.0), axis=0)
        lse = m + tl.log(l)
        loss = (1.0 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - z_sum / C)
        loss = tl.where(bad, float("nan"), loss)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
        if COMPUTE_GRAD:
            # dL/dz = scale (softmax - (1-ls) onehot - ls/C); dL/dS = dL/dz * a * inv_nw
            coef = tl.where(ignored, 0.0, tl.load(scale_ptr))
            coef = tl.where(bad, float("nan"), coef)
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
    ignored = target == ignore_index
    bad = ((target < 0) | (target >= C)) & ~ignored  # masked like the kernel's: NaN loss and gradient row
    y = torch.where(ignored | bad, torch.zeros_like(target), target).long()[:, None]
    loss = (1.0 - ls) * (lse - z.gather(1, y)[:, 0]) + ls * (lse - z.mean(dim=1))
    loss = loss.masked_fill(bad, float("nan"))
    loss_rows.copy_(torch.where(ignored, torch.zeros_like(loss), loss))
    if compute_grad:
        dz = torch.softmax(z, dim=1).sub_(ls / C)
        dz.scatter_add_(1, y, torch.full_like(z[:, :1], ls - 1.0))
        coef = torch.where(ignored, torch.zeros_like(scale), scale).masked_fill(bad, float("nan")) * a
        s.copy_(dz.mul_(coef[:, None]).mul_(inv_nw[None, :]))


def auto_chunk(B: int, C: int, D: int) -> int:
    """Rows per chunk: the chunk's fp32 logits no larger than the (B, D) input (Liger's rule)."""
    return max(1, math.ceil(B / max(1, math.ceil(C / max(D, 1)))))


# Devices on which bf16 p and w feed the three GEMMs directly (tensor cores, fp32 accumulation and output):
# in fp32 they cannot keep up with torch.compile's bf16 GEMMs. CPU keeps its fp32 GEMMs for now (without
# AMX bf16 GEMMs are no faster; with AMX they measured 3-5x fp32, not yet measured through this op); the
# tests add "cpu" to run the low-precision path without a GPU.
LOW_PRECISION_GEMM_DEVICES: set[str] = {"cuda"}


def gemm_dtype(p: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """Input dtype of the fused path's GEMMs: bfloat16 when p and w are both bf16 on a device listed in
    LOW_PRECISION_GEMM_DEVICES, else float32 (fp32 inputs stay exact; mixed dtypes, autocast's bf16 p with
    an fp32 weight, and fp16 run fp32 GEMMs).

    Precision of the bf16 path: the logits S = p W^T are what fp32 GEMMs of the upcast inputs give
    (bf16 x bf16 products are exact in fp32 and summed in fp32), so the loss does not change. dL/dS is
    rounded to bf16 for the two gradient GEMMs, as autocast and torch.compile do: a relative error of at
    most 2^-9 per element, no more than the rounding of the bf16 gradients returned. fp16 is left out on
    purpose: dL/dS = dL/dz sigma / (||p|| ||w_c||) / B falls below fp16's normal range (6e-5) for most
    classes, and the op runs before a GradScaler's scale reaches it.
    """
    if p.dtype == w.dtype == torch.bfloat16 and p.device.type in LOW_PRECISION_GEMM_DEVICES:
        return torch.bfloat16
    return torch.float32


_OUT_DTYPE_GEMMS: dict[str, tuple[bool, bool]] = {}


def _out_dtype_gemms(device_type: str) -> tuple[bool, bool]:
    """(mm, addmm): whether this torch runs bf16 x bf16 -> fp32 GEMMs (`out_dtype=torch.float32`, the
    fp32 accumulator as addmm's `self` and `out`) on the device. Probed once on 1 x 1 tensors, the value
    checked: the overloads exist on CUDA since torch 2.8 and not on CPU, and the dtype addmm accepts for
    `self` has changed between versions. Not probed during a CUDA graph capture (the check syncs): the
    upcast path serves that call and the next call outside a capture probes."""
    if device_type in _OUT_DTYPE_GEMMS:
        return _OUT_DTYPE_GEMMS[device_type]
    if device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False, False
    one = torch.ones(1, 1, device=device_type, dtype=torch.bfloat16)
    acc = torch.ones(1, 1, device=device_type, dtype=torch.float32)
    try:
        mm_ok = torch.mm(one, one, out_dtype=torch.float32).item() == 1.0
    except (RuntimeError, TypeError, NotImplementedError):
        mm_ok = False
    addmm_ok = False
    if mm_ok:
        try:
            addmm_ok = torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc).item() == 2.0
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    _OUT_DTYPE_GEMMS[device_type] = (mm_ok, addmm_ok)
    return mm_ok, addmm_ok


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False) -> None:
    """out = a @ b, or out += a @ b when accumulate; out (m, n) float32, a (m, k) and b (k, n) fp32 or bf16.

    bf16: fp32 accumulation and output, in one cuBLAS call where torch has the out_dtype GEMMs; elsewhere
    (CPU when the tests force this path, a torch before 2.8) the same numbers from fp32 GEMMs of upcast
    copies.
    """
    if a.dtype != torch.float32:
        mm_ok, addmm_ok = _out_dtype_gemms(a.device.type)
        if mm_ok and not accumulate:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        elif mm_ok and addmm_ok:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        elif mm_ok:
            out.add_(torch.mm(a, b, out_dtype=torch.float32))
        if mm_ok:
            return
        a, b = a.float(), b.float()
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


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
    gd = gemm_dtype(p, w)  # bf16 on CUDA when p and w are bf16, else fp32 (see gemm_dtype)
    wg = w.to(gd)  # no copy when w is already in that dtype (fp32: the autocast case; bf16 on CUDA)
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
    chunk = max(1, min(B, chunk_size if chunk_size > 0 else auto_chunk(B, C, D)))  # >= 1: B = 0 runs no chunk
    s_buf = torch.empty((chunk, C), device=dev, dtype=torch.float32) if B else None
    # dL/dS rounded to the GEMM dtype for the two gradient GEMMs (bf16 path only)
    lp_grad = B and compute_grad and gd != torch.float32
    s_lp_buf = torch.empty((chunk, C), device=dev, dtype=gd) if lp_grad else None
    for r0 in range(0, B, chunk):
        r1 = min(B, r0 + chunk)
        pc = p[r0:r1].to(gd)
        s = s_buf[: r1 - r0]
        _mm_f32(pc, wg.t(), s)
        rows(s, target[r0:r1], inv_np[r0:r1], inv_nw, loss_rows[r0:r1], grad_scale, sigma, ignore_index,
             label_smoothing, compute_grad)
        if compute_grad:
            sg = s if s_lp_buf is None else s_lp_buf[: r1 - r0].copy_(s)
            _mm_f32(sg, wg, grad_p[r0:r1], accumulate=accumulate)
            _mm_f32(sg.t(), pc, grad_w, accumulate=r0 > 0)
    if compute_grad:
        project(grad_p, p, inv_np)
        project(grad_w, w, inv_nw)
    return loss_rows.sum() * scale, grad_p, grad_w


def _forward(p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size):
    args = (p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size)

    def compiled():
        # the scale is a 0-dim tensor on the device (1/n_valid for "mean"): no host sync, so the op can be
        # captured in a CUDA graph; all rows ignored gives 1/0 = inf, hence PyTorch's NaN loss
        dev = p.device
        scale = 1.0 / (target != ignore_index).sum().float() if mean else torch.ones((), device=dev)
        return torch.ops.fastcbd_C.cosine_ce_fwd(p, w, target, sigma, ignore_index, label_smoothing, scale,
                                                 compute_grad, chunk_size)

    return _common.dispatch("cosine_ce", p.device, triton_fwd=lambda: _fused_fwd(*args, use_triton=True),
                            compiled_fwd=compiled, torch_fwd=lambda: _fused_fwd(*args, use_triton=False))


def _impl(p: torch.Tensor, w: torch.Tensor, target: torch.Tensor, sigma: float, ignore_index: int,
          label_smoothing: float, mean: bool, compute_grad: bool,
          chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(p, w, target, sigma, ignore_index, label_smoothing, mean, compute_grad, chunk_size)


_cosine_ce_op = torch.library.custom_op("fastcbd::cosine_ce", _impl, mutates_args=())


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
_Eager = _common.eager_autograd("CosineCE", _impl, _setup_context, _backward)


def cosine_ce(p: torch.Tensor, w: torch.Tensor, target: torch.Tensor, *, sigma: float = 20.0,
              ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
              chunk_size: int = 0) -> torch.Tensor:
    """Cross-entropy of the cosine classifier sigma * cos(p_b, w_c), fused; 0-dim fp32 loss.

    p (B, D) features (un-normalised), w (C, D) class weights (un-normalised), target (B,) int64 or int32
    in [0, C) or ignore_index (else ValueError; see _common.check_target for when that is not checked).
    reduction "mean" (over non-ignored rows) or "sum" run fused; "none" returns the (B,) fp32 per-row
    losses through the plain reference (the fused op saves one combined gradient, which a per-row
    upstream gradient cannot use). chunk_size: rows per chunk, 0 = automatic.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(_REDUCTIONS)}")
    _common.check_target(target, w.shape[0], ignore_index)
    if reduction == "none":
        with _common.no_autocast(p.device):
            return cosine_ce_ref(p.float(), w.float(), target.long(), sigma=sigma, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, reduction="none")
    loss, _, _ = _common.run_op(_cosine_ce_op, _Eager, p, w, target, float(sigma), int(ignore_index),
                                float(label_smoothing), reduction == "mean", _common.needs_grad(p, w),
                                int(chunk_size))
    return loss
