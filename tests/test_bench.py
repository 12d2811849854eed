"""`dfq bench` times the real iteration and its plain-PyTorch lower bound."""

from __future__ import annotations

import json

import pytest

from dfq import cli


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
    for key in ("ms_median", "ms_min", "ms_max", "peak_rss_mib", "lower_bound_ms", "ratio_to_lower_bound"):
        assert r[key] > 0, key
    assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
    assert {"student_fwd_bwd", "fake_quantization", "generator_step"} <= set(r["phases_ms"])
    assert ("bns" in r["phases_ms"]) and r["shared_student_forward"] is (method == "adadfq")


def test_bench_bad_arguments(capsys):
    assert cli.main(["bench", "resnet20a_cifar10", "--method", "adadfq", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.startswith("dfq: error: --batch-size must be >= 1")
