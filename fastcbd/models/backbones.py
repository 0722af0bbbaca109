"""Backbones: (B, C, H, W) images -> (B, out_features) pooled features."""
from __future__ import annotations

import torch
from torch import nn

from fastcbd.errors import ConfigError


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """The demo backbone for 28x28 gray images: three stages of two 3x3 conv-BN-ReLU layers (the second
    of stages 2 and 3 strided), then global average pooling. width=32 -> 128 features."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w),
            _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w),
            _conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w),
        )
        self.out_features = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) with the CIFAR stem (3x3 conv, 16-32-64 channels); n=5 is ResNet-32."""

    def __init__(self, depth: int = 32, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = _conv_bn(in_channels, 16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_features = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet (random init: nothing is downloaded) without its fc layer."""

    def __init__(self, name: str = "resnet50", in_channels: int = 3):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.out_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet3(nn.Module):
    """ConvNet-3, the dataset-distillation network (fastcbd.condense.convnet: conv + instance norm + ReLU +
    average pooling, `depth` times) without its classifier: flattened features of width * (H/8) * (W/8).
    What `fastcbd condense --relabel auto` trains as its teacher."""

    def __init__(self, in_channels: int, width: int, image_size, depth: int = 3):
        super().__init__()
        from fastcbd.condense.convnet import ConvNet

        if not image_size:
            raise ConfigError("model.backbone=convnet3 needs the image size (arch.image_size)")
        net = ConvNet(in_channels, 1, tuple(int(s) for s in image_size), width=width, depth=depth)
        self.features, self.out_features = net.features, net.feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


def build_backbone(name: str, in_channels: int = 3, width: int = 0, image_size=None, options: dict | None = None,
                   weights: str = "") -> nn.Module:
    """name: small_cnn | convnet3 | resnet32 | resnet20 | resnet18 | resnet50 | timm:<name>; width (small_cnn,
    convnet3): 0 = default. image_size (H, W) is for convnet3 and timm backbones; options (create_model
    kwargs) and weights (a local file) for timm backbones (fastcbd.models.timm_backbone)."""
    if name.startswith("timm:"):
        from fastcbd.models.timm_backbone import TimmBackbone

        return TimmBackbone(name[5:], in_channels, image_size, options, weights)
    if options or weights:
        raise ConfigError(f"model.timm_kwargs and model.weights apply to timm:<name> backbones, not {name!r}")
    if name == "small_cnn":
        return SmallCNN(in_channels, width or 32)
    if name == "convnet3":
        return ConvNet3(in_channels, width or 128, image_size)
    if name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        return TorchvisionResNet(name, in_channels)
    if name.startswith("resnet") and name[6:].isdigit() and (int(name[6:]) - 2) % 6 == 0:
        return ResNetCifar(int(name[6:]), in_channels)
    raise ConfigError(f"model.backbone={name!r}: expected small_cnn, convnet3, resnet32 (CIFAR, 6n+2), resnet18, "
                      "resnet50 or timm:<name> (e.g. timm:resnet50, timm:vit_small_patch16_224)")
