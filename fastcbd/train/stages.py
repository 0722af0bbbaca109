"""The two CBD stages and the baselines, each one call: build the model and loader, fit, return it.

- teacher: instance sampling, CE on the cosine classifier, vanilla or aug augmentation;
- ce_balanced: the same network trained with class-balanced sampling;
- crt: a trained teacher's backbone frozen (eval mode), its classifier re-initialised and re-trained
  with class-balanced sampling (Kang et al., ICLR 2020);
- student (CBD / CBD_ENS): a fresh network, class-balanced sampling, the CBD loss against the frozen,
  eval-mode teachers' features of the same augmented batch.
"""
from __future__ import annotations

import copy
import logging
import random

import numpy as np
import torch
import torch.nn.functional as F

from fastcbd.data.arrays import ArraySplits
from fastcbd.data.augment import AugmentConfig
from fastcbd.data.files import FileSplits
from fastcbd.data.loaders import build_loader, channel_stats
from fastcbd.data.samplers import build_sampler
from fastcbd.errors import ConfigError
from fastcbd.functional import cbd_loss
from fastcbd.models import Student, Teacher
from fastcbd.train import distributed as D
from fastcbd.train.checkpoint import CheckpointManager
from fastcbd.train.config import Config, OptimConfig, to_dict
from fastcbd.train.ensemble import ensemble
from fastcbd.train.loop import fit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA device is available")
    return torch.device(name)


def augment_config(cfg: Config, kind: str) -> AugmentConfig:
    """vanilla: random-resized crop + flip; aug: plus colour jitter (p=0.8) and grayscale."""
    if kind not in ("vanilla", "aug"):
        raise ConfigError(f"teacher kind {kind!r}: expected vanilla or aug")
    a = cfg.aug
    base = AugmentConfig(crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio), pad=a.pad, flip=a.flip)
    if kind == "aug":
        base.color_jitter, base.grayscale_p = a.color_jitter, a.grayscale_p
    return base


class Context:
    """What every stage shares: config, data, device, normalisation statistics and the log file."""

    def __init__(self, cfg: Config, splits: ArraySplits | FileSplits, log_path: str | None = None,
                 progress: bool = True, ckpt_dir: str | None = None, resume: bool = False,
                 tb_dir: str | None = None, require_resume: bool = False, allow_config_change: bool = False):
        """ckpt_dir: where each stage keeps its checkpoints, '{stage}' replaced by the stage's name
        (None: no checkpoints); resume: continue a stage from its newest readable checkpoint;
        require_resume (--resume): a stage whose checkpoints are all unreadable is an error, not a fresh
        start; allow_config_change: resume despite a config that changes the result (logged);
        tb_dir: the same for TensorBoard scalars (None: none)."""
        self.cfg, self.splits, self.log_path, self.progress = cfg, splits, log_path, progress
        self.ckpt_dir, self.resume, self.tb_dir = ckpt_dir, resume, tb_dir
        self.require_resume, self.allow_config_change = require_resume, allow_config_change
        self.device = D.local_device(cfg.device) if D.launched() else resolve_device(cfg.device)
        D.init(self.device)  # joins the process group under torchrun; a no-op otherwise
        self.mean, self.std = channel_stats(splits)
        self.in_channels = splits.image_shape[0]
        self.image_size = [int(v) for v in splits.image_shape[1:]]

    def _loader(self, train: bool, batch_size: int, **kw):
        d = self.cfg.data
        return build_loader(self.splits, train, batch_size=batch_size, mean=self.mean, std=self.std,
                            device=self.device, channels_last=self.cfg.channels_last, loader=d.loader,
                            workers=d.workers, skip_bad=d.skip_bad, **kw)

    def train_loader(self, sampler: str, kind: str, seed: int, epochs: int | None = None):
        """(loader, sampler): the configured loader (data.loader) over `sampler` with `kind` augmentation
        (epochs: the length of the schedule a progressive sampler moves along)."""
        s, bs, world = self.splits, self.cfg.data.batch_size, D.world_size()
        if bs % world:
            raise ConfigError(f"data.batch_size={bs} (the global batch) is not divisible by the {world} processes")
        bs //= world  # each rank: a disjoint share of the sampler's sequence, batch / world images per step
        smp = build_sampler(sampler, s.y_train, seed=seed, num_classes=s.num_classes, allow_empty=self.cfg.data.skip_bad,
                            rank=D.rank(), world_size=world, epochs=epochs)
        # each rank its own augmentation draws (rank 0 keeps the single-process seed)
        loader = self._loader(True, bs, sampler=smp, aug=augment_config(self.cfg, kind), seed=seed + 7919 * D.rank(),
                              drop_last=len(smp) > bs)
        return loader, smp

    def test_loader(self):
        return self._loader(False, 512 if isinstance(self.splits, ArraySplits) else self.cfg.data.batch_size)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the run's device (channels_last when configured)."""
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return model.to(self.device, memory_format=fmt)

    def arch(self, role: str, **extra) -> dict:
        m = self.cfg.model
        timm = {"timm_kwargs": dict(m.timm_kwargs)} if m.timm_kwargs else {}
        return {"role": role, "backbone": m.backbone, "num_classes": self.splits.num_classes,
                "in_channels": self.in_channels, "sigma": m.sigma,
                "width": m.width, "image_size": self.image_size, **timm, **extra}

    def backbone_kw(self) -> dict:
        """build_backbone's image_size, options and initial weights for a fresh network of this run."""
        m = self.cfg.model
        return {"image_size": self.image_size, "options": dict(m.timm_kwargs), "weights": m.weights}

    def info(self) -> dict:
        """What a model file records for predict / export: input size, normalisation, class names."""
        from fastcbd.train.model_info import input_info

        return input_info(self)

    def checkpoints(self, desc: str) -> CheckpointManager | None:
        if not self.ckpt_dir:
            return None
        c = self.cfg.checkpoint
        return CheckpointManager(self.ckpt_dir.format(stage=desc), c.every, c.keep, log=logging.getLogger("fastcbd"),
                                 required=self.require_resume)

    def fit(self, model, step_fn, loader, sampler, optim: OptimConfig, desc: str, **kw):
        return fit(model, step_fn, loader, sampler, optim, amp=self.cfg.amp, desc=desc, log_path=self.log_path,
                   show_progress=self.progress, ckpt=self.checkpoints(desc), resume=self.resume,
                   config=to_dict(self.cfg), compile=self.cfg.compile, log_every=self.cfg.log_every,
                   tb_dir=self.tb_dir.format(stage=desc) if self.tb_dir else None, sync_bn=self.cfg.sync_bn,
                   allow_config_change=self.allow_config_change, **kw)


def _ce_step(model, loss_fn=None):
    loss_fn = loss_fn or F.cross_entropy

    def step(x, y):
        loss = loss_fn(model(x), y)
        return loss, {}

    return step


def train_teacher(ctx: Context, kind: str, seed: int, sampler: str = "instance", desc: str | None = None,
                  loss_fn=None) -> Teacher:
    """A teacher (instance sampling) or, with sampler='balanced', the class-balanced CE baseline;
    loss_fn(logits, target) replaces cross-entropy (the loss baselines of fastcbd.train.baselines)."""
    seed_everything(seed)
    m = ctx.cfg.model
    model = ctx.place(Teacher(m.backbone, ctx.splits.num_classes, ctx.in_channels, m.sigma, m.width,
                              **ctx.backbone_kw()))
    loader, smp = ctx.train_loader(sampler, kind, seed)
    ctx.fit(model, _ce_step(model, loss_fn), loader, smp, ctx.cfg.teacher.optim, desc or f"teacher_{kind}_s{seed}")
    return model.eval()


def train_crt(ctx: Context, teacher: Teacher, seed: int) -> Teacher:
    """Classifier re-training: frozen backbone (eval mode), fresh cosine classifier, balanced sampling."""
    seed_everything(seed)
    model = copy.deepcopy(teacher)
    model.classifier.reset_parameters()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()
    fit_classifier(ctx, model, "balanced", seed, "crt")
    return model.eval()


def fit_classifier(ctx: Context, model, sampler: str, seed: int, desc: str) -> None:
    """Train only model.classifier on the features of model.backbone (frozen, in eval mode, under
    no_grad), with cross-entropy and the cfg.crt schedule: cRT and the tau-norm head."""
    loader, smp = ctx.train_loader(sampler, "vanilla", seed)

    def step(x, y):
        with torch.no_grad():
            feats = model.backbone(x)
        return F.cross_entropy(model.classifier(feats), y), {}

    ctx.fit(model, step, loader, smp, ctx.cfg.crt, desc, params=model.classifier.parameters(),
            train_modules=[model.classifier])


def freeze(teachers) -> list[torch.nn.Module]:
    """Teachers are frozen and in eval mode: batch-norm uses (and keeps) its running statistics."""
    for t in teachers:
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)
    return list(teachers)


def train_student(ctx: Context, teachers, seed: int, desc: str = "cbd", teacher_ids: list | None = None,
                  cache=None) -> Student:
    """CBD: a fresh student, class-balanced sampling (student.sampler), cbd_loss against the teachers' features.

    teacher_ids: the teachers' identities ({'path', 'sha256'}), kept in the checkpoints; a resume with
    other teachers is refused. cache: a fastcbd.cache.TeacherCache holding these teachers (teacher_ids'
    'weights' hashes, fastcbd.cache.store.weights_hash):
    the features of a stored view replace the live teachers' forward (teachers may then be empty)."""
    seed_everything(seed)
    m, sc = ctx.cfg.model, ctx.cfg.student
    loader, smp = ctx.train_loader(sc.sampler, "vanilla", seed, epochs=sc.optim.epochs)
    if cache is not None:
        from fastcbd.cache import cached_loader
        from fastcbd.cache.build import servable

        loader = cached_loader(servable(ctx, loader), cache, [t["weights"] for t in teacher_ids])
        proj_dim = sum(loader.dims)
    else:
        teachers = freeze(teachers)
        proj_dim = sum(t.out_features for t in teachers)
        run_teachers = ensemble(teachers, ctx.cfg.teacher.batched)  # inference_mode, eval mode
    torch.manual_seed(seed)  # the student's initial weights do not depend on whether a cache is used
    student = ctx.place(Student(m.backbone, ctx.splits.num_classes, proj_dim, ctx.in_channels, m.sigma, m.width,
                                **ctx.backbone_kw()))

    def step(x, y):
        x, t_feats = x if cache is not None else (x, run_teachers(x))
        p = student.features(x)
        loss = cbd_loss(p, student.classifier.weight, y, t_feats, alpha=sc.alpha, beta=sc.beta, sigma=m.sigma)
        return loss, {}

    ctx.fit(student, step, loader, smp, sc.optim, desc, train_modules=[student],
            meta={"teachers": teacher_ids} if teacher_ids is not None else None)
    return student.eval()
