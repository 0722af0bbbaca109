"""torch.ops.fastcbd_C.cbd_loss_fwd on a GPU against the float64 reference (skipped without one)."""
import pytest
import torch
from csrc_testing import assert_close, low_precision_tolerance, max_abs_err, needs_ext
from test_cbd_loss_cpu import NAMES, check_ignored_rows, make, op, reference_with_grad

pytestmark = needs_ext


@pytest.mark.parametrize("B,C,dims", [(1, 3, (37,)), (7, 1000, (37, 64)), (129, 1000, (37, 64, 5, 11)),
                                      (5, 8142, (12, 9)), (300, 10, (2048, 2048))])
@pytest.mark.parametrize("chunk", [0, 16])
def test_cuda_fp32_matches_float64(gen, cuda, B, C, dims, chunk):
    p, w, target, teachers = make(gen, B, C, dims)
    ours = op(p.to(cuda), w.to(cuda), target.to(cuda), [t.to(cuda) for t in teachers], chunk=chunk)
    exact = reference_with_grad(p.double(), w.double(), target, [t.double() for t in teachers])
    for name, o, e in zip(NAMES, ours, exact):
        assert o.is_cuda and o.dtype == torch.float32
        assert_close(o, e, atol=2e-6 * max(1.0, e.abs().max().item()), rtol=1e-5, what=f"cuda {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_and_no_grad(gen, cuda, dtype):
    p, w, target, teachers = make(gen, 33, 1000, (37, 64, 5), dtype)
    exact = reference_with_grad(p.double(), w.double(), target, [t.double() for t in teachers])
    theirs = reference_with_grad(p, w, target, teachers)
    dev = [t.to(cuda) for t in teachers]
    ours = op(p.to(cuda), w.to(cuda), target.to(cuda), dev)
    for name, o, t, e in zip(NAMES, ours, theirs, exact):
        assert_close(o, e, atol=low_precision_tolerance(max_abs_err(t, e), e), what=f"cuda {dtype} {name}")
    no_grad = op(p.to(cuda), w.to(cuda), target.to(cuda), dev, compute_grad=False)
    assert no_grad[3].numel() == 0 and no_grad[4].numel() == 0
    for name, a, b in zip(NAMES[:3], no_grad[:3], ours[:3]):
        assert_close(a, b, atol=1e-6, rtol=1e-6, what=f"cuda {name} without grad")


@pytest.mark.gpu
def test_cuda_ignored_rows_bad_target_and_zero_rows(gen, cuda):
    """-100 rows leave the CE mean (as the CPU and the reference), bad targets give NaN, B = 0 gives NaN."""
    p, w, target, teachers = make(gen, 10, 7, (5, 6))
    dev = [t.to(cuda) for t in teachers]
    check_ignored_rows(p.to(cuda), w.to(cuda), target.to(cuda), dev, atol=2e-6, rtol=1e-5)
    bad = target.clone().to(cuda)
    bad[1] = 7
    loss, ce, distill, gp, gw = op(p.to(cuda), w.to(cuda), bad, dev)
    assert loss.isnan() and ce.isnan() and distill.isfinite(), f"bad target: {loss}, {ce}, {distill}"
    assert gp[1].isnan().all() and gp[2:].isfinite().all() and gw.isnan().all(), "bad target: NaN pattern"
    loss, ce, distill, gp, gw = op(p[:0].to(cuda), w.to(cuda), target[:0].to(cuda), [t[:0] for t in dev])
    assert loss.isnan() and ce.isnan() and distill.isnan(), f"B=0: {loss}, {ce}, {distill}"
    assert gp.shape == (0, p.shape[1]) and not gw.any(), "B=0 gradients"
