"""MTT: the normalised parameter loss, the learnable step size gets a gradient, the constant-memory
gradient equals the full unroll for one step, and expert trajectories are written to disk."""
import os

import pytest
import torch

from fastcbd.condense.convnet import convnet_for
from fastcbd.condense.dsa import DSA, DSAConfig
from fastcbd.condense.mtt import (
    Flat,
    MTTConfig,
    constant_memory_backward,
    epoch_order,
    normalized_param_loss,
    train_experts,
    unroll_loss,
)
from fastcbd.condense.pool import RealPool
from fastcbd.condense.synthetic import SyntheticSet

NO_AUG = DSAConfig(strategy="crop", crop=0.0, mode="M")  # identity: exact comparisons


def test_normalized_param_loss():
    start, target = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 5.0])
    theta = torch.tensor([1.5, 1.0, 5.0])
    # ||theta - target||^2 = 0.25 + 1 + 0 ; ||start - target||^2 = 1 + 0 + 4
    assert abs(float(normalized_param_loss(theta, start, target)) - 1.25 / 5.0) < 1e-7
    assert float(normalized_param_loss(start, start, target)) == 1.0


def _setup(n_steps, seed=0):
    torch.manual_seed(seed)
    net = convnet_for((1, 8, 8), 3, width=4, depth=2).double()
    flat = Flat(net)
    start = flat.flatten(net).double()
    target = start + 0.05 * torch.randn_like(start)
    syn = SyntheticSet(torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2]), 3).double()
    aug = DSA(NO_AUG, seed=0)
    batches = [torch.randperm(6)[:4] for _ in range(n_steps)]
    draws = [aug.draw(4) for _ in range(n_steps)]
    return net, flat, start, target, syn, aug, batches, draws


def test_learnable_lr_gets_a_gradient():
    net, flat, start, target, syn, aug, batches, draws = _setup(3)
    syn_lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    loss = unroll_loss(net, flat, start, target, syn, syn_lr, batches, draws, aug)
    loss.backward()
    assert syn_lr.grad is not None and syn_lr.grad.abs() > 0, syn_lr.grad
    assert syn.images.grad.abs().max() > 0
    # the step size's gradient by finite differences
    eps = 1e-6
    up = unroll_loss(net, flat, start, target, syn, syn_lr.detach() + eps, batches, draws, aug)
    dn = unroll_loss(net, flat, start, target, syn, syn_lr.detach() - eps, batches, draws, aug)
    fd = (up - dn).item() / (2 * eps)
    assert abs(fd - float(syn_lr.grad)) < 1e-5 * max(1.0, abs(fd)), f"{float(syn_lr.grad)} vs finite diff {fd}"


def test_constant_memory_equals_unroll_for_one_step():
    net, flat, start, target, syn, aug, batches, draws = _setup(1)
    lr1 = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    unroll_loss(net, flat, start, target, syn, lr1, batches, draws, aug).backward()
    g_full, lr_full = syn.images.grad.clone(), lr1.grad.clone()
    syn.images.grad = None
    lr2 = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    constant_memory_backward(net, flat, start, target, syn, lr2, batches, draws, aug)
    d = (syn.images.grad - g_full).abs().max()
    assert d < 1e-10 * g_full.abs().max(), f"images gradient max |diff| {d:.3g}"
    assert abs(float(lr2.grad - lr_full)) < 1e-10 * abs(float(lr_full))


def test_constant_memory_close_to_unroll_for_several_steps():
    """It drops the Hessian terms: close to, not equal to, the full gradient for small steps."""
    net, flat, start, target, syn, aug, batches, draws = _setup(4)
    lr1 = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    unroll_loss(net, flat, start, target, syn, lr1, batches, draws, aug).backward()
    g_full = syn.images.grad.clone()
    syn.images.grad = None
    constant_memory_backward(net, flat, start, target, syn, torch.tensor(0.01, dtype=torch.float64,
                                                                        requires_grad=True), batches, draws, aug)
    cos = torch.nn.functional.cosine_similarity(syn.images.grad.flatten(), g_full.flatten(), dim=0)
    assert cos > 0.95, f"cosine to the exact gradient {float(cos):.4f}"


def test_train_experts_writes_trajectories(tmp_path):
    x = torch.randn(30, 1, 8, 8)
    y = torch.arange(3).repeat(10)
    cfg = MTTConfig(num_experts=2, expert_epochs_train=3, batch_train=16, width=4, depth=2)
    paths = train_experts(RealPool(x, y, 3), cfg, str(tmp_path), DSA(seed=0), seed=0)
    assert len(paths) == 2
    traj = torch.load(paths[1], weights_only=True)
    n = sum(p.numel() for p in convnet_for((1, 8, 8), 3, width=4, depth=2).parameters())
    assert len(traj) == 4 and all(t.shape == (n,) for t in traj)
    assert (traj[0] - traj[-1]).abs().max() > 0, "the expert did not move"
    assert not torch.equal(torch.load(paths[0], weights_only=True)[0], traj[0]), "experts share an init"
    stamp = os.stat(paths[1]).st_mtime_ns
    assert train_experts(RealPool(x, y, 3), cfg, str(tmp_path), DSA(seed=0), seed=0) == paths
    assert os.stat(paths[1]).st_mtime_ns == stamp, "same settings: the cached expert is reused"
    wider = MTTConfig(num_experts=2, expert_epochs_train=3, batch_train=16, width=6, depth=2)
    train_experts(RealPool(x, y, 3), wider, str(tmp_path), DSA(seed=0), seed=0)
    n6 = sum(p.numel() for p in convnet_for((1, 8, 8), 3, width=6, depth=2).parameters())
    assert torch.load(paths[1], weights_only=True)[0].shape == (n6,), "other settings: the experts are retrained"


def test_expert_epochs_instance_or_label_balanced():
    """Instance epochs are a permutation of the pool; balanced ones draw each label (and, with strata,
    each stratum of a label) equally often."""
    y = torch.tensor([0] * 90 + [1] * 10)
    strata = torch.tensor([0] * 60 + [1] * 30 + [2] * 6 + [3] * 4)  # group 0: classes 0, 1; group 1: 2, 3
    pool, grouped = RealPool(torch.zeros(100, 1, 2, 2), y, 2), RealPool(torch.zeros(100, 1, 2, 2), y, 2, strata=strata)
    gen = torch.Generator().manual_seed(0)
    inst = epoch_order(pool, False, gen)
    assert sorted(inst.tolist()) == list(range(100))
    draws = torch.cat([epoch_order(grouped, True, gen) for _ in range(40)])
    assert len(draws) == 4000
    labels, classes = torch.bincount(y[draws]) / 4000, torch.bincount(strata[draws]) / 4000
    assert torch.allclose(labels, torch.tensor([0.5, 0.5]), atol=0.03), labels
    assert torch.allclose(classes, torch.full((4,), 0.25), atol=0.03), classes
    plain = torch.cat([epoch_order(pool, True, gen) for _ in range(40)])
    assert torch.allclose(torch.bincount(y[plain]) / 4000, torch.tensor([0.5, 0.5]), atol=0.03)
    with pytest.raises(ValueError, match="expert_sampling='uniform'"):
        train_experts(pool, MTTConfig(expert_sampling="uniform"), "/nonexistent", None, 0)
