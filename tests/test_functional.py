"""fastcbd.functional against a float64 reference written here (DESIGN.md §1.1), and its input errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastcbd.functional as Fc
from fastcbd.nn import CBDLoss, CosineClassifier


def reference_cbd(p, w, y, teachers, alpha, beta, sigma):
    """The formula, term by term, in float64."""
    p, w = p.double(), w.double()
    f = p / p.norm(dim=1, keepdim=True)
    t = torch.cat([x.double() / x.double().norm(dim=1, keepdim=True) for x in teachers], 1) / math.sqrt(len(teachers))
    z = sigma * f @ (w / w.norm(dim=1, keepdim=True)).T
    ce = torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]
    return ((1 - alpha) * ce + alpha * beta * (1 - (f * t).sum(1))).mean()


def _close(name, got, want, tol):
    err = (got.double() - want).abs()
    worst = int(err.argmax()) if err.dim() else 0
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum()} non-finite values"
    assert float(err.max()) <= tol * (1 + float(want.abs().max())), \
        f"{name}: max abs error {float(err.max()):.3e} at flat index {worst} (tol {tol})"


@pytest.mark.parametrize("B,dims,C", [(1, [5], 3), (7, [37, 64], 10), (129, [13, 8, 21, 6], 100), (33, [3, 3, 3], 7)])
def test_cbd_loss_matches_reference(B, dims, C):
    g = torch.Generator().manual_seed(B * 1000 + C)
    D = sum(dims)
    p = torch.randn(B, D, generator=g).relu_() + 0.01
    w = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    teachers = [torch.randn(B, d, generator=g) * (k + 1) for k, d in enumerate(dims)]
    alpha, beta, sigma = 0.3, 50.0, 16.0

    p64, w64 = p.double().requires_grad_(), w.double().requires_grad_()
    want = reference_cbd(p64, w64, y, teachers, alpha, beta, sigma)
    gp_want, gw_want = torch.autograd.grad(want * 1.7, (p64, w64))

    p32, w32 = p.clone().requires_grad_(), w.clone().requires_grad_()
    got = Fc.cbd_loss(p32, w32, y, teachers, alpha=alpha, beta=beta, sigma=sigma)
    assert got.dim() == 0
    (got * 1.7).backward()
    _close("loss", got.detach(), want.detach(), 1e-5)
    _close("grad features", p32.grad, gp_want, 1e-5)
    _close("grad classifier_weight", w32.grad, gw_want, 1e-5)


def test_teachers_get_no_gradient():
    teachers = [torch.randn(4, 6, requires_grad=True), torch.randn(4, 2, requires_grad=True)]
    p = torch.rand(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    Fc.cbd_loss(p, w, torch.tensor([0, 1, 2, 0]), teachers).backward()
    assert all(t.grad is None for t in teachers), "a teacher received a gradient"
    assert p.grad is not None and w.grad is not None


def test_distill_term_and_logits_match_reference():
    g = torch.Generator().manual_seed(3)
    p, teachers = torch.randn(9, 20, generator=g), [torch.randn(9, 15, generator=g), torch.randn(9, 5, generator=g)]
    t = torch.cat([F.normalize(x, dim=1) for x in teachers], 1) / math.sqrt(2)
    want = (1 - (F.normalize(p, dim=1) * t).sum(1)).mean()
    _close("cosine_distill_loss", Fc.cosine_distill_loss(p, teachers), want.double(), 1e-6)
    w = torch.randn(4, 20, generator=g)
    z = Fc.cosine_logits(p, w, sigma=20.0)
    assert z.abs().max() <= 20.0 + 1e-4, "cosine logits exceed sigma"
    _close("cosine_logits", z, (20 * F.normalize(p, dim=1) @ F.normalize(w, dim=1).T).double(), 1e-6)


def test_modules_match_functional():
    g = torch.Generator().manual_seed(5)
    clf = CosineClassifier(12, 5, sigma=20.0)
    assert not any("bias" in n for n, _ in clf.named_parameters()), "the cosine classifier must have no bias"
    p, y = torch.rand(6, 12, generator=g), torch.randint(0, 5, (6,), generator=g)
    teachers = [torch.randn(6, 12, generator=g)]
    a = CBDLoss()(p, clf.weight, y, teachers)
    b = reference_cbd(p, clf.weight.detach(), y, teachers, 0.4, 100.0, 20.0)
    _close("CBDLoss", a.detach(), b, 1e-5)
    # normalised along the feature dimension: scaling one class vector leaves the logits unchanged
    with torch.no_grad():
        before = clf(p)
        clf.weight[2] *= 7.0
        _close("scaled class vector", clf(p), before.double(), 1e-5)


@pytest.mark.parametrize("case,match", [
    ("sum_dk", r"sum to 10"),
    ("batch", r"teacher_features\[1\] has batch size 5"),
    ("target_range", r"target\[2\] = 7 is outside \[0, C=4\)"),
    ("negative_target", r"target\[0\] = -1"),
    ("no_teachers", r"teacher_features is empty"),
    ("weight_dim", r"classifier_weight is 4x9"),
    ("target_len", r"target has 5 entries"),
    ("features_rank", r"features must be a 2-D tensor"),
])
def test_bad_input_names_the_argument(case, match):
    p, w, y = torch.rand(6, 12), torch.randn(4, 12), torch.tensor([0, 1, 2, 3, 0, 1])
    teachers = [torch.randn(6, 8), torch.randn(6, 4)]
    if case == "sum_dk":
        teachers = [torch.randn(6, 8), torch.randn(6, 2)]
    elif case == "batch":
        teachers = [torch.randn(6, 8), torch.randn(5, 4)]
    elif case == "target_range":
        y = torch.tensor([0, 1, 7, 3, 0, 1])
    elif case == "negative_target":
        y = torch.tensor([-1, 1, 2, 3, 0, 1])
    elif case == "no_teachers":
        teachers = []
    elif case == "weight_dim":
        w = torch.randn(4, 9)
    elif case == "target_len":
        y = y[:5]
    elif case == "features_rank":
        p = torch.rand(6, 12, 1)
    with pytest.raises(ValueError, match=match):
        Fc.cbd_loss(p, w, y, teachers)


def test_cosine_cross_entropy_checks_its_target():
    """Range-checked like cbd_loss (a ValueError naming the argument); ignore_index and int32 are accepted."""
    g = torch.Generator().manual_seed(7)
    p, w = torch.rand(5, 12, generator=g), torch.randn(4, 12, generator=g)
    with pytest.raises(ValueError, match=r"target\[1\] = 4 is outside \[0, C=4\)"):
        Fc.cosine_cross_entropy(p, w, torch.tensor([0, 4, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"target\[3\] = -1 is outside .* not ignore_index=-100"):
        Fc.cosine_cross_entropy(p, w, torch.tensor([0, 3, 1, -1, 3]))
    with pytest.raises(ValueError, match="target has 4 entries"):
        Fc.cosine_cross_entropy(p, w, torch.tensor([0, 3, 1, 2]))
    y = torch.tensor([0, 3, -100, 2, 1])
    want = F.cross_entropy(20 * F.normalize(p, dim=1) @ F.normalize(w, dim=1).T, y)
    _close("cosine_cross_entropy with an ignored row", Fc.cosine_cross_entropy(p, w, y), want.double(), 1e-5)
    _close("int32 target", Fc.cosine_cross_entropy(p, w, y.int()), want.double(), 1e-5)
