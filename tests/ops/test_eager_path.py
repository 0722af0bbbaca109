"""The eager fast path (_common.eager_autograd / run_op): plain eager calls skip torch.library's wrapper and
run the op's own implementation, setup_context and backward in an autograd.Function; anything traced
still goes through the registered custom op. Both paths must give the same bits."""
from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_BACKENDS, use_backend

from fastcbd.ops import cbd_loss as cbd_mod
from fastcbd.ops import cosine_ce as ce_mod
from fastcbd.ops import cosine_distill as cd_mod
from fastcbd.ops import multi_teacher_kd as kd_mod

B, K, DK, C = 6, 2, 5, 7


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(B, K * DK, generator=g).relu_().to(dtype).requires_grad_()
    w = torch.randn(C, K * DK, generator=g).to(dtype).requires_grad_()
    target = torch.randint(0, C, (B,), generator=g)
    target[2] = -100  # an ignored row: the CE scale and masks take the same path in both
    teachers = [torch.randn(B, DK, generator=g).relu_().to(dtype) for _ in range(K)]
    z = torch.randn(B, C, generator=g).to(dtype).requires_grad_()
    logits = [torch.randn(B, C, generator=g).to(dtype) for _ in range(K)]
    return p, w, target, teachers, z, logits


# (module, the public call, the op's argument tuple, the inputs that get gradients)
def _cases(dtype):
    p, w, target, teachers, z, logits = _inputs(dtype)
    kd_w = torch.tensor([0.3, 0.7])
    return {
        "cbd_loss": (cbd_mod, (p, w, target, teachers, 0.4, 100.0, 20.0, True, 0), [p, w]),
        "cosine_ce": (ce_mod, (p, w, target, 20.0, -100, 0.1, True, True, 0), [p, w]),
        "cosine_distill": (cd_mod, (p, teachers, True), [p]),
        "multi_teacher_kd": (kd_mod, (z, logits, kd_w, 2.0, True), [z]),
    }


OP_NAMES = {"cbd_loss": "_cbd_loss_op", "cosine_ce": "_cosine_ce_op", "cosine_distill": "_cosine_distill_op",
            "multi_teacher_kd": "_multi_teacher_kd_op"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("op", list(OP_NAMES))
def test_eager_function_equals_the_custom_op(monkeypatch, op, name, dtype):
    use_backend(monkeypatch, name, op)
    mod, args, params = _cases(dtype)[op]
    custom = getattr(mod, OP_NAMES[op])
    got = mod._Eager.apply(*args)
    want = custom(*args)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{op} {name}: output {i} differs between the eager Function and the op"
    g_got = torch.autograd.grad(got[0] * 1.5, params)  # an upstream gradient other than 1
    g_want = torch.autograd.grad(want[0] * 1.5, params)
    for a, b in zip(g_got, g_want):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b), f"{op} {name}: gradients differ between the eager Function and the op"


def test_plain_eager_calls_take_the_function_and_traced_calls_the_op():
    p, w, target, teachers, _, _ = _inputs(torch.float32)
    loss = cbd_mod.cbd_loss(p, w, target, teachers)
    assert type(loss.grad_fn).__name__ == "CBDLossBackward", type(loss.grad_fn).__name__

    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda p, w: cbd_mod.cbd_loss(p, w, target, teachers))(p.detach(), w.detach())
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert "fastcbd.cbd_loss.default" in targets, targets


def test_eager_path_gradient_only_where_asked():
    """needs_input_grad follows the op's argument positions: a frozen classifier gets no gradient."""
    p, w, target, teachers, _, _ = _inputs(torch.float32)
    w = w.detach()
    loss = cbd_mod.cbd_loss(p, w, target, teachers)
    (gp,) = torch.autograd.grad(loss, [p])
    ref = cbd_mod.cbd_loss_ref(p, w, target, teachers)
    (gp_ref,) = torch.autograd.grad(ref, [p])
    torch.testing.assert_close(gp, gp_ref, rtol=1e-4, atol=1e-6)
    assert w.grad is None
