"""The op-level contract every backend must keep alike (docs/ops.md), checked on torch, cpu and triton.

Targets outside [0, C) (masked: NaN, never read out of bounds) and their ValueError in the public functions,
int32 targets, cbd_loss's ignored (-100) rows, -inf teacher logits (probability 0), strided KD weights,
zero rows, no host sync inside the ops, and fp16 classifier gradients checked element by element.
The CUDA twins of these cases are in test_gpu.py.
"""
from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_BACKENDS, assert_close, use_backend
from torch.utils._python_dispatch import TorchDispatchMode

import fastcbd.functional as Fc
from fastcbd.ops import _common, cbd_loss, cosine_ce, cosine_distill, multi_teacher_kd
from fastcbd.ops.cbd_loss import cbd_loss_ref
from fastcbd.ops.cosine_ce import cosine_ce_ref
from fastcbd.ops.cosine_distill import cosine_distill_ref
from fastcbd.ops.multi_teacher_kd import multi_teacher_kd_ref

OPS = ["cosine_distill", "cosine_ce", "multi_teacher_kd", "cbd_loss"]


def _classifier(B=6, C=7, dims=(8, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = torch.relu(torch.randn(B, sum(dims), generator=g)).to(dtype)
    w = torch.randn(C, sum(dims), generator=g).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    teachers = [torch.randn(B, d, generator=g).to(dtype) for d in dims]
    return p, w, target, teachers


def _ref64(fn, leaves, *args, **kw):
    """fn on float64 copies of `leaves` (then args): (loss, gradient of each leaf)."""
    xs = [x.detach().double().requires_grad_() for x in leaves]
    loss = fn(*xs, *args, **kw)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def _check_nan_pattern(what, loss, gp, gw, bad_rows):
    good = torch.ones(gp.shape[0], dtype=torch.bool)
    good[bad_rows] = False
    assert loss.isnan().item(), f"{what}: loss {loss.item()} is not NaN"
    assert gp[bad_rows].isnan().all(), f"{what}: grad_p rows {bad_rows} hold {int(gp[bad_rows].isnan().sum())} NaN"
    assert gp[good].isfinite().all(), f"{what}: {int((~gp[good].isfinite()).sum())} non-finite in good rows"
    assert gw.isnan().all(), f"{what}: grad_w holds {int(gw.isnan().sum())} NaN of {gw.numel()}"


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_bad_targets_are_masked_at_the_op_level(monkeypatch, name):
    """The custom ops themselves do not check target values (no sync): a target outside [0, C) that is not
    ignore_index gives its row a NaN loss and NaN gradients, identically on every backend."""
    use_backend(monkeypatch, name, "cosine_ce")
    p, w, target, teachers = _classifier()
    target[2], target[4] = 7, -5  # C = 7
    loss, gp, gw = torch.ops.fastcbd.cosine_ce(p, w, target, 20.0, -100, 0.1, True, True, 4)
    _check_nan_pattern(f"{name} cosine_ce", loss, gp, gw, [2, 4])
    loss_ng, _, _ = torch.ops.fastcbd.cosine_ce(p, w, target, 20.0, -100, 0.1, True, False, 4)
    assert loss_ng.isnan().item(), f"{name} cosine_ce without grad: loss {loss_ng.item()}"
    use_backend(monkeypatch, name, "cbd_loss")
    loss, ce, distill, gp, gw = torch.ops.fastcbd.cbd_loss(p, w, target, teachers, 0.4, 100.0, 20.0, True, 4)
    assert ce.isnan().item() and distill.isfinite().item(), f"{name} cbd_loss parts {ce.item()}, {distill.item()}"
    _check_nan_pattern(f"{name} cbd_loss", loss, gp, gw, [2, 4])


@pytest.mark.parametrize("fn", ["ops.cosine_ce", "ops.cbd_loss", "Fc.cosine_cross_entropy", "Fc.cbd_loss"])
def test_public_functions_reject_bad_targets(fn):
    p, w, target, teachers = _classifier()
    call = {
        "ops.cosine_ce": lambda y, **kw: cosine_ce.cosine_ce(p, w, y, **kw),
        "ops.cbd_loss": lambda y, **kw: cbd_loss.cbd_loss(p, w, y, teachers),
        "Fc.cosine_cross_entropy": lambda y, **kw: Fc.cosine_cross_entropy(p, w, y, **kw),
        "Fc.cbd_loss": lambda y, **kw: Fc.cbd_loss(p, w, y, teachers),
    }[fn]
    for value, match in ((7, r"target\[2\] = 7 is outside \[0, C=7\)"), (-3, r"target\[2\] = -3 is outside")):
        bad = target.clone()
        bad[2] = value
        with pytest.raises(ValueError, match=match):
            call(bad)
    ignored = target.clone()
    ignored[2] = -100  # the default ignore_index (cbd_loss: the row has no CE term)
    assert call(ignored).isfinite(), f"{fn}: an ignored row should be accepted"
    with pytest.raises(ValueError, match="target must be a 1-D int64"):
        call(target.float())
    if fn.endswith(("cosine_ce", "cross_entropy")):
        with pytest.raises(ValueError, match=r"is not ignore_index=3"):
            call(ignored, ignore_index=3)
        assert call(torch.full_like(target, 9), ignore_index=9).isnan(), "all rows ignored: NaN (as PyTorch)"


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_target_check_is_skipped_under_torch_compile(monkeypatch, name):
    """The range check needs a host read, which torch.compile cannot trace: skipped, the kernels mask instead."""
    use_backend(monkeypatch, name, "cosine_ce")
    p, w, target, _ = _classifier()
    target[1] = 70
    torch._dynamo.reset()
    f = torch.compile(lambda p, w, y: cosine_ce.cosine_ce(p, w, y), fullgraph=True, backend="aot_eager")
    assert f(p, w, target).isnan().item(), f"{name}: compiled cosine_ce with a bad target should give NaN"


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_int32_targets_give_the_int64_result(monkeypatch, name):
    p, w, target, teachers = _classifier(B=9, C=13, seed=1)
    target[::4] = -100
    for op, run in (("cosine_ce", lambda p, w, y: cosine_ce.cosine_ce(p, w, y, label_smoothing=0.1)),
                    ("cbd_loss", lambda p, w, y: cbd_loss.cbd_loss(p, w, y, teachers))):
        use_backend(monkeypatch, name, op)
        out = []
        for y in (target, target.int()):
            pt, wt = p.clone().requires_grad_(), w.clone().requires_grad_()
            loss = run(pt, wt, y)
            loss.backward()
            out.append((loss, pt.grad, wt.grad))
        for what, a, b in zip(("loss", "grad_p", "grad_w"), out[1], out[0]):
            assert torch.equal(a, b), f"{name} {op}: int32 target changes {what} by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_cbd_loss_ignored_rows(monkeypatch, name):
    """Rows with target -100 have no CE term (the CE mean is over the others), as cbd_loss_ref defines."""
    use_backend(monkeypatch, name, "cbd_loss")
    p, w, target, teachers = _classifier(B=9, C=11, dims=(10, 7), seed=2)
    target[1::3] = -100
    pt, wt = p.clone().requires_grad_(), w.clone().requires_grad_()
    loss, ce, distill = cbd_loss.cbd_loss(pt, wt, target, teachers, alpha=0.3, chunk_size=4, return_parts=True)
    loss.backward()
    want, (want_gp, want_gw) = _ref64(cbd_loss_ref, [p, w], target, [t.double() for t in teachers], alpha=0.3)
    assert_close(loss, want, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(ce, cosine_ce_ref(p.double(), w.double(), target), what=f"{name} ce", rtol=1e-5, atol=1e-6)
    assert_close(distill, cosine_distill_ref(p.double(), [t.double() for t in teachers]), what=f"{name} distill",
                 rtol=1e-5, atol=1e-6)
    assert_close(pt.grad, want_gp, what=f"{name} grad_p")
    assert_close(wt.grad, want_gw, what=f"{name} grad_w")


def _kd_inputs():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 2500, generator=g) * 3
    teachers = [torch.randn(3, 2500, generator=g) * 4, torch.randn(3, 2500, generator=g) * 2]
    teachers[0][0, :2100] = float("-inf")  # a whole 2048-wide block before any finite logit
    teachers[1][2, ::7] = float("-inf")
    teachers[1][1, :-1] = float("-inf")  # one class left: a one-hot teacher
    return z, teachers


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_kd_minus_inf_teacher_logits_are_probability_zero(monkeypatch, name):
    use_backend(monkeypatch, name, "multi_teacher_kd")
    z, teachers = _kd_inputs()
    zt = z.clone().requires_grad_()
    loss = multi_teacher_kd.multi_teacher_kd(zt, teachers, tau=2.0, weights=(0.7, 0.3))
    loss.backward()
    want, (want_grad,) = _ref64(multi_teacher_kd_ref, [z], [t.double() for t in teachers], tau=2.0,
                                weights=(0.7, 0.3))
    assert want.isfinite(), f"the reference itself is {want.item()}"
    assert_close(loss, want, what=f"{name} loss with -inf teacher logits", rtol=1e-5, atol=1e-6)
    assert_close(zt.grad, want_grad, what=f"{name} grad_z with -inf teacher logits")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_kd_strided_weights(monkeypatch, name):
    use_backend(monkeypatch, name, "multi_teacher_kd")
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 30, generator=g)
    teachers = [torch.randn(5, 30, generator=g) * (1 + k) for k in range(3)]
    every_other = torch.tensor([0.5, 9.0, 0.25, 9.0, 2.0, 9.0])[::2]
    assert not every_other.is_contiguous()
    zt = z.clone().requires_grad_()
    loss = multi_teacher_kd.multi_teacher_kd(zt, teachers, weights=every_other)
    loss.backward()
    want, (want_grad,) = _ref64(multi_teacher_kd_ref, [z], [t.double() for t in teachers],
                                weights=[0.5, 0.25, 2.0])
    assert_close(loss, want, what=f"{name} loss with weights[::2]", rtol=1e-5, atol=1e-6)
    assert_close(zt.grad, want_grad, what=f"{name} grad_z with weights[::2]")


def _zero_row_cases():
    p, w, target, teachers = _classifier(B=0, C=5)
    z, logits = torch.randn(0, 5), [torch.randn(0, 5), torch.randn(0, 5)]
    t64 = [t.double() for t in teachers]
    return {
        "cosine_distill": ([p], lambda p: cosine_distill.cosine_distill(p, teachers),
                           lambda p: cosine_distill_ref(p, t64)),
        "cosine_ce": ([p, w], lambda p, w: cosine_ce.cosine_ce(p, w, target), lambda p, w: cosine_ce_ref(p, w, target)),
        "multi_teacher_kd": ([z], lambda z: multi_teacher_kd.multi_teacher_kd(z, logits),
                             lambda z: multi_teacher_kd_ref(z, [t.double() for t in logits])),
        "cbd_loss": ([p, w], lambda p, w: cbd_loss.cbd_loss(p, w, target, teachers),
                     lambda p, w: cbd_loss_ref(p, w, target, t64)),
    }


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_zero_rows(monkeypatch, name, op):
    """B = 0: the reference's value (NaN for a mean over nothing), empty / zero gradients, no error."""
    use_backend(monkeypatch, name, op)
    leaves, run, ref = _zero_row_cases()[op]
    xs = [x.clone().requires_grad_() for x in leaves]
    loss = run(*xs)
    loss.backward()
    want, want_grads = _ref64(ref, leaves)
    assert loss.isnan().item() == want.isnan().item(), f"{name} {op} B=0: loss {loss.item()}, reference {want.item()}"
    for i, (x, e) in enumerate(zip(xs, want_grads)):
        assert x.grad is not None and x.grad.shape == e.shape and not x.grad.any(), (
            f"{name} {op} B=0: gradient {i} {None if x.grad is None else tuple(x.grad.shape)}, want zeros "
            f"{tuple(e.shape)}")


class _NoHostSync(TorchDispatchMode):
    """Raises on every read of a tensor value by the host (.item(), int(), bool(): aten._local_scalar_dense)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync: a tensor value was read on the host inside the op")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_no_host_sync_inside_the_ops(monkeypatch, name, op):
    """The op bodies never read a device value on the host (on a GPU that is a sync, which breaks CUDA-graph
    capture): run each op's forward under a dispatch mode that fails on any such read. The compiled ops are
    seen as one call (what they do inside on the CPU is theirs); cosine_ce's "mean" passes 1/n_valid as a
    tensor."""
    use_backend(monkeypatch, name, op)
    p, w, target, teachers = _classifier(B=5, C=9, seed=5)
    target[1] = -100
    z, logits = torch.randn(5, 9), [torch.randn(5, 9), torch.randn(5, 9)]
    run = {
        "cosine_distill": lambda: cosine_distill._forward(p, teachers, True),
        "cosine_ce": lambda: cosine_ce._forward(p, w, target, 20.0, -100, 0.1, True, True, 2),
        "multi_teacher_kd": lambda: multi_teacher_kd._forward(z, logits, torch.tensor([0.4, 0.6]), 2.0, True),
        "cbd_loss": lambda: cbd_loss._forward(p, w, target, teachers, 0.4, 100.0, 20.0, True, 2),
    }[op]
    want = run()
    with _NoHostSync():
        got = run()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{name} {op}: output {i} differs under the no-sync mode"


def relative_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(worst row-relative error ||got_r - want_r|| / ||want_r||, worst element error relative to its row's
    largest |want|): an error on the many small entries of a row shows in both, however small the entries."""
    g, e = got.detach().double().cpu(), want.detach().double().cpu()  # a GPU result against a CPU reference
    row_rel = (g - e).norm(dim=1) / e.norm(dim=1).clamp_min(1e-300)
    elem_rel = (g - e).abs() / e.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    return float(row_rel.nan_to_num(float("inf")).max()), float(elem_rel.nan_to_num(float("inf")).max())


# fp16 W at iNat18 size: the CUDA backend once cast dL/dlogits to fp16 for the grad_p GEMM, which flushed most
# of each row (~1e-8) to zero: grad_p off by 1-3% while test_low_precision's absolute floor still passed.
FP16_SHAPE = {"B": 512, "C": 8142, "D": 64}
FP16_ROW_RTOL, FP16_ELEM_RTOL = 2e-4, 2e-4  # measured: ~1e-6 fp32 dL/dS, ~2e-3 fp16 (below)


def fp16_classifier_inputs(device="cpu"):
    g = torch.Generator().manual_seed(6)
    B, C, D = FP16_SHAPE["B"], FP16_SHAPE["C"], FP16_SHAPE["D"]
    p = torch.relu(torch.randn(B, D, generator=g)).half()
    w = torch.randn(C, D, generator=g).half()
    target = torch.randint(0, C, (B,), generator=g)
    return p.to(device), w.to(device), target.to(device)


def check_fp16_relative(what, gp, gw, want_gp, want_gw):
    for name, got, want in (("grad_p", gp, want_gp), ("grad_w", gw, want_gw)):
        row, elem = relative_errors(got.float(), want)
        assert row <= FP16_ROW_RTOL and elem <= FP16_ELEM_RTOL, (
            f"{what} {name}: worst row-relative error {row:.3g} (limit {FP16_ROW_RTOL}), worst element error "
            f"{elem:.3g} of its row's max (limit {FP16_ELEM_RTOL})")


def fp16_reference(p, w, target):
    _, (gp, gw) = _ref64(cosine_ce_ref, [p.cpu(), w.cpu()], target.cpu())
    return gp, gw


@pytest.fixture(scope="module")
def fp16_truth():
    p, w, target = fp16_classifier_inputs()
    return fp16_reference(p, w, target)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_fp16_classifier_gradients_elementwise(monkeypatch, name, fp16_truth):
    use_backend(monkeypatch, name, "cosine_ce")
    p, w, target = fp16_classifier_inputs()
    # the gradients in fp32 (what the kernels return before the cast to fp16 in backward)
    _, gp, gw = torch.ops.fastcbd.cosine_ce(p, w, target, 20.0, -100, 0.0, True, True, 0)
    check_fp16_relative(f"{name} fp16 W", gp, gw, *fp16_truth)


def test_fp16_elementwise_check_catches_fp16_dlogits(fp16_truth):
    """The check above fails on the old CUDA path, emulated here: dL/dS cast to fp16 before the grad_p GEMM."""
    p, w, target = fp16_classifier_inputs()
    inv_np, inv_nw = _common.inv_norms(p), _common.inv_norms(w)
    s = p.float() @ w.float().t()
    scale = torch.tensor(1.0 / p.shape[0])
    cosine_ce._rows_torch(s, target, inv_np, inv_nw, torch.empty(p.shape[0]), scale, 20.0, -100, 0.0, True)
    gp = s.half().float() @ w.float()  # the defect: fp16 dL/dS
    _common.project_rows_torch(gp, p, inv_np)
    row, elem = relative_errors(gp, fp16_truth[0])
    assert row > FP16_ROW_RTOL or elem > FP16_ELEM_RTOL, (
        f"fp16 dL/dS gives grad_p errors {row:.3g} (rows) / {elem:.3g} (elements): the check cannot see it")


def test_trusted_targets_skips_only_the_range_check():
    """Inside trusted_targets() a bad target is not read on the host: it reaches the op, which masks its row
    to NaN; outside (and after the block) the ValueError is back; shape and dtype are still checked."""
    p, w, target, teachers = _classifier(B=5, C=9, seed=5)
    bad = target.clone()
    bad[2] = 9
    with _common.trusted_targets():
        loss = cbd_loss.cbd_loss(p, w, bad, teachers)
        assert loss.isnan().item(), f"a bad target under trusted_targets gave a finite loss {loss.item()}"
        with pytest.raises(ValueError, match="1-D int64"):
            cbd_loss.cbd_loss(p, w, bad.float(), teachers)
        with _common.trusted_targets(False), pytest.raises(ValueError, match=r"target\[2\] = 9 is outside"):
            cosine_ce.cosine_ce(p, w, bad)
    with pytest.raises(ValueError, match=r"target\[2\] = 9 is outside"):
        cbd_loss.cbd_loss(p, w, bad, teachers)
