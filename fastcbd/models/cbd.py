"""Teacher and student networks of CBD (DESIGN.md §1.1)."""
from __future__ import annotations

import torch
from torch import nn

from fastcbd.models.backbones import build_backbone
from fastcbd.nn import CosineClassifier


def backbone_kwargs(arch: dict) -> dict:
    """What a model file's arch adds to the backbone's name (timm backbones: image size, create_model
    kwargs); {} for a file written before they were recorded."""
    kw = {"image_size": arch.get("image_size"), "options": arch.get("timm_kwargs")}
    return {k: v for k, v in kw.items() if v}


class Teacher(nn.Module):
    """backbone + cosine classifier. features(x) -> (B, D) raw pooled features (what CBD distils)."""

    def __init__(self, backbone: str, num_classes: int, in_channels: int = 3, sigma: float = 20.0, width: int = 0,
                 **backbone_kw):
        super().__init__()
        self.backbone = build_backbone(backbone, in_channels, width, **backbone_kw)
        self.out_features = self.backbone.out_features
        self.classifier = CosineClassifier(self.out_features, num_classes, sigma)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


class Student(nn.Module):
    """backbone + ReLU(Linear(D -> proj_dim)) + cosine classifier; proj_dim = sum of the teachers' D_k.
    backbone_kw: build_backbone's image_size, options, weights (timm backbones).

    features(x) -> p (B, proj_dim), the projection the CBD loss normalises and distils."""

    def __init__(self, backbone: str, num_classes: int, proj_dim: int, in_channels: int = 3, sigma: float = 20.0,
                 width: int = 0, **backbone_kw):
        super().__init__()
        self.backbone = build_backbone(backbone, in_channels, width, **backbone_kw)
        self.projection = nn.Sequential(nn.Linear(self.backbone.out_features, proj_dim), nn.ReLU(inplace=True))
        self.out_features = proj_dim
        self.classifier = CosineClassifier(proj_dim, num_classes, sigma)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
