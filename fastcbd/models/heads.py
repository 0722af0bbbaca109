"""The decoupled baselines' model wrappers (Kang et al., ICLR 2020; Menon et al., ICLR 2021) around a
trained network: what a model file with `arch["head"]` rebuilds (fastcbd.train.checkpoint.wrap_head), and
what fastcbd.train.baselines trains."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def log_prior(class_counts, device=None) -> torch.Tensor:
    """(C,) float32 log pi_c = log(n_c / N); an empty class gets log of half an image (finite)."""
    n = torch.as_tensor(np.maximum(np.asarray(class_counts, dtype=np.float64), 0.5), dtype=torch.float32, device=device)
    return (n / n.sum()).log()


class PostHocAdjusted(nn.Module):
    """A trained model whose logits are shifted by -tau log pi (argmax of p(y|x) / pi_y^tau)."""

    def __init__(self, model: nn.Module, class_counts, tau: float = 1.0):
        super().__init__()
        self.model, self.tau = model, float(tau)
        self.register_buffer("log_pi", log_prior(class_counts))

    def forward(self, x):
        z = self.model(x)
        return z - self.tau * self.log_pi.to(z.dtype)


class LWS(nn.Module):
    """Learnable weight scaling: logits_c * s_c of a frozen model, s initialised to 1 (so the wrapped
    model's predictions at the start)."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model = model
        self.scale = nn.Parameter(torch.ones(num_classes))

    def forward(self, x):
        with torch.no_grad():
            z = self.model(x)
        return z * self.scale.to(z.dtype)


class LinearHead(nn.Module):
    """A frozen backbone and a linear classifier without bias (B, D) -> (B, C), for tau-norm."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_features, num_classes, bias=False)

    def forward(self, x):
        return self.classifier(self.backbone(x))
