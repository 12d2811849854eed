"""No silent failure: a NaN/Inf in synthesis or calibration is one clear error, and an unsupported model is refused
before any synthesis runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfq
from dfq.errors import DFQError, UnsupportedLayerError
from dfq.methods import ReconConfig, ZeroQConfig
from dfq.quant import QuantConfig, QuantLinear, calibrate, quantize_model
from dfq.testing import INPUT_SIZE, tiny_classifier

EXAMPLE = torch.zeros(1, *INPUT_SIZE)


def test_a_non_finite_bns_loss_stops_the_synthesis_with_one_clear_error():
    p = tiny_classifier()
    p.bn1.running_var[0] = float("inf")  # a broken checkpoint: the BNS loss is infinite from step 0
    for method in (ZeroQConfig(steps=3, num_samples=2), ReconConfig(num_samples=2, synth_steps=3, iters=1)):
        with pytest.raises(DFQError, match=r"synthesis stopped at step 0: the BatchNorm-statistics loss is inf"):
            dfq.quantize(p, QuantConfig(wbits=8, abits=8), method, example_inputs=EXAMPLE, progress=False)


def test_calibration_on_non_finite_inputs_names_the_site():
    q = quantize_model(tiny_classifier(), QuantConfig(wbits=8, abits=8))
    x = torch.randn(2, *INPUT_SIZE)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DFQError, match=r"calibration gave a non-finite range at \S+_quantizer"):
        calibrate(q, [x])


class _PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("method", [ZeroQConfig(steps=2), ReconConfig(num_samples=2, synth_steps=2, iters=1)])
def test_an_unsupported_layer_is_refused_before_the_synthesis(method, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the synthesis ran before the refusal")

    monkeypatch.setattr("dfq.methods.zeroq.distill_inputs", never)
    monkeypatch.setattr("dfq.methods.recon.synthesize_pool", never)
    with pytest.raises(UnsupportedLayerError, match=r"act \(PReLU\)"):
        dfq.quantize(_PReLUNet().eval(), QuantConfig(), method, example_inputs=EXAMPLE)


class _LibraryLinear(nn.Linear):
    """Like timm's Linear: a subclass of nn.Linear whose forward calls F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def test_a_library_subclass_of_linear_is_quantized_as_a_linear():
    model = nn.Sequential(nn.Flatten(), _LibraryLinear(3 * 4 * 4, 5)).eval()
    q = quantize_model(model, QuantConfig(wbits=8, abits=8))
    assert isinstance(q[1], QuantLinear)
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(q(x), model(x), atol=0.05)
