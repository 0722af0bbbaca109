"""The seed's method: two-stage classification and two-stage hierarchical training over class groups.

Two-stage classification: a group classifier picks the group, then that group's classifier picks the
class among the group's members (a one-class group needs no second classifier).

Two-stage hierarchical training (wraps any distillation algorithm `distill(pool, syn, seed, tag)`):
  1. group level: the real images relabelled by group, sampled class-balanced inside each group
     (so the head does not dominate a group's statistics); a synthetic set of `group_ipc` images per
     group is distilled on them and trains the group classifier;
  2. class level: for each group of more than one class, its classes' real images (labels local to the
     group) are distilled at the per-class IPC and train that group's classifier.
"""
from __future__ import annotations

import numpy as np
import torch

from fastcbd.condense.evaluate import EvalConfig, train_classifier
from fastcbd.condense.grouping import group_of
from fastcbd.condense.pool import RealPool
from fastcbd.condense.synthetic import SyntheticSet


class TwoStage:
    """groups: list of class-id lists; group_net: (B, G) logits or None (one group); class_nets[g]: (B, |g|)
    logits or None (one-class group)."""

    def __init__(self, groups, group_net, class_nets):
        self.groups, self.group_net, self.class_nets = groups, group_net, class_nets

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 500) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            gp = self.group_net(xb).argmax(1) if self.group_net is not None else torch.zeros(len(xb), dtype=torch.long)
            pred = torch.empty(len(xb), dtype=torch.long)
            for g, members in enumerate(self.groups):
                sel = gp == g
                if not sel.any():
                    continue
                ids = torch.tensor(members)
                pred[sel] = ids[0] if len(members) == 1 else ids[self.class_nets[g](xb[sel]).argmax(1)]
            out.append(pred)
        return torch.cat(out).numpy()


def group_pool(pool: RealPool, groups) -> RealPool:
    """Real images labelled by group, class-balanced sampling inside each group."""
    gof = torch.from_numpy(group_of(groups, pool.num_labels))
    return RealPool(pool.x, gof[pool.y], len(groups), strata=pool.y)


def member_pool(pool: RealPool, members: list[int]) -> RealPool:
    """The real images of one group's classes, labels 0..len(members)-1 in the order of members."""
    local = torch.full((pool.num_labels,), -1, dtype=torch.long)
    local[torch.tensor(members)] = torch.arange(len(members))
    keep = local[pool.y] >= 0
    return RealPool(pool.x[keep], local[pool.y[keep]], len(members))


def distill_hierarchical(pool: RealPool, groups, ipc: int, distill, seed: int, group_ipc: list[int] | None = None,
                         soft_labels: bool = False) -> dict:
    """{'group': SyntheticSet over groups or None, 'classes': [SyntheticSet or None per group]}.

    group_ipc: images per group (default ipc x group size: as many images as the group's classes get)."""
    gen = torch.Generator().manual_seed(seed)
    out = {"group": None, "classes": []}
    if len(groups) > 1:
        gp = group_pool(pool, groups)
        budget = group_ipc or [ipc * len(m) for m in groups]
        syn = SyntheticSet.from_real(gp, budget, gen, soft_labels)
        distill(gp, syn, seed, "group")
        out["group"] = syn
    for g, members in enumerate(groups):
        if len(members) == 1:
            out["classes"].append(None)
            continue
        mp = member_pool(pool, members)
        syn = SyntheticSet.from_real(mp, ipc, gen, soft_labels)
        distill(mp, syn, seed + 7919 * (g + 1), f"group{g}")
        out["classes"].append(syn)
    return out


def train_two_stage(groups, group_x, group_t, class_sets: list, cfg: EvalConfig, seed: int, aug, progress=None,
                    teacher=None) -> TwoStage:
    """Train the group classifier on (group_x, group_t) and each group's classifier on class_sets[g] =
    (x, local targets) or None. teacher (relabel.SoftLabeler): the classifiers learn its soft labels
    instead, summed over each group's classes (group level) or kept to the group's classes (class level)."""
    from fastcbd.condense.relabel import LabelView

    view = (lambda **kw: LabelView(teacher, **kw)) if teacher is not None else (lambda **kw: None)
    group_net = train_classifier(group_x, group_t, len(groups), cfg, seed, aug, progress,
                                 view(groups=groups)) if len(groups) > 1 else None
    nets = []
    for g, members in enumerate(groups):
        if len(members) == 1 or class_sets[g] is None:
            nets.append(None)
            continue
        x, t = class_sets[g]
        nets.append(train_classifier(x, t, len(members), cfg, seed + 101 * (g + 1), aug, progress,
                                     view(members=members)))
    return TwoStage(groups, group_net, nets)


def relabel_by_group(x: torch.Tensor, targets: torch.Tensor, groups, num_classes: int):
    """Split a class-labelled set (hard labels (N,)) into the two-stage training sets: (x, group labels)
    and per group (x of its classes, local labels) or None for one-class groups."""
    gof = torch.from_numpy(group_of(groups, num_classes))
    sets = []
    for members in groups:
        if len(members) == 1:
            sets.append(None)
            continue
        local = torch.full((num_classes,), -1, dtype=torch.long)
        local[torch.tensor(members)] = torch.arange(len(members))
        keep = local[targets] >= 0
        sets.append((x[keep], local[targets[keep]]))
    return gof[targets], sets
