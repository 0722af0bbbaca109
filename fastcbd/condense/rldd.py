"""`--method rldd`: uni-level long-tailed distillation by unbiased recovery (after RLDD, Cui et al., AAAI
2026, arXiv 2511.18858, in the SRe2L / EDC family). Evaluated with relabeling (relabel.py).

1. observer: a ConvNet-3 with batch norm trained on the long-tailed set with the balanced-softmax loss
   (a class-balanced loss), its batch-norm statistics then recalibrated to the class-balanced ones by a
   forward pass over the set (bnstats.py);
2. initialisation, over `init_rounds` rounds: each round draws augmented crops (DSA crop + scale) of each
   class's real images (the images themselves are candidates too), keeps the `keep` most confident under
   the scorer (the relabel teacher, else the observer) and adds, one at a time, the kept crop farthest (in
   the observer's normalised features) from those already chosen, preferring crops of real images no pick
   came from yet (coverage: a tail class of 4 images keeps all 4), until the class has its share of the
   budget for that round;
3. recovery: Adam on the pixels of L = CE(observer(A(S)), y) + bn_weight * sum_l (||mu_l(S) - mu_l*|| +
   ||var_l(S) - var_l*||), mu_l / var_l the class-balanced moments of layer l's input on the augmented
   synthetic batch and mu_l* / var_l* the observer's recalibrated statistics (the observer in eval mode).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcbd.condense.bnstats import batch_stats, class_weights, recalibrate_bn
from fastcbd.condense.convnet import convnet_for
from fastcbd.condense.dsa import DSA, DSAConfig
from fastcbd.condense.evaluate import fit_balanced_softmax
from fastcbd.condense.pool import RealPool
from fastcbd.condense.synthetic import SyntheticSet


@dataclass
class RLDDConfig:
    observer_steps: int = 2000
    observer_batch: int = 256
    observer_lr: float = 0.05
    init_rounds: int = 3
    init_candidates: int = 8  # augmented crops drawn per image still to choose, each round (0: the real images only)
    keep: float = 0.5  # share of the most confident crops the diversity pick chooses from
    iterations: int = 1000
    lr_img: float = 0.05
    bn_weight: float = 1.0
    width: int = 128
    depth: int = 3


def train_observer(pool: RealPool, cfg: RLDDConfig, aug: DSA, seed: int, progress=None) -> nn.Module:
    """ConvNet-3 (batch norm) trained with the balanced-softmax loss on the pool (instance sampling, DSA
    augmentation, SGD momentum 0.9, lr / 10 halfway), then its BN statistics made class-balanced."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = convnet_for(tuple(pool.x.shape[1:]), pool.num_labels, cfg.width, cfg.depth, norm="batch").to(pool.x.device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.observer_lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [cfg.observer_steps // 2], 0.1)
    fit_balanced_softmax(net, pool.x, pool.y, pool.counts, aug, opt, sched, cfg.observer_steps, cfg.observer_batch,
                         gen, progress)
    recalibrate_bn(net, pool.x, pool.y, pool.num_labels)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


@torch.no_grad()
def select_init(pool: RealPool, syn: SyntheticSet, scorer, embed, cfg: RLDDConfig, seed: int) -> None:
    """Fill syn.images class by class with confident, diverse augmented real crops (module docstring, 2).
    scorer(x) -> (B, num_labels) probabilities; embed(x) -> (B, D) features. A class without real images
    keeps its initial images."""
    crops = DSA(DSAConfig(strategy="crop_scale", flip=False), seed)
    gen = torch.Generator().manual_seed(seed)
    for c in range(pool.num_labels):
        slots = torch.nonzero(syn.labels == c).flatten()
        real = pool.x[pool.by_label[c]]
        if len(slots) == 0 or len(real) == 0:
            continue
        chosen, feats, used = [], [], []
        for r in range(cfg.init_rounds):
            target = math.ceil(len(slots) * (r + 1) / cfg.init_rounds)
            need = target - len(chosen)
            if need <= 0:
                continue
            m = cfg.init_candidates * need
            src = torch.randint(len(real), (m,), generator=gen)
            # candidates: the real images themselves (an identity crop) and m augmented crops of them
            src = torch.cat([torch.arange(len(real)), src])
            cand = torch.cat([real, crops(real[src[len(real):]], crops.draw(m))]) if m else real
            conf = scorer(cand)[:, c]
            top = conf.argsort(descending=True)[:max(need, math.ceil(cfg.keep * len(cand)))]
            cand, conf, src = cand[top], conf[top], src[top]
            f = F.normalize(embed(cand).flatten(1), dim=1)
            # distance of each candidate to the nearest chosen one (inf before the first pick)
            dist = torch.full((len(cand),), float("inf"))
            for prev in feats:
                dist = torch.minimum(dist, (f - prev).norm(dim=1))
            free = torch.ones(len(cand), dtype=torch.bool)
            for _ in range(need):
                # coverage first: crops of a real image no pick came from yet, when the kept ones have any
                fresh = free & ~torch.isin(src, torch.tensor(used, dtype=torch.long))
                pool_ = fresh if fresh.any() else free
                score = torch.where(pool_, dist, torch.tensor(-1.0))
                i = int(conf.mul(pool_).argmax()) if torch.isinf(score[pool_]).all() else int(score.argmax())
                chosen.append(cand[i])
                feats.append(f[i])
                used.append(int(src[i]))
                free[i] = False
                dist = torch.minimum(dist, (f - f[i]).norm(dim=1))
        syn.images.data[slots] = torch.stack(chosen[:len(slots)]).to(syn.images.dtype)


def bn_targets(observer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone()) for m in observer.modules() if isinstance(m, nn.BatchNorm2d)]


def recovery_loss(observer: nn.Module, x: torch.Tensor, y: torch.Tensor, targets, num_labels: int,
                  bn_weight: float) -> tuple[torch.Tensor, float]:
    """(CE + bn_weight * BN-statistics distance, the BN distance alone) for images x (N, C, H, W), labels y."""
    w = class_weights(y, num_labels).to(x.device)
    stats = []
    hooks = [m.register_forward_pre_hook(lambda _, inp: stats.append(batch_stats(inp[0], w)))
             for m in observer.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        logits = observer(x)
    finally:
        for h in hooks:
            h.remove()
    bn = sum((mu - tm).norm() + (var - tv).norm() for (mu, var), (tm, tv) in zip(stats, targets))
    return F.cross_entropy(logits, y) + bn_weight * bn, float(bn.detach())


def distill_rldd(pool: RealPool, syn: SyntheticSet, cfg: RLDDConfig, aug: DSA, seed: int, progress=None,
                 scorer=None, times: dict | None = None, embed=None) -> list[float]:
    """Observer, initialisation and recovery of syn.images in place; the recovery's BN distance per
    iteration is returned, and each stage's seconds added to `times` ('observer', 'init', 'recovery').

    scorer / embed: the relabel teacher's probabilities and features (None: the observer's). Without a
    recovery (cfg.iterations 0) and with both given, no observer is trained: the teacher scores the
    candidates and measures their diversity."""
    times = {} if times is None else times
    t0 = time.perf_counter()
    if cfg.iterations == 0 and scorer is not None and embed is not None:
        select_init(pool, syn, scorer, embed, cfg, seed)
        times["init"] = times.get("init", 0.0) + time.perf_counter() - t0
        return []
    observer = train_observer(pool, cfg, aug, seed)
    t1 = time.perf_counter()
    times["observer"] = times.get("observer", 0.0) + t1 - t0
    select_init(pool, syn, scorer or (lambda x: observer(x).softmax(1)), observer.embed, cfg, seed)
    t2 = time.perf_counter()
    times["init"] = times.get("init", 0.0) + t2 - t1
    targets = bn_targets(observer)
    torch.manual_seed(seed)
    opt = torch.optim.Adam([syn.images], lr=cfg.lr_img, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.iterations, 1))
    history = []
    for _ in range(cfg.iterations):
        xb = aug(syn.images, aug.draw(len(syn.labels)))
        loss, bn = recovery_loss(observer, xb, syn.labels, targets, pool.num_labels, cfg.bn_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(bn)
        if progress is not None:
            progress.update(1)
    times["recovery"] = times.get("recovery", 0.0) + time.perf_counter() - t2
    return history
