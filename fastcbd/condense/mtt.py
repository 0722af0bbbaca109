"""MTT, matching training trajectories (Cazenavette et al. 2022), with a TESLA-style constant-memory option.

Experts: networks trained on the real data whose flattened parameters after every epoch are stored on
disk (`expert_<i>.pt`: a list of (P,) float32 tensors, epoch 0 first). Distillation: from theta*_t (t
random below max_start_epoch) unroll N student SGD steps on synthetic mini-batches with a learnable step
size alpha, and minimise the normalised distance to the expert M epochs later:

    L = ||theta_hat_{t+N} - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

Backprop through the unroll keeps N graphs alive (memory grows with N). `constant_memory=True` runs the
unroll without a graph, then recomputes each step's gradient g_i with a graph on its own images only and
backpropagates -alpha * dL/dtheta_N . g_i into them, one step at a time (TESLA, Cui et al. 2023): the
memory of one step, and the terms by which earlier images move later steps' parameters (Hessian-vector
products) are dropped; with N = 1 it is the exact gradient.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastcbd.condense.convnet import convnet_for
from fastcbd.condense.dsa import DSA
from fastcbd.condense.pool import RealPool
from fastcbd.condense.synthetic import SyntheticSet

log = logging.getLogger("fastcbd")


@dataclass
class MTTConfig:
    num_experts: int = 5
    expert_epochs_train: int = 15  # epochs each expert is trained (trajectory length)
    lr_teacher: float = 0.01
    batch_train: int = 256
    iterations: int = 1000
    syn_steps: int = 20  # N
    expert_epochs: int = 2  # M
    max_start_epoch: int = 10
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    batch_syn: int = 0  # 0: the whole synthetic set every step
    expert_sampling: str = "balanced"  # balanced: label-balanced expert epochs | instance: the reference's
    constant_memory: bool = False
    width: int = 128
    depth: int = 3


class Flat:
    """Views of a flat (P,) parameter vector as a network's named parameters."""

    def __init__(self, net: torch.nn.Module):
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for _, p in net.named_parameters()]
        self.sizes = [p.numel() for _, p in net.named_parameters()]

    def flatten(self, net: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def params(self, flat: torch.Tensor) -> dict:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}


def epoch_order(pool: RealPool, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """The image indices of one expert epoch (len(pool) of them): a permutation of the pool, or, balanced,
    the same number drawn label-uniformly (with replacement; spread over the strata of a label when the
    pool has them), shuffled."""
    n = len(pool.y)
    if not balanced:
        return torch.randperm(n, generator=generator)
    labels = [c for c in range(pool.num_labels) if len(pool.by_label[c])]
    k = -(-n // len(labels))
    parts = []
    for c in labels:
        if pool.strata is not None:
            parts.append(pool.indices(c, k, generator))
        else:
            idx = pool.by_label[c]
            parts.append(idx[torch.randint(len(idx), (k,), generator=generator)])
    idx = torch.cat(parts)
    return idx[torch.randperm(len(idx), generator=generator)][:n]


def _reuse_only_if_same(out_dir: str, settings: dict) -> None:
    """Expert files in out_dir are a cache of trajectories trained with `settings` (experts.json): ones
    trained with other settings are deleted, so they are retrained rather than silently reused."""
    meta = os.path.join(out_dir, "experts.json")
    old = None
    if os.path.exists(meta):
        with open(meta) as f:
            old = json.load(f)
    if old == settings:
        return
    stale = expert_files(out_dir)
    if stale and old is not None:
        log.info("%s: experts were trained with %s; retraining for %s", out_dir, old, settings)
    for path in stale:
        os.remove(path)
    with open(meta, "w") as f:
        json.dump(settings, f)


def train_experts(pool: RealPool, cfg: MTTConfig, out_dir: str, aug: DSA, seed: int, progress=None) -> list[str]:
    """Train cfg.num_experts networks on the real images (SGD, no momentum, as the reference buffers) and
    store each trajectory. Existing expert files in out_dir are reused.

    cfg.expert_sampling: label-balanced epochs (default) or instance epochs (the reference). On long-tailed
    data instance epochs train experts whose trajectories carry the imbalance, and the images distilled to
    follow them carry it into the classifier trained on them. Measured on MNIST-LT (docs/condense.md):
    plain MTT is the same either way (84.03 instance, 84.07 balanced), but the hierarchical method's group
    level sees the head group's 13:1 share (cross-group errors 29% instead of 9%, 64.0% overall) and its
    class level the within-group tail (79.7%); balanced at both levels it reaches 84.6%."""
    if cfg.expert_sampling not in ("instance", "balanced"):
        raise ValueError(f"mtt expert_sampling={cfg.expert_sampling!r}: expected instance or balanced")
    balanced = cfg.expert_sampling == "balanced"
    os.makedirs(out_dir, exist_ok=True)
    shape = tuple(pool.x.shape[1:])
    _reuse_only_if_same(out_dir, {"width": cfg.width, "depth": cfg.depth, "epochs": cfg.expert_epochs_train,
                                  "lr": cfg.lr_teacher, "batch": cfg.batch_train, "sampling": cfg.expert_sampling,
                                  "seed": seed, "shape": list(shape), "labels": pool.num_labels, "images": len(pool.y)})
    paths = []
    for e in range(cfg.num_experts):
        path = os.path.join(out_dir, f"expert_{e}.pt")
        paths.append(path)
        if os.path.exists(path):
            continue
        torch.manual_seed(seed * 1000 + e)
        gen = torch.Generator().manual_seed(seed * 1000 + e)
        net = convnet_for(shape, pool.num_labels, cfg.width, cfg.depth).to(pool.x.device)
        flat = Flat(net)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_teacher)
        traj = [flat.flatten(net).clone()]
        for _ in range(cfg.expert_epochs_train):
            order = epoch_order(pool, balanced, gen)
            for i in range(0, len(order), cfg.batch_train):
                idx = order[i:i + cfg.batch_train]
                x = aug(pool.x[idx], aug.draw(len(idx)))
                loss = F.cross_entropy(net(x), pool.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            traj.append(flat.flatten(net).clone())
        tmp = path + ".tmp"
        torch.save(traj, tmp)
        os.replace(tmp, path)
        if progress is not None:
            progress.update(1)
    return paths


def normalized_param_loss(theta_n: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||theta_n - target||^2 / ||start - target||^2, all (P,)."""
    return ((theta_n - target) ** 2).sum() / ((start - target) ** 2).sum()


def _step_grad(net, flat: Flat, theta, x, targets, create_graph: bool):
    logits = functional_call(net, flat.params(theta), (x,))
    ce = F.cross_entropy(logits, targets)
    return torch.autograd.grad(ce, theta, create_graph=create_graph)[0]


def unroll_loss(net, flat: Flat, start, target, syn: SyntheticSet, syn_lr, batches, draws, aug: DSA):
    """The full-graph unroll: N steps, differentiable in the images, soft labels and syn_lr."""
    theta = start.clone().requires_grad_(True)
    targets = syn.targets()
    for idx, d in zip(batches, draws):
        x = aug(syn.images[idx], d)
        theta = theta - syn_lr * _step_grad(net, flat, theta, x, targets[idx], create_graph=True)
    return normalized_param_loss(theta, start, target)


def constant_memory_backward(net, flat: Flat, start, target, syn: SyntheticSet, syn_lr, batches, draws,
                             aug: DSA) -> float:
    """TESLA-style: accumulate the gradients into .grad one step at a time; returns the loss."""
    thetas, theta = [], start.clone()
    targets_all = syn.targets().detach()
    for idx, d in zip(batches, draws):  # pass 1: the trajectory, no graph
        thetas.append(theta)
        x = aug(syn.images.detach()[idx], d)
        t = theta.clone().requires_grad_(True)
        theta = theta - syn_lr.detach() * _step_grad(net, flat, t, x, targets_all[idx], create_graph=False)
    theta_n = theta.requires_grad_(True)
    loss = normalized_param_loss(theta_n, start, target)
    (lam,) = torch.autograd.grad(loss, theta_n)
    for theta_i, idx, d in zip(thetas, batches, draws):  # pass 2: one step's graph at a time
        t = theta_i.clone().requires_grad_(True)
        g = _step_grad(net, flat, t, aug(syn.images[idx], d), syn.targets()[idx], create_graph=True)
        (-(syn_lr * (lam * g).sum())).backward()
    return loss.detach().item()


def distill_mtt(pool: RealPool, syn: SyntheticSet, cfg: MTTConfig, aug: DSA, seed: int, expert_paths: list[str],
                progress=None) -> list[float]:
    """Optimise syn.images (and soft labels, and the step size) in place; returns the loss per iteration."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = convnet_for(tuple(syn.images.shape[1:]), pool.num_labels, cfg.width, cfg.depth)
    flat = Flat(net)
    syn_lr = torch.tensor(cfg.lr_teacher, requires_grad=True)
    groups = [{"params": [syn.images], "lr": cfg.lr_img}, {"params": [syn_lr], "lr": cfg.lr_lr}]
    if syn.label_logits is not None:
        groups.append({"params": [syn.label_logits], "lr": cfg.lr_img * 1e-3})
    opt = torch.optim.SGD(groups, momentum=0.5)
    experts = [torch.load(p, weights_only=True) for p in expert_paths]
    n = len(syn.labels)
    bs = cfg.batch_syn or n
    losses = []
    for _ in range(cfg.iterations):
        traj = experts[int(torch.randint(len(experts), (1,), generator=gen))]
        hi = max(1, min(cfg.max_start_epoch, len(traj) - cfg.expert_epochs))
        t = int(torch.randint(hi, (1,), generator=gen))
        start, target = traj[t], traj[min(t + cfg.expert_epochs, len(traj) - 1)]
        batches = [torch.randperm(n, generator=gen)[:bs] for _ in range(cfg.syn_steps)]
        draws = [aug.draw(len(b)) for b in batches]
        opt.zero_grad(set_to_none=True)
        if cfg.constant_memory:
            loss = constant_memory_backward(net, flat, start, target, syn, syn_lr, batches, draws, aug)
        else:
            loss_t = unroll_loss(net, flat, start, target, syn, syn_lr, batches, draws, aug)
            loss_t.backward()
            loss = loss_t.item()
        opt.step()
        with torch.no_grad():
            syn_lr.clamp_(min=1e-5)
        losses.append(loss)
        if progress is not None:
            progress.update(1)
    syn.learned_lr = float(syn_lr.detach())
    return losses


def expert_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "expert_*.pt")))
