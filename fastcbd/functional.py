"""The CBD losses as functions (mirrors torch.nn.functional). Formulas: DESIGN.md §1.1.

Shapes are validated here, once, with errors that name the argument; the fused ops in fastcbd.ops
(chosen by FASTCBD_BACKEND) assume valid shapes. Target values are range-checked by those ops' public
functions (fastcbd.ops._common.check_target: a host sync, skipped under torch.compile and CUDA-graph capture,
where a bad target gives a NaN loss instead).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (B, D), got {_shape(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def _check_teachers(features: torch.Tensor, teacher_features) -> list[torch.Tensor]:
    if isinstance(teacher_features, torch.Tensor):
        teacher_features = [teacher_features]
    teachers = list(teacher_features)
    if len(teachers) == 0:
        raise ValueError("teacher_features is empty: CBD needs K >= 1 teacher feature tensors")
    for k, t in enumerate(teachers):
        _check_matrix(f"teacher_features[{k}]", t)
        if t.shape[0] != features.shape[0]:
            raise ValueError(
                f"teacher_features[{k}] has batch size {t.shape[0]} but features has {features.shape[0]} "
                f"(shapes {_shape(t)} and {_shape(features)})"
            )
        if t.device != features.device:
            raise ValueError(f"teacher_features[{k}] is on {t.device} but features is on {features.device}")
    dims = [t.shape[1] for t in teachers]
    if sum(dims) != features.shape[1]:
        raise ValueError(
            f"features has D={features.shape[1]} but the teachers' dimensions sum to {sum(dims)} "
            f"(teacher_features shapes {[_shape(t) for t in teachers]}): the student projection must "
            "output sum_k D_k"
        )
    return teachers


def _check_classifier(features: torch.Tensor, weight, target=None) -> None:
    _check_matrix("features", features)
    _check_matrix("classifier_weight", weight)
    if weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"classifier_weight is {_shape(weight)} (C x D) but features is {_shape(features)} (B x D): D differs"
        )
    if target is None:
        return
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be a 1-D int64 (or int32) tensor of class indices, got {_shape(target)} "
                         f"{getattr(target, 'dtype', '')}")
    if target.shape[0] != features.shape[0]:
        raise ValueError(f"target has {target.shape[0]} entries but features has batch size {features.shape[0]}")
    # the values ([0, C) or ignore_index) are checked by the op itself (fastcbd.ops._common.check_target)


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, sigma: float = 20.0) -> torch.Tensor:
    """sigma * <f / ||f||, w_c / ||w_c||>: (B, D), (C, D) -> (B, C) logits; no bias."""
    _check_classifier(features, weight)
    return sigma * F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))


def cosine_distill_loss(features: torch.Tensor, teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_b (1 - <f_b, t_b>) with f = p/||p|| and t = concat_k(t_k/||t_k||)/sqrt(K).

    features: (B, D) student projection; teacher_features: K tensors (B, D_k), sum D_k = D, raw pooled
    features (normalised here; they get no gradient). Returns a 0-dim fp32 tensor.
    """
    from fastcbd.ops.cosine_distill import cosine_distill

    _check_matrix("features", features)
    teachers = _check_teachers(features, teacher_features)
    return cosine_distill(features, [t.detach() for t in teachers])


def cbd_loss(features: torch.Tensor, classifier_weight: torch.Tensor, target: torch.Tensor,
             teacher_features: Sequence[torch.Tensor], *, alpha: float = 0.4, beta: float = 100.0,
             sigma: float = 20.0) -> torch.Tensor:
    """The CBD student loss: mean_b (1-alpha) CE(sigma cos(f_b, w), y_b) + alpha beta (1 - <f_b, t_b>).

    features: (B, D) student projection after its ReLU, before normalisation; classifier_weight: (C, D),
    not normalised; target: (B,) int64/int32 in [0, C) (-100: the row has no CE term, as F.cross_entropy's
    default ignore_index); teacher_features: K tensors (B, D_k), sum D_k = D.
    Gradients flow to features and classifier_weight, never to the teachers.
    """
    from fastcbd.ops.cbd_loss import cbd_loss as _cbd_loss

    _check_classifier(features, classifier_weight, target)
    teachers = _check_teachers(features, teacher_features)
    return _cbd_loss(features, classifier_weight, target, [t.detach() for t in teachers],
                     alpha=alpha, beta=beta, sigma=sigma)


def cosine_cross_entropy(features: torch.Tensor, classifier_weight: torch.Tensor, target: torch.Tensor, *,
                         sigma: float = 20.0, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean") -> torch.Tensor:
    """CE(sigma * cos(f, w_c), y) without materialising the full fp32 logits (fused, chunked).

    target: (B,) int64/int32 in [0, C) or ignore_index; anything else is a ValueError naming it.
    """
    from fastcbd.ops.cosine_ce import cosine_ce

    _check_classifier(features, classifier_weight, target)
    return cosine_ce(features, classifier_weight, target, sigma=sigma, ignore_index=ignore_index,
                     label_smoothing=label_smoothing, reduction=reduction)


def multi_teacher_kd_loss(logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], *, tau: float = 4.0,
                          weights=None) -> torch.Tensor:
    """sum_k w_k tau^2 KL(softmax(t_k/tau) || softmax(z/tau)), summed over classes, mean over the batch."""
    from fastcbd.ops.multi_teacher_kd import multi_teacher_kd

    _check_matrix("logits", logits)
    teachers = list(teacher_logits)
    if not teachers:
        raise ValueError("teacher_logits is empty: need K >= 1 teacher logit tensors")
    for k, t in enumerate(teachers):
        _check_matrix(f"teacher_logits[{k}]", t)
        if t.shape != logits.shape:
            raise ValueError(f"teacher_logits[{k}] is {_shape(t)} but logits is {_shape(logits)}")
    if weights is not None and len(weights) != len(teachers):
        raise ValueError(f"weights has {len(weights)} entries for {len(teachers)} teachers")
    return multi_teacher_kd(logits, [t.detach() for t in teachers], tau=tau, weights=weights)
