"""The official CIFAR-10/100 test sets, read from the archives as published.

Four layouts are understood: the "python" pickles and the "binary" records of
CIFAR-10 and CIFAR-100, each as the downloaded ``.tar.gz``, as the folder it
extracts to, or as a folder that contains either. Archives are streamed member
by member, so nothing is extracted to disk. Only the test split is read: DFQ
methods never see training data.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfq.data.loader import ArrayDataset
from dfq.data.safe_pickle import restricted_load, restricted_loads
from dfq.errors import DFQError, did_you_mean
from dfq.hub import RemoteFile, fetch

__all__ = [
    "CIFAR10_BINARY",
    "CIFAR10_PYTHON",
    "CIFAR100_BINARY",
    "CIFAR100_PYTHON",
    "DOWNLOADS",
    "download_dataset",
    "open_cifar",
]

_KRIZ = "https://www.cs.toronto.edu/~kriz/"

# sha256 of the archives as published on the CIFAR page (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_PYTHON = RemoteFile(
    (_KRIZ + "cifar-10-python.tar.gz",),
    "cifar-10-python.tar.gz",
    sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
)
CIFAR100_PYTHON = RemoteFile(
    (_KRIZ + "cifar-100-python.tar.gz",),
    "cifar-100-python.tar.gz",
    sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
)
CIFAR10_BINARY = RemoteFile(
    (_KRIZ + "cifar-10-binary.tar.gz",),
    "cifar-10-binary.tar.gz",
    sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
)
CIFAR100_BINARY = RemoteFile(
    (_KRIZ + "cifar-100-binary.tar.gz",),
    "cifar-100-binary.tar.gz",
    sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
)

DOWNLOADS: dict[str, RemoteFile] = {
    "cifar10": CIFAR10_PYTHON,
    "cifar100": CIFAR100_PYTHON,
    "cifar10-binary": CIFAR10_BINARY,
    "cifar100-binary": CIFAR100_BINARY,
}

_PIXELS = 32 * 32 * 3
# A CIFAR test file is about 31 MB; refuse to buffer archive members far beyond that.
_MAX_MEMBER_BYTES = 128 << 20


def download_dataset(name: str) -> Path:
    """Download (once) an official CIFAR test archive and return its cached path.

    ``name`` is a key of :data:`DOWNLOADS`; the returned archive can be passed
    straight to :func:`dfq.data.open_dataset`.
    """
    if name not in DOWNLOADS:
        raise DFQError(f"unknown dataset '{name}'{did_you_mean(name, DOWNLOADS)}; downloadable: {', '.join(DOWNLOADS)}")
    return fetch(DOWNLOADS[name], subdir="data")


@dataclass(frozen=True)
class _Layout:
    """Where one official variant keeps its test split, and how to decode it."""

    dataset: str  # "cifar10" or "cifar100"
    folder: str  # what the archive extracts to
    archive: str  # the published archive's file name
    data: str  # the test split inside ``folder``
    meta: str  # class names inside ``folder``
    label_bytes: int  # 0 for pickles; else label bytes before each binary record, the last being the label used
    num_classes: int

    @property
    def title(self) -> str:
        return f"CIFAR-{self.dataset[5:]} {'binary' if self.label_bytes else 'python'}"


# Preference order when a folder holds several copies of one dataset: extracted before archived, python first.
_LAYOUTS = (
    _Layout("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "test_batch", "batches.meta", 0, 10),
    _Layout("cifar100", "cifar-100-python", "cifar-100-python.tar.gz", "test", "meta", 0, 100),
    _Layout("cifar10", "cifar-10-batches-bin", "cifar-10-binary.tar.gz", "test_batch.bin", "batches.meta.txt", 1, 10),
    _Layout("cifar100", "cifar-100-binary", "cifar-100-binary.tar.gz", "test.bin", "fine_label_names.txt", 2, 100),
)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def open_cifar(path: Path) -> ArrayDataset | None:
    """Read the CIFAR test set at ``path``, or return None if ``path`` does not look like CIFAR.

    ``path`` may be an archive (any ``.tar.gz``/``.tgz``/``.tar`` is searched for
    a CIFAR test split), a test file (``test_batch``, ``test``, ``test_batch.bin``,
    ``test.bin``), an extracted folder, or a folder containing one of those.
    """
    if path.is_dir():
        layout = _folder_layout(path)
        if layout is not None:
            return _read_folder(path, layout)
        return _read_parent(path)
    if path.name.lower().endswith(_ARCHIVE_SUFFIXES):
        return _read_archive(path)
    for layout in _LAYOUTS:
        if path.name == layout.data:
            return _read_folder(path.parent, layout)
    return None


def _folder_layout(folder: Path) -> _Layout | None:
    found = [layout for layout in _LAYOUTS if (folder / layout.data).is_file()]
    if len(found) > 1:
        names = ", ".join(layout.data for layout in found)
        raise DFQError(f"{folder}: holds test files of several CIFAR variants ({names}); keep one per folder")
    return found[0] if found else None


def _read_parent(folder: Path) -> ArrayDataset | None:
    """Read the one CIFAR dataset found directly inside ``folder``, preferring extracted copies."""
    candidates: dict[str, tuple[Path, _Layout]] = {}
    for extracted in (True, False):
        for layout in _LAYOUTS:
            child = folder / (layout.folder if extracted else layout.archive)
            usable = (child / layout.data).is_file() if extracted else child.is_file()
            if usable:
                candidates.setdefault(layout.dataset, (child, layout))
    if not candidates:
        return None
    if len(candidates) > 1:
        names = " and ".join(str(child) for child, _ in candidates.values())
        raise DFQError(f"{folder}: contains both {names}; pass the one to evaluate on")
    child, layout = next(iter(candidates.values()))
    return _read_folder(child, layout) if child.is_dir() else _read_archive(child)


def _read_folder(folder: Path, layout: _Layout) -> ArrayDataset:
    data_path, meta_path = folder / layout.data, folder / layout.meta
    try:
        if layout.label_bytes:
            names = meta_path.read_bytes() if meta_path.is_file() else None
            return _from_binary(data_path.read_bytes(), names, layout, str(data_path))
        with open(data_path, "rb") as f:
            batch = restricted_load(f, source=str(data_path))
        meta = None
        if meta_path.is_file():
            with open(meta_path, "rb") as f:
                meta = restricted_load(f, source=str(meta_path))
    except OSError as e:
        raise DFQError(f"{e.filename or folder}: cannot read ({e.strerror or e})") from e
    return _from_pickle(batch, meta, layout, str(data_path), str(meta_path))


def _read_archive(path: Path) -> ArrayDataset:
    """Stream ``path`` once, buffering only CIFAR test splits and class-name files, never extracting."""
    wanted = {(layout.folder, name): layout for layout in _LAYOUTS for name in (layout.data, layout.meta)}
    members: dict[tuple[str, str], bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                parts = member.name.split("/")
                key = (parts[-2] if len(parts) > 1 else "", parts[-1])
                if key not in wanted or not member.isfile():
                    continue
                if member.size > _MAX_MEMBER_BYTES:
                    raise DFQError(f"{path}: member {member.name} is {member.size} bytes, too large for a CIFAR file")
                f = tar.extractfile(member)
                assert f is not None  # regular files always have data
                members[key] = f.read()
                layout = wanted[key]
                if (layout.folder, layout.data) in members and (layout.folder, layout.meta) in members:
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DFQError(f"{path}: not a readable tar archive, truncated or corrupt ({e})") from e
    for layout in _LAYOUTS:
        data = members.get((layout.folder, layout.data))
        if data is None:
            continue
        meta = members.get((layout.folder, layout.meta))
        data_name, meta_name = f"{path}:{layout.folder}/{layout.data}", f"{path}:{layout.folder}/{layout.meta}"
        if layout.label_bytes:
            return _from_binary(data, meta, layout, data_name)
        batch = restricted_loads(data, source=data_name)
        meta_obj = None if meta is None else restricted_loads(meta, source=meta_name)
        return _from_pickle(batch, meta_obj, layout, data_name, meta_name)
    expected = ", ".join(f"{layout.folder}/{layout.data}" for layout in _LAYOUTS)
    raise DFQError(f"cannot read {path}: the archive holds no CIFAR test set (expected one of {expected})")


def _from_pickle(batch: object, meta: object, layout: _Layout, source: str, meta_source: str) -> ArrayDataset:
    label_key = "labels" if layout.dataset == "cifar10" else "fine_labels"
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise DFQError(f"{source}: not a {layout.title} test batch (expected a dict with 'data' and '{label_key}')")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        shape = "×".join(map(str, data.shape)) if isinstance(data, np.ndarray) else type(data).__name__
        raise DFQError(f"{source}: 'data' is {shape}, expected uint8 N×{_PIXELS} (32×32×3 images)")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DFQError(f"{source}: '{label_key}' is not a list of integers ({e})") from e
    return ArrayDataset(
        data.reshape(-1, 3, 32, 32),  # each row is the R plane, then G, then B, each 32×32 row-major
        labels,
        name=f"{layout.dataset}-test",
        num_classes=layout.num_classes,
        class_names=None if meta is None else _pickled_names(meta, layout, meta_source),
        source=source,
    )


def _pickled_names(meta: object, layout: _Layout, source: str) -> list[str]:
    key = "label_names" if layout.dataset == "cifar10" else "fine_label_names"
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DFQError(f"{source}: not a {layout.title} meta file (expected a dict with a '{key}' list of names)")
    return names


def _from_binary(data: bytes, meta: bytes | None, layout: _Layout, source: str) -> ArrayDataset:
    record = layout.label_bytes + _PIXELS
    if not data:
        raise DFQError(f"{source}: file is empty")
    if len(data) % record:
        raise DFQError(
            f"{source}: {len(data)} bytes is not a whole number of {record}-byte records "
            f"(truncated, or not a {layout.title} file)"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    names = None
    if meta is not None:
        names = [line.strip() for line in meta.decode("latin1").splitlines() if line.strip()]
    return ArrayDataset(
        rows[:, layout.label_bytes :].reshape(-1, 3, 32, 32),
        rows[:, layout.label_bytes - 1],
        name=f"{layout.dataset}-test",
        num_classes=layout.num_classes,
        class_names=names,
        source=source,
    )
