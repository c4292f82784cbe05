"""ResNet encoder and MLP projection head (SimCLR, Section 2.1 and B.9)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

# Every torchvision ResNet-family trunk (its constructor's name) and its feature size D: basic blocks end in 512
# channels, bottleneck blocks (ResNet-50 and up, the wide ResNets, ResNeXt) in 2048. simclr.config.BASE_MODELS
# lists the same names (tests/test_models.py checks).
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
                "wide_resnet50_2": 2048, "wide_resnet101_2": 2048, "resnext50_32x4d": 2048,
                "resnext101_32x8d": 2048, "resnext101_64x4d": 2048}
ARCHITECTURES = {  # the names tables and model cards print
    "resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
    "resnet152": "ResNet-152", "wide_resnet50_2": "Wide ResNet-50-2", "wide_resnet101_2": "Wide ResNet-101-2",
    "resnext50_32x4d": "ResNeXt-50 32x4d", "resnext101_32x8d": "ResNeXt-101 32x8d",
    "resnext101_64x4d": "ResNeXt-101 64x4d"}
# The encoder takes images in [0, 1] and normalises inside, so every caller feeds the same thing.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """torchvision ResNet trunk (fc removed) mapping float images `[B, 3, H, W]` in [0, 1] to `[B, D]`.

    Its state dict keys are `backbone.<torchvision key>`, so the trunk loads into a plain torchvision
    ResNet with only `fc` missing.
    """

    def __init__(self, base_model: str = "resnet18", cifar_stem: bool = False):
        super().__init__()
        if base_model not in FEATURE_DIMS:
            raise ValueError(f"base_model {base_model!r} is not one of {', '.join(FEATURE_DIMS)}")
        backbone = getattr(torchvision.models, base_model)(weights=None)
        if cifar_stem:
            # Small images (CIFAR, digits) lose too much to a 7x7 stride-2 conv and max-pool (paper, B.9). Every
            # family member's stem has 64 output channels, so the replacement fits all of them.
            backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.feature_dim = FEATURE_DIMS[base_model]
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)  # (B, D)


class ProjectionHead(nn.Module):
    """The nonlinear head g(h) the contrastive loss is applied to (Section 2.1).

    With the defaults, g(h) = W2 ReLU(W1 h), the paper's and the original repository's. `num_layers`
    linear layers in all (SimCLR v2 uses 3); with `batch_norm`, as in the official implementation, every
    linear layer is followed by BatchNorm (the last one without a learned scale and shift), and the
    linear layers then have no bias, which BatchNorm would cancel.

    Args:
        in_dim: feature size D of the encoder; hidden_dim: width of the hidden layers; out_dim: size of z.
        num_layers: linear layers, >= 1 (1: a linear projection, no ReLU).
        batch_norm: BatchNorm after each linear layer.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            width = out_dim if last else hidden_dim
            layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, width, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width, affine=not last))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # (B, out_dim)


class ResNetSimCLR(nn.Module):
    """Encoder f and projection head g: `forward(x)` returns `(h, z)`, `[B, D]` and `[B, out_dim]`."""

    def __init__(self, base_model: str = "resnet18", out_dim: int = 256, cifar_stem: bool = False,
                 head_layers: int = 2, head_bn: bool = False):
        super().__init__()
        self.encoder = Encoder(base_model, cifar_stem)
        dim = self.encoder.feature_dim
        self.head = ProjectionHead(dim, dim, out_dim, head_layers, head_bn)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.head(h)


def create_model(base_model: str, out_dim: int, cifar_stem: bool = False, head_layers: int = 2,
                 head_bn: bool = False) -> ResNetSimCLR:
    return ResNetSimCLR(base_model, out_dim, cifar_stem, head_layers, head_bn)
