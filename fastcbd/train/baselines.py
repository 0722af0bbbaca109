"""The standard long-tail baselines CBD is compared against, each a loss, a model wrapper or a stage.

- class-balanced CE (Cui et al., CVPR 2019): CE weighted by (1 - beta) / (1 - beta^n_c), normalised
  to a mean weight of 1; instance sampling.
- balanced softmax (Ren et al., NeurIPS 2020): CE on z + log n_c; instance sampling.
- logit adjustment (Menon et al., ICLR 2021): as a loss, CE on z + tau log pi_c; post hoc, the trained
  instance-sampled model's logits minus tau log pi_c.
- cRT, LWS, tau-normalisation (Kang et al., ICLR 2020), on a frozen instance-sampled backbone: cRT
  re-trains the classifier with class-balanced sampling (fastcbd.train.stages.train_crt); LWS learns
  one scale per class of the frozen classifier with class-balanced sampling; tau-norm rescales each
  class vector w_c / ||w_c||^tau of a linear classifier trained with instance sampling (the cosine
  classifier ignores ||w_c||, so tau-norm gets its own linear head).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastcbd.errors import ConfigError
from fastcbd.models.heads import LWS, LinearHead, PostHocAdjusted, log_prior
from fastcbd.train.stages import Context, fit_classifier, seed_everything, train_teacher

__all__ = ["BASELINES", "LWS", "LinearHead", "PostHocAdjusted", "balanced_softmax_loss", "class_balanced_weights",
           "log_prior", "logit_adjusted_loss", "run_baseline", "tau_normalize"]

BASELINES = ("ce_balanced", "crt", "lws", "tau_norm", "balanced_softmax", "logit_adj_loss", "logit_adj_posthoc",
             "cb_ce")


def logit_adjusted_loss(logits: torch.Tensor, target: torch.Tensor, log_pi: torch.Tensor, tau: float = 1.0):
    """CE(z + tau log pi, y): logits (B, C), target (B,) int64, log_pi (C,). tau = 0 is plain CE."""
    return F.cross_entropy(logits + tau * log_pi.to(logits.dtype), target)


def balanced_softmax_loss(logits: torch.Tensor, target: torch.Tensor, class_counts) -> torch.Tensor:
    """-log(n_y e^{z_y} / sum_j n_j e^{z_j}) = CE(z + log n, y); log N cancels, so it is the
    logit-adjusted loss with tau = 1."""
    return logit_adjusted_loss(logits, target, log_prior(class_counts, logits.device), 1.0)


def class_balanced_weights(class_counts, beta: float = 0.9999) -> torch.Tensor:
    """(C,) float32 weights (1 - beta) / (1 - beta^n_c), scaled to mean 1 over the classes present.
    beta = 0 gives all ones (plain CE); beta -> 1 tends to 1 / n_c."""
    n = np.asarray(class_counts, dtype=np.float64)
    w = np.where(n > 0, (1.0 - beta) / np.maximum(1.0 - np.power(beta, n), 1e-12), 0.0)
    w = w * (n > 0).sum() / w.sum()
    return torch.tensor(w, dtype=torch.float32)


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """(C, D) -> (C, D): each class vector w_c / ||w_c||^tau. tau = 0 returns the weights unchanged."""
    if tau == 0:
        return weight.clone()
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


def _frozen_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def train_lws(ctx: Context, teacher: nn.Module, seed: int) -> LWS:
    """Per-class scales of a frozen instance-sampled teacher, class-balanced sampling, cfg.crt schedule."""
    seed_everything(seed)
    model = ctx.place(LWS(_frozen_copy(teacher), ctx.splits.num_classes))
    loader, smp = ctx.train_loader("balanced", "vanilla", seed)
    ctx.fit(model, lambda x, y: (F.cross_entropy(model(x), y), {}), loader, smp, ctx.cfg.crt, "lws",
            params=[model.scale], train_modules=[])
    return model.eval()


def train_tau_norm(ctx: Context, teacher: nn.Module, seed: int) -> LinearHead:
    """A linear head on the teacher's frozen backbone (instance sampling, cfg.crt schedule), then
    w_c / ||w_c||^tau with tau = baselines.tau."""
    seed_everything(seed)
    model = ctx.place(LinearHead(_frozen_copy(teacher.backbone), ctx.splits.num_classes))
    fit_classifier(ctx, model, "instance", seed, "tau_norm")
    with torch.no_grad():
        model.classifier.weight.copy_(tau_normalize(model.classifier.weight, ctx.cfg.baselines.tau))
    return model.eval()


def train_with_loss(ctx: Context, name: str, seed: int) -> nn.Module:
    """A network trained from scratch with instance sampling and a long-tail loss (the teacher schedule):
    balanced_softmax, logit_adj_loss or cb_ce."""
    counts, b = ctx.splits.class_counts, ctx.cfg.baselines
    if name == "balanced_softmax":
        def loss_fn(z, y):
            return balanced_softmax_loss(z, y, counts)
    elif name == "logit_adj_loss":
        log_pi = log_prior(counts, ctx.device)

        def loss_fn(z, y):
            return logit_adjusted_loss(z, y, log_pi, b.logit_tau)
    elif name == "cb_ce":
        w = class_balanced_weights(counts, b.cb_beta).to(ctx.device)

        def loss_fn(z, y):
            return F.cross_entropy(z, y, weight=w.to(z.dtype))
    else:
        raise ValueError(f"baseline {name!r} is not a loss baseline")
    return train_teacher(ctx, "vanilla", seed, desc=name, loss_fn=loss_fn)


def run_baseline(ctx: Context, name: str, teacher: nn.Module | None, seed: int) -> nn.Module:
    """One baseline by name (BASELINES); the decoupled ones and logit_adj_posthoc use `teacher`
    (an instance-sampled vanilla teacher)."""
    from fastcbd.train.stages import train_crt

    if name not in BASELINES:
        raise ConfigError(f"baseline {name!r}: expected one of {', '.join(BASELINES)}")
    if name == "ce_balanced":
        return train_teacher(ctx, "vanilla", seed, sampler="balanced", desc="ce_balanced")
    if name in ("crt", "lws", "tau_norm", "logit_adj_posthoc") and teacher is None:
        raise ConfigError(f"baseline {name} needs a trained teacher")
    if name == "crt":
        return train_crt(ctx, teacher, seed)
    if name == "lws":
        return train_lws(ctx, teacher, seed)
    if name == "tau_norm":
        return train_tau_norm(ctx, teacher, seed)
    if name == "logit_adj_posthoc":
        return ctx.place(PostHocAdjusted(_frozen_copy(teacher), ctx.splits.class_counts, ctx.cfg.baselines.logit_tau)).eval()
    return train_with_loss(ctx, name, seed)
