"""Model zoo: every model runs and trains, checkpoints of the publishers' layouts load exactly."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfq.errors import DFQError
from dfq.hub import RemoteFile, fetch
from dfq.models import WeightSource, create_model, get_model_info, list_models, load_weights
from dfq.models._registry import _MODELS

# Activation sites (one ReLU/ReLU6 module each) of the models added with the pytorchcv/torchvision zoo.
_ACTIVATION_SITES = {
    "resnet20_cifar10": 1 + 9 * 2,
    "resnet20_cifar100": 1 + 9 * 2,
    "resnet56_cifar10": 1 + 27 * 2,
    "resnet56_cifar100": 1 + 27 * 2,
    "resnet18": 1 + 8 * 2,
    "resnet50": 1 + 16 * 3,
    "resnet50b": 1 + 16 * 3,
    "mobilenetv2": 1 + 2 + 16 * 2 + 1,  # the first block keeps its expand conv
    "mobilenetv2b": 1 + 1 + 16 * 2 + 1,
}


@pytest.mark.parametrize("name", list_models())
def test_model_runs_and_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    info = model.dfq_info
    assert info == get_model_info(name)
    c, h, w = info.input_size
    if info.dataset == "imagenet":
        h = w = 64  # the adaptive pools make small inputs work; 224 would be slow on CPU
    calls: Counter[int] = Counter()
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            m.register_forward_hook(lambda mod, inp, out: calls.update([id(mod)]))
    model.train()
    out = model(torch.randn(2, c, h, w))
    assert out.shape == (2, info.num_classes)
    F.cross_entropy(out, torch.tensor([0, info.num_classes - 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not missing, f"no (finite) gradient for {missing[:3]}"
    # Quantizers are attached after each activation module: none may serve two sites.
    assert set(calls.values()) == {1}, "an activation module is called more than once per forward"
    if name in _ACTIVATION_SITES:
        assert len(calls) == _ACTIVATION_SITES[name]


def test_pytorchcv_sources_are_consistent() -> None:
    """URL, cache name, zip member and sha1 of every imgclsmob release must agree with each other."""
    sources = [s for n in list_models() for s in get_model_info(n).weights.values() if s.remote.sha1]
    assert len(sources) >= 7
    for source in sources:
        r = source.remote
        stem = r.filename.removesuffix(".pth")
        assert r.zip_member == r.filename and stem != r.filename
        assert len(r.sha1) == 40 and stem.endswith("-" + r.sha1[:8])
        assert r.urls[0].startswith("https://github.com/osmr/imgclsmob/releases/download/v0.0.")
        assert r.urls[0].endswith(f"/{r.filename}.zip")
        assert source.license == "MIT"


# --- pytorchcv layout -------------------------------------------------------------------------------------------------

_PYTORCHCV_TWINS = [  # (dfq name, pytorchcv name, input side)
    ("resnet20_cifar10", "resnet20_cifar10", 32),
    ("resnet20_cifar100", "resnet20_cifar100", 32),
    ("resnet56_cifar100", "resnet56_cifar100", 32),
    ("resnet18", "resnet18", 64),
    ("resnet50", "resnet50", 64),
    ("resnet50b", "resnet50b", 64),
    ("mobilenetv2", "mobilenetv2_w1", 64),
    ("mobilenetv2b", "mobilenetv2b_w1", 64),
]


def _randomize_batchnorm(model: nn.Module) -> None:
    """Fresh BN layers are the identity in eval mode, which would hide a misplaced BN."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5


@pytest.mark.parametrize(("name", "pcv_name", "side"), _PYTORCHCV_TWINS)
def test_pytorchcv_checkpoint_gives_identical_outputs(name: str, pcv_name: str, side: int, tmp_path: Path) -> None:
    pytest.importorskip("pytorchcv")
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    ref = get_model(pcv_name, pretrained=False)
    _randomize_batchnorm(ref)
    # pytorchcv pools with a fixed AvgPool2d(7 or 8), i.e. global pooling at the published input size;
    # global pooling at any size lets the ImageNet models run on small, fast inputs.
    ref.features.final_pool = nn.AdaptiveAvgPool2d(1)
    ref.eval()
    path = tmp_path / f"{pcv_name}.pth"
    torch.save(ref.state_dict(), path)

    model = create_model(name, weights=path)  # layout detected
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)

    # The registered source for this pytorchcv model names the layout that converts it.
    (source,) = [s for s in model.dfq_info.weights.values() if s.remote.sha1 and s.remote.filename.startswith(pcv_name)]
    load_weights(model, path, layout=source.layout)


# --- torchvision layout (torchvision cannot be installed here: keys written out from its source) ----------------------

_BN_ATTRS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# torchvision resnet18: every conv/linear tensor, then every BatchNorm with its channel count.
_TV_RESNET18_WEIGHTS = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.1.conv1.weight": (64, 64, 3, 3),
    "layer1.1.conv2.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.1.conv1.weight": (128, 128, 3, 3),
    "layer2.1.conv2.weight": (128, 128, 3, 3),
    "layer3.0.conv1.weight": (256, 128, 3, 3),
    "layer3.0.conv2.weight": (256, 256, 3, 3),
    "layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "layer3.1.conv1.weight": (256, 256, 3, 3),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.0.conv1.weight": (512, 256, 3, 3),
    "layer4.0.conv2.weight": (512, 512, 3, 3),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.1.conv1.weight": (512, 512, 3, 3),
    "layer4.1.conv2.weight": (512, 512, 3, 3),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}
_TV_RESNET18_BNS = {
    "bn1": 64,
    "layer1.0.bn1": 64,
    "layer1.0.bn2": 64,
    "layer1.1.bn1": 64,
    "layer1.1.bn2": 64,
    "layer2.0.bn1": 128,
    "layer2.0.bn2": 128,
    "layer2.0.downsample.1": 128,
    "layer2.1.bn1": 128,
    "layer2.1.bn2": 128,
    "layer3.0.bn1": 256,
    "layer3.0.bn2": 256,
    "layer3.0.downsample.1": 256,
    "layer3.1.bn1": 256,
    "layer3.1.bn2": 256,
    "layer4.0.bn1": 512,
    "layer4.0.bn2": 512,
    "layer4.0.downsample.1": 512,
    "layer4.1.bn1": 512,
    "layer4.1.bn2": 512,
}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_resnet18_has_torchvision_state_dict() -> None:
    expected = dict(_TV_RESNET18_WEIGHTS)
    for prefix, n in _TV_RESNET18_BNS.items():
        expected.update({f"{prefix}.{a}": () if a == "num_batches_tracked" else (n,) for a in _BN_ATTRS})
    assert len(expected) == 122
    model = create_model("resnet18")
    assert _shapes(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's documented num_params


@pytest.mark.parametrize("name", ["resnet50", "resnet50b"])
def test_resnet50_has_torchvision_keys(name: str) -> None:
    shapes = _shapes(create_model(name))
    assert len(shapes) == 320
    spot = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    assert {k: shapes[k] for k in spot} == spot
    assert sum(v.numel() for v in create_model(name).parameters()) == 25_557_032


def test_resnet50_variants_differ_only_in_stride_placement() -> None:
    """pytorchcv resnet50 (the papers') strides the first 1x1 conv; torchvision's (v1.5) the 3x3 conv."""
    v1, v15 = create_model("resnet50"), create_model("resnet50b")
    assert (v1.layer2[0].conv1.stride, v1.layer2[0].conv2.stride) == ((2, 2), (1, 1))
    assert (v15.layer2[0].conv1.stride, v15.layer2[0].conv2.stride) == ((1, 1), (2, 2))


def test_mobilenetv2b_has_torchvision_keys() -> None:
    model = create_model("mobilenetv2b")
    shapes = _shapes(model)
    assert len(shapes) == 314
    spot = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.num_batches_tracked": (),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_mean": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.bias": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.running_var": (1280,),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    }
    assert {k: shapes[k] for k in spot} == spot
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    # pytorchcv's mobilenetv2_w1 keeps a 32->32 expand conv in the first block; it has no classifier bias.
    pcv = _shapes(create_model("mobilenetv2"))
    assert len(pcv) == 320 and pcv["features.1.conv.0.0.weight"] == (32, 32, 1, 1)
    assert sum(p.numel() for p in create_model("mobilenetv2").parameters()) == 3_504_960 + 1000


# --- wrong files ------------------------------------------------------------------------------------------------------


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "cifar10.pth"
    torch.save(create_model("resnet20_cifar10").state_dict(), path)
    with pytest.raises(DFQError, match=r"does not match model 'resnet20_cifar100'.*output\.weight.*\(10, 64\)"):
        create_model("resnet20_cifar100", weights=path)
    torch.save(create_model("resnet18").state_dict(), path)
    with pytest.raises(DFQError, match="does not match model 'resnet50'"):
        create_model("resnet50", weights=path)
    torch.save(create_model("mobilenetv2").state_dict(), path)
    with pytest.raises(DFQError, match="does not match model 'mobilenetv2b'"):
        create_model("mobilenetv2b", weights=path)


# --- pytorchcv zip download -------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output free of access logs."""


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1, and its base URL."""
    root = tmp_path / "srv"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_pytorchcv_zip_is_fetched_extracted_verified_and_loaded(
    http_root: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base = http_root
    monkeypatch.setenv("DFQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DFQ_OFFLINE", raising=False)
    name = "resnet20_cifar10"
    torch.manual_seed(0)
    trained = create_model(name)
    _randomize_batchnorm(trained)
    pth = tmp_path / "weights.pth"
    torch.save(trained.state_dict(), pth)
    sha1 = hashlib.sha1(pth.read_bytes()).hexdigest()
    member = f"{name}-0597-{sha1[:8]}.pth"  # pytorchcv's naming: the zip holds the .pth under this name
    with zipfile.ZipFile(root / f"{member}.zip", "w") as zf:
        zf.write(pth, member)

    bad = RemoteFile((f"{base}{member}.zip",), member, sha1="0" * 40, zip_member=member)
    with pytest.raises(DFQError, match="sha1"):
        fetch(bad, subdir="weights", progress=False)
    assert not (tmp_path / "home" / "weights" / member).exists()

    remote = RemoteFile((f"{base}{member}.zip",), member, sha1=sha1, zip_member=member)
    path = fetch(remote, subdir="weights", progress=False)
    assert path == tmp_path / "home" / "weights" / member
    assert path.read_bytes() == pth.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [member]  # no archive or partial file left behind

    # create_model(pretrained=True) goes through the same path, with the source's layout.
    info, factory = _MODELS[name]
    source = WeightSource(remote, "native", "MIT")
    monkeypatch.setitem(_MODELS, name, (dataclasses.replace(info, weights={"pytorchcv": source}), factory))
    model = create_model(name, pretrained=True, progress=False)
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
