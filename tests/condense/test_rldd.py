"""--method rldd (fastcbd/condense/rldd.py, bnstats.py): class-balanced BN statistics against a hand
computation, the weighted batch moments, the initialisation's picks, and a recovery that lowers its loss."""
import numpy as np
import pytest
import torch
from torch import nn

from fastcbd.condense.bnstats import batch_stats, class_weights, recalibrate_bn
from fastcbd.condense.pool import RealPool
from fastcbd.condense.rldd import RLDDConfig, distill_rldd, select_init
from fastcbd.condense.synthetic import SyntheticSet


def balanced_moments(a: np.ndarray, y: np.ndarray):
    """By hand: per class the mean of a (N, C, H, W) and of a^2 over its images and positions, averaged over
    the classes present; var = E_bal[a^2] - mu^2."""
    classes = sorted(set(y.tolist()))
    m1 = np.mean([a[y == c].transpose(1, 0, 2, 3).reshape(a.shape[1], -1).mean(1) for c in classes], axis=0)
    m2 = np.mean([(a[y == c] ** 2).transpose(1, 0, 2, 3).reshape(a.shape[1], -1).mean(1) for c in classes], axis=0)
    return m1, m2 - m1 ** 2


def test_recalibrated_bn_statistics_are_the_class_balanced_moments():
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    bn1, bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(4)
    net = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2)
    # 7 images of class 0, 2 of class 1, 1 of class 2 (a long tail), class 3 absent; batches of 3
    y = torch.tensor([0, 0, 1, 0, 0, 2, 0, 1, 0, 0])
    x = torch.randn(10, 2, 5, 6) + y.view(-1, 1, 1, 1).float()
    stats = recalibrate_bn(net, x, y, 4, batch=3)
    with torch.no_grad():
        a1 = conv1(x).double().numpy()
        mu1, var1 = balanced_moments(a1, y.numpy())
        # the second layer's inputs, normalised by the first layer's recalibrated statistics
        h = torch.relu((conv1(x) - torch.tensor(mu1).float().view(1, -1, 1, 1))
                       / torch.sqrt(torch.tensor(var1).float().view(1, -1, 1, 1) + bn1.eps) * bn1.weight.view(1, -1, 1, 1)
                       + bn1.bias.view(1, -1, 1, 1))
        mu2, var2 = balanced_moments(conv2(h).double().numpy(), y.numpy())
    for name, got, want in (("bn1 mean", bn1.running_mean, mu1), ("bn1 var", bn1.running_var, var1),
                            ("bn2 mean", bn2.running_mean, mu2), ("bn2 var", bn2.running_var, var2)):
        err = np.abs(got.double().numpy() - want)
        assert err.max() < 1e-5, f"{name}: worst channel {err.argmax()} off by {err.max()}: {got} vs {want}"
    assert torch.equal(stats[1]["mean"], bn2.running_mean)
    # not the instance-weighted statistics: class 0 would dominate those
    plain = a1.transpose(1, 0, 2, 3).reshape(3, -1).mean(1)
    assert np.abs(plain - mu1).max() > 0.05, (plain, mu1)


def test_batch_stats_weighted_by_class():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    w = class_weights(y, 3)
    assert torch.allclose(w, torch.tensor([1 / 8] * 4 + [1 / 4] * 2, dtype=torch.float64))
    mu, var = batch_stats(a, w)
    want_mu, want_var = balanced_moments(a.numpy(), y.numpy())
    assert np.allclose(mu.numpy(), want_mu) and np.allclose(var.numpy(), want_var)
    mu, var = batch_stats(a)  # unweighted: what BatchNorm2d computes in train mode
    assert torch.allclose(var, a.var(dim=(0, 2, 3), unbiased=False)) and torch.allclose(mu, a.mean(dim=(0, 2, 3)))


def _tiny_pool():
    g = torch.Generator().manual_seed(4)
    counts = [12, 5, 2]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randn(len(y), 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()
    return RealPool(x, y, 3)


def test_select_init_takes_confident_crops_of_the_class():
    pool = _tiny_pool()
    syn = SyntheticSet.from_real(pool, 4, torch.Generator().manual_seed(0))
    assert syn.counts == [4, 4, 2]  # the tail rule: class 2 has 2 real images
    # a scorer confident only for bright images: the picks of each class are its brightest crops
    scorer = lambda x: torch.stack([x.mean(dim=(1, 2, 3))] * 3, 1).softmax(0)
    embed = lambda x: x.flatten(1)
    cfg = RLDDConfig(init_rounds=2, init_candidates=6, keep=0.5)
    select_init(pool, syn, scorer, embed, cfg, seed=0)
    for c in range(3):
        picked = syn.images[syn.labels == c].detach()
        assert len(picked) == syn.counts[c]
        # the picks are crops of this class's images: mean brightness near the class's, far from the others'
        assert (picked.mean(dim=(1, 2, 3)) - c).abs().max() < 0.5, (c, picked.mean(dim=(1, 2, 3)))
        flat = picked.flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 1e-4, "two identical picks"
    # coverage: the tail class (2 real images, 2 slots) gets one pick from each of its images, here the
    # images themselves or crops of them (nearest real image of each pick: both, once)
    real = pool.x[pool.by_label[2]].flatten(1)
    nearest = torch.cdist(syn.images[syn.labels == 2].detach().flatten(1), real).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1], nearest


def test_select_init_from_real_images_by_diversity_alone():
    """init_candidates=0, keep=1 (the cpu preset): each pick is one of the class's real images, no image twice,
    and after the first (the most confident) each is the farthest from those already picked."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 4, 4, generator=g)
    y = torch.tensor([0] * 8 + [1] * 4)
    pool = RealPool(x, y, 2)
    syn = SyntheticSet.from_real(pool, 3, torch.Generator().manual_seed(0))
    scorer = lambda z: torch.stack([z.mean(dim=(1, 2, 3)), -z.mean(dim=(1, 2, 3))], 1).softmax(1)
    embed = lambda z: z.flatten(1)
    select_init(pool, syn, scorer, embed, RLDDConfig(init_rounds=1, init_candidates=0, keep=1.0), seed=0)
    real = x[:8].flatten(1)
    picked = syn.images[syn.labels == 0].detach().flatten(1)
    idx = [int(torch.cdist(p[None], real).argmin()) for p in picked]
    assert torch.equal(picked, real[idx]), "a pick is not one of the real images"
    assert len(set(idx)) == 3, idx
    f = torch.nn.functional.normalize(real, dim=1)
    expect = [int(scorer(x[:8])[:, 0].argmax())]
    for _ in range(2):
        d = torch.cdist(f, f[expect]).min(1).values
        d[expect] = -1
        expect.append(int(d.argmax()))
    assert idx == expect, (idx, expect)


def test_without_recovery_the_teacher_picks_and_no_observer_is_trained(monkeypatch):
    from fastcbd.condense import rldd

    monkeypatch.setattr(rldd, "train_observer", lambda *a, **k: pytest.fail("an observer was trained"))
    g = torch.Generator().manual_seed(2)
    pool = RealPool(torch.randn(10, 1, 4, 4, generator=g), torch.tensor([0] * 6 + [1] * 4), 2)
    syn = SyntheticSet.from_real(pool, 2, torch.Generator().manual_seed(0))
    scorer = lambda z: torch.full((len(z), 2), 0.5)
    times = {}
    cfg = RLDDConfig(iterations=0, init_candidates=0, keep=1.0, init_rounds=1)
    assert distill_rldd(pool, syn, cfg, NoAug(), 0, scorer=scorer, times=times, embed=lambda z: z.flatten(1)) == []
    assert set(times) == {"init"}
    for img, label in zip(syn.images.detach(), syn.labels):  # every pick is a real image of its class
        assert (pool.x[pool.y == label] - img).flatten(1).abs().sum(1).min() == 0


class NoAug:
    """The identity augmentation: the recovery's objective is then deterministic."""

    def draw(self, n):
        return None

    def __call__(self, x, draw, index=None):
        return x


def test_recovery_lowers_the_bn_distance():
    pool = _tiny_pool()
    syn = SyntheticSet.from_real(pool, 3, torch.Generator().manual_seed(0))
    cfg = RLDDConfig(observer_steps=30, observer_batch=8, iterations=40, lr_img=0.05, width=6, depth=2,
                     init_rounds=2, init_candidates=4)
    times = {}
    history = distill_rldd(pool, syn, cfg, NoAug(), seed=1, times=times)
    assert len(history) == 40 and all(np.isfinite(history))
    # history[0] is the distance of the initialised images, before any step
    assert history[-1] < 0.7 * history[0], history
    assert set(times) == {"observer", "init", "recovery"} and all(v > 0 for v in times.values())
