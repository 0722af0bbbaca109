"""torch.ops.fastcbd_C.cosine_ce_fwd on a GPU against the float64 reference (skipped without one)."""
import pytest
import torch
from csrc_testing import assert_close, low_precision_tolerance, max_abs_err, needs_ext
from test_cosine_ce_cpu import IGNORE, check_bad_target_masked, make, op, reference_with_grad

pytestmark = needs_ext


def _compare(ours, exact, what, atol=2e-6, rtol=1e-5):
    for name, o, e in zip(["loss", "grad_p", "grad_w"], ours, exact):
        assert o.is_cuda and o.dtype == torch.float32
        assert_close(o, e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, what=f"{what} {name}")


@pytest.mark.parametrize("B,C,D", [(1, 3, 37), (7, 1000, 106), (129, 1000, 64), (5, 8142, 20), (300, 3, 2049)])
@pytest.mark.parametrize("chunk", [0, 16])
def test_cuda_fp32_matches_float64(gen, cuda, B, C, D, chunk):
    p, w, target = make(gen, B, C, D, n_ignored=B // 5)
    kw = dict(label_smoothing=0.1, scale=0.5, sigma=16.0)
    ours = op(p.to(cuda), w.to(cuda), target.to(cuda), chunk=chunk, **kw)
    _compare(ours, reference_with_grad(p.double(), w.double(), target, **kw), f"B={B} C={C} D={D}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(gen, cuda, dtype):
    p, w, target = make(gen, 33, 1000, 96, dtype)
    kw = dict(scale=1 / 33)
    exact = reference_with_grad(p.double(), w.double(), target, **kw)
    theirs = reference_with_grad(p, w, target, **kw)
    ours = op(p.to(cuda), w.to(cuda), target.to(cuda), **kw)
    for name, o, t, e in zip(["loss", "grad_p", "grad_w"], ours, theirs, exact):
        assert_close(o, e, atol=low_precision_tolerance(max_abs_err(t, e), e), what=f"cuda {dtype} {name}")


def test_cuda_bf16_features_fp32_weights_and_no_grad(gen, cuda):
    p, w, target = make(gen, 40, 100, 48, torch.bfloat16, w_dtype=torch.float32)
    exact = reference_with_grad(p.double(), w.double(), target)
    _compare(op(p.to(cuda), w.to(cuda), target.to(cuda)), exact, "bf16 p, fp32 w")
    loss, gp, gw = op(p.to(cuda), w.to(cuda), target.to(cuda), compute_grad=False)
    assert gp.numel() == 0 and gw.numel() == 0
    assert_close(loss, exact[0], atol=2e-5, rtol=1e-5, what="cuda loss without grad")
    all_ignored = torch.full_like(target, IGNORE).to(cuda)
    loss, gp, gw = op(p.to(cuda), w.to(cuda), all_ignored)
    assert loss.item() == 0.0 and not gp.any() and not gw.any()


@pytest.mark.gpu
def test_cuda_bad_target_int32_and_device_scale(gen, cuda):
    """Bad targets masked (NaN, no out-of-bounds read), int32 targets, the scale read on the device."""
    p, w, target = make(gen, 9, 13, 7, n_ignored=2)
    p, w, target = p.to(cuda), w.to(cuda), target.to(cuda)
    bad = target.clone()
    bad[4] = 13
    check_bad_target_masked(p, w, bad, [4], "cuda target 13")
    scale = torch.tensor(0.3, device=cuda)
    want = op(p, w, target, label_smoothing=0.1, scale=scale)
    got = op(p, w, target.int(), label_smoothing=0.1, scale=scale)
    for name, a, b in zip(["loss", "grad_p", "grad_w"], got, want):
        assert torch.equal(a, b), f"cuda int32 target: {name} differs from int64"
    exact = reference_with_grad(p.double().cpu(), w.double().cpu(), target.cpu(), label_smoothing=0.1, scale=0.3)
    _compare(want, exact, "cuda device scale")
    loss, gp, gw = op(p, w, torch.full_like(target, IGNORE), scale=torch.tensor(float("inf"), device=cuda))
    assert loss.isnan().item() and not gp.any() and not gw.any(), f"all ignored, scale inf: loss {loss.item()}"
