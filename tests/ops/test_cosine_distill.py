"""fastcbd.ops.cosine_distill against its float64 reference, on every backend that runs here."""
from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_BACKENDS, assert_close, assert_low_precision, check_compiled, use_backend

from fastcbd.ops.cosine_distill import cosine_distill, cosine_distill_ref

OP = "cosine_distill"
# (B, teacher widths): one row, odd rows, many rows; K in {1, 2, 4}; unequal, non-power-of-two widths
SHAPES = [(1, (37,)), (7, (200, 45)), (129, (33, 100, 7, 64)), (7, (1030,)), (129, (3, 1))]


def _inputs(B, dims, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, sum(dims), generator=g).to(dtype)
    teachers = [(torch.randn(B, d, generator=g) * (1 + i)).to(dtype) for i, d in enumerate(dims)]
    return p, teachers


def _ref64(p, teachers, grad_out=1.0):
    p64 = p.detach().double().requires_grad_()
    loss = cosine_distill_ref(p64, [t.double() for t in teachers])
    (loss * grad_out).backward()
    return loss.detach(), p64.grad


def _run(p, teachers, grad_out=1.0):
    p = p.detach().clone().requires_grad_()
    loss = cosine_distill(p, teachers)
    loss.backward(torch.tensor(grad_out))
    return loss, p.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-D{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_matches_reference(monkeypatch, name, shape):
    use_backend(monkeypatch, name, OP)
    p, teachers = _inputs(*shape)
    loss, grad = _run(p, teachers, grad_out=-1.7)
    want_loss, want_grad = _ref64(p, teachers, grad_out=-1.7)
    assert loss.dtype == torch.float32 and loss.dim() == 0, f"loss {loss.dtype} {tuple(loss.shape)}"
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, what=f"{name} grad_p")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_no_grad_and_inference_teachers(monkeypatch, name):
    use_backend(monkeypatch, name, OP)
    p, teachers = _inputs(7, (24, 9))
    with torch.inference_mode():  # teachers as frozen networks produce them
        teachers = [t.clone() for t in teachers]
    want_loss, want_grad = _ref64(p, teachers)
    assert_close(cosine_distill(p, teachers), want_loss, what=f"{name} loss, p without grad",
                 rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        q = p.clone().requires_grad_()
        out = cosine_distill(q, teachers)
    assert not out.requires_grad, "loss computed under no_grad requires grad"
    loss, grad = _run(p, teachers)
    assert_close(grad, want_grad, what=f"{name} grad_p with inference-mode teachers")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_zero_row_and_strided_input(monkeypatch, name):
    """A zero row (ReLU can give one) follows F.normalize's clamp; p may be a strided view."""
    use_backend(monkeypatch, name, OP)
    _, teachers = _inputs(5, (19, 12))
    big = torch.randn(5, 50, generator=torch.Generator().manual_seed(3))
    big[2] = 0.0
    p = big[:, 5:36]  # row stride 50, not contiguous
    p.requires_grad_()
    loss = cosine_distill(p, teachers)
    loss.backward()
    want_loss, want_grad = _ref64(p, teachers)
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(p.grad, want_grad, what=f"{name} grad_p (zero row 2)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_low_precision(monkeypatch, name, dtype):
    """bf16/fp16 inputs: at most twice the error of PyTorch's own computation in that dtype."""
    use_backend(monkeypatch, name, OP)
    p, teachers = _inputs(33, (70, 130), dtype=dtype, seed=1)
    truth_loss, truth_grad = _ref64(p, teachers)
    q = p.clone().requires_grad_()
    ref_loss = cosine_distill_ref(q, teachers)  # the reference run natively in the low precision
    ref_loss.backward()
    loss, grad = _run(p, teachers)
    assert grad.dtype == dtype, f"grad dtype {grad.dtype}, expected {dtype}"
    assert_low_precision(loss, ref_loss, truth_loss, what=f"{name} {dtype} loss")
    assert_low_precision(grad, q.grad, truth_grad, what=f"{name} {dtype} grad_p")


def test_autocast_bf16(monkeypatch):
    """Under autocast the op takes the bf16 projection as it is and returns an fp32 loss."""
    monkeypatch.setenv("FASTCBD_BACKEND", "auto")
    lin = torch.nn.Linear(16, 40)
    x = torch.randn(9, 16)
    _, teachers = _inputs(9, (30, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = lin(x)
        loss = cosine_distill(p, teachers)
    assert p.dtype == torch.bfloat16 and loss.dtype == torch.float32, f"{p.dtype=} {loss.dtype=}"
    loss.backward()
    want_loss, _ = _ref64(p, teachers)
    assert_close(loss, want_loss, what="autocast loss", rtol=1e-5, atol=1e-6)
    assert lin.weight.grad is not None and lin.weight.grad.isfinite().all(), "no finite grad reached Linear"


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_torch_compile_fullgraph(monkeypatch, name):
    use_backend(monkeypatch, name, OP)
    p, teachers = _inputs(6, (20, 11))

    def f(p, t0, t1):
        return 3.0 * cosine_distill(torch.relu(p), [t0, t1])

    check_compiled(f, [p], *teachers)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_cuda(monkeypatch, name):
    use_backend(monkeypatch, name, OP, device="cuda")
    p, teachers = _inputs(129, (2048, 1000, 7), seed=5)
    p, teachers = p.cuda(), [t.cuda().bfloat16() for t in teachers]
    loss, grad = _run(p, teachers, grad_out=0.5)
    want_loss, want_grad = _ref64(p, teachers, grad_out=0.5)
    assert_close(loss, want_loss, what=f"{name} loss", rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, what=f"{name} grad_p")
