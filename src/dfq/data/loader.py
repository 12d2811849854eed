"""Datasets held as one uint8 array, the ``.npz`` reader, and normalised batching.

Evaluation images are kept as uint8 (4x smaller than float) and normalised one
batch at a time. In-memory datasets are batched by slicing the array, which is
much faster than a ``DataLoader`` collating 10,000 single items.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dfq.errors import DFQError

__all__ = ["ArrayDataset", "Batches", "ImageDataset", "load_npz", "make_loader"]


class ImageDataset(Dataset):
    """Labelled evaluation images; item ``i`` is ``(uint8 C×H×W tensor, int label)``.

    Attributes:
        name: short identifier used in reports, e.g. ``"cifar10-test"``.
        num_classes: number of classes the labels index into.
        class_names: one name per class, or None when the source has none.
        image_size: (height, width) of every item.
    """

    name: str
    num_classes: int
    class_names: list[str] | None
    image_size: tuple[int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class ArrayDataset(ImageDataset):
    """A dataset held in memory as ``images`` (uint8 N×C×H×W) and ``labels`` (int64 N) tensors.

    The constructor validates what every array source must satisfy, so CIFAR and
    ``.npz`` readers report bad files with the same messages. ``source`` names
    the file in those messages.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        name: str,
        num_classes: int,
        class_names: list[str] | None,
        source: str,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DFQError(f"{source}: images are {_describe(images)}, expected uint8 N×3×H×W")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DFQError(f"{source}: labels are {_describe(labels)}, expected a 1-D integer array")
        if len(images) != len(labels):
            raise DFQError(f"{source}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise DFQError(f"{source}: contains no images")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise DFQError(f"{source}: labels range over [{low}, {high}], expected [0, {num_classes - 1}]")
        if class_names is not None and len(class_names) != num_classes:
            raise DFQError(f"{source}: {len(class_names)} class names for {num_classes} classes")
        # "W": torch warns on read-only NumPy memory (np.frombuffer, some unpickled arrays).
        self.images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.name = name
        self.num_classes = num_classes
        self.class_names = class_names
        self.image_size = (int(images.shape[2]), int(images.shape[3]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A copy, so a caller editing the item cannot change the dataset.
        return self.images[index].clone(), int(self.labels[index])


def _describe(a: np.ndarray) -> str:
    return f"a {a.dtype} array of shape {'×'.join(map(str, a.shape))}" if a.ndim else f"a {a.dtype} scalar"


def load_npz(path: Path) -> ArrayDataset:
    """Read a test set saved as ``.npz`` with ``images`` (uint8 N×H×W×3) and ``labels`` (int N).

    An optional ``class_names`` string array names the classes; otherwise
    ``num_classes`` is ``max(labels) + 1``. Other keys are ignored.
    """
    try:
        # Our own handle, because np.load leaks its file when the zip directory is unreadable.
        with open(path, "rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DFQError(f"{path}: is a single .npy array, expected an .npz archive with 'images' and 'labels'")
            missing = [k for k in ("images", "labels") if k not in npz.files]
            if missing:
                found = ", ".join(npz.files) or "nothing"
                raise DFQError(f"{path}: has no {' or '.join(repr(k) for k in missing)} array (found: {found})")
            images, labels = npz["images"], npz["labels"]
            class_names = npz["class_names"] if "class_names" in npz.files else None
    except DFQError:
        raise
    except Exception as e:  # any parse failure of untrusted bytes is the file's fault, not ours
        # e.g. ValueError (pickled arrays, bad .npy headers), zlib.error (corrupt deflate data),
        # NotImplementedError and RuntimeError (zip flags), MemoryError (absurd declared shapes).
        raise DFQError(f"{path}: not a readable .npz archive, truncated or corrupt ({e})") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DFQError(f"{path}: 'images' is {_describe(images)}, expected uint8 N×H×W×3 (RGB)")
    names = None
    if class_names is not None:
        if class_names.ndim != 1 or class_names.dtype.kind != "U":
            raise DFQError(f"{path}: 'class_names' is {_describe(class_names)}, expected 1-D strings")
        names = [str(n) for n in class_names]
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1 or labels.size == 0:
        num_classes = 0  # the ArrayDataset checks below report the exact problem
    else:
        num_classes = len(names) if names is not None else int(labels.max()) + 1
    return ArrayDataset(
        images.transpose(0, 3, 1, 2),
        labels,
        name=path.stem,
        num_classes=num_classes,
        class_names=names,
        source=str(path),
    )


class Batches:
    """Normalised batches of a dataset, in order; iterable any number of times.

    Yields ``(float32 N×C×H×W, int64 N)`` with images mapped to ``(x/255 − mean)/std``.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        workers: int,
        count: int,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.workers = workers
        self.count = count
        self._mean = mean.view(1, -1, 1, 1)
        self._std = std.view(1, -1, 1, 1)

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._uint8_batches():
            yield images.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std), labels

    def _uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            for start in range(0, self.count, self.batch_size):
                stop = min(start + self.batch_size, self.count)
                yield ds.images[start:stop], ds.labels[start:stop].clone()
            return
        subset = ds if self.count == len(ds) else Subset(ds, range(self.count))
        loader = DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
        try:
            for images, labels in loader:
                yield images, labels.to(torch.int64)
        except DFQError as e:
            if not self.workers:
                raise
            raise _from_worker(e) from None


def _from_worker(error: DFQError) -> DFQError:
    """Recover a worker's one-line message: DataLoader re-raises it with the worker traceback prepended."""
    last = str(error).rstrip().splitlines()[-1]
    module = f"{DFQError.__module__}."
    return DFQError(last.split(": ", 1)[1]) if last.startswith(module) and ": " in last else error


def make_loader(
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    workers: int = 0,
    limit: int | None = None,
) -> Batches:
    """Batches of ``dataset`` normalised with the model's ``mean``/``std``, in dataset order.

    In-memory datasets are sliced directly; folder datasets are decoded by a
    ``DataLoader`` with ``workers`` processes. ``limit`` keeps only the first
    ``limit`` images (for quick evaluations).
    """
    if batch_size < 1:
        raise DFQError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise DFQError(f"number of data workers must be at least 0, got {workers}")
    if limit is not None and limit < 1:
        raise DFQError(f"image limit must be at least 1, got {limit}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
    if len(mean_t) != 3 or len(std_t) != 3:
        raise DFQError(f"normalisation needs 3 mean and std values (RGB), got {len(mean_t)} and {len(std_t)}")
    if not bool((std_t > 0).all()):
        raise DFQError(f"normalisation std values must be positive, got {std_t.tolist()}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return Batches(dataset, mean_t, std_t, batch_size, workers, count)
