"""Fuzzing of everything that reads user files: datasets, CIFAR pickles, weights, YAML presets.

Random bytes, truncations, bit flips and overwritten runs of valid small files, with fixed seeds
(each case is reproducible from its id). The contract: a reader either returns something
well-formed or raises :class:`DFQError` with a one-line message; no other exception escapes.
The crafted cases at the end are inputs that once escaped as other exceptions.
"""

from __future__ import annotations

import io
import random
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import CIFAR10_NAMES, binary_records, cifar10_python_files, py2_pickle, random_cifar, rows
from PIL import Image

from dfq.config import load_yaml, resolve_config
from dfq.data import ArrayDataset, ImageDataset, open_dataset
from dfq.data.safe_pickle import restricted_loads
from dfq.errors import DFQError
from dfq.models import create_model

MODEL = "resnet20a_cifar10"
CASES_PER_SPECIMEN = 12
IMAGE_SIZE = 16  # crop size for image folders: small, decoding is the point

# Corrupt images and pickles trigger these on the way to a DFQError; they are not what is tested.
pytestmark = [
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:PIL"),
    pytest.mark.filterwarnings(r"ignore:dtype\(\).*align"),  # flipped bytes in a pickled dtype
]


# --------------------------------------------------------------------------- valid specimens


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _npz(compressed: bool) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8), "labels": np.array([0, 3, 1, 2])}
    if compressed:
        arrays["class_names"] = np.array(["a", "b", "c", "d"])
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat_size: int) -> bytes:
    """An RGB PNG whose compressed pixels are split over IDAT chunks of ``idat_size`` bytes."""
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idats = b"".join(_chunk(b"IDAT", data[i : i + idat_size]) for i in range(0, len(data), idat_size))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idats + _chunk(b"IEND", b"")


def _image(fmt: str, **options: object) -> bytes:
    pixels = np.random.default_rng(2).integers(0, 256, (20, 26, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **options)
    return buf.getvalue()


def _specimens() -> dict[str, tuple[dict[str, bytes], str, str]]:
    """name -> (files by relative path, the file to corrupt, the path given to open_dataset)."""
    images, labels = random_cifar(3, 10)
    py = cifar10_python_files(images, labels)
    del py["data_batch_1"]
    py_members = {f"cifar-10-batches-py/{k}": v for k, v in py.items()}
    fine = np.array([5, 99, 0])
    c100 = {
        "cifar-100-python/test": py2_pickle({"data": rows(images), "fine_labels": [int(v) for v in fine]}),
        "cifar-100-python/meta": py2_pickle({"fine_label_names": [f"c{i}" for i in range(100)]}),
    }
    binary = binary_records(images, labels)
    names_txt = ("\n".join(CIFAR10_NAMES) + "\n").encode()
    bin_members = {"cifar-10-batches-bin/test_batch.bin": binary, "cifar-10-batches-bin/batches.meta.txt": names_txt}
    png = _png(30, 24, 64)
    return {
        "npz": ({"set.npz": _npz(False)}, "set.npz", "set.npz"),
        "npz-compressed": ({"set.npz": _npz(True)}, "set.npz", "set.npz"),
        "cifar10-python.tar.gz": ({"c.tar.gz": _tar(py_members, "w:gz")}, "c.tar.gz", "c.tar.gz"),
        "cifar10-python.tar": ({"c.tar": _tar(py_members, "w")}, "c.tar", "c.tar"),
        "cifar10-python-folder/test_batch": (py_members, "cifar-10-batches-py/test_batch", "."),
        "cifar10-python-folder/batches.meta": (py_members, "cifar-10-batches-py/batches.meta", "cifar-10-batches-py"),
        "cifar100-python.tar": ({"c100.tar": _tar(c100, "w")}, "c100.tar", "c100.tar"),
        "cifar10-binary.tar.gz": ({"b.tar.gz": _tar(bin_members, "w:gz")}, "b.tar.gz", "b.tar.gz"),
        "cifar10-binary/test_batch.bin": (bin_members, "cifar-10-batches-bin/test_batch.bin", "."),
        "image-folder/png": ({"val/a/x.png": png, "val/b/y.png": png}, "val/a/x.png", "val"),
        "image-folder/jpeg": ({"val/a/x.jpg": _image("JPEG", quality=80)}, "val/a/x.jpg", "val"),
        "image-folder/tiff": ({"val/a/x.tiff": _image("TIFF")}, "val/a/x.tiff", "val"),
    }


SPECIMENS = _specimens()


# --------------------------------------------------------------------------- corruption and checks


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    """One of: truncation, 1-8 bit flips, an overwritten run, a deleted run, or random bytes."""
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0 or not b:
        return bytes(b[: rng.randrange(len(b) + 1)])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 2:
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 64)]
    else:
        return rng.randbytes(rng.randrange(4096))
    return bytes(b)


def _check_one_line(error: DFQError) -> None:
    assert str(error) and "\n" not in str(error), repr(str(error))


def _check_dataset(ds: ImageDataset) -> None:
    """What a successfully opened dataset must satisfy, whatever the bytes were."""
    assert len(ds) > 0 and ds.num_classes >= 1
    height, width = ds.image_size
    if isinstance(ds, ArrayDataset):
        assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (len(ds), 3, height, width)
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
        assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < ds.num_classes
    if ds.class_names is not None:
        assert len(ds.class_names) == ds.num_classes
    for i in range(min(len(ds), 4)):
        try:
            image, label = ds[i]  # image folders decode here
        except DFQError as e:
            _check_one_line(e)
            continue
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, height, width)
        assert type(label) is int and 0 <= label < ds.num_classes


def _open_only_dfq_errors(path: Path) -> None:
    try:
        ds = open_dataset(path, image_size=IMAGE_SIZE)
    except DFQError as e:
        _check_one_line(e)
        return
    _check_dataset(ds)


def _write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", list(SPECIMENS))
def test_valid_specimens_open(tmp_path: Path, name: str) -> None:
    """The uncorrupted files are readable, so the corruptions below start from valid input."""
    files, _, target = SPECIMENS[name]
    _write(tmp_path, files)
    ds = open_dataset(tmp_path / target, image_size=IMAGE_SIZE)
    _check_dataset(ds)
    assert all(isinstance(ds[i][0], torch.Tensor) for i in range(len(ds)))


@pytest.mark.parametrize("name", list(SPECIMENS))
def test_corrupted_files_raise_only_dfq_errors(tmp_path: Path, name: str) -> None:
    files, victim, target = SPECIMENS[name]
    for case in range(CASES_PER_SPECIMEN):
        rng = random.Random(f"{name}/{case}")
        root = tmp_path / str(case)
        _write(root, {**files, victim: _corrupt(files[victim], rng)})
        try:
            _open_only_dfq_errors(root / target)
        except Exception as e:  # pragma: no cover - the failure report
            raise AssertionError(f"case {name}/{case}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize(
    "relative",
    [
        "x.npz",
        "cifar-10-python.tar.gz",
        "cifar-100-python.tar",
        "test_batch",
        "cifar-10-batches-bin/test_batch.bin",
        "cifar-100-binary/test.bin",
        "val/a/x.png",
        "val/a/x.jpeg",
        "val/a/x.webp",
        "unknown.bin",
    ],
)
def test_random_bytes_raise_only_dfq_errors(tmp_path: Path, relative: str) -> None:
    rng = random.Random(relative)
    for case in range(4):
        root = tmp_path / str(case)
        data = rng.randbytes([0, 1, 3073, rng.randrange(8192)][case])
        _write(root, {relative: data})
        target = root / ("val" if relative.startswith("val/") else relative)
        try:
            _open_only_dfq_errors(target)
        except Exception as e:  # pragma: no cover - the failure report
            raise AssertionError(f"case {relative}/{case} ({len(data)} bytes): {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- the restricted unpickler


def _only_dfq_errors(load: Callable[[], object]) -> object:
    try:
        return load()
    except DFQError as e:
        _check_one_line(e)
        return None


def test_restricted_unpickler_on_random_and_corrupted_pickles() -> None:
    images, labels = random_cifar(2, 10)
    valid = [
        py2_pickle({"data": rows(images), "labels": [int(v) for v in labels], "names": ["a", "b"]}),
        py2_pickle({"label_names": CIFAR10_NAMES, "num_vis": 3072}, numpy_module="numpy._core.multiarray"),
    ]
    rng = random.Random("restricted_loads")
    for case in range(40):
        data = _corrupt(valid[case % 2], rng) if case < 32 else rng.randbytes(rng.randrange(2048))
        try:
            _only_dfq_errors(lambda data=data: restricted_loads(data, source="fuzz.pkl"))
        except Exception as e:  # pragma: no cover - the failure report
            raise AssertionError(f"case {case}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- weights and YAML presets


@pytest.fixture(scope="module")
def state_dict_bytes() -> bytes:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(create_model(MODEL).state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("suffix", [".th", ".pt"])
def test_random_and_corrupted_weights_raise_only_dfq_errors(
    tmp_path: Path, suffix: str, state_dict_bytes: bytes
) -> None:
    rng = random.Random(f"weights{suffix}")
    for case in range(8):
        # Random bytes, then corruptions of a real checkpoint (flipped tensor data may load fine).
        data = rng.randbytes([0, 8, 1024, rng.randrange(65536)][case]) if case < 4 else _corrupt(state_dict_bytes, rng)
        path = tmp_path / f"w{case}{suffix}"
        path.write_bytes(data)
        try:
            model = _only_dfq_errors(lambda path=path: create_model(MODEL, weights=path))
        except Exception as e:  # pragma: no cover - the failure report
            raise AssertionError(f"case {case} ({len(data)} bytes): {type(e).__name__}: {e}") from e
        assert model is None or isinstance(model, torch.nn.Module)


_YAML_TOKENS = [
    "a", "quant", "train", "wbits", "epochs", "seed", "method", "overrides", "q_milestones", "zeroq",
    ":", ": ", " ", "  ", "\n", "\n  ", "- ", "[", "]", "{", "}", ",", "? ", "&x ", "*x", "!!int ", "!!float ",
    "!!binary ", "!!set ", "!!python/name:os.system ", "'", '"', "#", "|", ">", "\t", "---", "...", "%YAML 1.1",
    "0", "-1", "4", "1e400", ".nan", "null", "true", "2001-13-01", "2001-02-30 25:61:00", "0x", "~", "\\", "\x00",
]  # fmt: skip


def test_random_yaml_presets_raise_only_dfq_errors(tmp_path: Path) -> None:
    rng = random.Random("yaml")
    path = tmp_path / "preset.yaml"
    for case in range(60):
        if case < 20:
            path.write_bytes(rng.randbytes(rng.randrange(512)))
        else:
            path.write_text("".join(rng.choice(_YAML_TOKENS) for _ in range(rng.randrange(1, 40))))
        try:
            data = _only_dfq_errors(lambda: load_yaml(path))
            if data is not None:
                assert isinstance(data, dict)
                _only_dfq_errors(lambda data=data: resolve_config(data))
        except Exception as e:  # pragma: no cover - the failure report
            raise AssertionError(f"case {case} {path.read_bytes()[:200]!r}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- crafted regressions


@pytest.mark.parametrize(
    "text",
    [
        "seed: 2001-13-01\n",  # PyYAML raises ValueError for impossible dates
        "seed: !!int abc\n",
        "train: {q_lr: !!float 1.5x}\n",
        "[" * 3000 + "]" * 3000 + "\n",  # RecursionError in PyYAML's composer
        "quant: {wbits: 4\n",  # a multi-line PyYAML message, reported on one line
        "!!python/object/apply:os.system ['true']\n",
        "1: 2\n",  # a non-string key reached did_you_mean()
        "null: 1\n",
        "quant: {1: 2}\n",
    ],
)
def test_crafted_yaml_raises_dfq_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    with pytest.raises(DFQError) as info:
        resolve_config(load_yaml(path))
    _check_one_line(info.value)


def _decode_first(tmp_path: Path, name: str, data: bytes) -> DFQError:
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / name).write_bytes(data)
    ds = open_dataset(tmp_path / "val", image_size=IMAGE_SIZE)
    with pytest.raises(DFQError, match="cannot decode image") as info:
        ds[0]
    _check_one_line(info.value)
    return info.value


def test_broken_png_chunk_while_decoding_is_a_dfq_error(tmp_path: Path) -> None:
    """PIL raises SyntaxError (not OSError) for a broken chunk header between IDAT chunks."""
    png = bytearray(_png(30, 24, 64))
    second_idat = png.index(b"IDAT", png.index(b"IDAT") + 4)
    png[second_idat : second_idat + 4] = b"\x00\x01\x02\x03"
    _decode_first(tmp_path, "x.png", bytes(png))


def test_decompression_bomb_is_a_dfq_error(tmp_path: Path) -> None:
    """A valid header declaring 10^10 pixels: PIL's DecompressionBombError is not an OSError."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    error = _decode_first(tmp_path, "bomb.png", bomb + _chunk(b"IEND", b""))
    assert "exceeds limit" in str(error)


def _zip_npz(path: Path, images_npy: bytes, *, method: int = zipfile.ZIP_STORED) -> Path:
    labels = io.BytesIO()
    np.save(labels, np.arange(2))
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr("images.npy", images_npy)
        z.writestr("labels.npy", labels.getvalue())
    return path


def _npy(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def test_npz_with_corrupt_deflate_data_is_a_dfq_error(tmp_path: Path) -> None:
    """zlib.error is not an OSError: a flipped byte inside a compressed member."""
    path = _zip_npz(tmp_path / "x.npz", _npy((2, 4, 4, 3), bytes(96)), method=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    start = data.index(b"images.npy") + len("images.npy")  # the local header's name ends; deflate data follows
    for i in range(start + 4, start + 12):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DFQError, match=r"not a readable \.npz archive") as info:
        open_dataset(path)
    _check_one_line(info.value)


def test_npz_with_an_encrypted_or_unsupported_member_is_a_dfq_error(tmp_path: Path) -> None:
    """zipfile raises RuntimeError (encrypted) and NotImplementedError (compression method)."""
    path = _zip_npz(tmp_path / "x.npz", _npy((2, 4, 4, 3), bytes(96)))
    original = path.read_bytes()
    local = original.index(b"PK\x03\x04")
    central = original.index(b"PK\x01\x02")
    for offset, value, message in [(6, 1, "encrypted"), (8, 99, "compression method")]:
        data = bytearray(original)
        struct.pack_into("<H", data, local + offset, value)
        struct.pack_into("<H", data, central + offset + 2, value)  # the central directory's copy
        path.write_bytes(bytes(data))
        with pytest.raises(DFQError, match=message):
            open_dataset(path)


def test_npz_declaring_an_absurd_shape_is_a_dfq_error(tmp_path: Path) -> None:
    """A header claiming 10^12 images: MemoryError, which the CLI would call 'lower --batch-size'."""
    path = _zip_npz(tmp_path / "x.npz", _npy((10**12, 32, 32, 3), bytes(100)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DFQError, match=r"not a readable \.npz archive"):
            open_dataset(path)
