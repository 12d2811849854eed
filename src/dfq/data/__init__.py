"""Evaluation data: real test sets for measuring accuracy (the DFQ methods never see them).

:func:`open_dataset` recognises the format from the path itself, so one
``--data PATH`` option serves ``.npz`` test sets, the official CIFAR-10/100
archives (python or binary, archived or extracted) and ImageNet-style class
folders. :func:`make_loader` turns any of them into normalised batches.
"""

from __future__ import annotations

from pathlib import Path

from dfq.data.cifar import (
    CIFAR10_BINARY,
    CIFAR10_PYTHON,
    CIFAR100_BINARY,
    CIFAR100_PYTHON,
    DOWNLOADS,
    download_dataset,
    open_cifar,
)
from dfq.data.imagenet import ImageFolderDataset, open_image_folder
from dfq.data.loader import ArrayDataset, Batches, ImageDataset, load_npz, make_loader
from dfq.errors import DFQError

__all__ = [
    "CIFAR10_BINARY",
    "CIFAR10_PYTHON",
    "CIFAR100_BINARY",
    "CIFAR100_PYTHON",
    "DOWNLOADS",
    "ArrayDataset",
    "Batches",
    "ImageDataset",
    "ImageFolderDataset",
    "download_dataset",
    "make_loader",
    "open_dataset",
]

_EXPECTED = (
    "expected a .npz test set, a CIFAR-10/100 archive (cifar-10-python.tar.gz, cifar-10-binary.tar.gz, ...), "
    "its extracted folder or test file, or a folder of class subfolders with images"
)


def open_dataset(
    path: str | Path, *, image_size: int = 224, crop_fraction: float = 0.875, interpolation: str = "bilinear"
) -> ImageDataset:
    """Open the evaluation set at ``path``, detecting its format.

    ``image_size`` is the center-crop size for image folders (resized first to
    ``round(image_size / crop_fraction)`` with ``interpolation``: the model's preprocessing record);
    array formats keep their stored size.
    """
    path = Path(path).expanduser()
    if image_size < 1:
        raise DFQError(f"image size must be at least 1, got {image_size}")
    if not path.exists():
        raise DFQError(f"{path}: no such file or directory")
    if path.is_file():
        if path.stat().st_size == 0:
            raise DFQError(f"{path}: file is empty")
        if path.suffix.lower() == ".npz":
            return load_npz(path)
    try:
        dataset = open_cifar(path)
        if dataset is None and path.is_dir():
            dataset = open_image_folder(path, image_size, crop_fraction, interpolation)
    except OSError as e:  # unreadable folders or files met while detecting the format
        raise DFQError(f"{e.filename or path}: cannot read ({e.strerror or e})") from e
    if dataset is None:
        raise DFQError(f"cannot read {path}: {_EXPECTED}")
    return dataset
