"""ResNet encoder and MLP projection head (SimCLR, Section 2.1 and B.9)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048}
ARCHITECTURES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}  # the names tables and model cards print
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
            # Small images (CIFAR, digits) lose too much to a 7x7 stride-2 conv and max-pool (paper, B.9).
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
