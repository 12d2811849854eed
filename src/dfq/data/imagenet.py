"""ImageNet-style validation folders: ``root/<class>/<image>``, decoded lazily with PIL.

The preprocessing reproduces torchvision's standard evaluation transform
(``Resize(256)`` bilinear on the shorter side, then ``CenterCrop(224)``) with
PIL alone, so published ImageNet accuracies stay comparable without depending
on torchvision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfq.data.loader import ImageDataset
from dfq.errors import DFQError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "open_image_folder", "resize_center_crop"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
_INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_center_crop(
    image: Image.Image, image_size: int, crop_fraction: float = 0.875, interpolation: str = "bilinear"
) -> Image.Image:
    """Resize the shorter side to ``round(image_size / crop_fraction)``, then center-crop a square (the standard
    ImageNet evaluation by default: 224 of 256, bilinear).

    Output sizes and crop offsets are computed as torchvision does, so pixels match its transform.
    """
    if interpolation not in _INTERPOLATIONS:
        raise DFQError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {interpolation!r}")
    resize = round(image_size / crop_fraction)
    width, height = image.size
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    image = image.resize((new_w, new_h), _INTERPOLATIONS[interpolation])
    top = round((new_h - image_size) / 2.0)
    left = round((new_w - image_size) / 2.0)
    return image.crop((left, top, left + image_size, top + image_size))


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolderDataset(ImageDataset):
    """Class-folder images; class ``i`` is the ``i``-th subfolder name in sorted order."""

    def __init__(
        self, root: Path, classes: list[str], samples: list[tuple[Path, int]], image_size: int,
        crop_fraction: float = 0.875, interpolation: str = "bilinear",
    ) -> None:  # fmt: skip
        self.root = root
        self.crop = (crop_fraction, interpolation)
        self.samples = samples
        self.name = f"imagefolder-{root.name}"
        self.num_classes = len(classes)
        self.class_names = classes
        self.image_size = (image_size, image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = resize_center_crop(image.convert("RGB"), self.image_size[0], *self.crop)
        # UnidentifiedImageError and truncated files are OSErrors; PIL raises SyntaxError for broken PNG
        # chunks while decoding and DecompressionBombError for absurd declared sizes.
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DFQError(f"{path}: cannot decode image ({e})") from e
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), label


def open_image_folder(
    root: Path, image_size: int, crop_fraction: float = 0.875, interpolation: str = "bilinear"
) -> ImageFolderDataset | None:
    """Index ``root`` as class folders of images, or return None if no subfolder holds images.

    Hidden folders are ignored. A class folder without images is an error, since
    skipping it would shift every later class index.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [_images_under(root / c) for c in classes]
    if not any(per_class):
        return None
    for name, files in zip(classes, per_class, strict=True):
        if not files:
            raise DFQError(f"{root / name}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    samples = [(path, label) for label, files in enumerate(per_class) for path in files]
    return ImageFolderDataset(root, classes, samples, image_size, crop_fraction, interpolation)
