"""Tests for dfq.data: every input format, the restricted unpickler, errors, and batching."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import (
    CIFAR10_NAMES,
    Exploit,
    binary_records,
    cifar10_python_files,
    hwc,
    py2_pickle,
    random_cifar,
    rows,
    write_folder,
    write_tar,
)
from PIL import Image

import dfq.data.cifar as cifar_module
from dfq.data import (
    CIFAR10_BINARY,
    CIFAR10_PYTHON,
    CIFAR100_PYTHON,
    ArrayDataset,
    ImageFolderDataset,
    download_dataset,
    make_loader,
    open_dataset,
)
from dfq.data.safe_pickle import restricted_load, restricted_loads
from dfq.errors import DFQError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --- restricted unpickler ----------------------------------------------------------------------


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_restricted_unpickler_reads_python2_numpy_pickles(numpy_module):
    data = np.arange(24, dtype=np.uint8).reshape(4, 6)
    obj = {"data": data, "labels": [1, 2, 300], "names": ["a", "b"], "none": None, "pair": (1, -1)}
    loaded = restricted_loads(py2_pickle(obj, numpy_module))
    np.testing.assert_array_equal(loaded["data"], data)
    assert loaded["labels"] == [1, 2, 300] and loaded["names"] == ["a", "b"]
    assert loaded["none"] is None and loaded["pair"] == (1, -1)
    assert restricted_load(io.BytesIO(py2_pickle([7]))) == [7]


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker), protocol=2)
    with pytest.raises(DFQError, match=r"refusing to unpickle '(posix|os|nt)\.system'"):
        restricted_loads(payload, source="evil.pkl")
    assert not marker.exists()


def test_restricted_unpickler_refuses_eval():
    payload = b"\x80\x02cbuiltins\neval\nU\x061+1==2\x85R."
    assert pickle.loads(payload) is True  # the payload really does call eval
    with pytest.raises(DFQError, match=r"builtins\.eval"):
        restricted_loads(payload)


@pytest.mark.parametrize("data", [b"", b"\x80\x02}q\x01(U\x04data", b"not a pickle at all"])
def test_restricted_unpickler_corrupt_input(data):
    with pytest.raises(DFQError, match=r"x.pkl: not a readable pickle"):
        restricted_loads(data, source="x.pkl")


@pytest.mark.parametrize("form", ["archive", "folder"])
def test_malicious_pickle_inside_cifar_files(tmp_path, form):
    marker = tmp_path / "pwned"
    files = {"test_batch": pickle.dumps(Exploit(marker), protocol=2), "batches.meta": py2_pickle({})}
    if form == "archive":
        path = write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    else:
        path = write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(DFQError, match=r"test_batch: refusing to unpickle"):
        open_dataset(path)
    assert not marker.exists()


# --- CIFAR python ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["archive", "folder", "parent-of-folder", "parent-of-archive", "test-file"])
def test_cifar10_python_forms(tmp_path, form):
    images, labels = random_cifar(7, 10)
    files = cifar10_python_files(images, labels)
    if form in ("archive", "parent-of-archive"):
        (tmp_path / "dl").mkdir()
        archive = write_tar(tmp_path / "dl" / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
        path = archive if form == "archive" else archive.parent
    else:
        folder = write_folder(tmp_path / "x" / "cifar-10-batches-py", files)
        path = {"folder": folder, "parent-of-folder": folder.parent, "test-file": folder / "test_batch"}[form]
    ds = open_dataset(path)
    assert isinstance(ds, ArrayDataset)
    np.testing.assert_array_equal(hwc(ds), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert (ds.name, ds.num_classes, ds.class_names, ds.image_size, len(ds)) == (
        "cifar10-test",
        10,
        CIFAR10_NAMES,
        (32, 32),
        7,
    )
    image, label = ds[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and type(label) is int
    assert label == labels[3] and np.array_equal(image.permute(1, 2, 0).numpy(), images[3])


def test_cifar_row_is_red_then_green_then_blue_plane(tmp_path):
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    row[1 * 32 + 2] = 200  # red, y=1, x=2
    row[1024 + 31 * 32] = 201  # green, y=31, x=0
    batch = {"data": row[None], "labels": [4]}
    folder = write_folder(tmp_path / "cifar-10-batches-py", {"test_batch": py2_pickle(batch)})
    image, label = open_dataset(folder)[0]
    assert label == 4
    assert image[0, 1, 2] == 200 and image[1, 31, 0] == 201
    assert image[0, 0, 0] == 10 and image[1, 0, 0] == 20 and image[2, 0, 0] == 30


def test_cifar10_python_without_meta_has_no_class_names(tmp_path):
    images, labels = random_cifar(3, 10)
    files = cifar10_python_files(images, labels)
    del files["batches.meta"]
    ds = open_dataset(write_folder(tmp_path / "cifar-10-batches-py", files))
    assert ds.class_names is None and ds.num_classes == 10


def test_cifar100_python_archive_uses_fine_labels(tmp_path):
    images, fine = random_cifar(5, 100, seed=1)
    coarse = fine // 5
    batch = {"data": rows(images), "fine_labels": [int(v) for v in fine], "coarse_labels": [int(v) for v in coarse]}
    names = [f"class{i:03d}" for i in range(100)]
    meta = {"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]}
    files = {"test": py2_pickle(batch), "meta": py2_pickle(meta), "train": b"unused"}
    ds = open_dataset(write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", files))
    np.testing.assert_array_equal(hwc(ds), images)
    np.testing.assert_array_equal(ds.labels.numpy(), fine)
    assert (ds.name, ds.num_classes, ds.class_names) == ("cifar100-test", 100, names)


def test_parent_folder_with_cifar10_and_cifar100_is_ambiguous(tmp_path):
    images, labels = random_cifar(2, 10)
    write_folder(tmp_path / "cifar-10-batches-py", cifar10_python_files(images, labels))
    write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", {"test": b"x"})
    with pytest.raises(DFQError, match=r"contains both"):
        open_dataset(tmp_path)


# --- CIFAR binary ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["archive", "folder", "test-file"])
def test_cifar10_binary(tmp_path, form):
    images, labels = random_cifar(6, 10, seed=2)
    files = {"test_batch.bin": binary_records(images, labels), "batches.meta.txt": "\n".join(CIFAR10_NAMES) + "\n\n"}
    files = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    if form == "archive":
        path = write_tar(tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin", files)
    else:
        path = write_folder(tmp_path / "cifar-10-batches-bin", files)
    ds = open_dataset(path / "test_batch.bin" if form == "test-file" else path)
    np.testing.assert_array_equal(hwc(ds), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert (ds.name, ds.num_classes, ds.class_names) == ("cifar10-test", 10, CIFAR10_NAMES)


def test_cifar100_binary_reads_fine_label_byte(tmp_path):
    images, fine = random_cifar(4, 100, seed=3)
    coarse = fine // 5
    files = {"test.bin": binary_records(images, coarse, fine)}
    ds = open_dataset(write_tar(tmp_path / "c100.tar.gz", "cifar-100-binary", files))
    np.testing.assert_array_equal(hwc(ds), images)
    np.testing.assert_array_equal(ds.labels.numpy(), fine)
    assert ds.num_classes == 100 and ds.class_names is None


# --- CIFAR errors ------------------------------------------------------------------------------


def test_truncated_cifar_archive(tmp_path):
    images, labels = random_cifar(20, 10)
    archive = write_tar(tmp_path / "full.tar.gz", "cifar-10-batches-py", cifar10_python_files(images, labels))
    truncated = tmp_path / "cifar-10-python.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DFQError, match=r"cifar-10-python.tar.gz: not a readable tar archive, truncated or corrupt"):
        open_dataset(truncated)


def test_corrupt_and_foreign_archives(tmp_path):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(DFQError, match=r"garbage.tar.gz: not a readable tar archive"):
        open_dataset(garbage)
    other = write_tar(tmp_path / "other.tar.gz", "stuff", {"test_batch": b"x", "readme.txt": b"hi"})
    with pytest.raises(DFQError, match=r"other.tar.gz: the archive holds no CIFAR test set"):
        open_dataset(other)


def test_truncated_cifar_binary(tmp_path):
    images, labels = random_cifar(3, 10)
    data = binary_records(images, labels)[:-100]
    folder = write_folder(tmp_path / "cifar-10-batches-bin", {"test_batch.bin": data})
    with pytest.raises(DFQError, match=r"test_batch.bin: 9119 bytes is not a whole number of 3073-byte records"):
        open_dataset(folder)
    (folder / "test_batch.bin").write_bytes(b"")
    with pytest.raises(DFQError, match=r"test_batch.bin: file is empty"):
        open_dataset(folder)


def test_truncated_cifar_pickle(tmp_path):
    images, labels = random_cifar(3, 10)
    files = cifar10_python_files(images, labels)
    files["test_batch"] = files["test_batch"][:5000]
    with pytest.raises(DFQError, match=r"test_batch: not a readable pickle, truncated or corrupt"):
        open_dataset(write_folder(tmp_path / "cifar-10-batches-py", files))


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}, r"'data' is 2×3000, expected uint8 N×3072"),
        ({"data": np.zeros((2, 32, 32, 3), np.uint8), "labels": [0, 1]}, r"'data' is 2×32×32×3"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, r"labels range over \[0, 10\], expected \[0, 9\]"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "2 images but 1 labels"),
        ({"data": np.zeros((0, 3072), np.uint8), "labels": []}, "contains no images"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": ["cat"]}, "'labels' is not a list of integers"),
        ({"images": np.zeros((1, 3072), np.uint8)}, "expected a dict with 'data' and 'labels'"),
        ([1, 2], "expected a dict with 'data' and 'labels'"),
    ],
)
def test_bad_cifar_pickle_contents(tmp_path, batch, message):
    folder = write_folder(tmp_path / "cifar-10-batches-py", {"test_batch": py2_pickle(batch)})
    with pytest.raises(DFQError, match=message):
        open_dataset(folder)


def test_bad_cifar_meta(tmp_path):
    images, labels = random_cifar(2, 10)
    files = cifar10_python_files(images, labels)
    files["batches.meta"] = py2_pickle({"label_names": CIFAR10_NAMES[:7]})
    with pytest.raises(DFQError, match=r"7 class names for 10 classes"):
        open_dataset(write_folder(tmp_path / "a" / "cifar-10-batches-py", files))
    files["batches.meta"] = py2_pickle({"names": CIFAR10_NAMES})
    with pytest.raises(DFQError, match=r"batches.meta: not a CIFAR-10 python meta file"):
        open_dataset(write_folder(tmp_path / "b" / "cifar-10-batches-py", files))


# --- .npz --------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    labels = np.array([0, 3, 8, 9, 1])
    np.savez(tmp_path / "set.npz", images=images, labels=labels, test_index=np.arange(5))
    ds = open_dataset(tmp_path / "set.npz")
    np.testing.assert_array_equal(hwc(ds), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert (ds.name, ds.num_classes, ds.class_names, ds.image_size) == ("set", 10, None, (8, 6))
    np.savez_compressed(tmp_path / "named.npz", images=images, labels=labels, class_names=np.array(CIFAR10_NAMES))
    ds = open_dataset(str(tmp_path / "named.npz"))
    assert ds.class_names == CIFAR10_NAMES and ds.num_classes == 10


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, r"has no 'labels' array \(found: images\)"),
        (
            {"images": np.zeros((2, 4, 4, 3), np.float32), "labels": [0, 1]},
            "'images' is a float32 array of shape 2×4×4×3, expected uint8",
        ),
        (
            {"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": [0, 1]},
            r"'images' is a uint8 array of shape 2×3×4×4, expected uint8 N×H×W×3",
        ),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, 1, 2]}, "2 images but 3 labels"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, -1]}, r"labels range over \[-1, 0\]"),
        (
            {"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0.0, 1.0]},
            "labels are a float64 array of shape 2, expected a 1-D integer",
        ),
        ({"images": np.zeros((0, 4, 4, 3), np.uint8), "labels": np.zeros(0, int)}, "contains no images"),
        (
            {"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, 2], "class_names": np.array(["a", "b"])},
            r"labels range over \[0, 2\], expected \[0, 1\]",
        ),
    ],
)
def test_bad_npz_contents(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DFQError, match=message):
        open_dataset(tmp_path / "bad.npz")


def test_truncated_empty_and_corrupt_npz(tmp_path):
    images, labels = random_cifar(50, 10)
    np.savez_compressed(tmp_path / "full.npz", images=images, labels=labels)
    data = (tmp_path / "full.npz").read_bytes()
    cases = {
        "truncated.npz": (data[: len(data) // 2], "not a readable .npz archive, truncated or corrupt"),
        "tail-cut.npz": (data[:-30], "not a readable .npz archive, truncated or corrupt"),
        "empty.npz": (b"", "file is empty"),
        "noise.npz": (os.urandom(1000), "not a readable .npz archive"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DFQError, match=f"{name}: {message}"):
            open_dataset(tmp_path / name)
    np.savez(tmp_path / "objects.npz", images=np.array([object()]), labels=np.zeros(1))
    with pytest.raises(DFQError, match=r"objects.npz: not a readable .npz archive"):
        open_dataset(tmp_path / "objects.npz")
    np.save(tmp_path / "single.npy", images)
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DFQError, match=r"single.npz: is a single .npy array"):
        open_dataset(tmp_path / "single.npz")


# --- image folders -----------------------------------------------------------------------------


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "val"
    for name in ("n02", "n01", "n03/sub"):
        (root / name).mkdir(parents=True)
    (root / ".hidden").mkdir()
    gradient_image(300, 200).save(root / "n01" / "a.png")  # landscape
    gradient_image(301, 200).save(root / "n01" / "b.JPEG", quality=90)  # odd crop offset
    gradient_image(40, 90, "L").save(root / "n02" / "gray.png")  # portrait, grayscale
    gradient_image(64, 64).save(root / "n03" / "sub" / "nested.bmp")
    (root / "n02" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_classes_and_labels(image_folder):
    ds = open_dataset(image_folder)
    assert isinstance(ds, ImageFolderDataset)
    assert (ds.class_names, ds.num_classes, len(ds), ds.image_size) == (["n01", "n02", "n03"], 3, 4, (224, 224))
    assert ds.name == "imagefolder-val"
    assert [label for _, label in ds.samples] == [0, 0, 1, 2]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 224, 224) and label == ds.samples[i][1]


@pytest.mark.parametrize(
    ("name", "image_size", "resized", "box"),
    [
        ("n01/a.png", 224, (384, 256), (80, 16)),  # shorter side 200 -> 256, longer 300 -> 384
        ("n01/b.JPEG", 224, (385, 256), (80, 16)),  # (385 - 224) / 2 = 80.5 rounds to even
        ("n02/gray.png", 32, (37, 83), (2, 26)),  # resize = round(32 / 0.875) = 37
    ],
)
def test_image_folder_matches_pil_reference(image_folder, name, image_size, resized, box):
    ds = open_dataset(image_folder, image_size=image_size)
    index = [str(p.relative_to(image_folder)) for p, _ in ds.samples].index(name)
    with Image.open(image_folder / name) as img:
        reference = img.convert("RGB").resize(resized, Image.BILINEAR)
    left, top = box
    expected = np.array(reference)[top : top + image_size, left : left + image_size]
    image, _ = ds[index]
    assert image.shape == (3, image_size, image_size)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_image_folder_errors(tmp_path, image_folder):
    (image_folder / "n04").mkdir()
    with pytest.raises(DFQError, match=r"n04: class folder has no images"):
        open_dataset(image_folder)
    (image_folder / "n04" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = open_dataset(image_folder)
    with pytest.raises(DFQError, match=r"broken.jpg: cannot decode image"):
        ds[len(ds) - 1]
    with pytest.raises(DFQError, match=r"^\S*broken.jpg: cannot decode image \(cannot identify[^\n]*$"):
        list(make_loader(ds, MEAN, STD, workers=1))  # one line, not the worker's traceback
    (tmp_path / "flat").mkdir()
    gradient_image(10, 10).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DFQError, match=r"cannot read .*flat: expected"):
        open_dataset(tmp_path / "flat")


def test_unrecognised_and_missing_paths(tmp_path):
    with pytest.raises(DFQError, match=r"nope: no such file or directory"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DFQError, match=r"cannot read .*notes.txt: expected a \.npz test set"):
        open_dataset(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DFQError, match=r"cannot read .*empty: expected"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DFQError, match=r"image size must be at least 1"):
        open_dataset(tmp_path, image_size=0)


# --- batching ----------------------------------------------------------------------------------


def test_make_loader_normalises_array_dataset(tmp_path):
    images, labels = random_cifar(10, 10)
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    ds = open_dataset(tmp_path / "s.npz")
    loader = make_loader(ds, MEAN, STD, batch_size=4)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches]).numpy()
    y = torch.cat([b[1] for b in batches])
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    assert x.dtype == np.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x, expected, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert len(list(loader)) == 3  # iterable again
    limited = list(make_loader(ds, MEAN, STD, batch_size=4, limit=5))
    assert [len(y) for _, y in limited] == [4, 1]
    np.testing.assert_allclose(torch.cat([b[0] for b in limited]).numpy(), expected[:5], atol=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_make_loader_on_image_folder(image_folder, workers):
    ds = open_dataset(image_folder, image_size=16)
    batches = list(make_loader(ds, MEAN, STD, batch_size=3, workers=workers, limit=5))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 1, 2]
    raw = ds[2][0].to(torch.float64) / 255
    expected = (raw - torch.tensor(MEAN, dtype=torch.float64)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(batches[0][0][2].double(), expected, atol=1e-6, rtol=0)


def test_make_loader_rejects_bad_arguments(tmp_path):
    images, labels = random_cifar(2, 10)
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    ds = open_dataset(tmp_path / "s.npz")
    with pytest.raises(DFQError, match=r"needs 3 mean and std values \(RGB\), got 2 and 3"):
        make_loader(ds, (0.5, 0.5), STD)
    with pytest.raises(DFQError, match=r"std values must be positive"):
        make_loader(ds, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(DFQError, match=r"batch size must be at least 1"):
        make_loader(ds, MEAN, STD, batch_size=0)
    with pytest.raises(DFQError, match=r"image limit must be at least 1"):
        make_loader(ds, MEAN, STD, limit=0)


# --- real data and downloads -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "count"), [("cifar10-test-4class-lossless.npz", 4000), ("cifar10-test-jpeg75.npz", 10000)]
)
def test_shared_cifar10_test_sets(filename, count):
    path = SHARED_DATA / filename
    if not path.is_file():
        pytest.skip(f"real test data not present at {path} (expected the project's ../shared/data)")
    ds = open_dataset(path)
    assert len(ds) == count and ds.num_classes == 10 and ds.image_size == (32, 32)
    assert ds.images.shape == (count, 3, 32, 32)
    if count == 4000:
        assert sorted(torch.unique(ds.labels).tolist()) == [0, 1, 8, 9]
    x, y = next(iter(make_loader(ds, MEAN, STD, batch_size=500)))
    assert x.shape == (500, 3, 32, 32) and -2.2 < x.min() < x.max() < 2.7 and y.dtype == torch.int64


def test_download_sources():
    for remote in (CIFAR10_PYTHON, CIFAR100_PYTHON, CIFAR10_BINARY):
        assert remote.urls[0] == "https://www.cs.toronto.edu/~kriz/" + remote.filename
        assert remote.sha256 is not None and len(remote.sha256) == 64


def test_download_dataset(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cifar_module, "fetch", lambda remote, subdir: calls.append((remote, subdir)) or tmp_path)
    assert download_dataset("cifar100") == tmp_path
    assert calls == [(CIFAR100_PYTHON, "data")]
    with pytest.raises(DFQError, match=r"unknown dataset 'cifar-10'.*did you mean 'cifar10'"):
        download_dataset("cifar-10")
