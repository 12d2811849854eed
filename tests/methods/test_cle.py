"""The DFQ recipe (Nagel et al., ICCV 2019) as method ``cle``: folding, equalization, absorption, bias correction."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import dfq
from dfq.errors import DFQError
from dfq.methods import CLEConfig
from dfq.methods.cle import prepare_float
from dfq.models import create_model
from dfq.quant.equalize import (
    absorb_high_bias,
    clipped_normal_mean,
    equalize,
    find_pairs,
    fold_batchnorm,
    input_expectations,
)

FAST = {"calib_samples": 4, "calib_steps": 2}


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 1.5 + 0.2)
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _chain(dtype: torch.dtype = torch.float32, unbalanced: bool = False, seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU -> depthwise-BN-ReLU -> pointwise-BN-ReLU -> pool -> linear, on 3x8x8 inputs."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip
    _randomize_bn(m, seed)
    m.train()  # running statistics of standard-normal inputs, so BN's beta and gamma describe the signal
    for bn in (m[1], m[4], m[7]):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        m(torch.randn(512, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))
    if unbalanced:  # channel ranges over 3 decades, undone by the next layer: same function, bad per-tensor grids
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for bn, nxt in ((1, 3), (4, 6)):
                a = 10 ** (torch.rand(m[bn].num_features, generator=g) * 3 - 2)
                m[bn].weight.mul_(a)
                m[bn].bias.mul_(a)
                m[nxt].weight.div_(a.view(-1, 1, 1, 1) if nxt == 3 else a.view(1, -1, 1, 1))
    return m.to(dtype).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _spread(w: torch.Tensor) -> float:
    r = w.detach().abs().flatten(1).amax(1)
    return float(r.max() / r.min())


def test_folding_preserves_the_float_function():
    model = _chain()
    folded = copy.deepcopy(model)
    stats = fold_batchnorm(folded)
    assert set(stats) == {"0", "3", "6"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        assert _rel_err(model(x), folded(x)) < 1e-5
    beta, gamma = stats["3"]
    assert torch.equal(beta, model[4].bias.double()) and torch.equal(gamma, model[4].weight.double().abs())


def test_equalization_is_exact_and_balances_every_pair():
    model = _chain(torch.float64, unbalanced=True)
    p = copy.deepcopy(model)
    stats = fold_batchnorm(p)
    pairs = find_pairs(p)
    assert [(q.first, q.act, q.second) for q in pairs] == [("0", "relu", "3"), ("3", "relu", "6"), ("6", "relu", "11")]
    before = _spread(p[0].weight)
    passes = equalize(p, pairs, stats, iterations=500, tol=1e-12)
    assert 1 < passes < 500
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(model(x), p(x)) < 1e-10
    for pair in pairs:  # the paper's optimum: r1_i == r2_i for every channel of every pair
        w1, w2 = p.get_submodule(pair.first).weight.abs(), p.get_submodule(pair.second).weight.abs()
        r1 = w1.flatten(1).amax(1)
        r2 = w2.flatten(1).amax(1) if pair.second == "3" else w2.transpose(0, 1).flatten(1).amax(1)
        torch.testing.assert_close(r1, r2, rtol=1e-8, atol=0)
    after = _spread(p[0].weight)
    assert after < before / 10


def test_pairs_skip_relu6_and_residual_additions():
    relu6 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 1)).eval()
    fold_batchnorm(relu6)
    assert find_pairs(relu6) == []
    resnet = create_model("resnet20a_cifar10").eval()
    fold_batchnorm(resnet)
    pairs = find_pairs(resnet)  # only conv1 -> relu1 -> conv2 inside each block; block outputs meet an addition
    assert len(pairs) == 9 and all(p.first.endswith("conv1") and p.second.endswith("conv2") for p in pairs)


def _absorbable() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 3, 1)).double().eval()
    with torch.no_grad():
        m[0].weight.mul_(0.01)  # tiny pre-activation noise: BN output stays near beta
        m[0].bias.zero_()
        m[1].running_mean.zero_()
        m[1].running_var.fill_(1.0)
        m[1].eps = 0.0
        m[1].weight.copy_(torch.tensor([1.0, 0.5, 1.0, 1.0, 2.0]))
        m[1].bias.copy_(torch.tensor([5.0, 4.0, 0.5, -1.0, 6.0]))
    return m


def test_high_bias_absorption_moves_the_expected_amount_and_keeps_the_function():
    model = _absorbable()
    p = copy.deepcopy(model)
    stats = fold_batchnorm(p)
    b1, b2, w2 = p[0].bias.clone(), p[3].bias.clone(), p[3].weight.clone()
    moved = absorb_high_bias(p, find_pairs(p), stats)
    c = torch.tensor([2.0, 2.5, 0.0, 0.0, 0.0], dtype=torch.float64)  # max(0, beta - 3 gamma)
    torch.testing.assert_close(moved["0"], c)
    torch.testing.assert_close(p[0].bias, b1 - c)
    torch.testing.assert_close(p[3].bias, b2 + w2.flatten(1) @ c)
    torch.testing.assert_close(stats["0"][0], torch.tensor([3.0, 1.5, 0.5, -1.0, 6.0], dtype=torch.float64))
    x = torch.randn(32, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        pre = model[1](model[0](x))
        assert bool((pre[:, :2] >= c[:2].view(1, -1, 1, 1)).all())  # the absorbed channels stay above c
        assert _rel_err(model(x), p(x)) < 1e-10


def _clipped_mean(beta: float, gamma: float) -> float:
    """E[relu(z)], z ~ N(beta, gamma^2): gamma phi(beta/gamma) + beta (1 - Phi(-beta/gamma))."""
    t = beta / gamma
    phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    cdf_neg = 0.5 * (1 + math.erf(-t / math.sqrt(2)))
    return gamma * phi + beta * (1 - cdf_neg)


def test_clipped_normal_mean_matches_the_closed_form_and_relu6_by_integration():
    beta, gamma = torch.tensor([-1.0, 0.0, 0.7, 5.5, 2.0]), torch.tensor([0.5, 1.0, 2.0, 1.0, 0.0])
    got = clipped_normal_mean(beta, gamma)
    want = [_clipped_mean(b, g) for b, g in zip(beta.tolist()[:4], gamma.tolist()[:4], strict=True)] + [2.0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    for b, g in ((0.7, 2.0), (5.5, 1.0)):
        pdf = torch.exp(-0.5 * ((z - b) / g) ** 2) / (g * math.sqrt(2 * math.pi))
        numeric = float(torch.trapezoid(z.clamp(0, 6) * pdf, z))
        relu6 = clipped_normal_mean(torch.tensor([b]), torch.tensor([g]), 6.0)
        assert abs(float(relu6) - numeric) < 1e-6


def test_bias_correction_matches_its_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.Flatten()).eval()
    beta, gamma = [0.3, -0.5, 1.2], [0.8, 1.5, 0.4]
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(gamma))
        model[1].bias.copy_(torch.tensor(beta))
    cfg = CLEConfig(equalize=False, absorb_bias=False, **FAST)
    r = dfq.quantize(model, dfq.QuantConfig(wbits=4, abits=8), cfg, example_inputs=torch.randn(1, 2, 1, 1),
                     progress=False)  # fmt: skip
    q = r.model
    assert r.summary["bias_corrected"] == 1  # conv 0 reads the image: not corrected
    ex = torch.tensor([_clipped_mean(b, g) for b, g in zip(beta, gamma, strict=True)], dtype=torch.float64)
    w = model[3].weight.detach()
    eps = (q[3].weight_quantizer(q[3].weight) - w).detach().double().flatten(1)
    assert float(eps.abs().max()) > 1e-3  # 4-bit weights: a real error to correct
    want = model[3].bias.double() - eps @ ex
    torch.testing.assert_close(q[3].bias.double(), want, rtol=0, atol=1e-6)


def test_expectations_only_for_inputs_from_batchnorm():
    p, ex, summary = prepare_float(_chain(), CLEConfig())
    assert set(ex) == {"3", "6", "11"}  # not "0": it reads the image
    assert summary["folded_bn"] == 3 and summary["pairs"] == 3
    resnet = create_model("resnet20a_cifar10").eval()
    _, ex, _ = prepare_float(resnet, CLEConfig())
    assert "layer1.0.conv1" in ex and "layer1.1.conv1" not in ex and "linear" not in ex  # sums are not BN outputs
    assert input_expectations(p, {}) == {}


def test_end_to_end_on_a_zoo_model_gives_finite_outputs():
    model = _randomize_bn(create_model("resnet20a_cifar10"))
    r = dfq.quantize(model, dfq.QuantConfig(wbits=8, abits=8), CLEConfig(**FAST), progress=False)
    assert r.summary["method"] == "cle" and r.summary["pairs"] == 9
    assert not any(isinstance(m, nn.BatchNorm2d) for m in r.model.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, ref = r.model(x), model(x)
    assert torch.isfinite(out).all() and _rel_err(ref, out) < 0.2


def test_by_name_with_default_config():
    model = _chain()
    r = dfq.quantize(model, dfq.QuantConfig(wbits=8, abits=8), "cle", example_inputs=torch.randn(1, 3, 8, 8),
                     progress=False)  # fmt: skip
    with torch.no_grad():
        assert torch.isfinite(r.model(torch.randn(8, 3, 8, 8))).all()


def test_equalization_reduces_per_tensor_w4_error():
    model = _chain(unbalanced=True)
    quant = dfq.QuantConfig(wbits=4, abits=8, weight_granularity="per_tensor", protocol="paper")
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)

    def error(cfg: CLEConfig) -> float:
        r = dfq.quantize(model, quant, cfg, example_inputs=x[:1], progress=False)
        with torch.no_grad():
            return float(((r.model(x) - ref) ** 2).mean() / (ref**2).mean())

    fast = {"calib_samples": 16, "calib_steps": 10}
    off = error(CLEConfig(equalize=False, absorb_bias=False, correct_bias=False, **fast))
    equalized = error(CLEConfig(correct_bias=False, **fast))
    full = error(CLEConfig(**fast))
    assert equalized < off / 10, (equalized, off)  # measured: 0.0017 vs 0.090
    assert full < equalized, (full, equalized)  # bias correction on top: 0.0005


def test_deploy_protocol_and_onnx_export(tmp_path):
    model = _chain()
    r = dfq.quantize(model, dfq.QuantConfig(protocol="deploy", wbits=8, abits=8), CLEConfig(**FAST),
                     example_inputs=torch.randn(1, 3, 8, 8), progress=False)  # fmt: skip
    info = dfq.export_onnx(r, tmp_path / "q.onnx", verify=[torch.randn(8, 3, 8, 8)])
    assert (tmp_path / "q.onnx").is_file()
    assert info


@pytest.mark.parametrize("key", ["iterations", "calib_samples", "calib_steps"])
def test_config_validation(key):
    with pytest.raises(DFQError, match=rf"cle\.{key} must be >= 1, got 0"):
        CLEConfig(**{key: 0})
    with pytest.raises(DFQError, match=r"cle\.calib_lr"):
        CLEConfig(calib_lr=0)


def test_a_cle_run_directory_reloads_and_evaluates_as_quantized(tmp_path, random_weights, capsys):
    """Q is built on the folded architecture; `dfq eval RUN` rebuilds that architecture from the method."""
    import json

    import numpy as np

    from dfq.cli import main

    data = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels=np.arange(8) % 10)
    run = tmp_path / "run"
    argv = ["quantize", "resnet20a_cifar10", "--method", "cle", "--wbits", "8", "--abits", "8", "--protocol", "deploy",
            "--set", "method.calib_steps=2", "--set", "method.calib_samples=4", "--weights", str(random_weights),
            "--data", str(data), "--out", str(run), "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(run), "--data", str(data), "--json", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["top1"] == summary["top1"] and again["method"] == "cle"
