"""Quantizer lifecycle, layer conversion and gradients through the quantized model."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfq.errors import DFQError, UnsupportedLayerError
from dfq.models import create_model
from dfq.quant import (
    ActMode,
    ActQuantizer,
    LayerOverride,
    QuantActivation,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    act_quantizers,
    calibrate,
    quant_disabled,
    quantize_model,
    set_act_mode,
    weight_quantizers,
)
from dfq.quant.learning import LEARNED_SUFFIXES, BetaSchedule, QuantizerLearning, cosine_anneal

SEED = 123


def test_paper_observer_reproduces_the_quirk():
    # The papers' EMA update (GDFQ's code): for a constant batch max m the stored value goes 1m, 5.3m, 17.8m, 47m, ...
    q = ActQuantizer(QuantSpec(4), observer="paper")
    seen = []
    for _ in range(4):
        q.observe(torch.tensor([0.0, 1.0]))
        seen.append(float(q.hi))
    assert seen == pytest.approx([1.0, 5.26316, 17.8481, 47.0000], rel=1e-5)
    for _ in range(196):
        q.observe(torch.tensor([0.0, 1.0]))
    assert float(q.hi) == pytest.approx(1.0, abs=1e-4)


def test_ema_observer_is_bias_corrected():
    q = ActQuantizer(QuantSpec(4), observer="ema", momentum=0.9)
    q.observe(torch.tensor([0.0, 2.0]))
    assert float(q.hi) == pytest.approx(2.0)
    q.observe(torch.tensor([0.0, 4.0]))
    ref = (0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81)
    assert float(q.hi) == pytest.approx(ref)


def test_minmax_observer_keeps_extremes():
    q = ActQuantizer(QuantSpec(4), observer="minmax")
    for hi in (1.0, 3.0, 2.0):
        q.observe(torch.tensor([-hi / 2, hi]))
    assert (float(q.lo), float(q.hi)) == (-1.5, 3.0)


def test_lifecycle_observe_freeze_disable_and_state_in_buffers():
    q = ActQuantizer(QuantSpec(2))
    x = torch.linspace(0, 3, 7)
    with pytest.raises(DFQError, match="never calibrated"):
        q.set_mode(ActMode.FROZEN)
        q(x)
    q.set_mode(ActMode.OBSERVE)
    y = q(x)
    hi = float(q.hi)
    assert len(y.unique()) == 4 and hi == pytest.approx(3.0)
    q.set_mode(ActMode.FROZEN)
    q(x * 10)
    assert float(q.hi) == hi  # frozen: range unchanged
    assert float(q(x * 10).max()) == pytest.approx(3.0)  # clamped to the frozen range
    q.set_mode(ActMode.DISABLED)
    assert torch.equal(q(x * 10), x * 10)
    state = q.state_dict()
    assert {"mode", "lo", "hi", "num_updates"} <= set(state)
    fresh = ActQuantizer(QuantSpec(2))
    fresh.load_state_dict(state)
    assert fresh.get_mode() is ActMode.DISABLED and float(fresh.hi) == hi


def _resnet():
    torch.manual_seed(SEED)
    return create_model("resnet20a_cifar10")


def test_conversion_swaps_exactly_the_expected_layers():
    fp = _resnet()
    q = quantize_model(fp, QuantConfig(wbits=4, abits=4))
    convs = {n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d)}
    relus = {n for n, m in fp.named_modules() if isinstance(m, nn.ReLU)}
    assert {n for n, m in q.named_modules() if isinstance(m, QuantConv2d)} == convs
    assert {n for n, m in q.named_modules() if isinstance(m, QuantLinear)} == {"linear"}
    assert {n for n, m in q.named_modules() if isinstance(m, QuantActivation)} == relus
    assert len(relus) == 19  # stem + 2 per block x 9 blocks: every site has its own quantizer
    assert all(isinstance(m, nn.BatchNorm2d) for n, m in q.named_modules() if n.endswith(("bn1", "bn2")))
    assert not any(isinstance(m, QuantConv2d) for m in fp.modules())  # the float model is untouched
    assert q.dfq_info is fp.dfq_info


def test_quantized_model_equals_float_when_quantization_disabled():
    fp = _resnet().eval()
    q = quantize_model(fp, QuantConfig(wbits=4, abits=4)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    with quant_disabled(q):
        assert torch.equal(q(x), fp(x))
    assert next(iter(act_quantizers(q)))[1].get_mode() is ActMode.OBSERVE  # restored


def test_w32a32_is_a_no_op():
    fp = _resnet().eval()
    q = quantize_model(fp, QuantConfig(wbits=32, abits=32, protocol="paper")).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(q(x), fp(x))


def test_gradients_reach_every_parameter_through_the_ste():
    q = quantize_model(_resnet(), QuantConfig(wbits=3, abits=3))
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    calibrate(q, [x.detach()])
    q.train()
    q(x).square().mean().backward()
    missing = [n for n, p in q.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert x.grad is not None and x.grad.abs().sum() > 0  # a generator upstream would get gradients too


def test_overrides_by_name_pattern():
    cfg = QuantConfig(
        wbits=4, abits=4, overrides={"conv1": LayerOverride(wbits=8), "linear": {"wbits": 8}, "layer3.*": {"abits": 6}}
    )
    q = quantize_model(_resnet(), cfg)
    assert q.conv1.weight_quantizer.spec.bits == 8
    assert q.linear.weight_quantizer.spec.bits == 8
    assert q.layer1[0].conv1.weight_quantizer.spec.bits == 4
    assert q.layer3[2].relu2.act_quantizer.spec.bits == 6
    assert q.layer2[2].relu2.act_quantizer.spec.bits == 4


def test_ends_bits_keeps_the_first_and_last_layers_and_their_activations():
    """BRECQ/QDrop/Genie's exception: first conv's weights and output (the 2nd layer's input), classifier's
    weights and the site it reads (the last block's output, through pooling and flatten), all else at 4 bits."""
    q = quantize_model(_resnet(), QuantConfig(wbits=4, abits=4, ends_bits=8, protocol="paper"))
    weights = {
        n: m.weight_quantizer.spec.bits for n, m in q.named_modules() if isinstance(m, QuantConv2d | QuantLinear)
    }
    acts = {n: a.spec.bits for n, a in act_quantizers(q)}
    assert {n for n, b in weights.items() if b == 8} == {"conv1", "linear"}
    assert {n for n, b in acts.items() if b == 8} == {"relu.act_quantizer", "layer3.2.relu2.act_quantizer"}
    assert set(weights.values()) | set(acts.values()) == {4, 8}


def test_ends_bits_on_a_functional_model_and_explicit_overrides_win():
    """The sites are found in the dataflow: functional ReLUs and a reused module split into their own sites."""
    cfg = QuantConfig(protocol="paper", wbits=4, abits=4, ends_bits=6, overrides={"fc": LayerOverride(wbits=5)})
    q = quantize_model(FunctionalNet().eval(), cfg)
    assert (q.conv.weight_quantizer.spec.bits, q.conv2.weight_quantizer.spec.bits, q.fc.weight_quantizer.spec.bits) == (
        6, 4, 5)  # fmt: skip
    acts = {n: a.spec.bits for n, a in act_quantizers(q)}
    # the functional stem ReLU, the shared module's first use, its second use (read by fc through pool and flatten)
    assert acts == {"relu_act.act_quantizer": 6, "shared.act_quantizer": 4, "shared_1_act.act_quantizer": 6}
    with pytest.raises(DFQError, match="ends_bits"):
        QuantConfig(ends_bits=1)


class ViewNet(nn.Module):
    """The pytorch-cifar style head: the classifier reads ``x.view(x.size(0), -1)`` of a pooled ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        x = F.avg_pool2d(x, x.size()[3])
        return self.fc(x.view(x.size(0), -1))


def test_ends_bits_sees_through_shape_reads_and_reaches_the_deploy_input_site():
    q = quantize_model(ViewNet().eval(), QuantConfig(wbits=4, abits=4, ends_bits=8, protocol="paper"))
    assert (q.relu1.act_quantizer.spec.bits, q.relu2.act_quantizer.spec.bits) == (8, 8)
    deploy = quantize_model(_resnet(), QuantConfig(protocol="deploy", wbits=4, abits=4, ends_bits=8))
    assert deploy.linear.input_quantizer.spec.bits == deploy.linear.weight_quantizer.spec.bits == 8
    assert deploy.layer1[0].conv1.weight_quantizer.spec.bits == 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"conv*": {"wbits": 6}, "conv1": {"wbits": 3}}, {"conv1": (3, 8), "linear": (8, 8)}),  # later pattern wins
        ({"conv1": {"wbits": 3}, "conv*": {"wbits": 6}}, {"conv1": (6, 8)}),
        ({"relu": {"wbits": 6}}, {"relu": (6, 8)}),  # a field left unset keeps the ends' bits
        ({"layer*": {"abits": 6}}, {"layer3.2.relu2": (4, 6), "relu": (4, 8)}),
    ],
)
def test_ends_bits_lie_under_explicit_overrides(overrides, expected):
    """The ends are the first patterns: each explicit override wins where it matches, as without ends_bits."""
    cfg = QuantConfig(wbits=4, abits=4, ends_bits=8, overrides=overrides)
    q = quantize_model(_resnet(), cfg)
    for name, (wbits, abits) in expected.items():
        module = q.get_submodule(name)
        if hasattr(module, "weight_quantizer"):
            assert module.weight_quantizer.spec.bits == wbits, name
        if hasattr(module, "act_quantizer"):
            assert module.act_quantizer.spec.bits == abits, name
    reference = QuantConfig(wbits=4, abits=4, overrides=overrides)
    for name in expected:
        assert cfg.bits_for(name) == reference.bits_for(name)  # the saved config's own patterns are untouched


def test_calibrate_then_frozen_ranges_survive_state_dict():
    q = quantize_model(_resnet(), QuantConfig())
    calibrate(q, torch.randn(8, 3, 32, 32).split(4))
    ranges = {n: float(a.hi) for n, a in act_quantizers(q)}
    assert all(v > 0 for v in ranges.values())
    q2 = quantize_model(_resnet(), QuantConfig())
    q2.load_state_dict(q.state_dict())
    assert {n: float(a.hi) for n, a in act_quantizers(q2)} == ranges
    assert all(a.get_mode() is ActMode.FROZEN for _, a in act_quantizers(q2))


class FunctionalNet(nn.Module):
    """A user model that applies ReLU functionally and reuses one ReLU module twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.shared(self.conv2(x)) + x
        x = self.shared(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_functional_and_reused_relus_get_their_own_quantizers():
    torch.manual_seed(SEED)
    fp = FunctionalNet().eval()
    q = quantize_model(fp, QuantConfig(wbits=8, abits=8, protocol="paper")).eval()
    assert len(list(act_quantizers(q))) == 3
    x = torch.randn(2, 3, 8, 8)
    with quant_disabled(q):
        torch.testing.assert_close(q(x), fp(x))
    set_act_mode(q, "observe")
    q(x)
    assert all(float(a.hi) > 0 for _, a in act_quantizers(q))


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.act = nn.PReLU()  # learned slopes
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.norm(self.conv(x).mean((2, 3)))))


def test_unsupported_layers_are_reported_by_name():
    with pytest.raises(UnsupportedLayerError, match=r"norm \(LayerNorm\).*act \(PReLU\)"):
        quantize_model(WithLayerNorm(), QuantConfig())


class FunctionalSoftplus(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.softplus(x))


def test_unsupported_functional_call_is_reported():
    with pytest.raises(UnsupportedLayerError, match="softplus"):
        quantize_model(FunctionalSoftplus(), QuantConfig())


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            x = x * 2
        return self.fc(self.relu(x))


def test_untraceable_model_falls_back_to_module_swap_with_a_warning_under_the_papers_protocol_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_model(Untraceable(), QuantConfig(protocol="paper"))
    assert isinstance(q.relu, QuantActivation) and isinstance(q.fc, QuantLinear)
    assert any("could not trace" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedLayerError, match=r"deploy protocol needs a model that torch\.fx can trace.*Unt"):
            quantize_model(Untraceable(), QuantConfig())  # the export needs the dataflow
    assert not caught  # the refusal is the one message: no fallback warning before it


def test_config_validation_messages():
    with pytest.raises(DFQError, match="wbits"):
        QuantConfig(wbits=9)
    with pytest.raises(DFQError, match="act_observer"):
        QuantConfig(act_observer="max")
    with pytest.raises(DFQError, match="abits"):
        QuantConfig(overrides={"x": {"abits": 1}})
    cfg = QuantConfig(wbits=3, overrides={"conv1": {"wbits": 8}})
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- learned steps and rounding
def test_beta_schedule_shapes_by_hand():
    linear = BetaSchedule((20.0, 2.0), steps=6)  # the games' plug-in: linear over Q's learning iterations
    assert [linear(s) for s in (0, 3, 6, 9)] == [20.0, 11.0, 2.0, 2.0]  # held at the end
    cosine = BetaSchedule((20.0, 2.0), steps=10, anneal=cosine_anneal, warmup=2)  # recon: cosine after a warm-up
    assert not cosine.started(1) and cosine.started(2)
    assert cosine(2) == 20.0 and cosine(6) == pytest.approx(11.0) and cosine(10) == pytest.approx(2.0)


def test_quantizer_learning_opens_and_closes_a_phase():
    torch.manual_seed(SEED)
    q = quantize_model(create_model("resnet20a_cifar10"), QuantConfig(wbits=4, abits=4, weight_scales="stored"))
    calibrate(q, [torch.randn(2, 3, 32, 32)])
    weights, acts = list(weight_quantizers(q)), [aq for _, aq in act_quantizers(q)]
    for layer, wq in weights:
        wq.store(layer.weight)
    learning = QuantizerLearning(weights, acts)
    learned = learning.begin(rounding=True)
    assert [len(learned.rounding), len(learned.weight_steps), len(learned.act_steps)] == [len(weights)] * 2 + [
        len(acts)
    ]
    assert {aq.get_mode() for aq in acts} == {ActMode.LEARNED}
    with torch.no_grad():
        for alpha in learned.rounding:
            alpha.add_(torch.randn_like(alpha))
    total = learning.rounding_loss(4.0)
    torch.testing.assert_close(total, sum(wq.rounding_loss(4.0) for _, wq in weights))
    count = sum(alpha.numel() for alpha in learned.rounding)
    torch.testing.assert_close(learning.rounding_loss(4.0, reduction="mean"), total / count)
    learning.end()
    assert all(wq.alpha is None and not hasattr(wq, "step") for _, wq in weights)
    assert {aq.get_mode() for aq in acts} == {ActMode.FROZEN}
    assert not [k for k in q.state_dict() if k.endswith(LEARNED_SUFFIXES)]
    for layer, wq in weights:  # the weights lie on their stored grids
        codes = layer.weight.detach() / wq.scale
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
