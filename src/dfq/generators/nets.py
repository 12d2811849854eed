"""Generator architectures of the DFQ papers (METHODS.md §1.5, §5.3).

All three are ACGAN-style: Linear -> (BN) -> [Up x2 -> Conv3x3 -> BN -> LeakyReLU] x2
-> Conv3x3 -> Tanh -> BN(3, affine=False). The positional ``0.8`` of the original
code is BatchNorm's *eps*, reproduced here. The final parameter-free BN
standardises each channel over the batch, so images arrive roughly like
normalised real images. Generators always run in train mode (batch statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dfq.errors import DFQError, did_you_mean

__all__ = [
    "CifarGenerator",
    "ConditionalBatchNorm2d",
    "ImageNetGenerator",
    "UnconditionalGenerator",
    "create_generator",
    "list_generators",
]


class CifarGenerator(nn.Module):
    """GDFQ/AdaSG/AdaDFQ CIFAR generator: input = label embedding ⊙ noise."""

    conditional = True

    def __init__(self, num_classes: int, latent_dim: int = 100, img_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.init_size = latent_dim, num_classes, img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)  # N(0, 1) init, as in the papers
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.up1 = nn.Upsample(scale_factor=2)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128, eps=0.8)
        self.up2 = nn.Upsample(scale_factor=2)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=0.8)
        self.act = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.l1(self.label_emb(y) * z).view(z.shape[0], 128, self.init_size, self.init_size)
        h = self.act(self.bn1(self.conv1(self.up1(self.bn0(h)))))
        h = self.act(self.bn2(self.conv2(self.up2(h))))
        return self.out_bn(torch.tanh(self.conv3(h)))  # (B, C, img, img)


class ConditionalBatchNorm2d(nn.Module):
    """BN without affine, then per-class scale and shift (tables initialised to 1 and 0)."""

    def __init__(self, num_classes: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=eps)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gamma(y)[:, :, None, None] * self.bn(x) + self.beta(y)[:, :, None, None]


class ImageNetGenerator(nn.Module):
    """GDFQ/AdaSG/AdaDFQ ImageNet generator: plain noise, labels enter through class-conditional BN."""

    conditional = True

    def __init__(self, num_classes: int, latent_dim: int = 100, img_size: int = 224, channels: int = 3) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.init_size = latent_dim, num_classes, img_size // 4
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.bn0 = ConditionalBatchNorm2d(num_classes, 128)
        self.up1 = nn.Upsample(scale_factor=2)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = ConditionalBatchNorm2d(num_classes, 128, eps=0.8)
        self.up2 = nn.Upsample(scale_factor=2)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(num_classes, 64, eps=0.8)
        self.act = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size)
        h = self.up1(self.bn0(h, y))
        h = self.up2(self.act(self.bn1(self.conv1(h), y)))
        h = self.act(self.bn2(self.conv2(h), y))
        return self.out_bn(torch.tanh(self.conv3(h)))


class UnconditionalGenerator(nn.Module):
    """ZAQ's generator: the CIFAR topology without labels, default BN eps everywhere."""

    conditional = False

    def __init__(self, num_classes: int, latent_dim: int = 256, img_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.init_size = latent_dim, num_classes, img_size // 4
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.up1 = nn.Upsample(scale_factor=2)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128)
        self.up2 = nn.Upsample(scale_factor=2)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.act = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.l1(z.flatten(1)).view(z.shape[0], 128, self.init_size, self.init_size)
        h = self.act(self.bn1(self.conv1(self.up1(self.bn0(h)))))
        h = self.act(self.bn2(self.conv2(self.up2(h))))
        return self.out_bn(torch.tanh(self.conv3(h)))


_GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "cifar": CifarGenerator,
    "imagenet": ImageNetGenerator,
    "unconditional": UnconditionalGenerator,
}


def list_generators() -> list[str]:
    return sorted(_GENERATORS)


def create_generator(name: str, num_classes: int, img_size: int, latent_dim: int, channels: int = 3) -> nn.Module:
    """Build a registered generator; ``img_size`` must be divisible by 4."""
    if name not in _GENERATORS:
        raise DFQError(
            f"unknown generator '{name}'{did_you_mean(name, _GENERATORS)}; available: {', '.join(_GENERATORS)}"
        )
    if img_size % 4:
        raise DFQError(f"generator image size must be divisible by 4, got {img_size}")
    return _GENERATORS[name](num_classes=num_classes, latent_dim=latent_dim, img_size=img_size, channels=channels)
