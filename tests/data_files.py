"""Writers for data files in the official formats (CIFAR python/binary, Python 2 pickles), shared by the data,
fuzzing and bad-input tests."""

from __future__ import annotations

import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np

from dfq.data import ArrayDataset

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def py2_pickle(obj: object, numpy_module: str = "numpy.core.multiarray") -> bytes:
    """Pickle ``obj`` the way Python 2's cPickle (protocol 2) wrote the official CIFAR files.

    Python 3's pickler cannot do this: it writes byte strings as ``_codecs.encode`` calls,
    which the real files never contain.
    """
    out = bytearray(b"\x80\x02")

    def emit(x: object) -> None:
        if x is None:
            out.extend(b"N")
        elif isinstance(x, bool):
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            out.extend(b"K" + bytes([x]) if 0 <= x < 256 else b"J" + struct.pack("<i", x))
        elif isinstance(x, (str, bytes)):  # a Python 2 str
            raw = x.encode("latin1") if isinstance(x, str) else x
            out.extend(b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw)))
            out.extend(raw)
        elif isinstance(x, tuple):
            out.extend(b"(")
            for item in x:
                emit(item)
            out.extend(b"t")
        elif isinstance(x, list):
            out.extend(b"](")
            for item in x:
                emit(item)
            out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}(")
            for key, value in x.items():
                emit(key)
                emit(value)
            out.extend(b"u")
        elif isinstance(x, np.ndarray):
            assert x.dtype == np.uint8
            out.extend(f"c{numpy_module}\n_reconstruct\ncnumpy\nndarray\n".encode())
            emit((0,))
            emit("b")
            out.extend(b"\x87R(")  # TUPLE3 REDUCE, then the __setstate__ tuple
            emit(1)
            emit(tuple(x.shape))
            out.extend(b"cnumpy\ndtype\n")
            emit(("u1", 0, 1))
            out.extend(b"R")
            emit((3, "|", None, None, None, -1, -1, 0))
            out.extend(b"b")  # BUILD the dtype
            emit(False)
            emit(x.tobytes())
            out.extend(b"tb")  # BUILD the array
        else:
            raise TypeError(type(x))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def random_cifar(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random HWC images and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n)


def rows(images_hwc: np.ndarray) -> np.ndarray:
    """CIFAR rows: 1024 red values, then 1024 green, then 1024 blue, each plane row-major."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072)


def cifar10_python_files(images: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    batch = {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(v) for v in labels],
        "data": rows(images),
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
    }
    meta = {"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    return {"test_batch": py2_pickle(batch), "batches.meta": py2_pickle(meta), "data_batch_1": b"unused"}


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_tar(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def hwc(ds: ArrayDataset) -> np.ndarray:
    return ds.images.permute(0, 2, 3, 1).numpy()


class Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def binary_records(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
    labels = np.stack(label_columns, axis=1).astype(np.uint8)
    return np.concatenate([labels, rows(images)], axis=1).tobytes()
