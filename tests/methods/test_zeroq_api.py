"""BNS loss, ZeroQ input distillation, the Python API, run configs, checkpoints and the real-data baseline."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CIFAR10_4CLASS, CIFAR10_JPEG, RESNET20_WEIGHTS, require_shared
from torch import nn

import dfq.api
from dfq.checkpoint import CHECKPOINT_NAME, load_quantized
from dfq.config import RunConfig, resolve_config
from dfq.data import make_loader, open_dataset
from dfq.errors import DFQError
from dfq.evaluate import evaluate
from dfq.generators import BNStatsLoss
from dfq.hub import RemoteFile
from dfq.methods.zeroq import ZeroQConfig, distill_inputs
from dfq.models import create_model
from dfq.models._registry import _MODELS
from dfq.quant import ActMode, LayerOverride, QuantConfig, act_quantizers

RESNET20_SHA256 = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"


def _set_running_stats(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.5)


class ThreeBN(nn.Module):
    """Two BatchNorm2d and one BatchNorm1d, registered in a different order than they are called."""

    def __init__(self) -> None:
        super().__init__()
        self.head_bn = nn.BatchNorm1d(5)  # called last, registered first
        self.bn_b = nn.BatchNorm2d(4)  # called second
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)  # called first
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn_a(self.conv1(x)))
        x = self.relu2(self.bn_b(self.conv2(x)))
        return self.head_bn(self.fc(self.flatten(self.pool(x))))

    def bn_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input of each BN layer, computed by hand."""
        a = self.conv1(x)
        b = self.conv2(self.relu1(self.bn_a(a)))
        c = self.fc(self.flatten(self.pool(self.relu2(self.bn_b(b)))))
        return {"bn_a": a, "bn_b": b, "head_bn": c}


def _three_bn(seed: int = 0) -> ThreeBN:
    torch.manual_seed(seed)
    model = ThreeBN()
    _set_running_stats(model, seed)
    return model.eval()


def _hand_bns(model: ThreeBN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, inp in model.bn_inputs(x).items():
        bn = model.get_submodule(name)
        dims = [0, *range(2, inp.dim())]
        mean = inp.mean(dim=dims)
        var = ((inp - inp.mean(dim=dims, keepdim=True)) ** 2).mean(dim=dims)  # biased
        out[name] = ((mean - bn.running_mean) ** 2).mean() + ((var - bn.running_var) ** 2).mean()
    return out


# --------------------------------------------------------------------------- BNS loss


def test_bns_loss_matches_hand_computation() -> None:
    model = _three_bn()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    with torch.no_grad():
        expected = _hand_bns(model, x)
    assert {n: float(v) for n, v in expected.items()} != pytest.approx({n: 0.0 for n in expected})
    with BNStatsLoss(model) as bns:
        model(x)
        per_layer = bns.per_layer()
        loss = bns.loss()
    assert set(per_layer) == {"bn_a", "bn_b", "head_bn"}
    for name, value in expected.items():  # keyed by module: registration order differs from call order
        torch.testing.assert_close(per_layer[name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(loss, torch.stack(list(expected.values())).mean(), rtol=1e-5, atol=1e-6)


def test_normalized_bns_loss_matches_hand_computation_in_units_of_the_running_std() -> None:
    model = _three_bn()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    with torch.no_grad(), BNStatsLoss(model, normalized=True) as bns:
        model(x)
        per_layer = bns.per_layer()
    for name, inp in model.bn_inputs(x).items():
        bn = model.get_submodule(name)
        dims = [0, *range(2, inp.dim())]
        mean, var = inp.mean(dim=dims), inp.var(dim=dims, unbiased=False)
        scale = bn.running_var + bn.eps
        expected = ((mean - bn.running_mean) ** 2 / scale).mean() + (((var - bn.running_var) / scale) ** 2).mean()
        torch.testing.assert_close(per_layer[name], expected.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_normalized_bns_loss_does_not_depend_on_the_units_of_a_layer() -> None:
    """Scaling a convolution and its BatchNorm's statistics by c leaves the network's function unchanged: the
    normalized loss is unchanged at every layer, where the plain loss of that layer grows by about c**4."""
    c = 50.0
    model, scaled = _three_bn(), _three_bn()
    with torch.no_grad():
        scaled.conv1.weight.mul_(c), scaled.conv1.bias.mul_(c)
        scaled.bn_a.running_mean.mul_(c), scaled.bn_a.running_var.mul_(c * c)
        scaled.bn_a.eps *= c * c
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = {}
    for normalized in (False, True):
        for key, net in (("base", model), ("scaled", scaled)):
            with torch.no_grad(), BNStatsLoss(net, normalized=normalized) as bns:
                net(x)
                losses[normalized, key] = bns.per_layer()
    for name in ("bn_a", "bn_b", "head_bn"):
        torch.testing.assert_close(losses[True, "scaled"][name], losses[True, "base"][name], rtol=1e-4, atol=1e-7)
    ratio = losses[False, "scaled"]["bn_a"] / losses[False, "base"]["bn_a"]
    assert float(ratio) > c**3


def test_bns_loss_hooks_are_removed_and_state_cleared() -> None:
    model = _three_bn()
    bns_modules = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    x = torch.randn(4, 3, 8, 8)
    with BNStatsLoss(model) as bns:
        assert all(len(m._forward_hooks) == 1 for m in bns_modules)
        model(x)
        bns.loss()
        with pytest.raises(RuntimeError, match="no BatchNorm statistics"):
            bns.loss()  # loss() clears what it used
    assert all(len(m._forward_hooks) == 0 for m in bns_modules)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    model(x)  # no hook fires after the block
    assert bns.per_layer() == {}


def test_bns_loss_hooks_are_removed_on_error() -> None:
    model = _three_bn()
    with pytest.raises(ValueError, match="boom"), BNStatsLoss(model):
        raise ValueError("boom")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_bns_loss_gradient_reaches_the_input() -> None:
    model = _three_bn()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    with BNStatsLoss(model) as bns:
        model(x)
        bns.loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bns_loss_needs_batchnorm() -> None:
    with pytest.raises(DFQError, match="BatchNorm"):
        BNStatsLoss(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


# --------------------------------------------------------------------------- distillation


def test_distill_inputs_lowers_the_bns_loss_and_leaves_the_teacher_alone() -> None:
    teacher = _three_bn()
    frozen_by_user = teacher.fc.bias
    frozen_by_user.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    history: list[tuple[int, float]] = []
    x = distill_inputs(
        teacher,
        (3, 8, 8),
        8,
        steps=30,
        lr=0.1,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        on_step=lambda step, value: history.append((step, value)),
    )
    assert x.shape == (8, 3, 8, 8) and not x.requires_grad
    steps = [s for s, _ in history]
    assert steps[0] == 0 and steps[-1] == 29
    assert history[-1][1] < history[0][1]
    # the reported loss is the BNS loss of the inputs as they were at that step; the result is lower still
    with torch.no_grad(), BNStatsLoss(teacher) as bns:
        teacher(x)
        final = float(bns.loss())
    assert final < history[0][1]

    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert {n for n, p in teacher.named_parameters() if not p.requires_grad} == {"fc.bias"}
    assert all(len(m._forward_hooks) == 0 for m in teacher.modules())


def test_distill_inputs_is_deterministic_for_a_seed() -> None:
    teacher = _three_bn()

    def distil(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return distill_inputs(teacher, (3, 8, 8), 4, steps=5, generator=gen, progress=False)

    a, b, c = distil(0), distil(0), distil(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------- Python API


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def test_quantize_a_user_model_outside_the_zoo() -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    _set_running_stats(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = ZeroQConfig(steps=2, num_samples=4)
    result = dfq.quantize(model, QuantConfig(wbits=8, abits=8), method, example_inputs=torch.randn(1, 3, 8, 8),
                          progress=False)  # fmt: skip
    q, summary = result.model, result.summary
    assert result.input_size == (3, 8, 8) and result.method == method
    assert (summary["method"], summary["wbits"], summary["abits"]) == ("zeroq", 8, 8)
    quantizers = list(act_quantizers(q))
    # the deploy protocol's sites: the image, the ReLU, the pooled features the classifier reads
    assert [name for name, _ in quantizers] == ["conv.input_quantizer", "relu.act_quantizer", "fc.input_quantizer"]
    for name, aq in quantizers:
        assert aq.get_mode() is ActMode.FROZEN, name
        assert int(aq.num_updates) > 0, name
        assert float(aq.hi) > float(aq.lo), name
    out = q(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    for k, v in model.state_dict().items():  # the float model is left as it was
        assert torch.equal(v, before[k]), k
    assert not any(name.endswith("act_quantizer") for name, _ in model.named_modules())

    with pytest.raises(DFQError, match="example_inputs is required"):
        dfq.quantize(model, QuantConfig(wbits=8, abits=8), method, progress=False)
    with pytest.raises(DFQError, match="does not run on example inputs"):
        dfq.quantize(model, QuantConfig(wbits=8, abits=8), method, example_inputs=torch.randn(1, 5, 8, 8))


# --------------------------------------------------------------------------- config


def test_run_config_round_trip() -> None:
    config = RunConfig(
        model="resnet32a_cifar10",
        weights="/some/where.th",
        seed=7,
        quant=QuantConfig(
            wbits=5,
            abits=6,
            act_observer="minmax",
            overrides={"conv1": LayerOverride(wbits=8), "linear": LayerOverride(wbits=8, abits=8)},
        ),
        method=ZeroQConfig(num_samples=3, steps=9, lr=0.25),
    )
    data = config.to_dict()
    assert data["method"] == {"name": "zeroq", "num_samples": 3, "steps": 9, "lr": 0.25, "calib_batch_size": 0}
    assert resolve_config(yaml.safe_load(yaml.safe_dump(data, sort_keys=False))) == config
    assert resolve_config(data) == config
    assert resolve_config(RunConfig().to_dict()) == resolve_config()


@pytest.mark.parametrize(
    ("data", "dotted", "hint"),
    [
        ({"method": {"name": "zeroq", "stepz": 3}}, "method.stepz", "steps"),
        ({"quant": {"wbitz": 4}}, "quant.wbitz", "wbits"),
        ({"quant": {"overrides": {"conv1": {"wbitz": 8}}}}, "quant.overrides.conv1.wbitz", "wbits"),
        ({"modle": "resnet20a_cifar10"}, "modle", "model"),
    ],
)
def test_unknown_config_key_names_the_dotted_key(data: dict, dotted: str, hint: str) -> None:
    with pytest.raises(DFQError, match=rf"unknown config key '{dotted}' \(did you mean '{hint}'\?\)"):
        resolve_config(data)


def test_config_wrong_type_is_a_user_error() -> None:
    with pytest.raises(DFQError, match=r"method\.steps"):
        resolve_config({"method": {"name": "zeroq", "steps": "many"}})
    with pytest.raises(DFQError, match="must be a mapping"):
        resolve_config({"quant": 4})


# --------------------------------------------------------------------------- checkpoints


def test_run_checkpoint_round_trip(tmp_path: Path) -> None:
    if RESNET20_WEIGHTS.is_file():
        weights = RESNET20_WEIGHTS
    else:
        torch.manual_seed(0)
        weights = tmp_path / "random.pt"
        torch.save(create_model("resnet20a_cifar10").state_dict(), weights)
    config = resolve_config(
        None,
        {
            "weights": str(weights),
            "method.name": "zeroq",
            "seed": 3,
            "quant.wbits": 4,
            "quant.abits": 4,
            "method.steps": 2,
            "method.num_samples": 4,
        },
    )
    out = tmp_path / "run"
    summary = dfq.api.run(config, out, evaluate=None, progress=False)
    assert (summary["method"], summary["wbits"], summary["abits"]) == ("zeroq", 4, 4)
    assert "top1" not in summary
    assert {p.name for p in out.iterdir()} == {"config.yaml", CHECKPOINT_NAME, "summary.json"}

    first, loaded_config = load_quantized(out)
    second, _ = load_quantized(out / CHECKPOINT_NAME)
    assert loaded_config.quant.input_range == pytest.approx((-0.485 / 0.229, (1 - 0.406) / 0.225))  # the record's
    unfilled = dataclasses.replace(loaded_config.quant, input_range=None)
    assert dataclasses.replace(loaded_config, quant=unfilled) == config
    assert not first.training
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y1, y2 = first(x), second(x)
    assert torch.equal(y1, y2)
    assert all(aq.get_mode() is ActMode.FROZEN for _, aq in act_quantizers(first))

    payload = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    saved = payload["state_dict"]
    state = first.state_dict()
    assert state.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k

    # The same config quantized in process gives the same model as the one saved.
    again = dfq.quantize(
        create_model("resnet20a_cifar10", weights=weights),
        QuantConfig(wbits=4, abits=4),
        ZeroQConfig(steps=2, num_samples=4),
        seed=3,
        progress=False,
    )
    with torch.no_grad():
        assert torch.equal(again.model(x), y1)


# --------------------------------------------------------------------------- real data


def _fp_accuracy(data: Path) -> dict:
    model = create_model("resnet20a_cifar10", weights=RESNET20_WEIGHTS, progress=False)
    info = model.dfq_info
    dataset = open_dataset(data, image_size=info.input_size[-1])
    loader = make_loader(dataset, info.mean, info.std, batch_size=500)
    return evaluate(model, loader, total=len(dataset), progress=False)


def test_fp_resnet20_on_real_4class_set() -> None:
    require_shared(RESNET20_WEIGHTS, CIFAR10_4CLASS)
    metrics = _fp_accuracy(CIFAR10_4CLASS)
    assert metrics["n"] == 4000
    assert round(metrics["top1"] * metrics["n"] / 100) == 3798
    assert metrics["top1"] == pytest.approx(94.95, abs=1e-9)


def test_fp_resnet20_on_real_jpeg_set() -> None:
    require_shared(RESNET20_WEIGHTS, CIFAR10_JPEG)
    metrics = _fp_accuracy(CIFAR10_JPEG)
    assert metrics["n"] == 10000
    assert round(metrics["top1"] * metrics["n"] / 100) == 8103
    assert metrics["top1"] == pytest.approx(81.03, abs=1e-9)


# --------------------------------------------------------------------------- published weights


def test_pretrained_weights_download_verify_and_work_offline(
    http_server: tuple[Path, str, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    require_shared(RESNET20_WEIGHTS)
    root, base, requests = http_server
    name = "resnet20a_cifar10"
    fname = RESNET20_WEIGHTS.name
    shutil.copy(RESNET20_WEIGHTS, root / fname)
    info, factory = _MODELS[name]
    (tag, published), *_ = info.weights.items()
    assert published.remote.sha256 == RESNET20_SHA256
    source = dataclasses.replace(published, remote=RemoteFile((f"{base}/{fname}",), fname, sha256=RESNET20_SHA256))
    monkeypatch.setitem(_MODELS, name, (dataclasses.replace(info, weights={tag: source}), factory))
    monkeypatch.delenv("DFQ_OFFLINE", raising=False)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = create_model(name, weights=RESNET20_WEIGHTS)
    downloaded = create_model(name, pretrained=True, progress=False)
    assert requests == [f"/{fname}"]
    cached = tmp_path / "dfq_home" / "weights" / fname
    assert cached.read_bytes() == RESNET20_WEIGHTS.read_bytes()
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(downloaded(x), expected)

    monkeypatch.setenv("DFQ_OFFLINE", "1")
    offline = create_model(name, pretrained=True, progress=False)
    assert requests == [f"/{fname}"]  # served from the cache
    with torch.no_grad():
        assert torch.equal(offline(x), expected)
