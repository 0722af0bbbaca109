"""torch.ops.fastcbd_C.cbd_loss_fwd against a float64 PyTorch reference (contract: docs/ops.md)."""
import math

import pytest
import torch
import torch.nn.functional as F
from csrc_testing import assert_close, low_precision_tolerance, max_abs_err, needs_ext

pytestmark = needs_ext

DIMS = {1: (37,), 2: (37, 64), 4: (37, 64, 5, 11)}


def op(p, w, target, teachers, alpha=0.4, beta=100.0, sigma=20.0, compute_grad=True, chunk=0):
    return torch.ops.fastcbd_C.cbd_loss_fwd(p, w, target, teachers, alpha, beta, sigma, compute_grad, chunk)


def reference(p, w, target, teachers, alpha, beta, sigma):
    """(loss, ce, distill) of the CBD student loss (DESIGN.md 1.1), computed in p's dtype."""
    f = F.normalize(p, dim=1)
    z = sigma * (f @ F.normalize(w.to(p.dtype), dim=1).t())
    ce = F.cross_entropy(z, target)
    t = torch.cat([F.normalize(x.to(p.dtype), dim=1) for x in teachers], dim=1) / math.sqrt(len(teachers))
    distill = (1 - (f * t).sum(dim=1)).mean()
    return (1 - alpha) * ce + alpha * beta * distill, ce, distill


def reference_with_grad(p, w, target, teachers, alpha=0.4, beta=100.0, sigma=20.0):
    p = p.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss, ce, distill = reference(p, w, target, teachers, alpha, beta, sigma)
    gp, gw = torch.autograd.grad(loss, (p, w))
    return loss.detach(), ce.detach(), distill.detach(), gp, gw


def make(gen, B, C, dims, dtype=torch.float32, w_dtype=None, teacher_dtypes=None):
    D = sum(dims)
    p = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(C, D, generator=gen, dtype=torch.float64).to(w_dtype or dtype)
    target = torch.randint(0, C, (B,), generator=gen)
    teacher_dtypes = teacher_dtypes or [dtype] * len(dims)
    teachers = [torch.randn(B, d, generator=gen, dtype=torch.float64).to(td) for d, td in zip(dims, teacher_dtypes)]
    return p, w, target, teachers


NAMES = ["loss", "ce", "distill", "grad_p", "grad_w"]


def check(p, w, target, teachers, *, atol, rtol, what, chunk=0, **kw):
    ours = op(p, w, target, teachers, chunk=chunk, **kw)
    exact = reference_with_grad(p.double(), w.double(), target.long(), [t.double() for t in teachers], **kw)
    for name, o, e in zip(NAMES, ours, exact):
        assert o.shape == e.shape, f"{what} {name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        assert_close(o, e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, what=f"{what} {name}")
    return ours


@pytest.mark.parametrize("B", [1, 7, 129])
@pytest.mark.parametrize("C", [3, 1000])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(gen, B, C, K, dtype):
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    p, w, target, teachers = make(gen, B, C, DIMS[K], dtype)
    ours = check(p, w, target, teachers, what=f"B={B} C={C} K={K} {dtype}", **tol)
    check(p, w, target, teachers, alpha=0.7, beta=3.0, sigma=16.0, what=f"B={B} C={C} K={K} {dtype} a=.7", **tol)
    assert all(o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for o in ours)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked(gen, chunk):
    p, w, target, teachers = make(gen, 129, 37, (37, 64, 5))
    check(p, w, target, teachers, chunk=chunk, atol=2e-6, rtol=1e-5, what=f"chunk={chunk}")


def test_inaturalist_sized_classifier(gen):
    p, w, target, teachers = make(gen, 5, 8142, (12, 9))
    check(p, w, target, teachers, chunk=2, atol=2e-6, rtol=1e-5, what="C=8142")


def test_alpha_extremes_match_the_separate_ops(gen):
    """alpha = 0 is the plain mean cosine CE, alpha = 1 the pure distillation term."""
    p, w, target, teachers = make(gen, 9, 20, (7, 6))
    loss, ce, distill, gp, gw = op(p, w, target, teachers, alpha=0.0)
    ce_loss, ce_gp, ce_gw = torch.ops.fastcbd_C.cosine_ce_fwd(p, w, target, 20.0, -100, 0.0,
                                                              torch.tensor(1 / 9, dtype=torch.float64), True, 0)
    assert_close(loss, ce_loss, atol=1e-6, rtol=1e-6, what="alpha=0 loss vs cosine_ce_fwd")
    assert_close(gp, ce_gp, atol=1e-7, rtol=1e-5, what="alpha=0 grad_p vs cosine_ce_fwd")
    assert_close(gw, ce_gw, atol=1e-7, rtol=1e-5, what="alpha=0 grad_w vs cosine_ce_fwd")
    loss, ce, distill, gp, gw = op(p, w, target, teachers, alpha=1.0, beta=2.0)
    d_loss, d_gp = torch.ops.fastcbd_C.cosine_distill_fwd(p, teachers, 2.0 / 9, True)
    assert_close(loss, d_loss, atol=1e-6, rtol=1e-6, what="alpha=1 loss vs cosine_distill_fwd")
    assert_close(gp, d_gp, atol=1e-7, rtol=1e-5, what="alpha=1 grad_p vs cosine_distill_fwd")
    assert not gw.any(), "alpha=1 leaves no gradient for w"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,C,dims", [(7, 1000, (37, 64, 5)), (129, 3, (37, 64)), (1, 1000, (300,))])
def test_low_precision_within_twice_torch_error(gen, dtype, B, C, dims):
    p, w, target, teachers = make(gen, B, C, dims, dtype)
    exact = reference_with_grad(p.double(), w.double(), target, [t.double() for t in teachers])
    theirs = reference_with_grad(p, w, target, teachers)  # PyTorch computing in `dtype`
    ours = op(p, w, target, teachers)
    for name, o, t, e in zip(NAMES, ours, theirs, exact):
        assert o.dtype == torch.float32
        allowed = low_precision_tolerance(max_abs_err(t, e), e)
        assert_close(o, e, atol=allowed, what=f"{dtype} {name} (torch's own error x2 = {allowed:.3g})")


def test_mixed_dtypes_strided_and_no_grad(gen):
    p, w, target, teachers = make(gen, 17, 50, (37, 64, 5), torch.bfloat16, w_dtype=torch.float32,
                                  teacher_dtypes=[torch.float16, torch.float32, torch.float64])
    wide = torch.randn(17, 100, generator=gen).bfloat16()
    teachers[1] = wide[:, 20:84]
    check(p, w, target, teachers, atol=2e-6, rtol=1e-5, what="mixed dtypes")
    with_grad = op(p, w, target, teachers)
    loss, ce, distill, gp, gw = op(p, w, target, teachers, compute_grad=False)
    assert gp.numel() == 0 and gw.numel() == 0
    for name, a, b in zip(NAMES[:3], (loss, ce, distill), with_grad[:3]):
        assert torch.equal(a, b), f"{name} without grad {a.item()} != with grad {b.item()}"


def test_zero_rows_follow_f_normalize_clamp(gen):
    p, w, target, teachers = make(gen, 6, 9, (5, 3), torch.float64)
    p[1] = 0
    w[4] = 0
    teachers[0][2] = 0
    check(p, w, target, teachers, atol=1e-12, rtol=1e-10, what="zero rows")


class _CBD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, w, target, *teachers):
        loss, _, _, gp, gw = op(p, w, target, list(teachers), alpha=0.4, beta=5.0, sigma=3.0)
        ctx.save_for_backward(gp, gw)
        return loss

    @staticmethod
    def backward(ctx, g):
        gp, gw = ctx.saved_tensors
        return (g * gp, g * gw) + (None,) * (len(ctx.needs_input_grad) - 2)


@pytest.mark.parametrize("B,C,dims", [(1, 2, (3,)), (4, 5, (2, 3)), (3, 7, (2, 1, 3, 2))])
def test_gradcheck_float64(gen, B, C, dims):
    p, w, target, teachers = make(gen, B, C, dims, torch.float64)
    p.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _CBD.apply(a, b, target, *teachers), (p, w), eps=1e-6, atol=1e-7)


def check_ignored_rows(p, w, target, teachers, atol, rtol):
    """target -100 (F.cross_entropy's default ignore_index): the row has no CE term, whose mean is over the
    other rows; the distillation term still averages over every row (the reference, ignore_index included)."""
    ignored = target.clone()
    ignored[1::3] = -100
    check(p, w, ignored, teachers, atol=atol, rtol=rtol, what="ignored rows", alpha=0.3)
    check(p, w, ignored.int(), teachers, atol=atol, rtol=rtol, what="ignored rows, int32 target", alpha=0.3)


def test_ignored_rows_and_int32_target(gen):
    p, w, target, teachers = make(gen, 10, 7, (5, 6))
    check_ignored_rows(p, w, target, teachers, atol=2e-6, rtol=1e-5)
    loss, ce, distill, gp, gw = op(p, w, torch.full_like(target, -100), teachers, alpha=0.3)
    assert loss.isnan() and ce.isnan() and distill.isfinite(), f"all ignored: {loss}, {ce}, {distill}"
    _, d_gp = torch.ops.fastcbd_C.cosine_distill_fwd(p, teachers, 0.3 * 100.0 / 10, True)
    assert_close(gp, d_gp, atol=1e-7, rtol=1e-5, what="all ignored: grad_p is the distillation term's")
    assert not gw.any(), "all ignored: grad_w should be 0"


def test_bad_target_is_masked_and_zero_rows(gen):
    p, w, target, teachers = make(gen, 4, 6, (5, 6))
    bad = target.clone()
    bad[1] = 6
    loss, ce, distill, gp, gw = op(p, w, bad, teachers)
    assert loss.isnan() and ce.isnan() and distill.isfinite(), f"bad target: {loss}, {ce}, {distill}"
    assert gp[1].isnan().all() and gp[[0, 2, 3]].isfinite().all() and gw.isnan().all(), "bad target: NaN pattern"
    loss, ce, distill, gp, gw = op(p[:0], w, target[:0], [t[:0] for t in teachers])
    assert loss.isnan() and ce.isnan() and distill.isnan(), f"B=0: {loss}, {ce}, {distill} (the means of nothing)"
    assert gp.shape == (0, p.shape[1]) and gw.shape == w.shape and not gw.any(), "B=0 gradients"


def test_rejects_inputs_that_would_read_out_of_bounds(gen):
    p, w, target, teachers = make(gen, 4, 6, (5, 6))
    with pytest.raises(RuntimeError, match="sum of teacher widths"):
        op(p, w, target, teachers[:1])
    with pytest.raises(RuntimeError, match="w is"):
        op(p, w[:, :3], target, teachers)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        op(p, w, target.short(), teachers)
