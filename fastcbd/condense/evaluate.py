"""Evaluation as the field reports it: train a fresh ConvNet on a (synthetic) set N times, test top-1.

Training follows the reference evaluation (SGD momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10
halfway, DSA augmentation per image), counted in steps of `batch` images: with a synthetic set smaller
than the batch, a step is an epoch.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastcbd.condense.convnet import ConvNet, convnet_for
from fastcbd.condense.dsa import DSA
from fastcbd.condense.relabel import relabel_loss
from fastcbd.train.metrics import shot_accuracy

KEYS = ("all", "many", "medium", "few")


@dataclass
class EvalConfig:
    repeats: int = 5
    steps: int = 1000
    lr: float = 0.01
    batch: int = 256
    weight_decay: float = 5e-4
    augment: bool = True
    width: int = 128
    depth: int = 3
    workers: int = 1  # models of a set trained at once, in threads (train_classifiers): the same results


_INIT = threading.Lock()  # a model's initial weights come from the global RNG, seeded just before


def train_classifier(x: torch.Tensor, targets: torch.Tensor, num_labels: int, cfg: EvalConfig, seed: int,
                     aug: DSA | None, progress=None, teacher=None) -> ConvNet:
    """A fresh ConvNet trained on x (N, C, H, W) float with targets (N,) int64 or (N, K) soft.

    teacher (relabel.SoftLabeler or LabelView): the targets are ignored and each augmented batch is
    labelled by teacher.probs (the relabel loss, relabel.py)."""
    gen = torch.Generator().manual_seed(seed)
    with _INIT:
        torch.manual_seed(seed)
        net = convnet_for(tuple(x.shape[1:]), num_labels, cfg.width, cfg.depth).to(x.device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [cfg.steps // 2], 0.1)
    x, targets = x.detach(), targets.detach()

    def epochs():  # batches of a fresh permutation each epoch
        while True:
            order = torch.randperm(len(x), generator=gen)
            yield from (order[pos:pos + cfg.batch] for pos in range(0, len(x), cfg.batch))

    batches = epochs()

    def batch_loss() -> torch.Tensor:
        idx = next(batches)
        xb = aug(x[idx], aug.draw(len(idx))) if (aug is not None and cfg.augment) else x[idx]
        if teacher is None:
            return F.cross_entropy(net(xb), targets[idx])
        return relabel_loss(net(xb), teacher.probs(xb), teacher.tau)

    sgd_steps(opt, sched, cfg.steps, batch_loss, progress)
    return net.eval()


def train_classifiers(x: torch.Tensor, targets: torch.Tensor, num_labels: int, cfg: EvalConfig, seeds: list[int],
                      aug: DSA | None, progress=None, teacher=None) -> list[ConvNet]:
    """train_classifier for each seed, as one after another (aug's draws continuing from model to model).

    With cfg.workers > 1, up to that many train at once in threads (torch releases the GIL in its kernels:
    two single-threaded models use two cores, where one model's convolutions scale poorly over two
    threads). Each model gets a copy of aug whose generator is advanced to where the sequential run would
    start it, and aug ends where that run would leave it, so the models are the same bit for bit."""
    if cfg.workers <= 1 or len(seeds) <= 1:
        return [train_classifier(x, targets, num_labels, cfg, s, aug, progress, teacher) for s in seeds]
    augs = [aug] * len(seeds)
    if aug is not None and cfg.augment:
        per_epoch = [min(cfg.batch, len(x) - pos) for pos in range(0, len(x), cfg.batch)]
        sizes = [per_epoch[i % len(per_epoch)] for i in range(cfg.steps)]  # the batches epochs() yields
        state, augs = aug.generator.get_state(), []
        for _ in seeds:
            own = DSA(aug.cfg)
            own.generator.set_state(state)
            augs.append(own)
            scratch = DSA(aug.cfg)
            scratch.generator.set_state(state)
            for n in sizes:
                scratch.draw(n)
            state = scratch.generator.get_state()
        aug.generator.set_state(state)
    with ThreadPoolExecutor(min(cfg.workers, len(seeds)), thread_name_prefix="fastcbd-eval") as pool:
        futures = [pool.submit(train_classifier, x, targets, num_labels, cfg, s, a, progress, teacher)
                   for s, a in zip(seeds, augs)]
        return [f.result() for f in futures]


def sgd_steps(opt, sched, steps: int, batch_loss, progress=None) -> None:
    """`steps` optimizer and scheduler steps on batch_loss() (each call: a fresh batch's loss)."""
    for _ in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)


def fit_balanced_softmax(net, x: torch.Tensor, y: torch.Tensor, counts, aug: DSA, opt, sched, steps: int,
                         batch: int, gen: torch.Generator, progress=None) -> None:
    """Train net on the long-tailed x (N, C, H, W), y (N,) with the balanced-softmax loss: instance
    sampling (batches of `batch` drawn with replacement from gen) under the augmentation aug (what the
    `auto` relabel teacher and the RLDD observer are trained with)."""
    from fastcbd.train.baselines import balanced_softmax_loss

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(y), (min(batch, len(y)),), generator=gen).to(x.device)
        return balanced_softmax_loss(net(aug(x[idx], aug.draw(len(idx)))), y[idx], counts)

    sgd_steps(opt, sched, steps, batch_loss, progress)


@torch.no_grad()
def predict(net, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    return torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()


def summarize(runs: list[dict]) -> dict:
    """Mean over runs of all / many / medium / few (percent), `std` of `all` and std_<key> of each;
    other numeric keys (bias metrics) are averaged too."""
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if not vals or key == "per_class":
            continue
        arr = np.asarray(vals, dtype=float)
        out[key] = float(np.mean(arr)) if not np.isnan(arr).all() else float("nan")
        if key in KEYS:
            out["std" if key == "all" else f"std_{key}"] = float(np.std(arr)) if len(arr) > 1 else 0.0
    out["per_class"] = np.mean([r["per_class"] for r in runs], axis=0).tolist()
    out["runs"] = len(runs)
    return out


def accuracy(pred: np.ndarray, y_test: np.ndarray, class_counts) -> dict:
    return {k: v for k, v in shot_accuracy(pred, y_test, class_counts).items()}


def nan_to_none(v):
    return None if isinstance(v, float) and math.isnan(v) else v
