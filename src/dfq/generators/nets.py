"""Generator architectures of the DFQ papers (GDFQ, ECCV 2020: conditional; ZAQ, CVPR 2021: unconditional).

All three are ACGAN-style: Linear -> (BN) -> [Up x2 -> Conv3x3 -> BN -> LeakyReLU] x2
-> Conv3x3 -> Tanh -> BN(3, affine=False); each "Up x2 -> Conv3x3" runs as :func:`upsample_conv`.
The positional ``0.8`` of the original code is BatchNorm's *eps*, reproduced here. The final parameter-free BN
standardises each channel over the batch, so images arrive roughly like
normalised real images. Generators always run in train mode (batch statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfq.errors import DFQError
from dfq.registry import Registry

__all__ = [
    "CifarGenerator",
    "ConditionalBatchNorm2d",
    "ImageNetGenerator",
    "UnconditionalGenerator",
    "create_generator",
    "list_generators",
    "upsample_conv",
]


# Rows (and columns) of a 3x3 kernel that land on the same input pixel after a 2x nearest upsampling, per output
# phase: even outputs see input offsets (-1, 0) with kernel taps (0, 1+2), odd ones (0, +1) with taps (0+1, 2).
_PHASES = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class _InterleavePhases(torch.autograd.Function):
    """(N, 4 O, h+1, w+1) phase outputs -> (N, O, 2h, 2w) image; phase (a, b) is read at offset (a, b).

    Written out because autograd's backward of the four slices would fill four zero tensors of the input's
    size and add them; here the backward is one zero fill and four strided copies.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, o, h, w = y.shape[0], y.shape[1] // 4, y.shape[2] - 1, y.shape[3] - 1
        ctx.channels_last = y.is_contiguous(memory_format=torch.channels_last)
        if ctx.channels_last:  # physical layout (N, h, a, w, b, O)
            out = y.new_empty(n, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
        else:
            out = y.new_empty(n, o, 2 * h, 2 * w)
        grid, phases = out.view(n, o, h, 2, w, 2), y.view(n, 2, 2, o, h + 1, w + 1)
        for a in (0, 1):
            for b in (0, 1):
                grid[:, :, :, a, :, b] = phases[:, a, b, :, a : a + h, b : b + w]
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, o, h, w = g.shape[0], g.shape[1], g.shape[2] // 2, g.shape[3] // 2
        if ctx.channels_last:
            g_y = g.new_zeros(n, h + 1, w + 1, 4 * o).permute(0, 3, 1, 2)
        else:
            g_y = g.new_zeros(n, 4 * o, h + 1, w + 1)
        phases, grid = g_y.view(n, 2, 2, o, h + 1, w + 1), g.reshape(n, o, h, 2, w, 2)
        for a in (0, 1):
            for b in (0, 1):
                phases[:, a, b, :, a : a + h, b : b + w] = grid[:, :, :, a, :, b]
        return g_y


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(Upsample(scale_factor=2)(x))`` for a 3x3, stride-1, padding-1 conv, without the upsampled tensor.

    Each of the four output phases is a 2x2 convolution of ``x`` with summed kernel taps (the same linear map,
    summed in another order: equal up to float rounding), which costs 16 instead of 36 multiply-adds per input
    pixel and channel pair; the four run as one convolution. The generators spend most of their time here.
    """
    r = _PHASES.to(conv.weight)
    k = torch.einsum("apr,oirc,bqc->aboipq", r, conv.weight, r).flatten(0, 2)  # (4 O, I, 2, 2) phase kernels
    bias = None if conv.bias is None else conv.bias.repeat(4)
    return _InterleavePhases.apply(F.conv2d(F.pad(x, (1, 1, 1, 1)), k, bias))


class CifarGenerator(nn.Module):
    """GDFQ/AdaSG/AdaDFQ CIFAR generator: input = label embedding ⊙ noise."""

    conditional = True

    def __init__(self, num_classes: int, latent_dim: int = 100, img_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.init_size = latent_dim, num_classes, img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)  # N(0, 1) init, as in the papers
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128, eps=0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=0.8)
        self.act = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.l1(self.label_emb(y) * z).view(z.shape[0], 128, self.init_size, self.init_size)
        h = self.act(self.bn1(upsample_conv(self.bn0(h), self.conv1)))
        h = self.act(self.bn2(upsample_conv(h, self.conv2)))
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
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = ConditionalBatchNorm2d(num_classes, 128, eps=0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(num_classes, 64, eps=0.8)
        self.act = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size)
        h = self.act(self.bn1(upsample_conv(self.bn0(h, y), self.conv1), y))
        h = self.act(self.bn2(upsample_conv(h, self.conv2), y))
        return self.out_bn(torch.tanh(self.conv3(h)))


class UnconditionalGenerator(nn.Module):
    """ZAQ's generator: the CIFAR topology without labels, default BN eps everywhere."""

    conditional = False

    def __init__(self, num_classes: int, latent_dim: int = 256, img_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.init_size = latent_dim, num_classes, img_size // 4
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.act = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.l1(z.flatten(1)).view(z.shape[0], 128, self.init_size, self.init_size)
        h = self.act(self.bn1(upsample_conv(self.bn0(h), self.conv1)))
        h = self.act(self.bn2(upsample_conv(h, self.conv2)))
        return self.out_bn(torch.tanh(self.conv3(h)))


GENERATORS = Registry[Callable[..., nn.Module]]("generator")
GENERATORS.add("cifar", CifarGenerator)
GENERATORS.add("imagenet", ImageNetGenerator)
GENERATORS.add("unconditional", UnconditionalGenerator)


def list_generators() -> list[str]:
    return GENERATORS.names()


def create_generator(name: str, num_classes: int, img_size: int, latent_dim: int, channels: int = 3) -> nn.Module:
    """Build a registered generator; ``img_size`` must be divisible by 4."""
    factory = GENERATORS.get(name)
    if img_size % 4:
        raise DFQError(f"generator image size must be divisible by 4, got {img_size}")
    return factory(num_classes=num_classes, latent_dim=latent_dim, img_size=img_size, channels=channels)
