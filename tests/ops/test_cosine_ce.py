"""fastcbd.ops.cosine_ce against its float64 reference, on every backend that runs here."""
from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_BACKENDS, assert_close, assert_low_precision, check_compiled, use_backend

from fastcbd.ops.cosine_ce import cosine_ce, cosine_ce_ref

OP = "cosine_ce"
# (B, C, D, chunk_size): one row / many rows, C from 3 to iNat's 8142, several chunks with a ragged last one
SHAPES = [(1, 3, 37, 0), (7, 1000, 130, 3), (129, 3, 50, 0), (129, 8142, 64, 0), (129, 1000, 33, 50)]
OPTIONS = [dict(), dict(label_smoothing=0.1), dict(ignore_index=-100, label_smoothing=0.2, ignore_some=True),
           dict(ignore_index=2, reduction="sum", ignore_some=True), dict(sigma=16.0)]


def _inputs(B, C, D, dtype=torch.float32, wdtype=None, seed=0, ignore_index=-100, ignore_some=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.relu(torch.randn(B, D, generator=g)).to(dtype)  # the projection is a ReLU output
    w = (torch.randn(C, D, generator=g) * torch.rand(C, 1, generator=g) * 3).to(wdtype or dtype)
    target = torch.randint(0, C, (B,), generator=g)
    if ignore_some:
        target[::3] = ignore_index
    return p, w, target


def _ref64(p, w, target, grad_out=1.0, **kw):
    p64 = p.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = cosine_ce_ref(p64, w64, target, **kw)
    (loss * grad_out).backward()
    return loss.detach(), p64.grad, w64.grad


def _run(p, w, target, grad_out=1.0, **kw):
    p = p.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = cosine_ce(p, w, target, **kw)
    loss.backward(torch.tensor(grad_out))
    return loss, p.grad, w.grad


def _split(opts):
    opts = dict(opts)
    ignore_some = opts.pop("ignore_some", False)
    return opts, ignore_some


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-D{}-chunk{}".format(*s))
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_matches_reference(monkeypatch, name, shape):
    use_backend(monkeypatch, name, OP)
    B, C, D, chunk = shape
    p, w, target = _inputs(B, C, D)
    loss, gp, gw = _run(p, w, target, grad_out=-1.7, chunk_size=chunk)
    want_loss, want_gp, want_gw = _ref64(p, w, target, grad_out=-1.7)
    assert loss.dtype == torch.float32 and loss.dim() == 0, f"loss {loss.dtype} {tuple(loss.shape)}"
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(gp, want_gp, what=f"{name} grad_p")
    assert_close(gw, want_gw, what=f"{name} grad_w")


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_options(monkeypatch, name, opts):
    """label smoothing, ignore_index (mean over the valid rows), sum reduction, sigma."""
    use_backend(monkeypatch, name, OP)
    opts, ignore_some = _split(opts)
    p, w, target = _inputs(10, 300, 45, seed=2, ignore_index=opts.get("ignore_index", -100),
                           ignore_some=ignore_some)
    loss, gp, gw = _run(p, w, target, grad_out=0.3, chunk_size=4, **opts)
    want_loss, want_gp, want_gw = _ref64(p, w, target, grad_out=0.3, **opts)
    assert_close(loss, want_loss, what=f"{name} loss {opts}", rtol=1e-5, atol=1e-6)
    assert_close(gp, want_gp, what=f"{name} grad_p {opts}")
    assert_close(gw, want_gw, what=f"{name} grad_w {opts}")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_one_input_needs_grad_and_zero_row(monkeypatch, name):
    """Only w trainable (cRT: frozen features), only p trainable, nothing trainable; a zero feature row."""
    use_backend(monkeypatch, name, OP)
    p, w, target = _inputs(9, 40, 21, seed=4)
    p[4] = 0.0
    want_loss, want_gp, want_gw = _ref64(p, w, target)
    wt = w.clone().requires_grad_()
    cosine_ce(p, wt, target).backward()
    assert_close(wt.grad, want_gw, what=f"{name} grad_w with frozen p")
    pt = p.clone().requires_grad_()
    cosine_ce(pt, w, target).backward()
    assert_close(pt.grad, want_gp, what=f"{name} grad_p with frozen w (zero row 4)")
    with torch.no_grad():
        out = cosine_ce(pt, wt, target)
    assert not out.requires_grad, "loss computed under no_grad requires grad"
    assert_close(out, want_loss, what=f"{name} loss under no_grad", rtol=1e-5, atol=1e-6)


def test_reduction_none():
    p, w, target = _inputs(8, 30, 12, seed=5, ignore_some=True)
    pt = p.clone().requires_grad_()
    rows = cosine_ce(pt, w, target, reduction="none")
    rows.backward(torch.arange(8.0))
    # the "none" path runs the reference, so check it against the formula written out independently:
    # l_b = logsumexp_c z_bc - z_{b, y_b}, z = 20 cos(p_b, w_c), 0 for ignored rows
    p64 = p.double().requires_grad_()
    w64 = w.double()
    z = 20.0 * (p64 / p64.norm(dim=1, keepdim=True)) @ (w64 / w64.norm(dim=1, keepdim=True)).T
    valid = target != -100
    y = torch.where(valid, target, 0)
    want = torch.where(valid, torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0], torch.zeros(()).double())
    want.backward(torch.arange(8.0, dtype=torch.float64))
    assert_close(rows, want, what="per-row losses", rtol=1e-5, atol=1e-6)
    assert_close(pt.grad, p64.grad, what="grad_p with a per-row upstream gradient")
    # and against the fused op: the mean over the valid rows is its "mean" loss
    assert_close(rows.sum() / valid.sum(), cosine_ce(p, w, target), what="none-rows mean vs fused mean",
                 rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        cosine_ce(p, w, target, reduction="avg")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_low_precision(monkeypatch, name, dtype):
    """bf16/fp16 p and w: at most twice the error of PyTorch's own computation in that dtype."""
    use_backend(monkeypatch, name, OP)
    p, w, target = _inputs(33, 500, 70, dtype=dtype, seed=1)
    truth_loss, truth_gp, truth_gw = _ref64(p, w, target)
    pq, wq = p.clone().requires_grad_(), w.clone().requires_grad_()
    ref_loss = cosine_ce_ref(pq, wq, target)
    ref_loss.backward()
    loss, gp, gw = _run(p, w, target, chunk_size=8)
    assert gp.dtype == dtype and gw.dtype == dtype, f"grad dtypes {gp.dtype}, {gw.dtype}, expected {dtype}"
    assert_low_precision(loss, ref_loss, truth_loss, what=f"{name} {dtype} loss")
    assert_low_precision(gp, pq.grad, truth_gp, what=f"{name} {dtype} grad_p")
    assert_low_precision(gw, wq.grad, truth_gw, what=f"{name} {dtype} grad_w")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_autocast_bf16(monkeypatch, name):
    """Autocast's case: a bf16 projection with an fp32 classifier weight; within 2x autocast's own error."""
    use_backend(monkeypatch, name, OP)
    p, w, target = _inputs(17, 200, 40, seed=6, wdtype=torch.float32)
    p = p.bfloat16()
    truth_loss, truth_gp, truth_gw = _ref64(p, w, target)
    pq, wq = p.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = cosine_ce_ref(pq, wq, target)
        pt, wt = p.clone().requires_grad_(), w.clone().requires_grad_()
        loss = cosine_ce(pt, wt, target)
    ref_loss.backward()
    loss.backward()
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}"
    dtypes = (pt.grad.dtype, wt.grad.dtype)
    assert dtypes == (torch.bfloat16, torch.float32), f"grad dtypes {dtypes}"
    assert_low_precision(loss, ref_loss, truth_loss, what=f"{name} autocast loss")
    assert_low_precision(pt.grad, pq.grad, truth_gp, what=f"{name} autocast grad_p")
    assert_low_precision(wt.grad, wq.grad, truth_gw, what=f"{name} autocast grad_w")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_torch_compile_fullgraph(monkeypatch, name):
    use_backend(monkeypatch, name, OP)
    p, w, target = _inputs(6, 11, 20, seed=7)

    def f(p, w, target):
        return 2.0 * cosine_ce(p * 1.5, w, target, label_smoothing=0.1)

    check_compiled(f, [p, w], target)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_cuda(monkeypatch, name):
    use_backend(monkeypatch, name, OP, device="cuda")
    p, w, target = _inputs(129, 8142, 520, seed=8, ignore_some=True)
    p, w, target = p.cuda().bfloat16(), w.cuda(), target.cuda()
    loss, gp, gw = _run(p, w, target, grad_out=0.5, label_smoothing=0.1, chunk_size=40)
    want_loss, want_gp, want_gw = _ref64(p, w, target, grad_out=0.5, label_smoothing=0.1)
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(gp, want_gp, what=f"{name} grad_p", rtol=1e-2)  # grad_p is returned in bf16
    assert_close(gw, want_gw, what=f"{name} grad_w")
