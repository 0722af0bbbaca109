"""ConvNet-3, the network of the dataset-distillation literature (DC, DSA, DM, MTT).

`depth` blocks of conv(width, 3x3, padding 1) + instance norm + ReLU + 2x2 average pooling, then a
linear classifier on the flattened features. Instance norm is GroupNorm with one group per channel
(affine), as in the reference code: it normalises each image on its own, so a batch's embeddings do not
depend on which other images are in it (what lets DM and gradient matching batch all classes at once).
"""
from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """Input (B, C, H, W) float32 (normalised); `embed` gives (B, D) features, `forward` (B, K) logits."""

    def __init__(self, in_channels: int, num_classes: int, im_size: tuple[int, int], width: int = 128,
                 depth: int = 3, norm: str = "instance"):
        super().__init__()
        layers: list[nn.Module] = []
        c, (h, w) = in_channels, im_size
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "batch":  # the observer of --method rldd: its statistics guide the recovery
                layers.append(nn.BatchNorm2d(width))
            elif norm != "none":
                raise ValueError(f"ConvNet norm={norm!r}: expected 'instance', 'batch' or 'none'")
            layers += [nn.ReLU(), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.feat_dim = c * h * w
        self.classifier = nn.Linear(self.feat_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def convnet_for(image_shape: tuple[int, int, int], num_classes: int, width: int = 128, depth: int = 3,
                norm: str = "instance") -> ConvNet:
    """A ConvNet for images of shape (C, H, W)."""
    c, h, w = image_shape
    return ConvNet(c, num_classes, (h, w), width=width, depth=depth, norm=norm)
