"""`dfq bench` times the real iteration and its plain-PyTorch lower bound."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dfq import cli
from dfq.bench import PlainBNS, WeightFQ
from dfq.generators import BNStatsLoss
from dfq.quant import Granularity, QuantSpec, WeightQuantizer


@pytest.mark.parametrize("method", ["adadfq", "gdfq"])
def test_bench_json(method, capsys):
    rc = cli.main(
        [
            "bench",
            "resnet20a_cifar10",
            "--method",
            method,
            "--batch-size",
            "4",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--json",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    r = json.loads(out[-1])
    for key in ("ms_median", "ms_min", "ms_max", "peak_rss_mib", "lower_bound_ms", "ratio_to_lower_bound",
                "float_floor_ms", "ratio_to_float_floor"):  # fmt: skip
        assert r[key] > 0, key
    assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
    assert {"student_fwd_bwd", "fake_quantization", "generator_step"} <= set(r["phases_ms"])
    assert ("bns" in r["phases_ms"]) and r["shared_student_forward"] is (method == "adadfq")


def test_bench_bad_arguments(capsys):
    assert cli.main(["bench", "resnet20a_cifar10", "--method", "adadfq", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.startswith("dfq: error: --batch-size must be >= 1")


def test_lower_bound_does_the_same_quantization_and_bns_math():
    """The plain bound's built-in fake quantization and var_mean BNS compute what dfq's modules compute."""
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    dfq_w = WeightQuantizer(QuantSpec(4, False, Granularity.PER_CHANNEL))(w)
    torch.testing.assert_close(WeightFQ(4)(w), dfq_w, rtol=0, atol=1e-6)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model.eval()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with BNStatsLoss(model) as bns:
        model(x)
        expected = bns.loss()
    plain = PlainBNS(model)
    model(x)
    torch.testing.assert_close(plain.loss(), expected)
