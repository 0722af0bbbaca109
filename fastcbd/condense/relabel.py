"""Soft relabeling (`fastcbd condense --relabel MODEL.pt|auto`): the evaluation models learn from a teacher's
soft labels, computed on each augmented batch, instead of the synthetic set's stored labels.

The loss on a batch of B images with student logits s and teacher logits z (both (B, K)) at temperature tau:

    L = tau^2 / B * sum_i KL(p_i || q_i),   p_i = softmax(z_i / tau - b),  q_i = softmax(s_i / tau)

(Hinton et al.'s scaling by tau^2 keeps the gradient's size independent of tau). With a one-hot p it is
tau^2 x cross-entropy of s / tau, so at tau = 1 it is the hard-label loss exactly (0 log 0 = 0 via xlogy).

b (K,) is zero, or with `calibrate` an ADSA-style alignment of the soft labels for class frequency (after
Jiang et al., NeurIPS 2025): the soft labels of a class-balanced set should average to the uniform
distribution; the teacher's average over the augmented synthetic set, q_bar, does not (the long-tailed
teacher and the images both push it towards the head). b = log q_bar - mean(log q_bar) is re-estimated a
few times with the bias applied (a fixed point: each round divides out the remaining skew), so the
calibrated soft labels' mean over the set is close to uniform.

The teacher is any fastcbd model file (a teacher, a decoupled baseline, a CBD / CBD_ENS student) whose
classes and input match the dataset, or `auto`: a balanced-softmax teacher (a fastcbd Teacher with the
convnet3 backbone) trained on the long-tailed set under the evaluation's DSA augmentation
(`train_auto_teacher`) and cached under --out/teachers/<key>/model.pt (key: its settings).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from fastcbd.errors import BadInputError

log = logging.getLogger("fastcbd")


def relabel_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """tau^2 * mean over rows of KL(teacher_probs || softmax(student_logits / tau)); (B, K) float each."""
    log_q = F.log_softmax(student_logits / tau, dim=1)
    p = teacher_probs.to(log_q.dtype)
    kl = torch.xlogy(p, p) - p * log_q
    return kl.sum(1).mean() * tau * tau


class SoftLabeler:
    """A frozen teacher as a labeler of condense's images (normalised by the condense run's mean/std).

    net: (B, C, H, W) float -> (B, K) logits in the teacher's own normalisation; images are mapped from the
    run's normalisation to the teacher's (x * std + mean, then - t_mean / t_std). bias (K,) is subtracted
    from the tempered logits (see `calibrate`)."""

    def __init__(self, net, tau: float, run_mean, run_std, teacher_mean=None, teacher_std=None):
        if not tau > 0:
            raise ValueError(f"--relabel-tau {tau}: must be positive")
        self.net, self.tau = net, float(tau)
        rm, rs = torch.as_tensor(run_mean, dtype=torch.float32), torch.as_tensor(run_std, dtype=torch.float32)
        tm = rm if teacher_mean is None else torch.as_tensor(teacher_mean, dtype=torch.float32)
        ts = rs if teacher_std is None else torch.as_tensor(teacher_std, dtype=torch.float32)
        # x_t = (x * rs + rm - tm) / ts = x * scale + shift, per channel
        self.scale, self.shift = (rs / ts).view(1, -1, 1, 1), ((rm - tm) / ts).view(1, -1, 1, 1)
        self.bias = None

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 tempered, calibrated logits z / tau - b."""
        z = self.net(x * self.scale.to(x.device) + self.shift.to(x.device)).float() / self.tau
        return z if self.bias is None else z - self.bias.to(z.device)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(1)

    @property
    def has_features(self) -> bool:
        return callable(getattr(self.net, "features", None))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) the teacher's features (Teacher: the backbone's; Student: the projection) of x."""
        return self.net.features(x * self.scale.to(x.device) + self.shift.to(x.device)).float().flatten(1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 500) -> np.ndarray:
        """The teacher's own top-1 classes (uncalibrated: its accuracy as a classifier)."""
        bias, self.bias = self.bias, None
        try:
            return torch.cat([self.logits(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).cpu().numpy()
        finally:
            self.bias = bias

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, aug=None, views: int = 4, rounds: int = 3) -> torch.Tensor:
        """Set bias so the mean soft label over `views` augmented copies of x (a class-balanced set) is
        close to uniform; returns the bias (K,). Each round: b += log q_bar - mean(log q_bar)."""
        self.bias = None
        xs = [x if aug is None else aug(x, aug.draw(len(x))) for _ in range(views)]
        for _ in range(rounds):
            q_bar = torch.cat([self.probs(v) for v in xs]).mean(0).clamp_min(1e-12)
            step = q_bar.log() - q_bar.log().mean()
            self.bias = step if self.bias is None else self.bias + step
        return self.bias


class LabelView:
    """The teacher's soft labels over another label space: `groups` (lists of class ids) sums each group's
    probabilities (the group classifier of two-stage classification); `members` keeps those classes and
    renormalises (a group's own classifier). Same interface as SoftLabeler for train_classifier."""

    def __init__(self, labeler: SoftLabeler, groups=None, members=None):
        self.labeler, self.tau = labeler, labeler.tau
        self.groups, self.members = groups, members

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        p = self.labeler.probs(x)
        if self.groups is not None:
            return torch.stack([p[:, g].sum(1) for g in self.groups], dim=1)
        q = p[:, self.members]
        return q / q.sum(1, keepdim=True).clamp_min(1e-30)


def check_teacher(blob: dict, path: str, num_classes: int, image_shape) -> dict:
    """The model file's input record, after checking its classes and input against the dataset's."""
    arch, info = blob.get("arch", {}), blob.get("input")
    if arch.get("num_classes") != num_classes:
        raise BadInputError(f"--relabel {path}: the teacher has {arch.get('num_classes')} classes, the dataset "
                            f"{num_classes}")
    if not isinstance(info, dict):
        raise BadInputError(f"--relabel {path}: the model file does not record its input (channels, size, "
                            "normalisation); train it again with this version of fastcbd")
    c, h, w = (int(v) for v in image_shape)
    if int(info.get("channels", -1)) != c or [int(s) for s in info.get("size", [])] != [h, w]:
        raise BadInputError(f"--relabel {path}: the teacher takes {info.get('channels')} x "
                            f"{'x'.join(str(s) for s in info.get('size', []))} images, the dataset has {c} x {h}x{w}")
    return info


def load_labeler(path: str, num_classes: int, image_shape, run_mean, run_std, tau: float, device="cpu") -> SoftLabeler:
    """A fastcbd model file as a SoftLabeler; BadInputError when its classes or input do not fit."""
    from fastcbd.train.checkpoint import load_model

    if not os.path.exists(path):
        raise FileNotFoundError(f"--relabel {path}: no such model file")
    net, meta = load_model(path, device)  # BadInputError for a file that is not a fastcbd model
    info = check_teacher(meta, path, num_classes, image_shape)
    for p in net.parameters():
        p.requires_grad_(False)
    return SoftLabeler(net.eval(), tau, run_mean, run_std, info["mean"], info["std"])


def auto_settings(dataset: str, rho: float, data_seed: int, data_root: str | None, steps: int, width: int,
                  dsa: dict) -> dict:
    """What `--relabel auto`'s teacher depends on: its cache key."""
    return {"loss": "balanced_softmax", "dataset": dataset, "rho": float(rho), "data_seed": int(data_seed),
            "data_root": os.path.abspath(data_root) if data_root else "", "steps": int(steps), "width": int(width),
            "backbone": "convnet3", "dsa": dict(dsa), "batch": 128, "lr": 0.01, "version": 2}


def train_auto_teacher(x: torch.Tensor, y: torch.Tensor, counts, settings: dict, seed: int, progress=None):
    """The `auto` teacher: a fastcbd Teacher (ConvNet-3 backbone, cosine classifier) trained from scratch on
    the long-tailed set x (N, C, H, W, normalised), y (N,) with the balanced-softmax loss, instance
    sampling and the evaluation's DSA augmentation: SGD momentum 0.9, weight decay 5e-4, lr settings['lr']
    on a cosine schedule, settings['steps'] steps of settings['batch'] images."""
    from fastcbd.condense.dsa import DSA, DSAConfig
    from fastcbd.condense.evaluate import fit_balanced_softmax
    from fastcbd.models import Teacher

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    aug = DSA(DSAConfig(**settings["dsa"]), seed)
    c, h, w = x.shape[1:]
    net = Teacher("convnet3", len(counts), c, width=settings["width"], image_size=(h, w)).to(x.device)
    opt = torch.optim.SGD(net.parameters(), lr=settings["lr"], momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings["steps"])
    net.train()
    fit_balanced_softmax(net, x, y, counts, aug, opt, sched, settings["steps"], settings["batch"], gen, progress)
    return net.eval()


def auto_teacher(settings: dict, cache_dir: str, x: torch.Tensor, y: torch.Tensor, counts, mean, std,
                 progress=None) -> tuple[str, bool]:
    """(path, reused): the balanced-softmax teacher for `settings` (train_auto_teacher on x, y; images
    normalised by mean / std), written as a fastcbd model file unless cache_dir/<key>/model.pt holds it."""
    from fastcbd.train.checkpoint import save_model

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, key, "model.pt")
    if os.path.exists(path):
        log.info("--relabel auto: reusing the cached teacher %s", path)
        return path, True
    log.info("--relabel auto: training a balanced-softmax teacher (%s), cached as %s", settings, path)
    t0 = time.perf_counter()
    net = train_auto_teacher(x, y, counts, settings, settings["data_seed"] * 100 + 56, progress)
    c, h, w = (int(s) for s in x.shape[1:])
    arch = {"role": "teacher", "backbone": "convnet3", "num_classes": len(counts), "in_channels": c,
            "sigma": float(net.classifier.sigma),
            "width": settings["width"], "image_size": [h, w]}
    info = {"input": {"channels": c, "size": [h, w], "mean": [float(v) for v in np.ravel(mean)],
                      "std": [float(v) for v in np.ravel(std)], "resize": None}}
    save_model(path, net, arch, {"settings": settings, "seconds": time.perf_counter() - t0}, info)
    with open(os.path.join(cache_dir, key, "settings.json"), "w") as f:
        json.dump(settings, f, indent=1)
    return path, False
