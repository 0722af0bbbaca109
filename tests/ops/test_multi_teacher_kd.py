"""fastcbd.ops.multi_teacher_kd against its float64 reference, on every backend that runs here."""
from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_BACKENDS, assert_close, assert_low_precision, check_compiled, use_backend

from fastcbd.ops.multi_teacher_kd import multi_teacher_kd, multi_teacher_kd_ref

OP = "multi_teacher_kd"
# (B, C, K, weights): one row / many rows, C from 3 to iNat's 8142, K in {1, 2, 4}
SHAPES = [(1, 3, 1, None), (7, 1000, 2, (0.3, 0.9)), (129, 8142, 4, None), (129, 37, 4, (1.0, 0.0, 2.0, 0.5)),
          (7, 8142, 2, None), (7, 2500, 1, (2.0,))]
SLOW_IN_INTERPRETER = [(129, 8142, 4, None)]  # (7, 8142, 2) covers iNat's class count there


def _inputs(B, C, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, C, generator=g) * 4).to(dtype)
    teachers = [(torch.randn(B, C, generator=g) * (3 + 2 * k)).to(dtype) for k in range(K)]
    return z, teachers


def _ref64(z, teachers, grad_out=1.0, **kw):
    z64 = z.detach().double().requires_grad_()
    loss = multi_teacher_kd_ref(z64, [t.double() for t in teachers], **kw)
    (loss * grad_out).backward()
    return loss.detach(), z64.grad


def _run(z, teachers, grad_out=1.0, **kw):
    z = z.detach().clone().requires_grad_()
    loss = multi_teacher_kd(z, teachers, **kw)
    loss.backward(torch.tensor(grad_out))
    return loss, z.grad


def _id(s):
    return f"B{s[0]}-C{s[1]}-K{s[2]}{'' if s[3] is None else '-weighted'}"


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_matches_reference(monkeypatch, name, shape):
    if name == "triton" and shape in SLOW_IN_INTERPRETER:
        pytest.skip("slow in the Triton interpreter; a smaller batch with 8142 classes runs there")
    use_backend(monkeypatch, name, OP)
    B, C, K, weights = shape
    z, teachers = _inputs(B, C, K)
    for tau in (4.0, 1.0):
        loss, grad = _run(z, teachers, grad_out=-1.7, tau=tau, weights=weights)
        want_loss, want_grad = _ref64(z, teachers, grad_out=-1.7, tau=tau, weights=weights)
        assert loss.dtype == torch.float32 and loss.dim() == 0, f"loss {loss.dtype} {tuple(loss.shape)}"
        assert_close(loss, want_loss, what=f"{name} loss tau={tau}", rtol=1e-5, atol=1e-6)
        assert_close(grad, want_grad, what=f"{name} grad_z tau={tau}")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_no_grad_inference_teachers_and_tensor_weights(monkeypatch, name):
    use_backend(monkeypatch, name, OP)
    z, teachers = _inputs(5, 30, 2, seed=3)
    with torch.inference_mode():
        teachers = [t.clone() for t in teachers]
    weights = torch.tensor([0.25, 0.75])
    want_loss, want_grad = _ref64(z, teachers, weights=weights.tolist())
    out = multi_teacher_kd(z, teachers, weights=weights)
    assert_close(out, want_loss, what=f"{name} loss, z without grad", rtol=1e-5, atol=1e-6)
    loss, grad = _run(z, teachers, weights=weights)
    assert_close(grad, want_grad, what=f"{name} grad_z with inference-mode teachers")
    with torch.no_grad():
        out = multi_teacher_kd(z.clone().requires_grad_(), teachers)
    assert not out.requires_grad, "loss computed under no_grad requires grad"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_low_precision(monkeypatch, name, dtype):
    """bf16/fp16 logits: at most twice the error of PyTorch's own computation in that dtype."""
    use_backend(monkeypatch, name, OP)
    z, teachers = _inputs(33, 700, 2, dtype=dtype, seed=1)
    truth_loss, truth_grad = _ref64(z, teachers)
    q = z.clone().requires_grad_()
    ref_loss = multi_teacher_kd_ref(q, teachers)
    ref_loss.backward()
    loss, grad = _run(z, teachers)
    assert grad.dtype == dtype, f"grad dtype {grad.dtype}, expected {dtype}"
    assert_low_precision(loss, ref_loss, truth_loss, what=f"{name} {dtype} loss")
    assert_low_precision(grad, q.grad, truth_grad, what=f"{name} {dtype} grad_z")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_torch_compile_fullgraph(monkeypatch, name):
    use_backend(monkeypatch, name, OP)
    z, teachers = _inputs(6, 11, 2, seed=7)

    def f(z, t0, t1):
        return 0.5 * multi_teacher_kd(z * 2.0, [t0, t1], tau=3.0, weights=(0.4, 0.6))

    check_compiled(f, [z], *teachers)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_cuda(monkeypatch, name):
    use_backend(monkeypatch, name, OP, device="cuda")
    z, teachers = _inputs(129, 8142, 4, seed=8)
    z, teachers = z.cuda(), [t.cuda().bfloat16() for t in teachers]
    loss, grad = _run(z, teachers, grad_out=0.5, weights=(0.1, 0.2, 0.3, 0.4))
    want_loss, want_grad = _ref64(z, teachers, grad_out=0.5, weights=(0.1, 0.2, 0.3, 0.4))
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, what=f"{name} grad_z")
