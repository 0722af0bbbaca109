"""fastcbd.ops.cbd_loss against its float64 reference, on every backend that runs here."""
from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_BACKENDS, assert_close, assert_low_precision, check_compiled, use_backend

from fastcbd.ops.cbd_loss import cbd_loss, cbd_loss_ref
from fastcbd.ops.cosine_ce import cosine_ce_ref
from fastcbd.ops.cosine_distill import cosine_distill_ref

OP = "cbd_loss"
# (B, C, teacher widths, chunk_size): B in {1, 7, 129}, C in {3, 1000, 8142}, K in {1, 2, 4}
SHAPES = [(1, 3, (37,), 0), (7, 1000, (100, 30), 3), (129, 8142, (33, 20, 7, 4), 0), (129, 3, (50, 13), 40)]
INTERPRETER_SHAPES = SHAPES[:2] + SHAPES[3:]  # the 8142-class case is slow in the Triton interpreter


def _inputs(B, C, dims, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.relu(torch.randn(B, sum(dims), generator=g)).to(dtype)
    w = (torch.randn(C, sum(dims), generator=g) * torch.rand(C, 1, generator=g) * 3).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    teachers = [(torch.randn(B, d, generator=g) * (1 + k)).to(dtype) for k, d in enumerate(dims)]
    return p, w, target, teachers


def _ref64(p, w, target, teachers, grad_out=1.0, **kw):
    p64 = p.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = cbd_loss_ref(p64, w64, target, [t.double() for t in teachers], **kw)
    (loss * grad_out).backward()
    return loss.detach(), p64.grad, w64.grad


def _run(p, w, target, teachers, grad_out=1.0, **kw):
    p = p.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = cbd_loss(p, w, target, teachers, **kw)
    loss.backward(torch.tensor(grad_out))
    return loss, p.grad, w.grad


def _id(s):
    return f"B{s[0]}-C{s[1]}-D{'x'.join(map(str, s[2]))}-chunk{s[3]}"


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_matches_reference(monkeypatch, name, shape):
    if name == "triton" and shape not in INTERPRETER_SHAPES:
        pytest.skip("8142 classes are slow in the Triton interpreter (test_cosine_ce covers them)")
    use_backend(monkeypatch, name, OP)
    B, C, dims, chunk = shape
    p, w, target, teachers = _inputs(B, C, dims)
    loss, gp, gw = _run(p, w, target, teachers, grad_out=-1.7, chunk_size=chunk)
    want_loss, want_gp, want_gw = _ref64(p, w, target, teachers, grad_out=-1.7)
    assert loss.dtype == torch.float32 and loss.dim() == 0, f"loss {loss.dtype} {tuple(loss.shape)}"
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(gp, want_gp, what=f"{name} grad_p")
    assert_close(gw, want_gw, what=f"{name} grad_w")


HYPER = [dict(alpha=0.0), dict(alpha=1.0, beta=3.0), dict(alpha=0.25, beta=7.0, sigma=10.0)]


@pytest.mark.parametrize("hp", HYPER, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_hyper_parameters_and_parts(monkeypatch, name, hp):
    """alpha 0 (pure CE) and 1 (pure distillation) included; the reported parts are the two terms."""
    use_backend(monkeypatch, name, OP)
    p, w, target, teachers = _inputs(9, 50, (30, 17), seed=2)
    pt, wt = p.clone().requires_grad_(), w.clone().requires_grad_()
    loss, ce, distill = cbd_loss(pt, wt, target, teachers, return_parts=True, **hp)
    loss.backward(torch.tensor(0.6))
    want_loss, want_gp, want_gw = _ref64(p, w, target, teachers, grad_out=0.6, **hp)
    want_ce = cosine_ce_ref(p.double(), w.double(), target, sigma=hp.get("sigma", 20.0))
    want_distill = cosine_distill_ref(p.double(), [t.double() for t in teachers])
    assert not ce.requires_grad and not distill.requires_grad, "the reported parts should come detached"
    assert_close(loss, want_loss, what=f"{name} loss {hp}", rtol=1e-5, atol=1e-6)
    assert_close(ce, want_ce, what=f"{name} ce part {hp}", rtol=1e-5, atol=1e-6)
    assert_close(distill, want_distill, what=f"{name} distill part {hp}", rtol=1e-5, atol=1e-6)
    assert_close(pt.grad, want_gp, what=f"{name} grad_p {hp}")
    assert_close(wt.grad, want_gw, what=f"{name} grad_w {hp}")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_frozen_inputs_inference_teachers_zero_row(monkeypatch, name):
    use_backend(monkeypatch, name, OP)
    p, w, target, teachers = _inputs(6, 40, (25, 8), seed=4)
    p[3] = 0.0
    with torch.inference_mode():
        teachers = [t.clone() for t in teachers]
    want_loss, want_gp, want_gw = _ref64(p, w, target, teachers)
    pt = p.clone().requires_grad_()
    cbd_loss(pt, w, target, teachers).backward()
    assert_close(pt.grad, want_gp, what=f"{name} grad_p with frozen w (zero row 3)")
    wt = w.clone().requires_grad_()
    cbd_loss(p, wt, target, teachers).backward()
    assert_close(wt.grad, want_gw, what=f"{name} grad_w with frozen p")
    with torch.no_grad():
        out = cbd_loss(pt, wt, target, teachers)
    assert not out.requires_grad, "loss computed under no_grad requires grad"
    assert_close(out, want_loss, what=f"{name} loss under no_grad", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_low_precision(monkeypatch, name, dtype):
    """bf16/fp16 inputs: at most twice the error of PyTorch's own computation in that dtype."""
    use_backend(monkeypatch, name, OP)
    p, w, target, teachers = _inputs(33, 300, (60, 20), dtype=dtype, seed=1)
    truth_loss, truth_gp, truth_gw = _ref64(p, w, target, teachers)
    pq, wq = p.clone().requires_grad_(), w.clone().requires_grad_()
    ref_loss = cbd_loss_ref(pq, wq, target, teachers)
    ref_loss.backward()
    loss, gp, gw = _run(p, w, target, teachers, chunk_size=8)
    assert gp.dtype == dtype and gw.dtype == dtype, f"grad dtypes {gp.dtype}, {gw.dtype}, expected {dtype}"
    assert_low_precision(loss, ref_loss, truth_loss, what=f"{name} {dtype} loss")
    assert_low_precision(gp, pq.grad, truth_gp, what=f"{name} {dtype} grad_p")
    assert_low_precision(gw, wq.grad, truth_gw, what=f"{name} {dtype} grad_w")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_autocast_bf16(monkeypatch, name):
    """Autocast's case: bf16 projection, fp32 classifier weight; within 2x autocast's own error."""
    use_backend(monkeypatch, name, OP)
    p, w, target, teachers = _inputs(17, 200, (30, 10), seed=6)
    p = p.bfloat16()
    truth_loss, truth_gp, truth_gw = _ref64(p, w, target, teachers)
    pq, wq = p.clone().requires_grad_(), w.clone().requires_grad_()
    pt, wt = p.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = cbd_loss_ref(pq, wq, target, teachers)
        loss = cbd_loss(pt, wt, target, teachers)
    ref_loss.backward()
    loss.backward()
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}"
    assert_low_precision(loss, ref_loss, truth_loss, what=f"{name} autocast loss")
    assert_low_precision(pt.grad, pq.grad, truth_gp, what=f"{name} autocast grad_p")
    assert_low_precision(wt.grad, wq.grad, truth_gw, what=f"{name} autocast grad_w")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_torch_compile_fullgraph(monkeypatch, name):
    use_backend(monkeypatch, name, OP)
    p, w, target, teachers = _inputs(6, 11, (12, 8), seed=7)

    def f(p, w, target, t0, t1):
        return cbd_loss(torch.relu(p), w, target, [t0, t1], alpha=0.3)

    check_compiled(f, [p, w], target, *teachers)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_cuda(monkeypatch, name):
    use_backend(monkeypatch, name, OP, device="cuda")
    p, w, target, teachers = _inputs(129, 8142, (2048, 1000, 7, 33), seed=8)
    p, w, target = p.cuda(), w.cuda(), target.cuda()
    teachers = [t.cuda().bfloat16() for t in teachers]
    loss, gp, gw = _run(p, w, target, teachers, grad_out=0.5, chunk_size=40)
    want_loss, want_gp, want_gw = _ref64(p, w, target, teachers, grad_out=0.5)
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(gp, want_gp, what=f"{name} grad_p")
    assert_close(gw, want_gw, what=f"{name} grad_w")


def test_torch_compile_inductor(monkeypatch):
    """The default compiler (inductor) around the op, once: the other compile tests use aot_eager (fast)."""
    monkeypatch.setenv("FASTCBD_BACKEND", "auto")
    p, w, target, teachers = _inputs(6, 11, (12, 8), seed=9)

    def f(p, w, target, t0, t1):
        return cbd_loss(torch.relu(p) * 2.0, w, target, [t0, t1])

    check_compiled(f, [p, w], target, *teachers, backend="inductor", what="inductor")
