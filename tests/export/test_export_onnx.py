"""ONNX export of deploy-protocol models: code-exact parity with PyTorch, integer kernels, metadata and errors."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfq
from dfq.checkpoint import load_quantized, save_quantized
from dfq.cli import main
from dfq.config import RunConfig
from dfq.data import make_loader, open_dataset
from dfq.errors import DFQError, UnsupportedLayerError
from dfq.export.api import export, load_target
from dfq.export.onnx import build_onnx, write_onnx
from dfq.export.runtime import OnnxClassifier, optimized_op_counts, read_metadata, session
from dfq.export.verify import verify
from dfq.methods import ZeroQConfig
from dfq.models import CIFAR10_CLASSES, create_model
from dfq.quant import QuantConfig, calibrate, quantize_affine, quantize_model
from dfq.quant.modules import batchnorm_affine, folded_weight_scale

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

MODEL = "resnet20a_cifar10"
SHAPE = (3, 8, 8)
TINY = ["--set", "method.steps=2", "--set", "method.num_samples=4", "--no-progress"]
META_KEYS = ("dfq_version", "model", "method", "wbits", "abits", "protocol", "mean", "std", "input_size",
             "num_classes", "class_names")  # fmt: skip


def _deploy(wbits: int, abits: int) -> QuantConfig:
    return QuantConfig(protocol="deploy", wbits=wbits, abits=abits)


def _randomize_bns(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Non-trivial BatchNorm statistics (default ones fold into nothing)."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(torch.randn(c, generator=g))
                bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def _ort(proto_or_path, x: torch.Tensor) -> np.ndarray:
    source = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else proto_or_path
    return session(source).run(None, {"input": x.numpy()})[0]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_user_error(rc: int, err: str, *fragments: str) -> None:
    """Exit code 2 and a single 'dfq: error:' line, no traceback."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfq: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- tiny models, one per pattern


class ConvBNReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


class ReLU6MaxPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        self.pool, self.flat, self.fc = nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.act(self.bn(self.conv(x))))))


class BiasConvAvgPoolView(nn.Module):
    """Conv with bias and no BatchNorm, AvgPool2d, x.view(x.size(0), -1), Dropout and Identity."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.pool, self.drop, self.id, self.fc = nn.AvgPool2d(2), nn.Dropout(0.5), nn.Identity(), nn.Linear(128, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.conv(x)))
        return self.fc(self.id(self.drop(x.view(x.size(0), -1))))


class ResidualOptionA(nn.Module):
    """An identity residual (x + y) and a strided option-A shortcut (slice + channel zero-padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.relu3, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + x)
        x = self.relu3(self.bn3(self.conv3(x)) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.relu2, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu2(self.bn2(self.dw(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


class FunctionalMean(nn.Module):
    """Functional torch.relu (split into a module by fx) and x.mean((2, 3)) as global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


PATTERNS = [ConvBNReLU, ReLU6MaxPool, BiasConvAvgPoolView, ResidualOptionA, Depthwise, FunctionalMean]


def _calibrated(cls: type[nn.Module], bits: int, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """A deploy-quantized tiny model calibrated on random batches, and fresh batches to compare on."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    q = quantize_model(_randomize_bns(cls(), g), _deploy(bits, bits))
    calibrate(q, [torch.randn(4, *SHAPE, generator=g) for _ in range(3)])
    return q.eval(), [torch.randn(4, *SHAPE, generator=g) * 1.2 for _ in range(2)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cls", PATTERNS, ids=lambda c: c.__name__)
def test_round_trip_is_code_exact(cls, bits, tmp_path):
    """Every site's codes and the logits of ONNX Runtime equal Q's, and convolutions run as QLinearConv."""
    q, batches = _calibrated(cls, bits)
    result = verify(q, SHAPE, batches)
    assert result["images"] == 8
    assert result["top1_agreement"] == 1.0
    assert result["sites"] and all(s["mismatch"] == 0 for s in result["sites"]), result["sites"]
    path = write_onnx(q, tmp_path / "m.onnx", SHAPE)
    with torch.no_grad():
        for x in batches:
            assert np.abs(_ort(path, x) - q(x).numpy()).max() < 1e-4
    ops = optimized_op_counts(path)
    assert ops.get("QGemm", 0) >= 1
    assert ops.get("QLinearConv", 0) >= 1, ops


def test_bn_folding_is_exact_in_the_export():
    """Folding BatchNorm keeps the weight codes (negated for g < 0, zero for g == 0) and only rescales them."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    layers = {"conv": nn.Conv2d(3, 6, 3, padding=1, bias=False), "bn": nn.BatchNorm2d(6), "relu": nn.ReLU(),
              "flat": nn.Flatten(), "fc": nn.Linear(6 * 4 * 4, 5)}  # fmt: skip
    model = nn.Sequential(OrderedDict(layers))
    _randomize_bns(model, g)
    gamma = torch.tensor([1.2, -0.7, 0.0, 0.5, -1.5, 0.9])
    with torch.no_grad():
        model.bn.weight.copy_(gamma)
    q = quantize_model(model, _deploy(4, 4))
    calibrate(q, [torch.randn(4, 3, 4, 4, generator=g) for _ in range(4)])
    conv, bn = q.conv, q.bn

    proto = build_onnx(q, (3, 4, 4), weight_storage="int8")  # the codes in their int8 container
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    w = conv.weight.detach()
    codes = quantize_affine(w, *conv.weight_quantizer.qparams(w), divide=True)
    gain = batchnorm_affine(bn)[0]
    expected = codes * torch.sign(gain).float()[:, None, None, None]
    assert init["conv_weight_q"].dtype == np.int8
    assert np.array_equal(init["conv_weight_q"], expected.numpy().astype(np.int8))
    assert not init["conv_weight_q"][2].any() and codes[2].abs().sum() > 0  # the zero-gain channel
    assert (init["conv_weight_q"][1] == -codes[1].numpy()).all()
    scale = folded_weight_scale(conv.weight_step(), gain).float().numpy()
    assert np.array_equal(init["conv_weight_scale"], scale) and scale[2] == 1.0

    x = torch.randn(16, 3, 4, 4, generator=g)
    out, ref = _ort(proto, x), q(x).detach().numpy()
    assert np.abs(out - ref).max() < 1e-4
    assert np.array_equal(out.argmax(1), ref.argmax(1))


def test_float_export_matches_pytorch():
    """A float model exports with BatchNorm folded into float weights and computes the same logits."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = _randomize_bns(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 5)), g)  # fmt: skip
    proto = build_onnx(model, SHAPE)
    assert not any(n.op_type in ("QuantizeLinear", "BatchNormalization") for n in proto.graph.node)
    x = torch.randn(8, *SHAPE, generator=g)
    with torch.no_grad():
        assert np.abs(_ort(proto, x) - model(x).numpy()).max() < 1e-4


# --------------------------------------------------------------------------- run directories, metadata, CLI


@pytest.fixture(scope="module")
def deploy_run(tmp_path_factory: pytest.TempPathFactory, random_weights: Path) -> Path:
    """A W4A4 deploy-protocol zeroq run made by the CLI, as a user would."""
    root = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFQ_HOME", str(root / "dfq_home"))
        rc = main(["quantize", MODEL, "--method", "zeroq", "--protocol", "deploy", "--wbits", "4", "--abits", "4",
                   "--weights", str(random_weights), "--out", str(root / "run"), *TINY])  # fmt: skip
    assert rc == 0
    return root / "run"


@pytest.fixture
def paper_run(tmp_path: Path) -> Path:
    """A papers'-protocol run directory (checkpoint only)."""
    paper = QuantConfig(wbits=4, abits=4, protocol="paper")
    q = quantize_model(create_model(MODEL), paper)
    config = RunConfig(model=MODEL, quant=paper, method=ZeroQConfig())
    save_quantized(tmp_path / "paper" / "model.pt", q, config)
    return tmp_path / "paper"


def _npz(path: Path, n: int = 12) -> Path:
    """A tiny CIFAR-shaped test set in dfq's .npz format (uint8 N×H×W×3 images, int labels)."""
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=np.arange(n) % 10)
    return path


def test_metadata_of_a_deploy_run_and_of_a_zoo_model(deploy_run, random_weights, tmp_path):
    """load_target describes the model; the export carries that description and read_metadata returns it."""
    q, meta = load_target(deploy_run)
    assert all(k in meta for k in META_KEYS)
    assert (meta["dfq_version"], meta["model"], meta["method"], meta["protocol"]) == (
        dfq.__version__, MODEL, "zeroq", "deploy")  # fmt: skip
    assert (meta["wbits"], meta["abits"], meta["num_classes"], meta["input_size"]) == (4, 4, 10, [3, 32, 32])
    assert meta["class_names"] == list(CIFAR10_CLASSES)
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    # the preprocessing record: pixels 0 and 255 after ImageNet's mean/std, CIFAR images used as they are
    assert meta["input_range"] == pytest.approx([-0.485 / 0.229, (1 - 0.406) / 0.225])
    assert (meta["crop_fraction"], meta["interpolation"]) == (1.0, "bicubic")

    fp, fmeta = load_target(MODEL, weights=str(random_weights))
    assert all(k in fmeta for k in META_KEYS)
    assert (fmeta["method"], fmeta["protocol"], fmeta["wbits"], fmeta["abits"]) == ("none", "float", 32, 32)
    assert fmeta["mean"] == meta["mean"] and fmeta["class_names"] == meta["class_names"]

    for model, m, name in ((q, meta, "q.onnx"), (fp, fmeta, "fp.onnx")):
        result = export(model, tmp_path / name, m)
        bits = {} if m is fmeta else {"conv1": [4, 8], **{k: [4, 4] for k in layer_names(q) if k != "conv1"}}
        assert read_metadata(result["out"]) == {**m, "weight_storage": "packed", "layer_bits": bits}
    assert result["integer_ops"] == {} and result["float_ops"].get("Conv", 0) >= 1  # the float one


def test_cli_quantize_export_verify_and_eval_agree(deploy_run, tmp_path, capsys):
    """quantize --protocol deploy -> export --verify -> eval: integer kernels, exact parity, same predictions."""
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "m.onnx"
    rc, stdout, err = _run(capsys, "export", str(deploy_run), "--out", str(out), "--verify", "--limit", "16",
                           "--json", "--no-progress")  # fmt: skip
    assert rc == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["integer_ops"].get("QLinearConv", 0) >= 1
    assert "Conv" not in result["float_ops"] and "Gemm" not in result["float_ops"]  # every conv/linear is integer
    assert result["verify"]["top1_agreement"] == 1.0 and result["verify"]["images"] == 16
    assert all(s["mismatch"] == 0 for s in result["verify"]["sites"])
    assert read_metadata(out)["protocol"] == "deploy"

    evals = []
    for target in (out, deploy_run):
        rc, stdout, err = _run(capsys, "eval", str(target), "--data", str(data), "--json", "--no-progress")
        assert rc == 0, err
        evals.append(json.loads(stdout.strip().splitlines()[-1]))
    assert evals[0]["runtime"] == "onnxruntime" and evals[0]["n"] == evals[1]["n"] == 12
    assert (evals[0]["top1"], evals[0]["top5"]) == (evals[1]["top1"], evals[1]["top5"])

    # Stronger than equal accuracy: the same prediction for every image.
    q, _ = load_quantized(deploy_run)
    onnx_model = OnnxClassifier(out)
    info = q.dfq_info
    for x, _ in make_loader(open_dataset(str(data), image_size=32), info.mean, info.std, batch_size=12):
        with torch.no_grad():
            assert torch.equal(onnx_model(x).argmax(1), q(x).argmax(1))


# --------------------------------------------------------------------------- errors


def test_paper_protocol_run_is_refused(paper_run, tmp_path, capsys):
    """Papers'-protocol runs are not integer-deployable; the message says how to get one that is."""
    with pytest.raises(DFQError, match="--protocol deploy"):
        load_target(paper_run)
    q, _ = load_quantized(paper_run)
    with pytest.raises(DFQError, match="--protocol deploy"):
        build_onnx(q, (3, 32, 32))
    rc, _, err = _run(capsys, "export", str(paper_run), "--out", str(tmp_path / "x.onnx"))
    _assert_user_error(rc, err, "--protocol deploy")
    assert not (tmp_path / "x.onnx").exists()


def test_uncalibrated_deploy_model_names_the_site():
    q = quantize_model(create_model(MODEL), _deploy(4, 4))
    with pytest.raises(DFQError, match=r"conv1\.input_quantizer was never calibrated"):
        build_onnx(q, (3, 32, 32))


def test_unsupported_float_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(UnsupportedLayerError, match="PReLU"):
        build_onnx(model, SHAPE)


@pytest.mark.parametrize("wbits, abits, where", [(16, 8, "0"), (8, 16, "1.act_quantizer")])
def test_16_bit_quantizers_do_not_fit_the_8_bit_container(wbits, abits, where):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    q = quantize_model(model, _deploy(wbits, abits))
    calibrate(q, [torch.randn(2, *SHAPE)])
    with pytest.raises(DFQError, match=rf"cannot export {where}: 16-bit quantization"):
        build_onnx(q, SHAPE)


def test_cli_export_of_a_missing_target(tmp_path, capsys):
    rc, _, err = _run(capsys, "export", str(tmp_path / "missing_dir"), "--out", str(tmp_path / "x.onnx"))
    _assert_user_error(rc, err, "missing_dir")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_eval_of_a_file_that_is_not_onnx(tmp_path, capsys):
    garbage = tmp_path / "not_onnx.onnx"
    garbage.write_bytes(b"this is not a protobuf\x00\xff" * 10)
    rc, _, err = _run(capsys, "eval", str(garbage), "--data", str(_npz(tmp_path / "d.npz")))
    _assert_user_error(rc, err, "cannot load")


def test_cli_eval_of_onnx_without_dfq_metadata(tmp_path, capsys):
    path = write_onnx(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval(), tmp_path / "m.onnx", (3, 32, 32))
    rc, _, err = _run(capsys, "eval", str(path), "--data", str(_npz(tmp_path / "d.npz")))
    _assert_user_error(rc, err, "lacks dfq metadata", "dfq export")


def test_cli_export_does_not_overwrite_without_flag(deploy_run, tmp_path, capsys):
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    rc, _, err = _run(capsys, "export", str(deploy_run), "--out", str(existing))
    _assert_user_error(rc, err, "--overwrite")
    assert existing.read_bytes() == b"keep me"
    rc, _, err = _run(capsys, "export", str(deploy_run), "--out", str(existing), "--overwrite")
    assert rc == 0, err
    assert read_metadata(existing)["model"] == MODEL


# --------------------------------------------------------------------------- regressions found in review


class SharedSite(nn.Module):
    """One quantized activation read by a conv first, then by MaxPool -> Flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.pool, self.gap = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)
        self.fc, self.fc2 = nn.Linear(8 * 4 * 4, 5), nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1)) + self.fc2(torch.flatten(self.gap(y), 1))


def test_export_keeps_the_integer_path_when_a_site_has_two_consumers():
    q, batches = _calibrated(SharedSite, 4)
    with torch.no_grad():
        assert np.abs(_ort(build_onnx(q, SHAPE), batches[0]) - q(batches[0]).numpy()).max() < 1e-4


def test_verify_checks_the_graph_that_is_exported():
    q, batches = _calibrated(ReLU6MaxPool, 4)
    assert verify(q, SHAPE, batches)["logits_max_abs_error"] < 1e-4


def test_relu6_below_8_bits_runs_on_integer_kernels():
    q, _ = _calibrated(ReLU6MaxPool, 4)
    assert optimized_op_counts(build_onnx(q, SHAPE).SerializeToString()).get("QLinearConv", 0) >= 1


def test_non_negative_weights_at_8_bits():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
    q = quantize_model(model, _deploy(8, 8))
    x = torch.randn(8, *SHAPE)
    calibrate(q, [x])
    with torch.no_grad():
        assert np.abs(_ort(build_onnx(q, SHAPE), x) - q(x).numpy()).max() < 1e-4


def test_string_metadata_that_looks_like_json_round_trips(tmp_path):
    meta = {"dfq_version": "1.0", "model": "7", "method": "null"}
    path = write_onnx(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval(), tmp_path / "m.onnx", (3, 2, 2), meta)
    assert read_metadata(path) == meta


def test_cli_quantize_export_writes_the_onnx_and_reports_its_runtime_top1(random_weights, tmp_path, capsys):
    """The main job ends with a file a user can run, and ONNX Runtime's top-1 printed beside PyTorch's."""
    data, out = _npz(tmp_path / "d.npz"), tmp_path / "q.onnx"
    rc, stdout, err = _run(capsys, "quantize", MODEL, "--method", "zeroq", "--wbits", "4", "--abits", "4",
                           "--weights", str(random_weights), "--out", str(tmp_path / "run"), "--data", str(data),
                           "--export", str(out), "--json", *TINY)  # fmt: skip
    assert rc == 0, err
    payload = json.loads(stdout.strip().splitlines()[-1])
    assert payload["export"]["out"] == str(out) and out.is_file()
    assert payload["export"]["integer_ops"].get("QLinearConv") == 19
    assert payload["export"]["onnx_top1"] == payload["top1"]  # same predictions on these 12 images
    assert "ONNX Runtime top-1" in stdout and read_metadata(out)["protocol"] == "deploy"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(["--protocol", "paper"], "--export needs the deploy protocol"), (["--export", "q.txt"], "ONNX file"),
     (["--export", "EXISTS"], "exists; pass --overwrite")],
)  # fmt: skip
def test_cli_quantize_export_refusals_come_before_any_work(extra, fragment, random_weights, tmp_path, capsys):
    exists = tmp_path / "exists.onnx"
    exists.write_bytes(b"keep")
    extra = [str(exists) if e == "EXISTS" else str(tmp_path / e) if e == "q.txt" else e for e in extra]
    export = [] if "--export" in extra else ["--export", str(tmp_path / "q.onnx")]
    rc, _, err = _run(capsys, "quantize", MODEL, "--method", "zeroq", "--weights", str(random_weights),
                      "--out", str(tmp_path / "run"), *export, *extra, *TINY)  # fmt: skip
    _assert_user_error(rc, err, fragment)
    assert not (tmp_path / "run").exists() and exists.read_bytes() == b"keep"


def layer_names(q: torch.nn.Module) -> list[str]:
    return [n for n, m in q.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
