"""torch.ops.fastcbd_C.cosine_ce_fwd against a float64 PyTorch reference (contract: docs/ops.md)."""
import pytest
import torch
import torch.nn.functional as F
from csrc_testing import assert_close, low_precision_tolerance, max_abs_err, needs_ext

pytestmark = needs_ext

IGNORE = -100


def op(p, w, target, *, sigma=20.0, ignore_index=IGNORE, label_smoothing=0.0, scale=1.0, compute_grad=True, chunk=0):
    """The op; `scale` (a number or a tensor) goes in as a 0-dim tensor on p's device (float64: exact on CPU)."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(scale, dtype=torch.float64, device=p.device)
    return torch.ops.fastcbd_C.cosine_ce_fwd(
        p, w, target, sigma, ignore_index, label_smoothing, scale, compute_grad, chunk
    )


def reference(p, w, target, *, sigma=20.0, ignore_index=IGNORE, label_smoothing=0.0, scale=1.0):
    """scale * sum_b CE(sigma * cos(p_b, w_c), y_b) computed in the inputs' dtype."""
    z = sigma * (F.normalize(p, dim=1) @ F.normalize(w.to(p.dtype), dim=1).t())
    ce = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    return scale * ce


def reference_with_grad(p, w, target, **kw):
    p = p.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = reference(p, w, target, **kw)
    gp, gw = torch.autograd.grad(loss, (p, w))
    return loss.detach(), gp, gw


def make(gen, B, C, D, dtype=torch.float32, w_dtype=None, n_ignored=0):
    p = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(C, D, generator=gen, dtype=torch.float64).to(w_dtype or dtype)
    target = torch.randint(0, C, (B,), generator=gen)
    target[torch.randperm(B, generator=gen)[:n_ignored]] = IGNORE
    return p, w, target


def check(p, w, target, *, atol, rtol, what, chunk=0, **kw):
    loss, gp, gw = op(p, w, target, chunk=chunk, **kw)
    ref_loss, ref_gp, ref_gw = reference_with_grad(p.double(), w.double(), target, **kw)
    assert loss.dim() == 0 and gp.shape == p.shape and gw.shape == w.shape
    scale = max(1.0, ref_loss.abs().item())
    assert_close(loss, ref_loss, atol=atol * scale, rtol=rtol, what=f"{what} loss")
    assert_close(gp, ref_gp, atol=atol * max(1.0, ref_gp.abs().max().item()), rtol=rtol, what=f"{what} grad_p")
    assert_close(gw, ref_gw, atol=atol * max(1.0, ref_gw.abs().max().item()), rtol=rtol, what=f"{what} grad_w")
    return loss, gp, gw


@pytest.mark.parametrize("B", [1, 7, 129])
@pytest.mark.parametrize("C", [3, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(gen, B, C, dtype):
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    p, w, target = make(gen, B, C, 106, dtype, n_ignored=B // 5)
    check(p, w, target, what=f"B={B} C={C} {dtype}", scale=1 / max(1, B - B // 5), **tol)
    check(p, w, target, what=f"B={B} C={C} {dtype} ls=0.1 sigma=16", sigma=16.0, label_smoothing=0.1, scale=0.7,
          **tol)
    loss, gp, gw = op(p, w, target, scale=0.7)
    assert loss.dtype == gp.dtype == gw.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_chunking_does_not_change_the_result(gen, chunk):
    p, w, target = make(gen, 129, 37, 24, n_ignored=9)
    kw = dict(label_smoothing=0.2, scale=0.01)
    check(p, w, target, chunk=chunk, atol=2e-6, rtol=1e-5, what=f"chunk={chunk}", **kw)
    loss0, gp0, gw0 = op(p, w, target, chunk=0, **kw)
    loss1, gp1, gw1 = op(p, w, target, chunk=chunk, **kw)
    assert_close(loss1, loss0, atol=1e-6, rtol=1e-6, what=f"chunk={chunk} vs automatic, loss")
    assert_close(gw1, gw0, atol=1e-7, rtol=1e-5, what=f"chunk={chunk} vs automatic, grad_w")


def test_inaturalist_sized_classifier(gen):
    """C = 8142 classes (iNat18) with small B and D; other ignore_index and smoothing."""
    p, w, target = make(gen, 6, 8142, 20)
    target[4] = 7
    check(p, w, target, ignore_index=7, label_smoothing=0.05, scale=0.2, atol=2e-6, rtol=1e-5, what="C=8142",
          chunk=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,C,D", [(7, 1000, 37), (129, 3, 64), (1, 1000, 256)])
def test_low_precision_within_twice_torch_error(gen, dtype, B, C, D):
    p, w, target = make(gen, B, C, D, dtype)
    # PyTorch's fp16 CPU cross-entropy with label smoothing sums C log-probabilities in fp16 and
    # overflows to inf at C = 1000, which would leave no error to compare with: smoothing in bf16 only.
    kw = dict(label_smoothing=0.1 if dtype == torch.bfloat16 else 0.0, scale=1.0 / B)
    exact = reference_with_grad(p.double(), w.double(), target, **kw)
    theirs = reference_with_grad(p, w, target, **kw)  # PyTorch computing in `dtype`
    ours = op(p, w, target, **kw)
    for name, o, t, e in zip(["loss", "grad_p", "grad_w"], ours, theirs, exact):
        assert o.dtype == torch.float32
        allowed = low_precision_tolerance(max_abs_err(t, e), e)
        assert_close(o, e, atol=allowed, what=f"{dtype} {name} (torch's own error x2 = {allowed:.3g})")


def test_low_precision_features_fp32_weights(gen):
    """bf16 features against fp32 weights (autocast-style): computed at fp32 accuracy."""
    p, w, target = make(gen, 33, 100, 48, torch.bfloat16, w_dtype=torch.float32)
    check(p, w, target, atol=2e-6, rtol=1e-5, what="bf16 p, fp32 w", scale=0.1)
    check(p.t().contiguous().t(), w, target, atol=2e-6, rtol=1e-5, what="column-major bf16 p", scale=0.1)


def test_all_ignored_and_no_grad(gen):
    p, w, target = make(gen, 5, 11, 8)
    loss, gp, gw = op(p, w, torch.full_like(target, IGNORE), scale=1.0)
    assert loss.item() == 0.0 and not gp.any() and not gw.any(), "all rows ignored must give 0 loss and 0 grads"
    loss_g, _, _ = op(p, w, target, label_smoothing=0.1)
    loss, gp, gw = op(p, w, target, label_smoothing=0.1, compute_grad=False)
    assert gp.numel() == 0 and gw.numel() == 0
    assert torch.equal(loss, loss_g), f"loss without grad {loss.item()} != with grad {loss_g.item()}"


def test_zero_rows_follow_f_normalize_clamp(gen):
    p, w, target = make(gen, 6, 9, 5, torch.float64)
    p[1] = 0
    w[4] = 0
    check(p, w, target, atol=1e-12, rtol=1e-10, what="zero rows", label_smoothing=0.1)


def test_deterministic(gen):
    p, w, target = make(gen, 129, 1000, 37)
    a = op(p, w, target, scale=0.3)
    b = op(p, w, target, scale=0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "two identical calls differ"


class _CosineCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, w, target, sigma, ls):
        loss, gp, gw = op(p, w, target, sigma=sigma, label_smoothing=ls, scale=0.5)
        ctx.save_for_backward(gp, gw)
        return loss

    @staticmethod
    def backward(ctx, g):
        gp, gw = ctx.saved_tensors
        return g * gp, g * gw, None, None, None


@pytest.mark.parametrize("B,C,D,ls", [(1, 2, 3, 0.0), (4, 5, 3, 0.1), (3, 7, 6, 0.3)])
def test_gradcheck_float64(gen, B, C, D, ls):
    p, w, target = make(gen, B, C, D, torch.float64)
    if B > 1:
        target[0] = IGNORE
    p.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _CosineCE.apply(a, b, target, 3.0, ls), (p, w), eps=1e-6, atol=1e-7)


def check_bad_target_masked(p, w, target, bad_rows, what):
    """A target outside [0, C) (not ignore_index) is masked, never read: NaN loss, NaN grad_p rows of the bad
    rows and NaN grad_w (every class gets that row's dL/dz); the other rows of grad_p are finite."""
    loss, gp, gw = op(p, w, target, label_smoothing=0.1, scale=0.5)
    good = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    good[bad_rows] = False
    assert loss.isnan().item(), f"{what}: loss {loss.item()} is not NaN"
    assert gp[bad_rows].isnan().all(), f"{what}: grad_p rows {bad_rows} hold {int(gp[bad_rows].isnan().sum())} NaN"
    assert gp[good].isfinite().all(), f"{what}: {int((~gp[good].isfinite()).sum())} non-finite in the good rows"
    assert gw.isnan().all(), f"{what}: grad_w holds {int(gw.isnan().sum())} NaN of {gw.numel()}"
    loss_ng, _, _ = op(p, w, target, label_smoothing=0.1, scale=0.5, compute_grad=False)
    assert loss_ng.isnan().item(), f"{what}: loss without grad {loss_ng.item()} is not NaN"


def test_bad_target_is_masked_not_read(gen):
    p, w, target = make(gen, 5, 6, 5)
    for value in (6, -1, 2**40):
        bad = target.clone()
        bad[2] = value
        check_bad_target_masked(p, w, bad, [2], f"target {value}")


def test_int32_target_gives_the_int64_result(gen):
    p, w, target = make(gen, 9, 13, 7, n_ignored=2)
    want = op(p, w, target, label_smoothing=0.1, scale=0.3)
    got = op(p, w, target.int(), label_smoothing=0.1, scale=0.3)
    for name, a, b in zip(["loss", "grad_p", "grad_w"], got, want):
        assert torch.equal(a, b), f"int32 target: {name} differs from int64 by {max_abs_err(a, b):.3g}"


def test_scale_is_a_tensor(gen):
    """The scale is a 0-dim tensor (1/n_valid stays on the device); inf (all rows ignored) gives NaN, 0 grads."""
    p, w, target = make(gen, 4, 6, 5)
    half = op(p, w, target, scale=torch.tensor(0.5))
    one = op(p, w, target, scale=torch.tensor(1.0, dtype=torch.float32))
    for name, a, b in zip(["loss", "grad_p", "grad_w"], half, one):
        assert_close(a, 0.5 * b, atol=1e-7, rtol=1e-6, what=f"scale 0.5 vs 1, {name}")
    loss, gp, gw = op(p, w, torch.full_like(target, IGNORE), scale=torch.tensor(float("inf")))
    assert loss.isnan().item() and not gp.any() and not gw.any(), f"all ignored, scale inf: loss {loss.item()}"
    with pytest.raises(RuntimeError, match="scale"):
        op(p, w, target, scale=torch.ones(2))


def test_rejects_inputs_that_would_read_out_of_bounds(gen):
    p, w, target = make(gen, 4, 6, 5)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        op(p, w, target.short())
    with pytest.raises(RuntimeError, match="w is"):
        op(p, w[:, :4], target)
    with pytest.raises(RuntimeError, match="shape"):
        op(p, w, target[:3])
