"""Mixed precision on a real (tiny) model: the choices and their costs, the sensitivity pass, the Python API,
the ONNX record of the bits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfq
from dfq.errors import DFQError
from dfq.methods import ZeroQConfig
from dfq.mixed import MixedConfig, bits_of, measure_sensitivity, model_tensors, tensors_of
from dfq.quant import QuantConfig, quantize_model
from dfq.testing import INPUT_SIZE, ChainedSumsNet, tiny_classifier

SMALL_POOL = {"num_samples": 8, "synth_steps": 2, "synth_batch": 8}
FAST = ZeroQConfig(steps=2, num_samples=4)


def _quantize(mixed: MixedConfig, **kwargs) -> dfq.QuantizationResult:
    return dfq.quantize(tiny_classifier(), QuantConfig(), FAST, example_inputs=torch.zeros(1, *INPUT_SIZE),
                        progress=False, mixed=mixed, **kwargs)  # fmt: skip


def test_choices_and_costs_of_a_tiny_model() -> None:
    t = tensors_of(tiny_classifier(), QuantConfig(), INPUT_SIZE)
    names = [c.name for c in t.choices]
    assert [n for n in names if n.endswith(":w")] == ["conv1:w", "layer1.0:w", "layer2.0:w", "fc:w"]
    assert "conv1:a" not in names  # the model input keeps its 8 bits
    layers = {lay.key: lay for lay in t.layers}
    assert (layers["conv1"].reads, layers["conv1"].input_bits) == (None, 8)
    # multiply-accumulates: outputs x (in_channels / groups x kernel area)
    assert layers["conv1"].macs == 8 * 8 * 8 * 27 and layers["layer1.0"].macs == 8 * 8 * 8 * 72
    assert layers["layer2.0"].macs == 16 * 4 * 4 * 72 and layers["fc"].macs == 10 * 16
    assert t.params == 8 * 27 + 8 * 72 + 16 * 72 + 16 * 10
    assert t.weight_bits(t.uniform(4, 4)) == 4 * t.params
    assert {c.key for c in t.choices if c.pointwise} == {"fc"}


def test_the_sum_of_chained_residuals_is_a_choice_its_readers_read() -> None:
    t = tensors_of(ChainedSumsNet().eval(), QuantConfig(), INPUT_SIZE)
    assert {"blocks.0.add_out:a", "blocks.1.add_out:a"} <= {c.name for c in t.choices}
    assert {lay.key: lay.reads for lay in t.layers}["blocks.1.conv"] == "blocks.0.add_out:a"


@pytest.mark.parametrize("model", [tiny_classifier, ChainedSumsNet])
def test_an_allocation_as_overrides_sets_exactly_those_bits(model) -> None:
    """Every choice name is the override key that sets it: the bits read back from Q are the ones asked for."""
    p = model()
    t = tensors_of(p, QuantConfig(), INPUT_SIZE)
    wanted = {c.name: (2, 3, 5, 6, 7)[i % 5] for i, c in enumerate(t.choices)}
    overrides: dict = {}
    for name, b in wanted.items():
        key, kind = name.rsplit(":", 1)
        overrides.setdefault(key, {})["wbits" if kind == "w" else "abits"] = b
    q = quantize_model(p, QuantConfig(overrides=overrides))
    assert bits_of(q, model_tensors(q, torch.zeros(1, *INPUT_SIZE))) == wanted


def test_sensitivity_is_larger_at_fewer_bits() -> None:
    p = tiny_classifier()
    t = tensors_of(p, QuantConfig(), INPUT_SIZE)
    options = {c.name: (2, 8) for c in t.choices}
    pool = torch.randn(16, *INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    s = measure_sensitivity(p, QuantConfig(), pool, options, batch_size=8, progress=False)
    assert s.loss.keys() == options.keys()
    for name, row in s.loss.items():
        assert row[2] > row[8] >= 0, name
    again = type(s).from_dict(json.loads(json.dumps(s.to_dict())))
    assert again.loss == s.loss


def test_quantize_under_budgets(tmp_path: Path) -> None:
    result = _quantize(MixedConfig(size="W4A4", bops="W4A4", **SMALL_POOL), run_dir=tmp_path)
    alloc = result.allocation
    t = tensors_of(tiny_classifier(), result.quant, INPUT_SIZE)
    assert bits_of(result.model, model_tensors(result.model, torch.zeros(1, *INPUT_SIZE))) == alloc.bits
    assert alloc.weight_bytes <= t.weight_bits(t.uniform(4, 4)) / 8 == alloc.budget["weight_bytes"]
    assert alloc.bops <= t.bops(t.uniform(4, 4)) == alloc.budget["bops"]
    assert result.summary["weight_bytes"] == alloc.weight_bytes and result.summary["bops"] == alloc.bops
    assert result.summary["mixed"] is True and result.summary["sensitivity_s"] > 0
    assert (tmp_path / "sensitivity.json").is_file()
    again = _quantize(MixedConfig(size="W4A4", bops="W4A4", **SMALL_POOL), run_dir=tmp_path)
    assert again.allocation.bits == alloc.bits and again.allocation.sensitivity_s == 0  # read from the cache


def test_accelerator_pairs_and_pointwise_rule() -> None:
    mixed = MixedConfig(size="2024B", pairs=["W4A8", "W8A8"], pointwise_only_wbits=[4], **SMALL_POOL)
    result = _quantize(mixed)
    t = tensors_of(tiny_classifier(), result.quant, INPUT_SIZE)
    bits = result.allocation.bits
    for lay in t.layers:
        assert (bits[f"{lay.key}:w"], t.input_bits_of(lay, bits)) in {(4, 8), (8, 8)}
    assert all(bits[c.name] == 8 for c in t.choices if c.kind == "w" and not c.pointwise)
    assert bits["fc:w"] == 4  # the only layer that may take 4 bits; 2,024 bytes is all 8-bit but fc at 4


def test_user_overrides_pin_their_choices() -> None:
    result = dfq.quantize(tiny_classifier(), QuantConfig(overrides={"conv1": {"wbits": 8}}), FAST,
                          example_inputs=torch.zeros(1, *INPUT_SIZE), progress=False,
                          mixed=MixedConfig(avg_wbits=3, **SMALL_POOL))  # fmt: skip
    assert result.allocation.bits["conv1:w"] == 8
    assert result.allocation.weight_bytes * 8 <= 3 * tensors_of(tiny_classifier(), result.quant, INPUT_SIZE).params


def test_onnx_records_the_chosen_bits(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    result = _quantize(MixedConfig(size="W3A4", bops="W3A4", **SMALL_POOL))
    dfq.export_onnx(result, tmp_path / "q.onnx")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    recorded = json.loads(meta["layer_bits"])
    assert json.loads(meta["mixed"]) is True
    bits = result.allocation.bits
    t = tensors_of(tiny_classifier(), result.quant, INPUT_SIZE)
    assert recorded == {lay.key: [bits[f"{lay.key}:w"], t.input_bits_of(lay, bits)] for lay in t.layers}


@pytest.mark.parametrize(
    ("quant", "mixed", "message"),
    [
        (QuantConfig(protocol="paper"), MixedConfig(size="W4A4"), "needs the deploy protocol"),
        (QuantConfig(ends_bits=8), MixedConfig(size="W4A4"), "drop quant.ends_bits"),
        (QuantConfig(), MixedConfig(size="10B", **SMALL_POOL), "no bit allocation fits"),
    ],
)
def test_refusals(quant: QuantConfig, mixed: MixedConfig, message: str) -> None:
    with pytest.raises(DFQError, match=message):
        dfq.quantize(tiny_classifier(), quant, FAST, example_inputs=torch.zeros(1, *INPUT_SIZE), progress=False,
                     mixed=mixed)  # fmt: skip


def test_a_budget_is_required() -> None:
    with pytest.raises(DFQError, match="needs a budget"):
        MixedConfig()
    with pytest.raises(DFQError, match="from 2 to 8"):
        MixedConfig(size="1MB", wbits=[1, 4])


def test_a_method_that_learns_its_rounding_keeps_the_weights_at_the_budgets_bits() -> None:
    every = [2, 3, 4, 5, 6, 8]
    assert MixedConfig(size="W4A4", bops="W4A4").for_method(learns_rounding=True).wbits == [4]
    assert MixedConfig(size="w3a3").for_method(learns_rounding=True).wbits == [3]
    assert MixedConfig(size="W4A4").for_method(learns_rounding=False).wbits == every
    for open_budget in ({"size": "180KB"}, {"bops": "W4A4"}, {"avg_wbits": 4}, {"size": "W4A4", "pairs": ["W4A8"]},
                        {"size": "W4A4", "pointwise_only_wbits": [4]}, {"size": "W4A4", "avg_wbits": 3}):  # fmt: skip
        assert MixedConfig(**open_budget).for_method(learns_rounding=True).wbits == every, open_budget
    assert MixedConfig(size="W4A4", wbits=[8, 3]).for_method(learns_rounding=True).wbits == [3, 8]  # the user's


def test_the_run_config_saves_the_search_space_its_method_gets() -> None:
    from dfq.config import resolve_config

    recon = resolve_config(overrides={"method.name": "recon", "mixed.size": "W4A4", "mixed.bops": "W4A4"})
    assert recon.mixed.wbits == [4] and recon.to_dict()["mixed"]["wbits"] == [4]
    zeroq = resolve_config(overrides={"method.name": "zeroq", "mixed.size": "W4A4", "mixed.bops": "W4A4"})
    assert zeroq.mixed.wbits == [2, 3, 4, 5, 6, 8]
    assert resolve_config(zeroq.to_dict(), {"method.name": "zeroq"}).mixed == zeroq.mixed  # reloads as saved


def test_the_weights_of_a_rounding_method_stay_at_the_budgets_bits() -> None:
    recon = dfq.methods.ReconConfig(num_samples=4, synth_batch=4, synth_steps=1, iters=1, batch_size=4)
    result = dfq.quantize(tiny_classifier(), QuantConfig(), recon, example_inputs=torch.zeros(1, *INPUT_SIZE),
                          progress=False, mixed=MixedConfig(size="W3A4", bops="W3A4", **SMALL_POOL))  # fmt: skip
    bits = result.allocation.bits
    assert {b for name, b in bits.items() if name.endswith(":w")} == {3}
    assert len({b for name, b in bits.items() if name.endswith(":a")}) > 1  # the activations are allocated


def test_learned_rounding_fits_the_layer_output_and_restores_the_weight() -> None:
    from dfq.mixed.rounding import learned_rounding
    from dfq.quant.clip import least_error_weight_grid

    q = quantize_model(tiny_classifier(), QuantConfig(wbits=2, weight_scales="stored"))
    layer = q.get_submodule("layer1.0")
    wq = layer.weight_quantizer
    least_error_weight_grid(wq, layer.weight.detach())
    x = torch.randn(16, 8, 8, 8, generator=torch.Generator().manual_seed(0)).relu()
    w0, scale0 = layer.weight.detach().clone(), wq.scale.clone()

    def error() -> float:
        with torch.no_grad():
            out, target = layer._conv_forward(x, wq(layer.weight), None), layer._conv_forward(x, w0, None)
            return float((out - target).pow(2).sum())

    nearest = error()
    with learned_rounding(layer, x, steps=200):
        learned = error()
        codes = layer.weight / wq.scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # the weight lies on its (learned) grid
    assert learned < nearest
    assert torch.equal(layer.weight, w0) and torch.equal(wq.scale, scale0)


def test_the_sensitivity_cache_is_not_reused_for_other_weights(tmp_path: Path) -> None:
    mixed = MixedConfig(size="W4A4", **SMALL_POOL)
    first = _quantize(mixed, run_dir=tmp_path)
    assert first.allocation.sensitivity_s > 0
    other = dfq.quantize(tiny_classifier(seed=7), QuantConfig(), FAST, example_inputs=torch.zeros(1, *INPUT_SIZE),
                         progress=False, mixed=mixed, run_dir=tmp_path)  # fmt: skip
    assert other.allocation.sensitivity_s > 0  # measured again, not read from the cache


class _WithAux(nn.Module):
    """GoogLeNet's pattern: an auxiliary classifier that runs only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.aux, self.fc = nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flatten(F.adaptive_avg_pool2d(self.relu(self.bn(self.conv(x))), 1), 1)
        return self.fc(y) + self.aux(y) if self.training else self.fc(y)


def test_layers_that_never_run_in_evaluation_are_not_choices() -> None:
    t = tensors_of(_WithAux().eval(), QuantConfig(), INPUT_SIZE)
    assert [c.name for c in t.choices if c.kind == "w"] == ["conv:w", "fc:w"]
    assert t.params == 8 * 27 + 8 * 10


def test_an_allocation_does_not_depend_on_what_ran_before_it_in_the_process() -> None:
    """A sweep runs its points in one process: each point's sensitivities must be those of a fresh run."""
    first = _quantize(MixedConfig(size="W4A4", bops="W4A4", **SMALL_POOL))
    torch.rand(1000)  # what an earlier point leaves behind in the global stream
    again = _quantize(MixedConfig(size="W4A4", bops="W4A4", **SMALL_POOL))
    assert again.allocation.predicted_loss == first.allocation.predicted_loss
    assert again.allocation.bits == first.allocation.bits
