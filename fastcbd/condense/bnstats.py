"""Class-balanced batch-norm statistics (RLDD's recalibration, after Cui et al., AAAI 2026).

A network trained on a long-tailed set keeps running statistics dominated by the head classes. Here each
BatchNorm2d layer's running mean and variance are replaced by those of the class-balanced mixture of its
inputs over the whole set: with a_c the inputs of class c's images (every image and position),

    mu  = 1/C' sum_c mean(a_c),       var = 1/C' sum_c mean(a_c^2) - mu^2

over the C' classes present, i.e. every image weighted 1 / (C' n_c). The layers are recalibrated in order,
each with one forward pass over the set in eval mode, so a layer's inputs are normalised by the layers
before it with their recalibrated statistics (what the network computes afterwards). The moments are
accumulated in float64. `batch_stats` gives the same weighted moments of one batch, differentiably (what
the recovery matches).
"""
from __future__ import annotations

import torch
from torch import nn


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) float64 weights 1 / (C' n_c) of labels y (N,) int64: each present class weighs 1 / C'."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)
    present = int((counts > 0).sum())
    return 1.0 / (present * counts[y])


def batch_stats(a: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of a (N, C, H, W), images weighted by w (N,) summing to 1
    (None: equally); differentiable in a."""
    m1 = a.mean(dim=(2, 3))
    m2 = (a * a).mean(dim=(2, 3))
    if w is None:
        mu, sq = m1.mean(0), m2.mean(0)
    else:
        w = w.to(a.dtype).view(-1, 1)
        mu, sq = (w * m1).sum(0), (w * m2).sum(0)
    return mu, sq - mu * mu


@torch.no_grad()
def recalibrate_bn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch: int = 512) -> list[dict]:
    """Set every BatchNorm2d's running_mean / running_var of `net` to the class-balanced statistics of its
    inputs over x (N, C, H, W) with labels y (N,). Returns per layer {'mean', 'var'} (float32 tensors)."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    w = class_weights(y.cpu(), num_classes).to(x.device)
    was_training = net.training
    net.eval()
    out = []
    for bn in bns:
        acc = {}

        def hook(_, inputs, acc=acc):
            a = inputs[0].to(torch.float64)
            wb = acc["w"]
            acc["m1"] = acc.get("m1", 0) + (wb.view(-1, 1) * a.mean(dim=(2, 3))).sum(0)
            acc["m2"] = acc.get("m2", 0) + (wb.view(-1, 1) * (a * a).mean(dim=(2, 3))).sum(0)
            raise _Stop

        handle = bn.register_forward_pre_hook(hook)
        try:
            for i in range(0, len(x), batch):
                acc["w"] = w[i:i + batch]
                try:
                    net(x[i:i + batch])
                except _Stop:
                    pass
        finally:
            handle.remove()
        mean, var = acc["m1"], acc["m2"] - acc["m1"] ** 2
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))
        out.append({"mean": bn.running_mean.clone(), "var": bn.running_var.clone()})
    net.train(was_training)
    return out


class _Stop(Exception):
    """Ends a recalibration pass at the layer being measured (the layers after it are not needed)."""
